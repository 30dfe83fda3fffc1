"""OD-VAE: presets, official checkpoint conversion, parity with the official code, official tiling,
exact streaming of od-vae-stream, inflation from a 2D image VAE and latent widening.

Parity fixtures (tests/fixtures/odvae, see PROVENANCE.md) were produced by the official
Open-Sora-Plan v1.2.0 code on a reduced-width v1.2 layout.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from videovae.checkpoint import CheckpointError, load_checkpoint
from videovae.cli import main
from videovae.engine import EngineOptions, decode_tensor, encode_tensor
from videovae.models import PRESETS, from_preset
from videovae.models.odvae import (
    ODVAE,
    OfficialTiling,
    config_from_official,
    convert_official,
    inflate_image_vae,
    map_official_key,
    odvae_config,
    official_windows,
    unwrap_official_state,
    widen_latent,
)

FIXTURES = Path(__file__).parent / "fixtures" / "odvae"
WEIGHTS = FIXTURES / "small_weights.safetensors"
TOL = 1e-4  # max abs difference asked for by the issue (fp32)


def _metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def official_config() -> dict:
    return json.loads(_metadata(WEIGHTS)["config"])


@pytest.fixture(scope="module")
def small(official_config) -> ODVAE:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return convert_official(WEIGHTS, config=official_config)


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(FIXTURES / "small_io.safetensors")).items()}


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# --- presets ------------------------------------------------------------------------------------------


def test_presets_registered_with_official_parameter_counts():
    for name in ("od-vae", "od-vae-t01", "od-vae-t02", "od-vae-3d", "od-vae-stream"):
        family, cfg = PRESETS[name]
        assert family == "od-vae" and cfg.time_factor == 4 and cfg.space_factor == 8
    with torch.device("meta"):
        params = from_preset("od-vae").num_parameters()
        stream = from_preset("od-vae-stream")
    # official: encoder 94,399,368 + quant_conv 72; decoder 144,790,531 + post_quant_conv 20
    assert params == {"encoder": 94_399_440, "decoder": 144_790_551, "total": 239_189_991}
    assert stream.num_parameters() == params
    assert stream.config.exactly_streamable and not PRESETS["od-vae"][1].exactly_streamable


def test_full_size_state_dict_matches_official_names_and_shapes():
    official = json.loads((FIXTURES / "official_keys_v12.json").read_text())
    with torch.device("meta"):
        model = from_preset("od-vae")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == official
    assert all(map_official_key(k) == k for k in official)
    assert map_official_key("encoder.down.0.attn.0.q.weight") is None


# --- config and key mapping ---------------------------------------------------------------------------


def test_config_from_official(official_config):
    cfg = config_from_official(official_config)
    assert cfg.base_channels == 32 and cfg.channel_mult == (1, 2, 1, 1)
    assert cfg.encoder_block_kinds == ("2d", "2d", "3d", "3d") and cfg.encoder_conv_in == "2d"
    assert cfg.temporal_down == (False, True, True) and cfg.decoder_res_blocks == 3
    assert config_from_official({}) == PRESETS["od-vae"][1]
    bookkeeping = dict(official_config, _class_name="CausalVAEModel", _diffusers_version="0.27.0", lr=1e-5)
    assert config_from_official(bookkeeping) == cfg
    with pytest.raises(ValueError, match="encoder_attention='AttnBlock3D'"):
        config_from_official(dict(official_config, encoder_attention="AttnBlock3D"))
    with pytest.raises(ValueError, match="temporal"):
        config_from_official(dict(official_config, encoder_temporal_downsample=["", "TimeDownsample2x", "", ""]))
    with pytest.raises(ValueError, match="_class_name='AutoencoderKL'"):
        config_from_official({"_class_name": "AutoencoderKL"})
    with pytest.raises(ValueError, match="embed_dim"):
        config_from_official(dict(official_config, embed_dim=8))


def test_unwrap_training_checkpoints():
    w = torch.ones(2)
    plain = {"encoder.norm_out.weight": w}
    assert unwrap_official_state(plain).keys() == plain.keys()
    nested = {"epoch": 3, "state_dict": {"gen_model": {"module.encoder.norm_out.weight": w},
                                         "dics_model": {"x": w}}}
    assert list(unwrap_official_state(nested)) == ["encoder.norm_out.weight"]
    lightning = {"state_dict": {"encoder.norm_out.weight": w, "loss.discriminator.main.0.weight": w,
                                "loss.logvar": w}}
    assert list(unwrap_official_state(lightning)) == ["encoder.norm_out.weight"]
    ema = {"state_dict": {"gen_model": {"a.weight": w}}, "ema_state_dict": {"module.b.weight": w}}
    assert list(unwrap_official_state(ema)) == ["b.weight"]
    assert list(unwrap_official_state(ema, prefer_ema=False)) == ["a.weight"]


def test_convert_rejects_unexpected_and_missing_keys(tmp_path, official_config):
    state = load_file(str(WEIGHTS))
    extra = dict(state, **{"encoder.extra_block.weight": torch.zeros(1)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="encoder.extra_block.weight"):
        convert_official(tmp_path / "extra.safetensors", config=official_config)
    missing = {k: v for k, v in state.items() if k != "decoder.conv_out.conv.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: decoder.conv_out.conv.bias"):
        convert_official(tmp_path / "missing.safetensors", config=official_config)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        convert_official(WEIGHTS)  # full-size v1.2 layout expected without the small config


def test_convert_cli_folder_and_training_checkpoint(tmp_path, official_config, small):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(official_config, _class_name="CausalVAEModel")))
    save_file(load_file(str(WEIGHTS)), str(folder / "diffusion_pytorch_model.safetensors"))
    out = tmp_path / "w.safetensors"
    assert main(["convert", "--from", "od-vae-official", str(folder), "-o", str(out)]) == 0
    loaded = load_checkpoint(out)
    assert isinstance(loaded, ODVAE) and loaded.config == small.config
    ref = small.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())

    ckpt_dir = tmp_path / "train"
    ckpt_dir.mkdir()
    (ckpt_dir / "config.json").write_text(json.dumps(official_config))
    gen = {"module." + k: v for k, v in load_file(str(WEIGHTS)).items()}
    gen["module.loss.perceptual_loss.net.0.weight"] = torch.zeros(3)
    ema = {k: v.float() + 1 for k, v in gen.items()}
    torch.save({"epoch": 1, "state_dict": {"gen_model": gen}, "ema_state_dict": ema}, ckpt_dir / "last.ckpt")
    from_ema = convert_official(ckpt_dir)
    from_gen = convert_official(ckpt_dir / "last.ckpt", prefer_ema=False)
    key = "decoder.conv_out.conv.bias"
    assert torch.equal(from_ema.state_dict()[key], ref[key] + 1)
    assert torch.equal(from_gen.state_dict()[key], ref[key])
    assert main(["convert", "--from", "od-vae-official", str(tmp_path / "nope"), "-o", str(out)]) == 1


# --- parity with the official code -----------------------------------------------------------------------


def test_parity_whole_clip(small, io):
    with torch.no_grad():
        posterior = small.encode(io["x"])
        assert _maxdiff(posterior.mean, io["x_mean"]) <= TOL
        assert _maxdiff(posterior.logvar, io["x_logvar"]) <= TOL
        assert _maxdiff(small.decode(io["x_mean"]), io["x_dec"]) <= TOL


def test_parity_single_frame(small, io):
    with torch.no_grad():
        posterior = small.encode(io["x_img"])
        assert _maxdiff(posterior.mean, io["img_mean"]) <= TOL
        assert _maxdiff(posterior.logvar, io["img_logvar"]) <= TOL
        assert _maxdiff(small.decode(io["img_mean"]), io["img_dec"]) <= TOL


def test_official_windows():
    assert official_windows(17, 9) == [(0, 9), (8, 17)]
    assert official_windows(93, 33) == [(0, 33), (32, 65), (64, 93)]
    assert official_windows(33, 33) == [(0, 33)]
    assert official_windows(5, 3) == [(0, 3), (2, 5)]


def _with_fixture_tiling(small) -> ODVAE:
    """``small`` with the fixture's official tiling stored in its config."""
    model = ODVAE(replace(small.config, official_frames=8, official_decode_latents=2, official_tile=32,
                          official_overlap=0.25))
    model.load_state_dict(small.state_dict())
    return model.eval()


def test_parity_official_tiling(small, io):
    """``tiling='official'`` with no other option reproduces the official code with the official
    sizes stored in the config: a 17-frame 48x64 clip is longer than one encode window (9 frames)
    and one decode window (3 latents) and 48 is not a multiple of the 32 px tile."""
    meta = json.loads(_metadata(FIXTURES / "small_io.safetensors")["tiling"])
    assert (meta["tile_sample_min_size"], meta["tile_latent_min_size_t"]) == (32, 3)
    model = _with_fixture_tiling(small)
    assert model.official_tiling_for() == OfficialTiling(32, 4, 0.25, 9, 3)
    result = encode_tensor(model, io["x"], tiling="official")
    assert _maxdiff(result.mean, io["x_tiled_mean"]) <= TOL
    assert _maxdiff(result.logvar, io["x_tiled_logvar"]) <= TOL
    assert _maxdiff(decode_tensor(model, io["x_mean"], tiling="official"), io["x_tiled_dec"]) <= TOL


def test_engine_official_tiling_options(small):
    with pytest.raises(ValueError, match="inconsistent"):
        small.official_tiling_for(8, tile=32)  # overlap 0.125: the official code would return 9 latent columns
    assert small.official_tiling_for(8, tile=256).latent_size == 32
    assert small.official_tiling_for(8, 2, 32, 0.25) == OfficialTiling(32, 4, 0.25, 9, 3)
    assert small.official_tiling_for() == OfficialTiling(256, 32, 0.125, 33, 16)
    whole = small.official_tiling_for(0, 0, 0)
    assert min(whole.sample_size, whole.sample_frames, whole.latent_size, whole.latent_frames) > 1 << 20
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match="no official tiling"):
        encode_tensor(from_preset("tiny"), x, tiling="official")
    with torch.no_grad():
        expected = small.encode(x).mean
    assert _maxdiff(encode_tensor(small, x, tiling="official").mean, expected) == 0
    with pytest.raises(TypeError, match="ODVAEConfig"):
        ODVAE(PRESETS["tiny"][1])
    # the official decode windows (16 latents, stride 15) do not follow the encode windows
    assert PRESETS["od-vae"][1].official_frames == 32 and PRESETS["od-vae"][1].official_decode_latents == 15
    model = _with_fixture_tiling(small)
    only_encode = EngineOptions(tiling="official", official_frames=16).official_tiling(model)
    assert (only_encode.sample_frames, only_encode.latent_frames) == (17, 3)
    only_decode = EngineOptions(tiling="official", official_decode_latents=5).official_tiling(model)
    assert (only_decode.sample_frames, only_decode.latent_frames, only_decode.sample_size) == (9, 6, 32)


# --- exact streaming ----------------------------------------------------------------------------------------


def _small_config(**kw):
    return odvae_config(base_channels=32, channel_mult=(1, 2, 1, 1), **kw)


def test_od_vae_stream_chunked_equals_whole_clip():
    """Exact up to rounding: computed in float64 (the engine returns float32), so that differing
    conv blockings cannot hide a real mismatch."""
    torch.manual_seed(0)
    model = ODVAE(_small_config(stream=True)).double().eval()
    x = torch.rand(1, 3, 9, 16, 16, dtype=torch.float64) * 2 - 1
    opts = {"dtype": torch.float64}
    whole = encode_tensor(model, x, chunk_frames=0, **opts).mean
    chunked = encode_tensor(model, x, chunk_frames=4, **opts).mean
    assert _maxdiff(whole, chunked) <= 1e-6
    z = whole.double()
    decoded = decode_tensor(model, z, chunk_frames=0, **opts)
    assert _maxdiff(decoded, decode_tensor(model, z, chunk_frames=4, **opts)) <= 1e-6
    official = ODVAE(_small_config()).double().eval()
    official.load_state_dict(model.state_dict())
    z = encode_tensor(official, x, chunk_frames=0, **opts).mean
    assert _maxdiff(z, encode_tensor(official, x, chunk_frames=4, **opts).mean) > 1e-3


# --- inflation from a 2D image VAE ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_vae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        block_out_channels=(32, 64, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval()
    with torch.no_grad():  # move GroupNorm and biases off their trivial initial values
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vae


def _image_roundtrip(vae, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        mean = vae.encode(frame).latent_dist.mean
        return mean, vae.decode(mean).sample


@pytest.mark.parametrize("init", ["tail", "center"])
def test_inflated_stream_model_reproduces_image_vae(image_vae, init):
    model = inflate_image_vae(image_vae.state_dict(), _small_config(stream=True), init=init)
    frame = torch.rand(1, 3, 16, 24) * 2 - 1
    ref_mean, ref_dec = _image_roundtrip(image_vae, frame)
    with torch.no_grad():
        mean = model.encode(frame[:, :, None]).mean
        decoded = model.decode(mean)
    assert _maxdiff(mean[:, :, 0], ref_mean) <= TOL
    assert _maxdiff(decoded[:, :, 0], ref_dec) <= TOL
    # a static clip: every frame reproduces the image VAE
    with torch.no_grad():
        clip_mean = model.encode(frame[:, :, None].expand(-1, -1, 5, -1, -1)).mean
        clip_dec = model.decode(clip_mean)
    assert max(_maxdiff(clip_mean[:, :, t], ref_mean) for t in range(clip_mean.shape[2])) <= TOL
    assert max(_maxdiff(clip_dec[:, :, t], ref_dec) for t in range(5)) <= TOL


def test_inflated_od_vae_encoder_is_exact(image_vae):
    """The official layout upsamples frames bilinearly at two decoder levels (SD: nearest), so
    only its encoder reproduces the image VAE exactly."""
    model = inflate_image_vae(image_vae.state_dict(), _small_config(), init="tail")
    frame = torch.rand(1, 3, 16, 24) * 2 - 1
    ref_mean, ref_dec = _image_roundtrip(image_vae, frame)
    with torch.no_grad():
        mean = model.encode(frame[:, :, None]).mean
        decoded = model.decode(mean)
    assert _maxdiff(mean[:, :, 0], ref_mean) <= TOL
    assert _maxdiff(decoded[:, :, 0], ref_dec) > TOL


def test_inflation_reports_mismatch(image_vae):
    state = dict(image_vae.state_dict())
    state["encoder.unknown.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="encoder.unknown.weight"):
        inflate_image_vae(state, _small_config(stream=True))
    with pytest.raises(ValueError, match="cannot inflate"):
        inflate_image_vae(image_vae.state_dict(), odvae_config(base_channels=64, channel_mult=(1, 2, 1, 1)))


def test_init_cli_from_image_vae_errors(tmp_path):
    save_file({"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}, str(tmp_path / "sd.safetensors"))
    out = str(tmp_path / "o.safetensors")
    assert main(["init", "--model", "od-vae", "--from-image-vae", str(tmp_path / "sd.safetensors"), "-o", out]) == 1
    assert main(["init", "--model", "tiny", "--from-image-vae", str(tmp_path / "sd.safetensors"), "-o", out]) == 1
    assert not Path(out).exists()


# --- latent widening --------------------------------------------------------------------------------------


def test_widen_latent(small, tmp_path):
    wide = widen_latent(small, 8, seed=1)
    assert wide.config.latent_channels == 8 and isinstance(wide, ODVAE)
    old, new = small.state_dict(), wide.state_dict()
    assert torch.equal(new["encoder.conv_out.conv.weight"][:4], old["encoder.conv_out.conv.weight"][:4])
    assert torch.equal(new["encoder.conv_out.conv.weight"][8:12], old["encoder.conv_out.conv.weight"][4:])
    assert torch.equal(new["quant_conv.conv.weight"][8:12, 8:12], old["quant_conv.conv.weight"][4:, 4:])
    assert torch.equal(new["decoder.conv_in.conv.weight"][:, :4], old["decoder.conv_in.conv.weight"])
    fresh = new["decoder.conv_in.conv.weight"][:, 4:]
    ref = old["decoder.conv_in.conv.weight"]
    assert abs(fresh.std() - ref.std()) < 0.1 * ref.std() and abs(fresh.mean() - ref.mean()) < 0.1 * ref.std()
    assert torch.equal(new["encoder.down.0.block.0.conv1.weight"], old["encoder.down.0.block.0.conv1.weight"])
    with torch.no_grad():
        z = wide.encode(torch.rand(1, 3, 5, 16, 16) * 2 - 1).mean
    assert z.shape == (1, 8, 2, 2, 2)
    with pytest.raises(ValueError, match="must exceed"):
        widen_latent(small, 4)
    # CLI: checkpoint -> widened checkpoint
    from videovae.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "w4.safetensors", small)
    out = tmp_path / "w16.safetensors"
    assert main(["init", "--from-checkpoint", str(tmp_path / "w4.safetensors"), "--widen-latent", "16",
                 "-o", str(out)]) == 0
    assert load_checkpoint(out).config.latent_channels == 16
