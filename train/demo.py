"""``make demo``: fit the ``tiny`` preset to a sample clip on the CPU, then round-trip the clip.

Steps: (1) make the sample clip ``demo_out/sample.mp4`` (33 frames): cut and downscaled from
``../shared/data/world.mp4`` when that file exists, otherwise generated with
:func:`videovae.synthetic.write_synthetic_video` (always when ``VIDEOVAE_DEMO_SOURCE=synthetic``);
(2) train ``tiny`` on it for a fixed wall-time budget (``VIDEOVAE_DEMO_SECONDS``, default 180) with
the single-process DeepSpeed loop of :mod:`videovae.train.vae`; (3) export the EMA weights to
``demo_out/tiny_demo.safetensors``; (4) run the installed ``videovae roundtrip`` CLI, which writes
``demo_out/reconstruction.mp4``, ``demo_out/preview.png`` (original | reconstruction | error) and
``demo_out/metrics.json``, and print PSNR/SSIM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from videovae.demo import cli_command
from videovae.io import VideoReader, write_video
from videovae.synthetic import write_synthetic_video

CONFIG = Path(__file__).with_name("configs") / "tiny_demo.yaml"
SHARED_CLIP = Path("../shared/data/world.mp4")
FRAMES, WIDTH, HEIGHT = 33, 128, 72


def make_sample(out: Path) -> str:
    """Write the demo clip to ``out``; returns a sentence saying where it came from."""
    if SHARED_CLIP.is_file() and os.environ.get("VIDEOVAE_DEMO_SOURCE", "auto") != "synthetic":
        with VideoReader(SHARED_CLIP, max_frames=FRAMES) as reader:
            frames = reader.read_all()
        x = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=(HEIGHT, WIDTH), mode="bilinear", antialias=True)
        write_video(out, x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous(), 30.0, crf=12)
        return f"first {FRAMES} frames of {SHARED_CLIP} resized to {WIDTH}x{HEIGHT}"
    write_synthetic_video(out, FRAMES, HEIGHT, WIDTH, seed=3, crf=12)
    return f"synthetic clip (videovae.synthetic, seed 3), {FRAMES} frames {WIDTH}x{HEIGHT}"


def main() -> int:
    from videovae.train.config import load_config
    from videovae.train.vae import train

    out = Path("demo_out")
    out.mkdir(exist_ok=True)
    seconds = float(os.environ.get("VIDEOVAE_DEMO_SECONDS", "180"))
    sample = out / "sample.mp4"
    source = make_sample(sample)
    print(f"demo: sample clip {sample}: {source}")

    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(CONFIG, [
        f"data.paths=[{sample}]", f"run_dir={run_dir}", f"time_budget_s={seconds}", "max_steps=2000",
        "data.size=64", "data.crop_scale_min=0.85", "data.num_workers=0", "data.decode_short_side=0",
        "batch_size=1", "optim.lr=2e-3", "optim.warmup_steps=10", "optim.ema_decay=0.9", "loss.disc_start=100000",
        "val_every=100000", "save_every=100000", "val_clips=1", "log_every=10",
    ])
    print(f"demo: training tiny for {seconds:.0f} s on the CPU (DeepSpeed, 1 process) ...")
    t0 = time.time()
    summary = train(cfg)
    weights = out / "tiny_demo.safetensors"
    shutil.copyfile(summary["export"], weights)
    print(f"demo: {summary['step']} steps in {time.time() - t0:.0f} s ({summary['samples_per_s']:.2f} clips/s), "
          f"final recon loss {summary['last_terms'].get('recon', float('nan')):.4f}; exported {weights}")

    cmd = [*cli_command(), "roundtrip", str(sample), "-o", str(out / "reconstruction.mp4"), "--weights", str(weights),
           "--metrics", str(out / "metrics.json"), "--preview", str(out / "preview.png"), "--quiet"]
    print("demo: " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"demo: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} over {metrics['frames']} frames "
          f"({source})")
    print(f"demo: wrote {out / 'reconstruction.mp4'}, {out / 'preview.png'}, {out / 'metrics.json'}, "
          f"training log {run_dir / 'log.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
