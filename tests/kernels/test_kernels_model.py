"""Two paths, one answer: a whole model decoded through the Triton kernels equals the reference."""

from __future__ import annotations

import pytest
import torch

from videovae.engine import EngineOptions, VideoGeometry, decode_frames, decode_tensor
from videovae.kernels import triton_available
from videovae.kernels.tolerance import check_model, exact_fp32
from videovae.models import from_preset

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def test_tiny_decode_with_triton_kernels_matches_reference(monkeypatch, device):
    torch.manual_seed(0)
    model = from_preset("tiny").eval().to(device)
    z = torch.randn(1, 4, 2, 2, 2, device=device)
    geometry = VideoGeometry(frames=5, height=13, width=15, padded_frames=5, padded_height=16, padded_width=16)
    opts = EngineOptions(chunk_frames=4, device=device)
    outputs = {}
    with exact_fp32():  # TF32 would turn last-bit differences of the fused ops into 1e-3 (tolerance.py)
        for backend in ("reference", "triton"):
            monkeypatch.setenv("VIDEOVAE_KERNELS", backend)
            outputs[backend] = (
                decode_tensor(model, z, chunk_frames=4, device=device),
                torch.cat(list(decode_frames(model, z, geometry, opts))),
            )
    for i, what in enumerate(("decoded clip", "uint8 frames")):
        problem = check_model(outputs["triton"][i], outputs["reference"][i], what)
        assert problem is None, problem
    frames_diff = (outputs["triton"][1].int() - outputs["reference"][1].int()).abs()
    assert (frames_diff > 0).float().mean() < 0.01  # one-level differences are rare
