"""Kernel-test setup: run Triton kernels through the interpreter when there is no CUDA GPU.

``TRITON_INTERPRET`` must be set before Triton decorates a kernel; the kernel modules of
``videovae.kernels`` are imported lazily (first call), so setting it here at import time suffices.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_real_empty = torch.empty
_real_empty_like = torch.empty_like


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.uint8:
        return t.fill_(77)
    return t


@pytest.fixture
def device() -> str:
    """``cuda`` when a GPU is present (compiled kernels), else ``cpu`` (interpreted kernels)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poison_empty(monkeypatch):
    """Make ``torch.empty`` / ``torch.empty_like`` return NaN-filled (uint8: 77-filled) tensors, so
    that any output element a kernel forgets to write shows up in the comparison."""
    monkeypatch.setattr(torch, "empty", lambda *a, **k: _poison(_real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_real_empty_like(*a, **k)))
