"""Backend selection of ``videovae.kernels`` (``VIDEOVAE_KERNELS=auto|reference|triton``)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import videovae.kernels as K


def _calls(x):
    """Call every public op once on small tensors derived from ``x`` (5-D float)."""
    c = x.shape[1]
    K.group_norm_silu(x, torch.ones(c), torch.zeros(c), 3)
    K.rms_norm_silu(x, torch.ones(c))
    K.to_uint8_frames(x[:, :3])
    K.causal_pad3d(x, 2, 1, 1)
    canvas = torch.zeros((1, c, x.shape[2], 9, 9))
    wsum = torch.zeros((9, 9))
    K.blend_tile_(canvas, wsum, x, 1, 2, 1, 1, 1, 1)
    K.normalize_canvas(canvas, wsum)


@pytest.fixture
def no_triton_impl(monkeypatch):
    """Fail loudly if any op reaches for a Triton implementation."""

    def boom(op):
        raise AssertionError(f"Triton implementation of {op} was selected")

    monkeypatch.setattr(K, "_triton_impl", boom)


@pytest.mark.parametrize("value", ["reference", "auto", "", "  Reference "])
def test_reference_and_auto_on_cpu_use_reference(value, monkeypatch, no_triton_impl):
    monkeypatch.setenv("VIDEOVAE_KERNELS", value)
    x = torch.randn(1, 6, 3, 5, 7)
    _calls(x)
    y = K.group_norm_silu(x, None, None, 3, per_frame=False)
    want = K.group_norm_silu_ref(x, None, None, 3, per_frame=False)
    assert torch.equal(y, want)


def test_auto_is_default(monkeypatch):
    monkeypatch.delenv("VIDEOVAE_KERNELS", raising=False)
    assert K.kernel_backend() == "auto"


def test_invalid_value_raises(monkeypatch):
    monkeypatch.setenv("VIDEOVAE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="VIDEOVAE_KERNELS"):
        K.kernel_backend()
    with pytest.raises(ValueError, match="VIDEOVAE_KERNELS"):
        K.rms_norm_silu(torch.randn(1, 4, 2, 3, 3), torch.ones(4))


def test_backend_is_read_at_call_time(monkeypatch, no_triton_impl):
    x = torch.randn(1, 6, 2, 3, 3)
    monkeypatch.setenv("VIDEOVAE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises((RuntimeError, AssertionError)):
        K.to_uint8_frames(x[:, :3])
    monkeypatch.setenv("VIDEOVAE_KERNELS", "reference")
    K.to_uint8_frames(x[:, :3])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_forced_triton_selects_triton(monkeypatch):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    monkeypatch.setenv("VIDEOVAE_KERNELS", "triton")
    seen = []
    real = K._triton_impl
    monkeypatch.setattr(K, "_triton_impl", lambda op: seen.append(op) or real(op))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.rand(1, 3, 2, 3, 5, device=device) * 2 - 1
    assert torch.equal(K.to_uint8_frames(x).cpu(), K.to_uint8_frames_ref(x).cpu())
    assert seen == ["to_uint8_frames"]


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_graph_capture_gets_the_reference_in_one_graph(backend, monkeypatch, no_triton_impl):
    """Under torch.compile every op is the reference, whatever the backend: one graph, no break
    (fullgraph=True raises on any), and the reference's values."""
    monkeypatch.setenv("VIDEOVAE_KERNELS", backend)
    monkeypatch.setattr(K, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch._dynamo.reset()
    x = torch.randn(1, 6, 3, 5, 7)
    w, b = torch.rand(6) + 0.5, torch.randn(6)

    def ops(x):
        y = K.group_norm_silu(x, w, b, 3) + K.rms_norm_silu(x, w)
        return K.to_uint8_frames(K.causal_pad3d(y, 2, 1, 1)[:, :3])

    compiled = torch.compile(ops, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), K.to_uint8_frames_ref(K.causal_pad3d_ref(
        K.group_norm_silu_ref(x, w, b, 3) + K.rms_norm_silu_ref(x, w), 2, 1, 1)[:, :3]))


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("VIDEOVAE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(K, "triton_available", lambda: True)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        K.causal_pad3d(torch.randn(1, 2, 2, 3, 3), 2)


def test_import_and_cpu_use_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, videovae.kernels as K\n"
        "assert not K.triton_available()\n"
        "x = torch.randn(1, 6, 3, 5, 7)\n"
        "y = K.group_norm_silu(x, None, None, 3)\n"
        "assert y.shape == x.shape\n"
        "assert K.to_uint8_frames(x[:, :3]).dtype == torch.uint8\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VIDEOVAE_KERNELS"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
