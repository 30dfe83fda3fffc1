"""Turbo-VAED decoder family: shapes, exact streaming and tiling, explicit caches, errors,
parameter budgets against the teachers, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from videovae.checkpoint import load_checkpoint, save_checkpoint
from videovae.engine import decode_chunks
from videovae.layers import CausalCache
from videovae.models import PRESETS, build_model, from_preset
from videovae.models.turbo_vaed import (
    TEACHERS,
    DecoderOnlyError,
    TurboVAED,
    TurboVAEDConfig,
    teacher_parameter_ratio,
)


@pytest.fixture(scope="module")
def model() -> TurboVAED:
    torch.manual_seed(0)
    m = from_preset("turbo-tiny").eval()
    # non-trivial norm affine parameters, so a mistake there cannot hide behind ones/zeros
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def _latents(t: int, h: int = 4, w: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 4, t, h, w, generator=torch.Generator().manual_seed(seed))


def test_registered_and_geometry(model):
    assert PRESETS["turbo-tiny"][0] == "turbo-vaed"
    tiny = PRESETS["tiny"][1]
    cfg = model.config
    assert (model.time_factor, model.space_factor, model.latent_channels) == (
        tiny.time_factor, tiny.space_factor, tiny.latent_channels
    )
    assert cfg.exactly_streamable and cfg.halo_tiling_exact
    assert TurboVAEDConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert model.family == "turbo-vaed" and isinstance(build_model("turbo-vaed", cfg.to_dict()), TurboVAED)


@pytest.mark.parametrize("t", [1, 2, 4])
@torch.no_grad()
def test_shapes(model, t):
    y = model.decode(_latents(t))
    assert y.shape == (1, 3, 1 + (t - 1) * 4, 32, 40) and y.dtype == torch.float32
    assert torch.isfinite(y).all()


@torch.no_grad()
def test_patch_size_and_odd_factors():
    cfg = TurboVAEDConfig(latent_channels=2, channels=(8, 4), blocks=(1, 0), time_up=(3,), space_up=(2,),
                          kernel_size=3, patch_size=2)
    m = TurboVAED(cfg).eval()
    assert (m.time_factor, m.space_factor) == (3, 4)
    assert m.decode(torch.randn(1, 2, 3, 2, 3)).shape == (1, 3, 7, 8, 12)


@torch.no_grad()
def test_chunked_equals_whole(model):
    z = _latents(7)
    whole = model.decode(z)
    cache = CausalCache()
    parts = []
    for a, b in [(0, 2), (2, 3), (3, 6), (6, 7)]:
        y, cache = model.decode_chunk(z[:, :, a:b], cache)
        parts.append(y)
    assert (torch.cat(parts, dim=2) - whole).abs().max() <= 1e-5
    # through the engine, with and without tiles
    streamed = torch.cat(list(decode_chunks(model, z)), dim=2)
    assert (streamed - whole).abs().max() <= 1e-5
    engine = model.decode_video(z, chunk_frames=8)
    assert (engine - whole).abs().max() <= 1e-5


@torch.no_grad()
def test_tiled_equals_untiled(model):
    z = _latents(3, 6, 7, seed=2)
    whole = model.decode(z)
    tiled = model.decode_video(z, chunk_frames=4, tile=32)  # 2 x 2 tiles
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max() <= 1e-5
    # an explicitly tight halo still covers the receptive field
    assert model.decoder_receptive_radius() < 8


@torch.no_grad()
def test_caches_are_explicit(model):
    z = _latents(3)
    first = CausalCache()
    y1, out = model.decode_chunk(z, first)
    assert out is first and first.frames  # state lives in the cache we passed, nowhere else
    keys = set(first.frames)
    assert "decoder.conv_in" in keys and any(k.endswith(".upsample") for k in keys)
    # the same chunk twice from a copy of the state gives the same frames: no hidden state
    step = _latents(2, seed=5)
    a, _ = model.decode_chunk(step, first.fork(None))
    b, _ = model.decode_chunk(step, first.fork(None))
    assert torch.equal(a, b) and a.shape[2] == 8
    # whole-clip calls leave no state behind
    assert torch.equal(model.decode(z), y1)


def test_errors(model):
    with pytest.raises(DecoderOnlyError, match="decoder-only"):
        model.encode(torch.zeros(1, 3, 5, 32, 32))
    with pytest.raises(DecoderOnlyError, match="teacher"):
        model.encode_video(torch.zeros(1, 3, 5, 32, 32))
    with pytest.raises(ValueError, match=r"expected latents \(N, 4, T, h, w\)"):
        model.decode(torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="expected latents"):
        model.decode(torch.zeros(4, 2, 4, 4))
    with pytest.raises(TypeError, match="float latents"):
        model.decode(torch.zeros(1, 4, 2, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="blocks needs 2 entries"):
        TurboVAEDConfig(channels=(8, 8), blocks=(1,), time_up=(2,), space_up=(2,))
    with pytest.raises(ValueError, match="kernel_size must be a positive odd"):
        TurboVAEDConfig(kernel_size=4)
    with pytest.raises(ValueError, match="unknown TurboVAEDConfig fields: colour"):
        TurboVAEDConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="not a turbo preset"):
        teacher_parameter_ratio("tiny")


def test_smaller_than_teachers():
    for name, teacher in TEACHERS.items():
        with torch.device("meta"):
            student, parent = from_preset(name), from_preset(teacher)
        assert (student.time_factor, student.space_factor, student.latent_channels) == (
            parent.time_factor, parent.space_factor, parent.latent_channels
        ), name
        counts = student.num_parameters()
        assert counts["encoder"] == 0 and counts["total"] == counts["decoder"]
        assert counts["decoder"] < 0.25 * parent.num_parameters()["decoder"], name
    assert teacher_parameter_ratio("turbo-tiny") == pytest.approx(
        from_preset("turbo-tiny").num_parameters()["decoder"] / from_preset("tiny").num_parameters()["decoder"]
    )


@torch.no_grad()
def test_checkpoint_roundtrip(model, tmp_path):
    path = tmp_path / "turbo.safetensors"
    digest = save_checkpoint(path, model)
    loaded = load_checkpoint(path)
    assert isinstance(loaded, TurboVAED) and loaded.config == model.config
    assert loaded._videovae_digest == digest
    z = _latents(3)
    assert torch.equal(loaded.decode(z), model.decode(z))


def test_shuffle_3d_equals_the_decoupled_form_and_stays_channels_last():
    from videovae.models.turbo_vaed import shuffle_3d, shuffle_3d_decoupled

    for st, s in ((2, 2), (1, 2), (2, 1), (1, 1), (4, 3)):
        y = torch.randn(2, 3 * st * s * s, 3, 4, 5)
        fast = shuffle_3d(y, st, s)
        assert torch.equal(fast, shuffle_3d_decoupled(y, st, s))
        assert fast.is_contiguous(memory_format=torch.channels_last_3d) or st * s == 1  # (a no-op view)
        cl = y.contiguous(memory_format=torch.channels_last_3d)
        assert torch.equal(shuffle_3d(cl, st, s), fast)


def test_causal_pad_keeps_channels_last():
    from videovae.kernels import causal_pad3d

    x = torch.randn(1, 6, 3, 4, 5).contiguous(memory_format=torch.channels_last_3d)
    for cache in (None, torch.randn(1, 6, 2, 4, 5)):
        for pad_h in (0, 1):
            out = causal_pad3d(x, 2, pad_h, pad_h, cache=cache, time_mode="zeros")
            assert out.is_contiguous(memory_format=torch.channels_last_3d)
            ref = causal_pad3d(x.contiguous(), 2, pad_h, pad_h, cache=cache, time_mode="zeros")
            assert ref.is_contiguous() and torch.equal(out, ref)
