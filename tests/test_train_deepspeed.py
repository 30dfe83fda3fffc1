"""A real 2-rank DeepSpeed run on the CPU (ZeRO-2): train, save, resume, export, decode with the CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from videovae.synthetic import write_synthetic_video

CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_demo.yaml"
LAUNCHER = Path(sys.executable).with_name("deepspeed")

pytestmark = pytest.mark.skipif(not LAUNCHER.is_file() and shutil.which("deepspeed") is None,
                                reason="the deepspeed launcher is not installed")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shm_buffers_left(port: int) -> list[Path]:
    """DeepSpeed CPU all-reduce buffers of the run on ``port`` still named in /dev/shm (the trainer
    unlinks them once every rank has mapped them; each is 66 MB of RAM until unlinked)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def _launch(run_dir: Path, clip: Path, *extra: str) -> subprocess.CompletedProcess:
    launcher = str(LAUNCHER) if LAUNCHER.is_file() else shutil.which("deepspeed")
    port = _port()
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(port), "--module", "videovae.train.vae",
           "--config", str(CONFIG), f"data.paths=[{clip}]", f"run_dir={run_dir}", "data.size=32",
           "data.num_frames=5", "data.num_workers=0", "batch_size=1", "max_steps=4", "loss.disc_start=1",
           "disc.channels=8", "deepspeed.zero_stage=2", "val_clips=1", "val_every=100", "save_every=100",
           "log_every=1", "progress=false", *extra]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _shm_buffers_left(port) == []
    return proc


def test_two_rank_zero2_train_resume_export(tmp_path):
    clip = tmp_path / "clip.mp4"
    write_synthetic_video(clip, 9, 32, 32, seed=4)
    run_dir = tmp_path / "run"
    _launch(run_dir, clip, "run_steps=2")
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000002"
    shards = sorted(p.name for p in (ckpt / "step_00000002" / "vae").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2  # ZeRO-2: one optimizer shard per rank
    assert {p.name for p in (ckpt / "step_00000002").glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}

    proc = _launch(run_dir, clip, "--resume")
    assert "resumed from" in proc.stderr + proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4 and summary["steps_this_run"] == 2
    steps = [r["step"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert (ckpt / "latest").read_text() == "step_00000004"

    weights = run_dir / "vae.safetensors"
    cli = [sys.executable, "-m", "videovae.cli"]
    for args in (["encode", str(clip), "-o", str(tmp_path / "z.safetensors")],
                 ["decode", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "out.mp4")]):
        done = subprocess.run([*cli, *args, "--weights", str(weights), "--quiet"], env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    from videovae.io import probe

    info = probe(tmp_path / "out.mp4")
    assert (info.width, info.height) == (32, 32)


def test_two_rank_distillation_resumes_and_exports_a_pair(tmp_path):
    from videovae.checkpoint import load_checkpoint, save_checkpoint
    from videovae.models import from_preset

    clip = tmp_path / "clip.mp4"
    write_synthetic_video(clip, 9, 32, 32, seed=5)
    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher, from_preset("tiny"))
    run_dir = tmp_path / "run"
    config = CONFIG.with_name("distill_tiny.yaml")
    launcher = str(LAUNCHER) if LAUNCHER.is_file() else shutil.which("deepspeed")

    def launch(*extra: str) -> subprocess.CompletedProcess:
        port = _port()
        cmd = [launcher, "--num_gpus", "2", "--master_port", str(port), "--module", "videovae.train.distill",
               "--config", str(config), "--teacher", str(teacher), f"data.paths=[{clip}]", f"run_dir={run_dir}",
               "data.size=32", "data.num_frames=9", "data.num_workers=0", "batch_size=1", "max_steps=4",
               "deepspeed.zero_stage=2", "val_clips=1", "val_every=100", "save_every=100", "log_every=1",
               "progress=false", "engine=deepspeed", *extra]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert _shm_buffers_left(port) == []
        return proc

    launch("run_steps=2")
    shards = sorted((run_dir / "checkpoints" / "step_00000002" / "student").glob("zero_pp_rank_*_optim_states.pt"))
    assert len(shards) == 2
    launch("--resume")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4 and summary["steps_this_run"] == 2
    assert summary["val"]["teacher_psnr"] > 0
    pair = load_checkpoint(run_dir / "turbo.safetensors")
    assert pair.family == "turbo-pair" and pair.config.teacher_family == "causal-vae"
