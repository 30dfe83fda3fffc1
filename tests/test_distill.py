"""Turbo-VAED distillation (`videovae distill`) and turbo pairs (teacher encoder + turbo decoder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from videovae.checkpoint import load_checkpoint, save_checkpoint, weights_digest
from videovae.cli import main as cli_main
from videovae.engine import decode_tensor, encode_tensor
from videovae.latents import LatentFileError, check_model_matches, load_latents
from videovae.models import from_preset
from videovae.models.turbo_vaed import TurboPair, TurboPairConfig
from videovae.synthetic import write_synthetic_video
from videovae.train.config import ConfigError, load_config
from videovae.train.distill import AlignHead, Distiller, auto_align_pairs, build_student, distill, plan_alignment

CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "distill_tiny.yaml"


def _teacher(seed: int):
    torch.manual_seed(seed)
    return from_preset("tiny").eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill")
    clip = root / "clip.mp4"
    write_synthetic_video(clip, 9, 32, 32, seed=3, crf=10)
    teacher = root / "teacher.safetensors"
    save_checkpoint(teacher, _teacher(0))
    other = root / "other.safetensors"
    save_checkpoint(other, _teacher(1))
    return {"clip": clip, "teacher": teacher, "other": other, "root": root}


def _overrides(files, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.paths=[{files['clip']}]", f"run_dir={run_dir}", f"distill.teacher={files['teacher']}",
            "data.size=32", "data.num_frames=9", "data.max_stride=1", "data.crop_scale_min=1.0",
            "data.num_workers=0", "batch_size=1", "progress=false", "val_clips=1", "optim.warmup_steps=0",
            "optim.lr=3e-3", "optim.ema_decay=0.5", "log_every=1", "engine=torch", *extra]


def _log(run_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


# --- the pair -------------------------------------------------------------------------------------------


def test_pair_encodes_like_the_teacher_and_decodes_like_the_student(tmp_path):
    teacher, student = _teacher(0), from_preset("turbo-tiny").eval()
    digest = weights_digest(teacher.state_dict())
    pair = TurboPair.from_models(teacher, student, digest).eval()
    assert not any(k.startswith(("teacher.decoder.", "teacher.post_quant_conv.")) for k in pair.state_dict())
    counts = pair.num_parameters()
    assert counts["decoder"] == student.num_parameters()["decoder"]
    assert counts["encoder"] == sum(p.numel() for p in teacher.encoder.parameters()) + sum(
        p.numel() for p in teacher.quant_conv.parameters())
    x = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    with torch.no_grad():
        z = teacher.encode(x).mean
        assert torch.equal(pair.encode(x).mean, z)
        assert torch.equal(pair.decode(z), student.decode(z))
    # latent identity: the teacher checkpoint's
    ident = pair.latent_identity()
    assert (ident.family, ident.config, ident.weights_sha256) == ("causal-vae", teacher.config.to_dict(), digest)
    save_checkpoint(tmp_path / "pair.safetensors", pair)
    loaded = load_checkpoint(tmp_path / "pair.safetensors")
    assert loaded.family == "turbo-pair" and loaded.config == pair.config
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), pair.decode(z))


def test_pair_streams_exactly_through_the_engine():
    pair = TurboPair.from_models(_teacher(0), from_preset("turbo-tiny"), "0" * 64).eval()
    video = torch.rand(1, 3, 13, 32, 32) * 2 - 1
    whole = encode_tensor(pair, video).mean
    chunked = encode_tensor(pair, video, chunk_frames=4).mean
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    a = decode_tensor(pair, whole)
    b = decode_tensor(pair, whole, chunk_frames=4, tile=16)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_pair_config_errors():
    teacher = _teacher(0)
    with pytest.raises(ValueError, match="latent channels"):
        TurboPair(TurboPairConfig("causal-vae", teacher.config.to_dict(), "0" * 64,
                                  from_preset("turbo-vv-s16").config))
    with pytest.raises(ValueError, match="cannot be paired"):
        TurboPairConfig("turbo-vaed", {}, "0" * 64, from_preset("turbo-tiny").config)
    with pytest.raises(ValueError, match="missing fields"):
        TurboPairConfig.from_dict({"teacher_family": "causal-vae"})


def test_pair_checks_latents_against_the_teacher_checkpoint():
    teacher = _teacher(0)
    digest = weights_digest(teacher.state_dict())
    pair = TurboPair.from_models(teacher, from_preset("turbo-tiny"), digest)

    class Meta:
        family, config, weights_sha256 = "causal-vae", teacher.config.to_dict(), digest

    check_model_matches(Meta, pair, "pair-digest-is-not-used", "z.safetensors")
    Meta.weights_sha256 = "f" * 64
    with pytest.raises(LatentFileError, match="other weights"):
        check_model_matches(Meta, pair, "x", "z.safetensors")
    Meta.family, Meta.config = "od-vae", from_preset("od-vae-stream").config.to_dict()
    with pytest.raises(LatentFileError, match="different model"):
        check_model_matches(Meta, pair, "x", "z.safetensors")


# --- alignment ------------------------------------------------------------------------------------------


def test_auto_alignment_matches_levels_to_teacher_blocks_of_the_same_shape():
    pairs = auto_align_pairs(from_preset("turbo-tiny"), _teacher(0))
    assert pairs == [(0, "decoder.up.3.block.0"), (1, "decoder.up.2.block.0"), (2, "decoder.up.1.block.0")]
    plan = plan_alignment(from_preset("turbo-tiny"), _teacher(0), [(2, "decoder.up.0.block.0")])
    assert plan.student_shapes[0][1:] == (9, 16, 16) and plan.teacher_shapes[0][1:] == (9, 32, 32)
    head = AlignHead(plan.student_shapes[0][0], plan.teacher_shapes[0][0], 2)
    assert head(torch.zeros(1, *plan.student_shapes[0])).shape[1:] == plan.teacher_shapes[0]
    with pytest.raises(ConfigError, match="frame counts"):
        plan_alignment(from_preset("turbo-tiny"), _teacher(0), [(0, "decoder.up.2.block.0")])
    with pytest.raises(ConfigError, match="not found"):
        plan_alignment(from_preset("turbo-tiny"), _teacher(0), [(0, "decoder.nope")])


def test_distiller_features_follow_the_plan():
    student, teacher = from_preset("turbo-tiny"), _teacher(0)
    plan = plan_alignment(student, teacher, auto_align_pairs(student, teacher))
    recon, feats = Distiller(student, plan)(torch.randn(1, 4, 3, 4, 4))
    assert recon.shape == (1, 3, 9, 32, 32)
    assert [tuple(f.shape[1:]) for f in feats] == list(plan.teacher_shapes)


# --- the job --------------------------------------------------------------------------------------------


def test_distillation_lowers_the_loss_and_the_pair_decodes_teacher_latents_through_the_cli(files, tmp_path):
    run_dir = tmp_path / "run"
    args = ["distill", "--config", str(CONFIG), "--teacher", str(files["teacher"]), "--student", "turbo-tiny",
            *_overrides(files, run_dir, "max_steps=24", "save_every=100", "val_every=12")]
    assert cli_main(args) == 0
    records = _log(run_dir)
    assert [r["step"] for r in records] == list(range(1, 25))
    first = sum(r["total"] for r in records[:4]) / 4
    last = sum(r["total"] for r in records[-4:]) / 4
    assert last < 0.7 * first
    assert {"recon", "align", "align_0", "align_2"} <= set(records[0])
    assert records[-1]["align"] < records[0]["align"]
    val = _log(run_dir, "val")
    assert [v["step"] for v in val] == [12, 24] and {"teacher_psnr", "psnr_vs_teacher"} <= set(val[0])
    assert list((run_dir / "previews").glob("step_*.png"))
    pair_file = run_dir / "turbo.safetensors"
    pair = load_checkpoint(pair_file)
    assert pair.family == "turbo-pair"

    # the teacher's latent file, decoded by the pair
    z_file, out = tmp_path / "z.safetensors", tmp_path / "out.mp4"
    assert cli_main(["encode", str(files["clip"]), "-o", str(z_file), "--weights", str(files["teacher"]),
                     "--quiet"]) == 0
    assert cli_main(["decode", str(z_file), "-o", str(out), "--weights", str(pair_file), "--quiet"]) == 0
    from videovae.io import read_video

    frames, _ = read_video(out)
    assert frames.shape[0] == 9
    latent, meta = load_latents(z_file)
    with torch.no_grad():
        expected = decode_tensor(pair, latent, meta.geometry).clamp(-1, 1)
    ours = frames.permute(3, 0, 1, 2).float().div(127.5).sub(1).unsqueeze(0)
    assert (ours - expected).abs().mean() < 0.05  # video codec error only

    # the pair writes the teacher's latents: the teacher decodes them too
    z_pair = tmp_path / "z_pair.safetensors"
    assert cli_main(["encode", str(files["clip"]), "-o", str(z_pair), "--weights", str(pair_file), "--quiet"]) == 0
    pair_latent, pair_meta = load_latents(z_pair)
    assert pair_meta.family == "causal-vae" and pair_meta.weights_sha256 == meta.weights_sha256
    torch.testing.assert_close(pair_latent, latent, rtol=0, atol=1e-6)
    assert cli_main(["decode", str(z_pair), "-o", str(tmp_path / "t.mp4"), "--weights", str(files["teacher"]),
                     "--quiet"]) == 0

    # latents of another teacher checkpoint are refused
    z_other = tmp_path / "z_other.safetensors"
    assert cli_main(["encode", str(files["clip"]), "-o", str(z_other), "--weights", str(files["other"]),
                     "--quiet"]) == 0
    assert cli_main(["decode", str(z_other), "-o", str(tmp_path / "x.mp4"), "--weights", str(pair_file)]) == 1
    assert not (tmp_path / "x.mp4").exists()


def test_exported_pair_decoder_decodes_teacher_latents(files, tmp_path):
    pytest.importorskip("onnxruntime")
    teacher = load_checkpoint(files["teacher"])
    pair = TurboPair.from_models(teacher, from_preset("turbo-tiny"), teacher._videovae_digest)
    pair_file = tmp_path / "pair.safetensors"
    save_checkpoint(pair_file, pair)
    z_file = tmp_path / "z.safetensors"
    assert cli_main(["encode", str(files["clip"]), "-o", str(z_file), "--weights", str(files["teacher"]),
                     "--quiet"]) == 0
    onnx = tmp_path / "dec.onnx"
    assert cli_main(["export", "--weights", str(pair_file), "-o", str(onnx), "--format", "onnx",
                     "--chunk-latents", "1", "--height", "32", "--width", "32", "--quiet"]) == 0
    sidecar = json.loads(onnx.with_name(onnx.name + ".json").read_text())
    assert sidecar["spec"]["latent_source"]["weights_sha256"] == teacher._videovae_digest
    from videovae.deploy.runtime import decode_latent_file, open_decoder

    decoder = open_decoder(onnx, "onnx")
    frames = torch.cat(list(decode_latent_file(z_file, decoder)))
    latent, meta = load_latents(z_file)
    with torch.no_grad():
        expected = decode_tensor(pair, latent, meta.geometry)
    from videovae.io import from_model_range

    assert (frames.int() - from_model_range(expected[0]).int()).abs().max() <= 1
    other_z = tmp_path / "other.safetensors"
    assert cli_main(["encode", str(files["clip"]), "-o", str(other_z), "--weights", str(files["other"]),
                     "--quiet"]) == 0
    with pytest.raises(LatentFileError, match="other weights"):
        list(decode_latent_file(other_z, decoder))


def test_distillation_resumes_exactly(files, tmp_path):
    common = ("max_steps=4", "save_every=100", "val_every=100", "val_clips=0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    distill(load_config(CONFIG, _overrides(files, straight, *common)))
    assert distill(load_config(CONFIG, _overrides(files, split, *common, "run_steps=2")))["step"] == 2
    second = distill(load_config(CONFIG, _overrides(files, split, *common)), resume=True)
    assert second["step"] == 4 and second["steps_this_run"] == 2
    assert [r["step"] for r in _log(split)] == [1, 2, 3, 4]
    a = load_checkpoint(straight / "turbo.safetensors").state_dict()
    b = load_checkpoint(split / "turbo.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    with pytest.raises(ConfigError, match="different settings"):
        distill(load_config(CONFIG, _overrides(files, split, *common, "max_steps=6", "distill.student=turbo-tiny",
                                               f"distill.teacher={files['other']}")), resume=True)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("distill.teacher=null",), "pass the teacher"),
        (("distill.student=turbo-vv-s16",), "latent channels"),
        (("distill.student=tiny",), "not a turbo-vaed preset"),
        (("distill.align=[7=decoder.up.3.block.0]",), "student levels"),
        (("distill.align=[a=b]",), "level number"),
    ],
)
def test_distillation_config_errors(files, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        distill(load_config(CONFIG, _overrides(files, tmp_path / "run", "max_steps=1", *extra)))


def test_distilling_from_a_turbo_pair_is_refused(files, tmp_path):
    pair = TurboPair.from_models(_teacher(0), from_preset("turbo-tiny"), "0" * 64)
    save_checkpoint(tmp_path / "pair.safetensors", pair)
    with pytest.raises(ConfigError, match="must be a VAE"):
        distill(load_config(CONFIG, _overrides(files, tmp_path / "run", "max_steps=1",
                                               f"distill.teacher={tmp_path / 'pair.safetensors'}")))


def test_the_student_can_start_from_a_distilled_decoder(files, tmp_path):
    """distill.student_init: the student starts as the turbo decoder of a pair (or a turbo checkpoint)
    of the student preset's architecture, e.g. to re-distil after the teacher trained on."""
    torch.manual_seed(5)
    earlier = from_preset("turbo-tiny")
    pair = TurboPair.from_models(_teacher(0), earlier, "0" * 64)
    save_checkpoint(tmp_path / "pair.safetensors", pair)
    save_checkpoint(tmp_path / "student.safetensors", earlier)
    for init in ("pair.safetensors", "student.safetensors"):
        cfg = load_config(CONFIG, _overrides(files, tmp_path / "run", f"distill.student_init={tmp_path / init}"))
        student = build_student(cfg, _teacher(0))
        for key, value in earlier.state_dict().items():
            assert torch.equal(student.state_dict()[key], value), key
    assert not torch.equal(from_preset("turbo-tiny").state_dict()["decoder.conv_in.conv.weight"],
                           earlier.state_dict()["decoder.conv_in.conv.weight"])  # the init is not the preset's
    for wrong, message in ((files["teacher"], "not a turbo decoder"), ("turbo-vv-s16", "another architecture")):
        cfg = load_config(CONFIG, _overrides(files, tmp_path / "run", f"distill.student_init={wrong}"))
        with pytest.raises(ConfigError, match=message):
            build_student(cfg, _teacher(0))


def test_distillation_with_lpips_from_local_weights(files, tmp_path):
    from safetensors.torch import save_file

    from videovae.train.lpips import LPIPS

    torch.manual_seed(0)
    net = LPIPS()
    for conv in net.lins:
        conv.weight.data.uniform_(0, 0.1)
    save_file({f"features.{k}": v for k, v in net.features.state_dict().items()}, tmp_path / "vgg.safetensors")
    save_file({f"lin{i}.model.1.weight": c.weight.detach().clone() for i, c in enumerate(net.lins)},
              tmp_path / "lin.safetensors")
    run_dir = tmp_path / "run"
    summary = distill(load_config(CONFIG, _overrides(
        files, run_dir, "max_steps=2", "save_every=100", "val_every=100", "loss.lpips_weight=0.5",
        f"loss.lpips_vgg={tmp_path / 'vgg.safetensors'}", f"loss.lpips_lin={tmp_path / 'lin.safetensors'}",
        "distill.align_weight=0")))
    records = _log(run_dir)
    assert summary["align"] == [] and "align" not in records[0]
    assert records[0]["lpips"] > 0
    assert records[0]["total"] == pytest.approx(records[0]["recon"] + 0.5 * records[0]["lpips"], rel=1e-5)
