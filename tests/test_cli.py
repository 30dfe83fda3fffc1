"""The installed ``videovae`` command, run in subprocesses on real mp4 files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from videovae.io import probe, read_image, read_video
from videovae.synthetic import write_synthetic_video

VIDEOVAE = shutil.which("videovae", path=str(Path(sys.executable).parent)) or shutil.which("videovae")


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    assert VIDEOVAE, "the videovae command is not installed"
    done = subprocess.run([VIDEOVAE, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def fails(*args: str, match: str) -> str:
    done = run(*args, ok=False)
    assert done.returncode != 0
    lines = [line for line in done.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("videovae: error:"), done.stderr
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    write_synthetic_video(root / "clip.mp4", 14, 40, 56, seed=3, fps=25)
    run("init", "--model", "tiny", "-o", str(root / "w.safetensors"), "--seed", "1")
    run("init", "--model", "tiny-rms", "-o", str(root / "other.safetensors"))
    return root


def test_models_and_info(work):
    out = run("models").stdout
    assert "tiny" in out and "4x8x8" in out and "base" in out
    assert "checkpoint" in run("info", str(work / "w.safetensors")).stdout
    info = run("info", str(work / "clip.mp4")).stdout
    assert "56x40" in info and "14 frames" in info and "25 fps" in info


def test_encode_decode_mp4_mkv_png(work):
    lat = work / "clip.safetensors"
    run("encode", str(work / "clip.mp4"), "-o", str(lat), "--weights", str(work / "w.safetensors"),
        "--chunk-frames", "8", "--quiet")
    info = run("info", str(lat)).stdout
    assert "14 frames 56x40" in info and "(1, 4, 5, 5, 7)" in info
    for out in ("dec.mp4", "dec.mkv", "frames/"):
        target = work / out
        run("decode", str(lat), "-o", str(target), "--weights", str(work / "w.safetensors"), "--tile", "32",
            "--quiet")
        if out.endswith("/"):
            pngs = sorted(target.iterdir())
            assert len(pngs) == 14 and read_image(pngs[0]).shape == (1, 40, 56, 3)
        else:
            frames, fps = read_video(target)
            assert frames.shape == (14, 40, 56, 3) and fps == pytest.approx(25)
    # all tiles chunk by chunk: the same frames as the default order (tile by tile for so short a clip)
    run("decode", str(lat), "-o", str(work / "chunk_major/"), "--weights", str(work / "w.safetensors"), "--tile",
        "32", "--tile-order", "chunk", "--quiet")
    for a, b in zip(sorted((work / "frames").iterdir()), sorted((work / "chunk_major").iterdir()), strict=True):
        assert torch.equal(read_image(a), read_image(b))


def test_default_tile_order_is_the_smaller_planned_peak(monkeypatch):
    """``--tile-order auto``: tile order for a short tiled clip (one tile's caches plus the held
    clip is the smaller peak), chunk order for a long one or an unknown length, and as given
    otherwise; exchanged tile norms always stream chunk by chunk."""
    from videovae import cli
    from videovae.cli import _engine_options, build_parser
    from videovae.models import from_preset

    monkeypatch.setattr(cli, "available_memory_bytes", lambda device: None)  # plan, whatever this machine has
    model = from_preset("tiny")

    def order(frames, *flags):
        args = build_parser().parse_args(["decode", "in.safetensors", "-o", "out.mp4", "--quiet", *flags])
        return _engine_options(args, model, 720, 1280, frames).tile_order

    assert order(17, "--tile", "256") == "tile"
    assert order(1025, "--tile", "256") == "chunk"
    assert order(None, "--tile", "256") == "chunk"
    assert order(17, "--tile", "256", "--tile-order", "chunk") == "chunk"
    assert order(1025, "--tile", "256", "--tile-order", "tile") == "tile"
    assert order(17) == "chunk"  # untiled: the order does not matter
    assert order(17, "--tile", "256", "--tile-norm", "exact") == "chunk"
    # the check against the memory available costs the order that will run
    from videovae.engine import DEFAULT_CHUNK_FRAMES, estimate_peak_bytes

    plan = (model, DEFAULT_CHUNK_FRAMES, 256, 256, torch.float32, 720, 1280)
    chunk_need = estimate_peak_bytes(*plan)
    tile_need = estimate_peak_bytes(*plan, tile_order="tile", frames=17)
    assert tile_need < chunk_need
    monkeypatch.setattr(cli, "available_memory_bytes", lambda device: (tile_need + chunk_need) // 2)
    assert order(17, "--tile", "256") == "tile"
    with pytest.raises(cli.CLIError, match=r"256 px tiles \(chunk order\)"):
        order(17, "--tile", "256", "--tile-order", "chunk")
    with pytest.raises(ValueError, match="frame count"):
        estimate_peak_bytes(*plan, tile_order="tile")


def test_sampled_encode_is_seeded(work):
    outs = []
    for name in ("s1.safetensors", "s2.safetensors"):
        run("encode", str(work / "clip.mp4"), "-o", str(work / name), "--weights", str(work / "w.safetensors"),
            "--sample", "--seed", "7", "--quiet")
        outs.append((work / name).read_bytes())
    assert outs[0] == outs[1]


def test_roundtrip_metrics_and_preview(work):
    m = work / "m.json"
    p = work / "p.png"
    lat = work / "rt.safetensors"
    out = run("roundtrip", str(work / "clip.mp4"), "-o", str(work / "rt.mp4"), "--weights",
              str(work / "w.safetensors"), "--metrics", str(m), "--preview", str(p), "--latents", str(lat),
              "--max-memory", "1G", "--quiet").stdout
    assert "PSNR" in out
    metrics = json.loads(m.read_text())
    assert metrics["frames"] == 14 and len(metrics["psnr_per_frame"]) == 14
    assert {"psnr", "ssim", "flicker"} <= set(metrics)
    preview = read_image(p)
    assert preview.shape[2] == 3 * 56 and preview.shape[1] % 40 == 0
    assert probe(work / "rt.mp4").num_frames == 14 and lat.exists()


def test_max_frames(work):
    run("encode", str(work / "clip.mp4"), "-o", str(work / "mf.safetensors"), "--weights",
        str(work / "w.safetensors"), "--max-frames", "5", "--quiet")
    assert "5 frames" in run("info", str(work / "mf.safetensors")).stdout


def test_bench(work):
    out = run("bench", "--model", "tiny", "--frames", "5,9", "--size", "32", "--json", str(work / "b.json")).stdout
    assert "decode peak" in out
    rows = json.loads((work / "b.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["fps"] > 0 and r["peak_bytes"] > 0 for r in rows)


def test_bench_turbo_against_its_teacher(work):
    out = run("bench", "--model", "turbo-tiny", "--frames", "9", "--size", "32", "--json", str(work / "t.json")).stdout
    assert "student fps" in out and "teacher fps" in out and "speed-up" in out
    data = json.loads((work / "t.json").read_text())
    assert data["turbo"] and [r["direction"] for r in data["rows"]] == ["decode", "decode"]
    from videovae.checkpoint import load_checkpoint, save_checkpoint
    from videovae.models import from_preset
    from videovae.models.turbo_vaed import TurboPair

    teacher = load_checkpoint(work / "w.safetensors")
    pair = TurboPair.from_models(teacher, from_preset("turbo-tiny"), teacher._videovae_digest)
    save_checkpoint(work / "pair.safetensors", pair)
    out = run("bench", "--weights", str(work / "pair.safetensors"), "--frames", "5", "--size", "32").stdout
    assert "student fps" in out and "speed-up" in out
    out = run("bench", "--model", "turbo-tiny", "--frames", "5,9", "--size", "32", "--no-teacher").stdout
    assert "student peak at 9 frames" in out and "teacher" not in out
    info = run("info", str(work / "pair.safetensors")).stdout
    assert "turbo-pair" in info and teacher._videovae_digest[:12] in info


def test_bad_inputs(work):
    w = str(work / "w.safetensors")
    fails("encode", str(work / "missing.mp4"), "-o", str(work / "x.safetensors"), "--weights", w, match="missing.mp4")
    (work / "notes.mp4").write_text("this is not a video")
    fails("encode", str(work / "notes.mp4"), "-o", str(work / "x.safetensors"), "--weights", w, match="notes.mp4")
    (work / "empty.mp4").write_bytes(b"")
    fails("encode", str(work / "empty.mp4"), "-o", str(work / "x.safetensors"), "--weights", w, match="empty.mp4")
    data = (work / "clip.mp4").read_bytes()
    (work / "cut.mp4").write_bytes(data[: len(data) // 3])
    done = run("encode", str(work / "cut.mp4"), "-o", str(work / "cut.safetensors"), "--weights", w, "--quiet",
               ok=False)
    assert done.returncode == 0 or "cut.mp4" in done.stderr
    # a latent file from another model, and a weights file that is not ours
    fails("decode", str(work / "clip.safetensors"), "-o", str(work / "x.mp4"), "--weights",
          str(work / "other.safetensors"), match="different model")
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(work / "foreign.safetensors"))
    fails("encode", str(work / "clip.mp4"), "-o", str(work / "x.safetensors"), "--weights",
          str(work / "foreign.safetensors"), match="not a videovae checkpoint")
    fails("encode", str(work / "clip.mp4"), "-o", str(work / "x.safetensors"), "--weights", w, "--max-memory", "1M",
          match="memory budget")
    fails("decode", str(work / "clip.mp4"), "-o", str(work / "x.mp4"), "--weights", w, match="clip.mp4")
    fails("encode", str(work / "clip.mp4"), "-o", str(work / "x.safetensors"), "--weights", w, "--tiling", "official",
          "--compile", "default", match="--compile applies to the chunked decode step")
    fails("init", "--model", "nope", "-o", str(work / "x.safetensors"), match="unknown model preset")
    fails("encode", str(work / "clip.mp4"), "-o", str(work / "no" / "x.safetensors"), "--weights", w,
          match="does not exist")
    leftovers = [p.name for p in work.iterdir() if p.name.startswith((".", "x.")) or ".tmp" in p.name]
    assert leftovers == []


def test_odd_sized_video_roundtrip(work):
    write_synthetic_video(work / "odd.mkv", 6, 27, 35, seed=2)
    run("roundtrip", str(work / "odd.mkv"), "-o", str(work / "odd_out.mkv"), "--weights",
        str(work / "w.safetensors"), "--quiet")
    frames, _ = read_video(work / "odd_out.mkv")
    assert frames.shape == (6, 27, 35, 3)


def test_one_frame_video_is_an_image(work):
    write_synthetic_video(work / "one.mp4", 1, 32, 32, seed=2)
    run("roundtrip", str(work / "one.mp4"), "-o", str(work / "one_out.mkv"), "--weights",
        str(work / "w.safetensors"), "--quiet")
    assert read_video(work / "one_out.mkv")[0].shape == (1, 32, 32, 3)


def test_shared_sample_clip(work, shared_data):
    run("roundtrip", str(shared_data / "world.mp4"), "-o", str(work / "world.mp4"), "--weights",
        str(work / "w.safetensors"), "--max-frames", "9", "--metrics", str(work / "world.json"), "--quiet")
    metrics = json.loads((work / "world.json").read_text())
    assert metrics["frames"] == 9
    assert probe(work / "world.mp4").width == 480


def _peak_rss(*args: str) -> tuple[int, subprocess.CompletedProcess]:
    """Peak resident set size (bytes) of one `videovae` run, measured in a fresh wrapper process."""
    wrapper = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
               "sys.stderr.write(done.stderr); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(done.returncode)")
    done = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    return int(done.stdout.strip().splitlines()[-1]), done


def test_max_memory_holds_on_a_720p_clip(work):
    """--max-memory bounds the peak RSS (budget + the interpreter's own footprint), and a budget that
    cannot hold the clip is refused up front with the --max-memory that would."""
    clip, lat, out = work / "c720.mp4", work / "c720.safetensors", work / "c720_out.mp4"
    write_synthetic_video(clip, 5, 720, 1280, seed=6)
    w = str(work / "w.safetensors")
    baseline, _ = _peak_rss(sys.executable, "-c", "import videovae.cli, torch")
    refused = fails("encode", str(clip), "-o", str(lat), "--weights", w, "--max-memory", "512M",
                    match="does not fit a memory budget of 512 MiB")
    assert "--max-memory" in refused and not lat.exists()
    budget = 3 * 2**30
    peak, done = _peak_rss(VIDEOVAE, "encode", str(clip), "-o", str(lat), "--weights", w, "--max-memory", "3G",
                           "--quiet")
    assert done.returncode == 0, done.stderr
    assert peak <= budget + baseline, f"encode peak {peak / 2**30:.2f} GiB"
    peak, done = _peak_rss(VIDEOVAE, "decode", str(lat), "-o", str(out), "--weights", w, "--max-memory", "3G",
                           "--quiet")
    assert done.returncode == 0, done.stderr
    assert peak <= budget + baseline, f"decode peak {peak / 2**30:.2f} GiB"
    assert probe(out).num_frames == 5


def test_a_run_that_cannot_fit_the_available_memory_is_refused_before_it_starts(work, monkeypatch):
    import videovae.cli as cli

    monkeypatch.setattr(cli, "available_memory_bytes", lambda device: 2**30)
    out = work / "never.safetensors"
    assert cli.main(["encode", str(work / "clip.mp4"), "-o", str(out), "--weights", str(work / "w.safetensors"),
                     "--quiet"]) == 0  # 56x40 fits easily
    clip = work / "c720b.mp4"
    write_synthetic_video(clip, 5, 720, 1280, seed=7)
    assert cli.main(["encode", str(clip), "-o", str(out.with_name("big.safetensors")), "--weights",
                     str(work / "w.safetensors"), "--quiet"]) == 1
    assert not out.with_name("big.safetensors").exists()
