"""CausalVAE: shapes, configs, posterior, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from videovae import load
from videovae.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from videovae.models import PRESETS, from_preset
from videovae.models.causal_vae import CausalVAE, CausalVAEConfig


@pytest.fixture(scope="module")
def tiny() -> CausalVAE:
    torch.manual_seed(0)
    return from_preset("tiny").eval()


@pytest.mark.parametrize("frames", [1, 5, 17])
def test_shapes(tiny, frames):
    x = torch.rand(2, 3, frames, 32, 48) * 2 - 1
    with torch.no_grad():
        posterior = tiny.encode(x)
        assert posterior.mean.shape == (2, 4, 1 + (frames - 1) // 4, 4, 6)
        y = tiny.decode(posterior.mean)
    assert y.shape == x.shape


def test_image_is_a_one_frame_video(tiny):
    """Frame 0 is compressed alone: its latent does not depend on later frames."""
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        first = tiny.encode(x[:, :, :1]).mean
        whole = tiny.encode(x).mean
    torch.testing.assert_close(first, whole[:, :, :1], atol=1e-5, rtol=0)


def test_bad_inputs_are_named(tiny):
    with pytest.raises(ValueError, match="frame count 6"):
        tiny.encode(torch.zeros(1, 3, 6, 32, 32))
    with pytest.raises(ValueError, match="size 30x32"):
        tiny.encode(torch.zeros(1, 3, 5, 30, 32))
    with pytest.raises(ValueError, match="NCTHW"):
        tiny.encode(torch.zeros(3, 5, 32, 32))
    with pytest.raises(TypeError, match="uint8"):
        tiny.encode(torch.zeros(1, 3, 5, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="latents"):
        tiny.decode(torch.zeros(1, 3, 2, 4, 4))


def test_posterior_sample_kl(tiny):
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = tiny.encode(x)
    a = posterior.sample(torch.Generator().manual_seed(3))
    b = posterior.sample(torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, posterior.mode())
    kl = posterior.kl()
    assert kl.shape == (1,) and kl.item() > 0
    expected = 0.5 * (posterior.mean**2 + posterior.logvar.exp() - 1 - posterior.logvar).sum()
    torch.testing.assert_close(kl[0], expected)


def test_latent_scaling_roundtrip():
    model = CausalVAE(CausalVAEConfig(base_channels=8, channel_mult=(1, 1), temporal_down=(True,),
                                      encoder_block_kinds=("3d", "3d"), num_res_blocks=1, norm_groups=4,
                                      scaling_factor=0.5, shift_factor=0.1))
    z = torch.randn(1, 4, 2, 3, 3)
    torch.testing.assert_close(model.unscale_latents(model.scale_latents(z)), z)
    torch.testing.assert_close(model.scale_latents(z), (z - 0.1) * 0.5)


def test_config_roundtrip_and_validation():
    for _family, cfg in PRESETS.values():
        assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown CausalVAEConfig fields: colour"):
        CausalVAEConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="temporal_down needs 3 entries"):
        CausalVAEConfig(temporal_down=(True,))
    with pytest.raises(ValueError, match="norm must be"):
        CausalVAEConfig(norm="batch")


def test_preset_sizes():
    tiny = from_preset("tiny").num_parameters()["total"]
    assert 100_000 < tiny < 1_000_000
    base = from_preset("base")
    assert (base.time_factor, base.space_factor, base.latent_channels) == (4, 8, 4)
    assert base.num_parameters()["total"] > 100_000_000
    assert PRESETS["tiny"][1].exactly_streamable and PRESETS["base"][1].exactly_streamable
    assert PRESETS["tiny-rms"][1].halo_tiling_exact and not PRESETS["tiny"][1].halo_tiling_exact
    with pytest.raises(ValueError, match="unknown model preset"):
        from_preset("huge")


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = from_preset("tiny").train()
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1

    def grads():
        model.zero_grad()
        recon, posterior = model(x, sample=False)
        ((recon - x).abs().mean() + 1e-6 * posterior.kl().mean()).backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_gradient_checkpointing(True)
    checkpointed = grads()
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_checkpoint_roundtrip(tmp_path, tiny):
    path = tmp_path / "w.safetensors"
    digest = save_checkpoint(path, tiny)
    loaded = load(path)
    assert loaded.config == tiny.config and loaded._videovae_digest == digest
    x = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x).mean, tiny.encode(x).mean)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_checkpoint_errors(tmp_path, tiny):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a videovae checkpoint"):
        load_checkpoint(foreign)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="no such weights file"):
        load_checkpoint(tmp_path / "missing.safetensors")
    # a checkpoint whose tensors do not fit its config names the keys
    path = tmp_path / "w.safetensors"
    save_checkpoint(path, tiny)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    state.pop("decoder.conv_out.conv.bias")
    state["extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing keys: decoder.conv_out.conv.bias.*unexpected keys: extra"):
        load_checkpoint(broken)


def test_streaming_decoder_runs_its_full_rate_levels_frame_by_frame(tiny, monkeypatch):
    """After the last temporal upsampler an exactly streamable decoder runs frame by frame through
    the cache while streaming (one frame of full-resolution activations alive), with the whole-clip
    answer; models with per-clip norms or trilinear time upsampling keep whole chunks."""
    from videovae import layers
    from videovae.layers import WINDOW_FRAMES, CausalCache

    monkeypatch.setattr(layers, "CPU_WINDOW_MIN_NCTH", 0)  # windows even for these small frames

    assert tiny.decoder.frame_local_from == 2  # levels 1 and 0 follow tiny's last temporal upsampler
    assert from_preset("od-vae").decoder.frame_local_from is None
    frames_per_call = []
    pad_t = tiny.decoder.conv_out.kernel_t - 1
    hook = tiny.decoder.conv_out.conv.register_forward_pre_hook(
        lambda m, args: frames_per_call.append(args[0].shape[2] - pad_t)
    )
    z = torch.randn(1, tiny.latent_channels, 3, 4, 4)
    try:
        with torch.no_grad():
            whole = tiny.decode(z)
            # whole clip: windows of WINDOW_FRAMES frames (the padded input never exists for the clip)
            t = whole.shape[2]
            assert frames_per_call == [min(WINDOW_FRAMES, t - t0) for t0 in range(0, t, WINDOW_FRAMES)]
            frames_per_call.clear()
            cache, chunks = CausalCache(), []
            for start, stop in ((0, 2), (2, 3)):
                h, cache = tiny.decode_stem(z[:, :, start:stop], cache)
                y, cache = tiny.decode_body(h, cache)
                chunks.append(y)
    finally:
        hook.remove()
    assert frames_per_call == [1] * whole.shape[2]
    torch.testing.assert_close(torch.cat(chunks, dim=2), whole, atol=1e-5, rtol=0)
