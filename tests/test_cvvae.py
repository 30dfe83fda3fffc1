"""CV-VAE: presets, official checkpoint conversion, parity with the official code (whole clip and
official windowed tiling), exact streaming of cv-vae-stream.

Parity fixtures (tests/fixtures/cvvae, see PROVENANCE.md) were produced by the official
AILab-CVC/CV-VAE code on reduced-width SD 2.1 and SD3 layouts.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from videovae.checkpoint import load_checkpoint
from videovae.cli import _engine_options as engine_options
from videovae.cli import build_parser, main
from videovae.engine import decode_tensor, encode_tensor
from videovae.layers import CausalCache
from videovae.models import PRESETS, from_preset
from videovae.models.cvvae import (
    CVVAE,
    ImageVAE,
    config_from_official,
    convert_official,
    inflate_image_vae,
    map_official_key,
    official_seam_pixels,
)
from videovae.statedict import CheckpointError
from videovae.train.compat import CompatibilityLoss

FIXTURES = Path(__file__).parent / "fixtures" / "cvvae"
TOL = 1e-4  # max abs difference asked for by the issue (fp32)
LAYOUTS = ("sd21", "sd3")


def _official_config(layout: str) -> dict:
    with safe_open(str(FIXTURES / f"{layout}_weights.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["config"])


def _diffusers_folder(tmp: Path, layout: str) -> Path:
    """A released-style folder: config.json (official names) + fp16 diffusion_pytorch_model.safetensors."""
    folder = tmp / f"vae3d_{layout}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_official_config(layout)))
    weights = load_file(str(FIXTURES / f"{layout}_weights.safetensors"))
    assert all(v.dtype == torch.float16 for v in weights.values())
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, CVVAE]:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tmp = tmp_path_factory.mktemp("cvvae")
    return {layout: convert_official(_diffusers_folder(tmp, layout)) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def io() -> dict[str, dict[str, torch.Tensor]]:
    return {
        layout: {k: v.float() for k, v in load_file(str(FIXTURES / f"{layout}_io.safetensors")).items()}
        for layout in LAYOUTS
    }


# --- presets ------------------------------------------------------------------------------------------


def test_full_size_parameter_counts_match_the_paper():
    """CV-VAE paper: 68M encoder + 114M decoder for the 2D+3D model."""
    with torch.device("meta"):
        params = from_preset("cv-vae").num_parameters()
    assert params == {"encoder": 68_748_936, "decoder": 113_697_539, "total": 182_446_475}
    with torch.device("meta"):
        sd3 = from_preset("cv-vae-sd3")
    assert sd3.latent_channels == 16 and sd3.time_factor == 4 and sd3.space_factor == 8


def test_stream_variant_has_the_same_weight_shapes():
    with torch.device("meta"):
        a, b = from_preset("cv-vae").state_dict(), from_preset("cv-vae-stream").state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert not PRESETS["cv-vae"][1].exactly_streamable
    assert PRESETS["cv-vae-stream"][1].exactly_streamable


def test_config_round_trips_through_a_checkpoint(tmp_path):
    from videovae.checkpoint import save_checkpoint

    model = from_preset("cv-vae-tiny-sd3")
    save_checkpoint(tmp_path / "w.safetensors", model)
    loaded = load_checkpoint(tmp_path / "w.safetensors")
    assert loaded.family == "cv-vae" and loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_config_rejects_what_it_cannot_build():
    with pytest.raises(ValueError, match="temporal attention"):
        replace(PRESETS["cv-vae"][1], layout="sd3")
    with pytest.raises(ValueError, match="causal_decoder"):
        config_from_official({"causal_decoder": True})
    with pytest.raises(ValueError, match="unknown fields bogus"):
        config_from_official({"bogus": 1})
    with pytest.raises(ValueError, match="_class_name"):
        config_from_official({"_class_name": "AutoencoderKL"})


# --- parity with the official code ----------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_whole_clip_parity(models, io, layout):
    model, ref = models[layout], io[layout]
    z = model.latent_channels
    with torch.no_grad():
        posterior = model.encode(ref["x"])
        assert (posterior.mean - ref["moments"][:, :z]).abs().max() < TOL
        assert (posterior.logvar - ref["moments"][:, z:].clamp(-30, 20)).abs().max() < TOL
        decoded = model.decode(ref["moments"][:, :z])
    assert decoded.shape == ref["decoded"].shape
    assert (decoded - ref["decoded"]).abs().max() < TOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_single_frame_parity(models, io, layout):
    model, ref = models[layout], io[layout]
    z = model.latent_channels
    with torch.no_grad():
        mean = model.encode(ref["x"][:, :, :1]).mean
        assert (mean - ref["moments_1frame"][:, :z]).abs().max() < TOL
        assert (model.decode(ref["moments_1frame"][:, :z]) - ref["decoded_1frame"]).abs().max() < TOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_official_tiling_parity(models, io, layout):
    """Windowed + spatially tiled encode/decode as the official code with its config.json values
    (windows of 5 frames / 2 latents, 40 px tiles): two windows of each kind, 48x48 not a multiple."""
    model, ref = models[layout], io[layout]
    z = model.latent_channels
    assert (model.config.official_frames, model.config.official_decode_latents) == (4, 1)  # from config.json
    result = encode_tensor(model, ref["x"], tiling="official")  # no other option: the official defaults
    decoded = decode_tensor(model, ref["moments"][:, :z], tiling="official")
    official = ref["moments_official_tiling"]
    assert result.mean.shape == (1, z, 3, 6, 6)  # official sd3 stitching gives 7x7: cropped to H/8 x W/8
    assert (result.mean - official[:, :z, :, :6, :6]).abs().max() < TOL
    assert (result.logvar - official[:, z:, :, :6, :6].clamp(-30, 20)).abs().max() < TOL
    # ours keeps the input size; the official output lacks one pixel per seam (48x48 -> 47x47)
    assert decoded.shape == (1, 3, 9, 48, 48) and ref["decoded_official_tiling"].shape == (1, 3, 9, 47, 47)
    rows, cols = official_seam_pixels(48, 40, 0.2222), official_seam_pixels(48, 40, 0.2222)
    assert rows == [31] and cols == [31]
    keep_r = [i for i in range(48) if i not in rows]
    keep_c = [i for i in range(48) if i not in cols]
    assert (decoded[..., keep_r, :][..., keep_c] - ref["decoded_official_tiling"]).abs().max() < TOL
    # the windows/tiles really change the result (the test would notice tiling being skipped)
    assert (decoded - ref["decoded"]).abs().max() > 1e-2


def test_tiling_official_flags_override_one_value_each(models):
    model = models["sd21"]
    parse = build_parser().parse_args
    args = parse(["encode", "in.mp4", "--weights", "w", "-o", "o", "--tiling", "official"])
    opts = engine_options(args, model, 48, 48, None)
    assert opts.official_tiling(model) == model.official_tiling_for()
    args = parse(["encode", "in.mp4", "--weights", "w", "-o", "o", "--tiling", "official", "--tile", "64"])
    tiling = engine_options(args, model, 48, 48, None).official_tiling(model)
    assert (tiling.tile, tiling.encode_frames, tiling.decode_latents, tiling.overlap) == (64, 4, 1, 0.2222)
    args = parse(["decode", "l", "--weights", "w", "-o", "o", "--tiling", "official", "--decode-latents", "3",
                  "--tile-overlap", "0.25"])
    tiling = engine_options(args, model, 48, 48, None).official_tiling(model)
    assert (tiling.tile, tiling.encode_frames, tiling.decode_latents, tiling.overlap) == (40, 4, 3, 0.25)
    tiling = model.official_tiling_for(frames=8)  # as the official code: decode windows follow the encode ones
    assert (tiling.encode_frames, tiling.decode_latents) == (8, 2)


def test_official_seam_pixels_of_the_issue_case():
    """tile 256, overlap 0.2222: the official decode of 272x288 is 271x287."""
    assert official_seam_pixels(272, 256, 0.2222) == [199]
    assert official_seam_pixels(288, 256, 0.2222) == [199]
    assert official_seam_pixels(576, 576, 0.2222) == []


# --- conversion ------------------------------------------------------------------------------------


def test_raw_checkpoint_formats_convert(tmp_path, models):
    """Lightning-style ``state_dict`` with ``module.`` prefixes and loss keys, fp16, read with
    torch.load(weights_only=True)."""
    weights = load_file(str(FIXTURES / "sd21_weights.safetensors"))
    obj = {"state_dict": {f"module.{k}": v for k, v in weights.items()}}
    obj["state_dict"]["loss.logvar"] = torch.zeros(())
    torch.save(obj, tmp_path / "last.ckpt")
    model = convert_official(tmp_path / "last.ckpt", config=_official_config("sd21"))
    for k, v in models["sd21"].state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_bad_keys_are_listed(tmp_path):
    cfg = _official_config("sd21")
    weights = load_file(str(FIXTURES / "sd21_weights.safetensors"))
    bad = dict(weights)
    bad["encoder.extra.weight"] = torch.zeros(1)
    save_file(bad, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match="encoder.extra.weight"):
        convert_official(tmp_path / "a.safetensors", config=cfg)
    bad = dict(weights)
    del bad["decoder.conv_out.bias"]
    save_file(bad, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: decoder.conv_out.bias"):
        convert_official(tmp_path / "b.safetensors", config=cfg)
    bad = dict(weights)
    bad["decoder.mid.attn_1.q_t.weight"] = torch.zeros(3, 3)
    save_file(bad, str(tmp_path / "c.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape mismatch: decoder.mid.attn_1.q_t.weight"):
        convert_official(tmp_path / "c.safetensors", config=cfg)


def test_sd3_names_map_to_ours():
    cfg = config_from_official(_official_config("sd3"))
    assert map_official_key("decoder.up_blocks.0.upsamplers.0.conv.weight", cfg) == "decoder.up.3.upsample.conv.weight"
    assert map_official_key("encoder.mid_block.attentions.0.to_out.0.bias", cfg) == "encoder.mid.attn_1.proj_out.bias"
    assert map_official_key("decoder.mid_block.resnets.1.norm2.weight", cfg) == "decoder.mid.block_2.norm2.weight"
    assert map_official_key("encoder.down_blocks.0.resnets.0.conv_shortcut.weight", cfg) is not None
    assert map_official_key("decoder.mid_block.attentions.0.to_q.lora.weight", cfg) is None


def test_cli_convert_and_info(tmp_path, capsys):
    folder = _diffusers_folder(tmp_path, "sd3")
    out = tmp_path / "cv.safetensors"
    assert main(["convert", str(folder), "--from", "cv-vae-official", "-o", str(out)]) == 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "family cv-vae" in text and "16 latent channels" in text and '"official_tile": 40' in text


# --- streaming ----------------------------------------------------------------------------------------


def _video(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, h, w, generator=g) * 2 - 1


def test_stream_variant_chunked_equals_whole():
    torch.manual_seed(0)
    model = from_preset("cv-vae-tiny-stream").eval()
    x = _video(13, 16, 24)
    with torch.no_grad():
        whole = model.encode_chunk(x, None)[0]
        cache, parts = CausalCache(), []
        for a, b in ((0, 5), (5, 9), (9, 13)):
            out, cache = model.encode_chunk(x[:, :, a:b], cache)
            parts.append(out)
        assert (torch.cat(parts, dim=2) - whole).abs().max() < 1e-5
        z = whole[:, :4]
        decoded = model.decode_chunk(z, None)[0]
        cache, parts = CausalCache(), []
        for a, b in ((0, 2), (2, 3), (3, 4)):
            out, cache = model.decode_chunk(z[:, :, a:b], cache)
            parts.append(out)
        assert torch.cat(parts, dim=2).shape == decoded.shape
        assert (torch.cat(parts, dim=2) - decoded).abs().max() < 1e-5
        # causal: later frames do not change earlier outputs
        y = x.clone()
        y[:, :, 9:] = 0
        assert (model.encode_chunk(y, None)[0][:, :, :3] - whole[:, :, :3]).abs().max() < 1e-5
        z2 = z.clone()
        z2[:, :, 3:] = 0
        assert (model.decode_chunk(z2, None)[0][:, :, :9] - decoded[:, :, :9]).abs().max() < 1e-5


def test_stream_variant_through_the_engine_chunked():
    torch.manual_seed(0)
    model = from_preset("cv-vae-tiny-stream").eval()
    x = _video(9, 16, 24)
    with torch.no_grad():
        whole = model.encode(x).mean
        result = model.encode_video(x, chunk_frames=4)
        assert (result.mean - whole).abs().max() < 1e-5
        decoded = model.decode_video(whole, chunk_frames=4)
        assert (decoded - model.decode(whole)).abs().max() < 1e-5


def test_official_layout_is_not_exact_when_chunked():
    torch.manual_seed(0)
    model = from_preset("cv-vae-tiny").eval()
    z = torch.randn(1, 4, 4, 2, 3)
    with torch.no_grad():
        whole = model.decode_chunk(z, None)[0]
        cache = CausalCache()
        a, cache = model.decode_chunk(z[:, :, :2], cache)
        b, cache = model.decode_chunk(z[:, :, 2:], cache)
    chunked = torch.cat([a, b], dim=2)
    assert chunked.shape == whole.shape
    assert (chunked - whole).abs().max() > 1e-3


# --- image VAE: inflation and the latent regularisation ---------------------------------------------------


@pytest.fixture(scope="module")
def image_vae():
    """A small random diffusers AutoencoderKL with the layout of cv-vae-tiny (32 x [1, 2, 1, 1], z=4)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(3)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
    ).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return vae


def test_image_vae_module_reproduces_autoencoderkl(image_vae):
    x = _video(1, 32, 40)[:, :, 0]
    ours = ImageVAE(image_vae.state_dict())
    with torch.no_grad():
        mean = image_vae.encode(x).latent_dist.mean
        assert (ours.encode(x) - mean).abs().max() < TOL
        assert (ours.decode(mean) - image_vae.decode(mean).sample).abs().max() < TOL


def test_inflated_model_reproduces_the_image_vae_on_one_frame(image_vae, tmp_path):
    state = dict(image_vae.state_dict())
    state["post_quant_conv.bias"] = torch.zeros(4)  # its bias cannot be folded exactly (zero padding)
    reference = type(image_vae)(**image_vae.config).eval()
    reference.load_state_dict(state)
    x = _video(1, 32, 40)
    with torch.no_grad():
        mean = reference.encode(x[:, :, 0]).latent_dist.mean
        image = reference.decode(mean).sample
        # the layout of cv-vae-tiny without temporal attention and with the image VAE's GroupNorm eps
        cfg = replace(PRESETS["cv-vae-tiny"][1], temporal_attention="none", norm_eps=1e-6)
        model = inflate_image_vae(state, cfg)
        assert (model.encode(x).mean[:, :, 0] - mean).abs().max() < TOL
        assert (model.decode(mean.unsqueeze(2))[:, :, 0] - image).abs().max() < TOL
        # a multi-frame clip of one repeated image decodes every frame as the image
        video = model.decode(mean.unsqueeze(2).expand(-1, -1, 3, -1, -1))
        assert video.shape[2] == 9 and (video - image.unsqueeze(2)).abs().max() < TOL
    # the released layout through the command line: the encoder still reproduces the image latent
    save_file(state, str(tmp_path / "image_vae.safetensors"))
    out = tmp_path / "inflated.safetensors"
    assert main(["init", "--model", "cv-vae-tiny", "--from-image-vae", str(tmp_path / "image_vae.safetensors"),
                 "-o", str(out)]) == 0
    with torch.no_grad():
        assert (load_checkpoint(out).encode(x).mean[:, :, 0] - mean).abs().max() < 1e-3  # eps 1e-5 vs 1e-6


def test_compatibility_loss_gradient_points_downhill(image_vae):
    torch.manual_seed(0)
    model = from_preset("cv-vae-tiny").train()
    compat = CompatibilityLoss(ImageVAE(image_vae.state_dict()), weight=1.0)
    compat.check_model(model)
    x = _video(5, 16, 16, seed=4)
    params = list(model.encoder.parameters())

    def loss_now() -> torch.Tensor:
        torch.manual_seed(1)  # the same random frame of each group every time: one fixed objective
        return compat(model, x, model.encode(x))["compat"]

    # a short step down the gradient lowers the loss by about step * |grad| (first order): the term
    # is differentiable in the encoder and its gradient points downhill, whatever the thread count
    loss = loss_now()
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    step = 1e-5
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= step * g / norm
    with torch.no_grad():
        drop = float(loss.detach() - loss_now())
    assert drop > 0.5 * step * float(norm), (float(loss), drop, float(norm))
    assert all(p.grad is None for p in compat.parameters())  # the image VAE stays frozen
    assert 0 < compat.compatibility_psnr(model.eval(), x) < 100
    with pytest.raises(ValueError, match="does not fit"):
        compat.check_model(from_preset("cv-vae-tiny-sd3"))


def test_training_run_logs_the_compatibility_term(image_vae, tmp_path):
    from videovae.synthetic import write_synthetic_video
    from videovae.train.config import ConfigError, load_config
    from videovae.train.vae import train

    clip = tmp_path / "clip.mp4"
    write_synthetic_video(clip, 5, 16, 16, seed=2, crf=10)
    save_file(image_vae.state_dict(), str(tmp_path / "image_vae.safetensors"))
    run_dir = tmp_path / "run"
    overrides = [f"data.paths=[{clip}]", f"run_dir={run_dir}", "data.size=16", "data.num_frames=5",
                 "data.max_stride=1", "data.crop_scale_min=1.0", "batch_size=1", "progress=false", "val_clips=1",
                 "val_every=2", "max_steps=2", "log_every=1", "disc.channels=8", "model.preset=cv-vae-tiny",
                 f"loss.image_vae={tmp_path / 'image_vae.safetensors'}", "loss.compat_weight=0.5"]
    with pytest.raises(ConfigError, match="needs loss.image_vae"):
        load_config(None, [*overrides[:-2], "loss.compat_weight=0.5"])
    summary = train(load_config(None, overrides))
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert all("compat" in r for r in records if r["kind"] == "train")
    assert 0 < summary["val"]["compat_psnr"] < 100


def test_model_families_do_not_import_the_checkpoint_module():
    """Strict loading lives in videovae.statedict, below the families: imports run one way."""
    import subprocess
    import sys

    code = ("import sys, videovae.models.odvae, videovae.models.cvvae; "
            "print('videovae.checkpoint' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
