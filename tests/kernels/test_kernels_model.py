"""Two paths, one answer: a whole model decoded through the Triton kernels equals the reference."""

from __future__ import annotations

import pytest
import torch

from videovae.engine import EngineOptions, VideoGeometry, decode_frames, decode_tensor
from videovae.kernels import triton_available
from videovae.models import from_preset

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def test_tiny_decode_with_triton_kernels_matches_reference(monkeypatch, device):
    torch.manual_seed(0)
    model = from_preset("tiny").eval().to(device)
    z = torch.randn(1, 4, 2, 2, 2, device=device)
    geometry = VideoGeometry(frames=5, height=13, width=15, padded_frames=5, padded_height=16, padded_width=16)
    opts = EngineOptions(chunk_frames=4, device=device)
    outputs = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("VIDEOVAE_KERNELS", backend)
        outputs[backend] = (
            decode_tensor(model, z, chunk_frames=4, device=device),
            torch.cat(list(decode_frames(model, z, geometry, opts))),
        )
    torch.testing.assert_close(outputs["triton"][0], outputs["reference"][0], atol=1e-4, rtol=0)
    frames_diff = (outputs["triton"][1].int() - outputs["reference"][1].int()).abs()
    assert frames_diff.max() <= 1 and (frames_diff > 0).float().mean() < 0.01
