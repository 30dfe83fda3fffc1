"""Test-wide settings.

``torch.empty`` / ``torch.empty_like`` are poisoned with NaN so that an output a kernel or layer
forgets to write shows up as NaN instead of plausible leftover memory.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_empty = torch.empty
_empty_like = torch.empty_like


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    return t


@functools.wraps(_empty)
def _nan_empty(*args, **kwargs):
    return _poison(_empty(*args, **kwargs))


@functools.wraps(_empty_like)
def _nan_empty_like(*args, **kwargs):
    return _poison(_empty_like(*args, **kwargs))


torch.empty = _nan_empty
torch.empty_like = _nan_empty_like

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The sample clips beside the checkout; tests using it skip where it is absent."""
    if not (SHARED_DATA / "world.mp4").exists():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
