"""``make demo``: round-trip a real clip through the shipped model (``vv-s16``) on the CPU.

Takes the first 33 frames of ``../shared/data/mmaction2_makeup.avi`` (a clip held out of the shipped
model's training; 320x240) when it exists, else renders a synthetic clip
(:mod:`videovae.synthetic`; also with ``VIDEOVAE_DEMO_SOURCE=synthetic``), and runs the installed
``videovae roundtrip`` without ``--weights``, so the shipped weights are used. Writes
``demo_out/sample.mkv`` (the input, lossless), ``demo_out/reconstruction.mp4``,
``demo_out/preview.png`` (original | reconstruction | error), ``demo_out/latents.safetensors``
and ``demo_out/metrics.json``, and prints PSNR/SSIM. ``make demo-train`` runs the training demo
(:mod:`videovae.train.demo`) instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from videovae.io import VideoReader, write_video
from videovae.synthetic import synthetic_video

SHARED_CLIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mmaction2_makeup.avi"
FRAMES = 33


def make_sample(out: Path) -> str:
    """Write the demo clip to ``out`` (lossless); returns a sentence saying where it came from."""
    if SHARED_CLIP.is_file() and os.environ.get("VIDEOVAE_DEMO_SOURCE", "auto") != "synthetic":
        with VideoReader(SHARED_CLIP, max_frames=FRAMES) as reader:
            frames, fps = reader.read_all(), reader.info.fps
        write_video(out, frames, fps)
        return f"first {FRAMES} frames of {SHARED_CLIP.name} (held out of the shipped model's training)"
    write_video(out, synthetic_video(FRAMES, 256, 320, seed=3), 24.0)
    return f"synthetic clip (videovae.synthetic, seed 3), {FRAMES} frames 320x256"


def cli_command() -> list[str]:
    """The installed ``videovae`` console script next to this interpreter, else ``python -m videovae.cli``."""
    script = Path(sys.executable).with_name("videovae")
    if script.is_file():
        return [str(script)]
    found = shutil.which("videovae")
    return [found] if found else [sys.executable, "-m", "videovae.cli"]


def main() -> int:
    out = Path("demo_out")
    out.mkdir(exist_ok=True)
    sample = out / "sample.mkv"
    source = make_sample(sample)
    print(f"demo: sample clip {sample}: {source}")
    cmd = [*cli_command(), "roundtrip", str(sample), "-o", str(out / "reconstruction.mp4"),
           "--latents", str(out / "latents.safetensors"), "--metrics", str(out / "metrics.json"),
           "--preview", str(out / "preview.png"), "--crf", "12"]
    print("demo: " + " ".join(cmd))
    t0 = time.time()
    subprocess.run(cmd, check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"demo: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} over {metrics['frames']} frames "
          f"in {time.time() - t0:.1f} s ({source})")
    if "psnr_last_8" in metrics:
        # a causal model whose state drifts scores well on the first frames and worse later on
        print(f"demo: PSNR of frames 1-9 {metrics['psnr_first_9']:.2f} dB, of the last 8 frames "
              f"{metrics['psnr_last_8']:.2f} dB")
    print(f"demo: wrote {out / 'reconstruction.mp4'}, {out / 'preview.png'}, {out / 'latents.safetensors'}, "
          f"{out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
