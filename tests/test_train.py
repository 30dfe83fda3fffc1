"""Training: config, data, losses, LPIPS, and short single-process DeepSpeed runs (CPU, tiny preset)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from videovae.checkpoint import load_checkpoint
from videovae.cli import main as cli_main
from videovae.synthetic import write_synthetic_video
from videovae.train.config import ConfigError, deepspeed_config, load_config
from videovae.train.data import ClipDataset
from videovae.train.discriminator import PatchDiscriminator3D
from videovae.train.losses import adaptive_weight, hinge_d_loss, recon_loss
from videovae.train.lpips import LPIPS, LPIPSWeightsError, lpips_video
from videovae.train.vae import lr_factor, train

CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_demo.yaml"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A 5-frame 32x32 clip: with crop_scale_min=1 and max_stride=1 every training sample is the same."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_synthetic_video(path, 5, 32, 32, seed=2, crf=10)
    return path


def _overrides(clip: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.paths=[{clip}]", f"run_dir={run_dir}", "data.size=32", "data.num_frames=5", "data.max_stride=1",
            "data.crop_scale_min=1.0", "data.num_workers=0", "batch_size=1", "progress=false", "val_clips=1",
            "optim.warmup_steps=0", "optim.lr=3e-3", "optim.ema_decay=0.5", "log_every=1", "disc.channels=8",
            *extra]


def _train_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# --- config -------------------------------------------------------------------------------------------


def test_config_yaml_overrides_and_deepspeed_dict():
    cfg = load_config(CONFIG, ["optim.lr=2e-4", "data.paths=[a.mp4,b]", "deepspeed.zero_stage=2",
                               "deepspeed.precision=bf16", "deepspeed.grad_accum=4", "loss.lpips_vgg=null"])
    assert cfg.optim.lr == 2e-4 and cfg.data.paths == ["a.mp4", "b"] and cfg.model.preset == "tiny"
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"]
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == cfg.batch_size * 4 * 2
    assert ds["gradient_clipping"] == cfg.optim.grad_clip


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key"),
    ("max_steps=abc", "max_steps: expected an integer"),
    ("deepspeed.zero_stage=3", "zero_stage must be 0, 1 or 2"),
    ("loss.recon=l2", "loss.recon must be l1, mse or charbonnier"),
    ("noequals", "not key=value"),
    ("data.crop_scale_max=0.4", "crop_scale_max"),  # below the config's crop_scale_min
])
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)


# --- losses, discriminator, LPIPS -------------------------------------------------------------------------


def test_losses_and_discriminator_shapes():
    x = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    assert recon_loss(x, x).item() == 0.0
    assert recon_loss(x, x, "charbonnier").item() == pytest.approx(0.0, abs=1e-6)
    y = x + 0.25 * torch.sign(torch.randn_like(x))
    assert recon_loss(x, y).item() == pytest.approx(0.25, rel=1e-5)
    assert recon_loss(x, y, "mse").item() == pytest.approx(0.0625, rel=1e-5)
    with pytest.raises(ValueError, match="unknown reconstruction loss 'l3'"):
        recon_loss(x, y, "l3")
    disc = PatchDiscriminator3D(channels=8, layers=3)
    for t in (1, 9):
        logits = disc(x[:, :, :t])
        assert logits.shape[:2] == (2, 1)
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    w = torch.randn(4, 4, requires_grad=True)
    assert adaptive_weight((w * 2).sum(), w.sum(), w).item() == pytest.approx(2.0, rel=1e-3)


def test_lpips_needs_local_weights(tmp_path):
    with pytest.raises(LPIPSWeightsError, match="nothing is downloaded"):
        LPIPS.from_files(None, None)
    with pytest.raises(LPIPSWeightsError, match="not found"):
        LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "lin.pth")
    with pytest.raises(ConfigError, match="LPIPS weights file not found"):
        load_config(CONFIG, ["loss.lpips_weight=0.1", f"loss.lpips_vgg={tmp_path}/no.pth",
                             f"loss.lpips_lin={tmp_path}/no.pth"])


def test_lpips_forward_and_loading_random_weights(tmp_path):
    torch.manual_seed(0)
    net = LPIPS()
    for conv in net.lins:
        conv.weight.data.uniform_(0, 0.1)
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    d = net(a, b)
    assert d.shape == (2,) and (d > 0).all()
    assert net(a, a).abs().max().item() < 1e-6
    vgg = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(1)
    save_file(vgg, tmp_path / "vgg.safetensors")
    torch.save({f"lin{i}.model.1.weight": c.weight.detach().clone() for i, c in enumerate(net.lins)},
               tmp_path / "lin.pth")
    loaded = LPIPS.from_files(tmp_path / "vgg.safetensors", tmp_path / "lin.pth")
    assert torch.allclose(loaded(a, b), d)
    video = torch.rand(1, 3, 3, 32, 32) * 2 - 1
    assert lpips_video(loaded, video, video).item() < 1e-6
    with pytest.raises(LPIPSWeightsError, match="missing lin0"):
        LPIPS.from_files(tmp_path / "vgg.safetensors", tmp_path / "vgg.safetensors")


# --- data -----------------------------------------------------------------------------------------------


def test_dataset_clips_images_and_corrupt_video_skipped(tmp_path, caplog):
    write_synthetic_video(tmp_path / "good.mp4", 12, 40, 48, seed=1)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (tmp_path / "notes.txt.bak").write_text("ignored")
    from videovae.io import write_png

    write_png(tmp_path / "still.png", torch.full((30, 50, 3), 128, dtype=torch.uint8))
    with caplog.at_level(logging.WARNING, logger="videovae.train"):
        ds = ClipDataset([str(tmp_path)], num_frames=9, size=16, max_stride=3, crop_scale_min=0.5,
                         image_ratio=0.5, batch_size=2, seed=0)
    assert any("broken.mp4" in r.getMessage() for r in caplog.records)
    assert ds.videos == [str(tmp_path / "good.mp4")]
    shapes = {tuple(ds[n].shape) for n in range(12)}
    assert shapes == {(3, 9, 16, 16), (3, 1, 16, 16)}
    for n in range(0, 12, 2):  # one clip length per batch
        assert ds[n].shape == ds[n + 1].shape
    x = ds[3]
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.equal(ds[5], ds[5])  # sample n is a pure function of (seed, rank, n)


@pytest.mark.parametrize("scale", [0.25, 0.5, 1.0])
def test_crop_scale_range_sets_the_crop_side(tmp_path, scale):
    """A horizontal 0..255 ramp: a crop of side ``scale * short side`` spans about ``scale`` of the ramp."""
    from videovae.io import write_png

    ramp = torch.linspace(0, 255, 200).round().to(torch.uint8)
    write_png(tmp_path / "ramp.png", ramp.view(1, 200, 1).expand(200, 200, 3).contiguous())
    ds = ClipDataset([str(tmp_path)], num_frames=1, size=16, crop_scale_min=scale, crop_scale_max=scale)
    for n in range(4):
        x = ds[n][0, 0]  # (16, 16) in [-1, 1]
        span = (x[:, -1] - x[:, 0]).mean().item() / 2  # fraction of the ramp covered
        assert abs(span - scale * 15 / 16) < 0.04
    with pytest.raises(ValueError, match="crop scales"):
        ClipDataset([str(tmp_path)], num_frames=1, size=16, crop_scale_min=0.6, crop_scale_max=0.5)


def test_video_failing_at_decode_time_is_skipped(tmp_path, caplog):
    write_synthetic_video(tmp_path / "a.mp4", 9, 32, 32, seed=1)
    write_synthetic_video(tmp_path / "b.mp4", 9, 32, 32, seed=2)
    ds = ClipDataset([str(tmp_path)], num_frames=5, size=16, seed=0, cache_mb=0)
    (tmp_path / "b.mp4").write_bytes(b"garbage" * 100)  # breaks after the listing
    with caplog.at_level(logging.WARNING, logger="videovae.train"):
        clips = [ds[n] for n in range(8)]
    assert all(c.shape == (3, 5, 16, 16) for c in clips)
    assert any("b.mp4" in r.getMessage() and "failed to decode" in r.getMessage() for r in caplog.records)
    assert ds.bad == {str(tmp_path / "b.mp4")}


# --- single-process training --------------------------------------------------------------------------------


def test_few_steps_reduce_the_loss(clip, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(CONFIG),
            *_overrides(clip, run_dir, "max_steps=8", "loss.disc_start=100", "save_every=100", "val_every=100")]
    assert cli_main(args) == 0  # `videovae train ...`
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [r for r in _train_log(run_dir) if r["kind"] == "train"]
    assert records[0]["step"] == 1 and records[-1]["step"] == 8
    assert records[-1]["recon"] < 0.8 * records[0]["recon"]
    assert {"recon", "kl", "total", "lr"} <= set(records[0])
    assert summary["step"] == 8 and (run_dir / "config.yaml").is_file() and (run_dir / "val.csv").is_file()
    assert list((run_dir / "previews").glob("step_*.png"))
    model = load_checkpoint(run_dir / "vae.safetensors")
    assert model.family == "causal-vae"


def test_resume_equivalence_single_process(clip, tmp_path):
    common = ("max_steps=4", "loss.disc_start=2", "loss.disc_weight=0.5", "save_every=100", "val_every=100",
              "val_clips=0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(load_config(CONFIG, _overrides(clip, straight, *common)))
    first = train(load_config(CONFIG, _overrides(clip, split, *common, "run_steps=2")))
    assert first["step"] == 2
    interrupted = split / "checkpoints" / "step_00000003.tmp" / "vae"  # as left by a kill during a save
    interrupted.mkdir(parents=True)
    (interrupted / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    second = train(load_config(CONFIG, _overrides(clip, split, *common)), resume=True)
    assert second["step"] == 4 and second["steps_this_run"] == 2
    steps = [r["step"] for r in _train_log(split) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert not interrupted.parent.exists()
    assert "d_loss" in _train_log(split)[-1]  # the discriminator ran after resuming
    for name in ("vae", "disc"):
        a = torch.load(straight / "checkpoints/step_00000004" / name / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
        b = torch.load(split / "checkpoints/step_00000004" / name / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name}.{k}")
    ema_a, ema_b = load_file(straight / "vae.safetensors"), load_file(split / "vae.safetensors")
    for k in ema_a:
        torch.testing.assert_close(ema_a[k], ema_b[k], rtol=1e-5, atol=1e-6)


def test_resume_without_checkpoint_is_a_clear_error(clip, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(load_config(CONFIG, _overrides(clip, tmp_path / "empty", "max_steps=2")), resume=True)


def test_bad_runs_fail_early_with_clear_errors(clip, tmp_path):
    done = tmp_path / "done"
    (done / "checkpoints").mkdir(parents=True)
    (done / "checkpoints" / "latest").write_text("step_00000002")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(load_config(CONFIG, _overrides(clip, done, "max_steps=2")))
    with pytest.raises(ConfigError, match="not 1 \\+ k\\*4"):
        train(load_config(CONFIG, _overrides(clip, tmp_path / "r1", "data.num_frames=6")))
    with pytest.raises(ValueError, match="no such file or folder"):
        train(load_config(CONFIG, _overrides(clip, tmp_path / "r2", f"data.paths=[{tmp_path}/missing]")))


def test_torch_engine_trains_like_deepspeed_and_resumes(clip, tmp_path):
    """engine=torch (plain PyTorch, one process) follows the same steps as the DeepSpeed engine, and
    4 steps == 2 steps + resume + 2 steps. (Gradient clipping is off: under gradient accumulation
    DeepSpeed's clipping differs from torch's clip_grad_norm_ in the last digits.)"""
    common = ("max_steps=4", "loss.disc_start=2", "loss.disc_weight=0.5", "save_every=100", "val_every=100",
              "val_clips=0", "deepspeed.grad_accum=2", "optim.grad_clip=0")
    ds = train(load_config(CONFIG, _overrides(clip, tmp_path / "ds", *common, "engine=deepspeed")))
    straight = train(load_config(CONFIG, _overrides(clip, tmp_path / "torch", *common, "engine=torch")))
    assert ds["engine"] == "deepspeed" and straight["engine"] == "torch"
    first = train(load_config(CONFIG, _overrides(clip, tmp_path / "split", *common, "engine=torch", "run_steps=2")))
    assert first["step"] == 2
    second = train(load_config(CONFIG, _overrides(clip, tmp_path / "split", *common, "engine=torch")), resume=True)
    assert second["step"] == 4 and second["steps_this_run"] == 2
    assert "d_loss" in _train_log(tmp_path / "split")[-1]
    reference = load_file(tmp_path / "ds" / "vae.safetensors")
    for run in ("torch", "split"):
        weights = load_file(tmp_path / run / "vae.safetensors")
        for k in reference:
            torch.testing.assert_close(weights[k], reference[k], rtol=1e-4, atol=1e-5, msg=f"{run}: {k}")
    with pytest.raises(ConfigError, match="engine"):
        train(load_config(CONFIG, _overrides(clip, tmp_path / "split", *common, "engine=deepspeed")), resume=True)
    with pytest.raises(ConfigError, match="engine=torch"):
        load_config(CONFIG, _overrides(clip, tmp_path / "x", "engine=torch", "deepspeed.precision=fp16"))


def test_validation_on_held_out_media(clip, tmp_path):
    held_out = tmp_path / "held_out.mp4"
    write_synthetic_video(held_out, 5, 32, 32, seed=9, crf=10)
    run_dir = tmp_path / "run"
    train(load_config(CONFIG, _overrides(clip, run_dir, "max_steps=1", "engine=torch", f"data.val_paths=[{held_out}]",
                                         "loss.disc_start=100")))
    from videovae.io import VideoReader, to_model_range
    from videovae.metrics import psnr

    with VideoReader(held_out) as reader:
        x = to_model_range(reader.read_all())
    model = load_checkpoint(run_dir / "vae.safetensors")
    with torch.no_grad():
        expected = psnr(x, model(x, sample=False)[0].clamp(-1, 1)).clamp(max=100).mean().item()
    val = [r for r in _train_log(run_dir) if r["kind"] == "val"]
    assert val and val[-1]["psnr"] == pytest.approx(expected, abs=1e-3)


def test_validation_on_longer_clips_logs_drift(clip, tmp_path):
    """data.val_num_frames validates on clips longer than the training clips and logs the PSNR of
    their first 9 and last 8 frames (a causal state that drifts past the training length shows)."""
    held_out = tmp_path / "held_out.mp4"
    write_synthetic_video(held_out, 17, 32, 32, seed=9, crf=10)
    run_dir = tmp_path / "run"
    train(load_config(CONFIG, _overrides(clip, run_dir, "max_steps=1", "engine=torch", f"data.val_paths=[{held_out}]",
                                         "data.val_num_frames=17", "loss.disc_start=100")))
    from videovae.io import VideoReader, to_model_range
    from videovae.metrics import drift_psnr

    with VideoReader(held_out) as reader:
        x = to_model_range(reader.read_all())
    model = load_checkpoint(run_dir / "vae.safetensors")
    with torch.no_grad():
        expected = drift_psnr(x, model(x, sample=False)[0].clamp(-1, 1))
    val = [r for r in _train_log(run_dir) if r["kind"] == "val"][-1]
    assert val["psnr_first_9"] == pytest.approx(expected["psnr_first_9"], abs=1e-3)
    assert val["psnr_last_8"] == pytest.approx(expected["psnr_last_8"], abs=1e-3)
    with pytest.raises(ConfigError, match="val_num_frames=15"):
        train(load_config(CONFIG, _overrides(clip, tmp_path / "bad", "data.val_num_frames=15")))
    with pytest.raises(ConfigError, match="val_num_frames must be >= 0"):
        load_config(CONFIG, _overrides(clip, tmp_path / "bad", "data.val_num_frames=-1"))


# --- joint continuous/discrete training (OneVAE) --------------------------------------------------------


def test_joint_training_logs_both_paths_and_codebook_usage(clip, tmp_path):
    """The joint objective trains both paths of a OneVAE (GAN on the discrete one), logs the discrete
    terms and the codebook usage, validates both paths, and lowers both reconstruction losses."""
    run_dir = tmp_path / "joint"
    summary = train(load_config(CONFIG, _overrides(
        clip, run_dir, "model.preset=onevae-tiny", "max_steps=8", "engine=torch", "loss.discrete_weight=1.0",
        "loss.disc_start=6", "loss.disc_weight=0.1", "save_every=100", "val_every=4")))
    records = [r for r in _train_log(run_dir) if r["kind"] == "train"]
    first, last = records[0], records[-1]
    assert {"recon", "recon_discrete", "kl", "discrete_weight", "codebook_usage", "codebook_perplexity"} <= set(first)
    assert "gan" in last and "d_loss" in last
    assert 0 < first["codebook_usage"] <= 1 and first["codebook_perplexity"] >= 1
    assert last["recon"] < first["recon"] and last["recon_discrete"] < first["recon_discrete"]
    val = [r for r in _train_log(run_dir) if r["kind"] == "val"]
    assert {"psnr", "psnr_discrete", "ssim_discrete", "codebook_usage"} <= set(val[-1])
    assert summary["val"]["psnr_discrete"] == val[-1]["psnr_discrete"]
    model = load_checkpoint(run_dir / "vae.safetensors")
    assert model.family == "onevae" and model.config.discrete


def test_discrete_ramp_and_joint_needs_a_quantiser(clip, tmp_path):
    from videovae.train.config import LossConfig
    from videovae.train.losses import discrete_weight_at

    ramp = LossConfig(discrete_weight=2.0, discrete_ramp_steps=10)
    assert [discrete_weight_at(ramp, s) for s in (0, 5, 10, 50)] == [0.0, 1.0, 2.0, 2.0]
    with pytest.raises(ConfigError, match="quantiser"):
        train(load_config(CONFIG, _overrides(clip, tmp_path / "r", "loss.discrete_weight=1", "engine=torch")))
    with pytest.raises(ConfigError, match="cannot both be 0"):
        load_config(CONFIG, _overrides(clip, tmp_path / "r", "loss.discrete_weight=0", "loss.continuous_weight=0"))


def test_init_backbone_from_a_continuous_checkpoint(tmp_path):
    """A discrete model starts from a continuous checkpoint of the same backbone: every backbone weight
    is copied, the new head keeps its initialisation; another backbone is refused."""
    from dataclasses import replace

    from videovae.checkpoint import save_checkpoint
    from videovae.models import PRESETS, build_model, from_preset
    from videovae.train.vae import init_backbone

    torch.manual_seed(0)
    _, tiny = PRESETS["onevae-tiny"]
    continuous = build_model("onevae", replace(tiny, fsq_levels=(), fsq_groups=1))
    save_checkpoint(tmp_path / "cont.safetensors", continuous)
    model = build_model("onevae", replace(tiny, first_frame_boost=True))
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k not in continuous.state_dict()}
    assert head_before  # quant_conv / post_quant_conv / first-frame branch
    init_backbone(model, str(tmp_path / "cont.safetensors"))
    state = model.state_dict()
    for k, v in continuous.state_dict().items():
        assert torch.equal(state[k], v), k
    for k, v in head_before.items():
        assert torch.equal(state[k], v), k
    with pytest.raises(ConfigError, match="base_channels"):
        init_backbone(from_preset("onevae-small"), str(tmp_path / "cont.safetensors"))
    with pytest.raises(ConfigError, match="onevae"):
        init_backbone(from_preset("tiny"), str(tmp_path / "cont.safetensors"))


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG.parent.glob("*.yaml")))
def test_shipped_configs_load_and_fit_their_preset(name):
    """Every config in train/configs parses, validates, and its clip geometry fits its preset."""
    from videovae.models import from_preset
    from videovae.train.config import check_against_model

    cfg = load_config(CONFIG.parent / name, ["data.paths=[clips/]"])
    with torch.device("meta"):
        model = from_preset(cfg.model.preset)
    check_against_model(cfg, model.time_factor, model.space_factor)


def test_token_presets_share_their_continuous_backbone():
    """wan2.1-fsq starts from converted Wan 2.1 weights: the configs differ in head fields only."""
    from videovae.models import PRESETS

    (_, wan), (_, fsq) = PRESETS["wan2.1"], PRESETS["wan2.1-fsq"]
    head = set(type(wan).head_fields)
    a, b = wan.to_dict(), fsq.to_dict()
    assert {k for k in a if a[k] != b[k]} <= head and fsq.discrete and not wan.discrete
