"""OneVAE on the CPU: what the joint objective, the continuous initialisation, multi-token
quantisation and first-frame strengthening buy, measured on real clips.

Trains small OneVAE configurations for the same number of steps on the sample clips (one process,
the plain-torch engine) and evaluates each exported model on held-out clips: PSNR of the continuous
and the discrete path, PSNR of frame 0 through the discrete path, codebook usage and perplexity of
the held-out tokens. A measurement, not a test: numbers depend on steps, data and machine.

    .venv/bin/python benchmarks/onevae_study.py --out runs/onevae-study --steps 400

Runs (the ``onevae-small*`` presets share one backbone; ``--steps`` optimizer steps each):

- ``continuous``: the continuous path alone (the quantiser is not trained; its PSNR through the
  untrained head is reported for completeness).
- ``joint``: the paper's joint objective (both paths, weight 1 each), from scratch.
- ``joint-from-continuous``: the joint objective started from ``continuous``'s weights
  (``model.init_backbone``) — the paper's recipe of quantising a trained continuous VAE. With
  ``continuous`` it has trained twice as many steps in all; compare it with ``joint`` for what the
  continuous initialisation buys at the same discrete training steps.
- ``joint-1-token``: ``joint`` with one token per latent position instead of two.
- ``joint-first-frame``: ``joint`` with first-frame strengthening (frame 0 tokens at 2x).

Prints a Markdown table and writes ``results.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from videovae.checkpoint import load_checkpoint
from videovae.io import VideoReader, VideoWriter, to_model_range
from videovae.metrics import psnr
from videovae.quantizers import CodebookUsage
from videovae.train.config import config_from_dict
from videovae.train.data import shrink_frames
from videovae.train.vae import train

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TRAIN_CLIPS = ("mmaction2_armwrestling.mp4", "mmaction2_basketball.mp4", "a.mp4", "world.mp4")
HELD_OUT = ("mmaction2_pool.mp4", "mmaction2_makeup.avi")

JOINT = {"discrete_weight": 1.0, "continuous_weight": 1.0}
RUNS = [
    ("continuous", "onevae-small", {}, None),
    ("joint", "onevae-small", JOINT, None),
    ("joint-from-continuous", "onevae-small", JOINT, "continuous"),
    ("joint-1-token", "onevae-small-1tok", JOINT, None),
    ("joint-first-frame", "onevae-small-fe", JOINT, None),
]


def prepare_training_clips(folder: Path, short_side: int, names: list[str]) -> list[str]:
    """The training clips decoded once and stored at ``short_side`` (lossless FFV1), so that every
    run reads small files instead of decoding the full-resolution sources again."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        out = folder / (Path(name).stem + ".mkv")
        if not out.is_file():
            with VideoReader(str(SHARED / name), max_frames=2048) as reader:
                frames, fps = shrink_frames(reader.read_all(), short_side), reader.info.fps
            if frames.shape[1] % 2 or frames.shape[2] % 2:
                frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
            with VideoWriter(str(out), fps) as writer:
                writer.write(frames)
        paths.append(str(out))
    return paths


def train_config(name: str, preset: str, loss: dict, init: Path | None, args) -> dict:
    return {
        "run_dir": str(args.out / name),
        "seed": 0,
        "batch_size": 2,
        "max_steps": args.steps,
        "log_every": 25,
        "val_every": 10**9,
        "val_clips": 0,
        "save_every": args.steps,
        "keep_checkpoints": 1,
        "progress": False,
        "threads": args.threads,
        "engine": "torch",
        "model": {"preset": preset, "init_backbone": str(init) if init else None},
        "data": {"paths": args.clips, "num_frames": 9, "size": args.size,
                 "max_stride": 2, "crop_scale_min": 0.5, "decode_short_side": args.short_side,
                 "cache_mb": 1024},
        "loss": {"recon": "l1", "kl_weight": 1e-7, "disc_weight": 0.0, "sample_posterior": False, **loss},
        "optim": {"lr": args.lr, "warmup_steps": 20, "ema_decay": 0.0, "grad_clip": 1.0},
    }


def centre_clips(names: list[str], frames: int, size: int) -> list[torch.Tensor]:
    """Centre crops (1, 3, frames, size, size) in [-1, 1] of the clips' first frames."""
    clips = []
    for name in names:
        with VideoReader(str(SHARED / name), max_frames=frames) as reader:
            video = torch.cat(list(reader.iter_chunks(frames)))  # (T, H, W, 3) uint8
        t, h, w, _ = video.shape
        s = min(h, w)
        crop = video[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        x = to_model_range(crop.contiguous())  # (1, 3, T, s, s)
        clips.append(torch.nn.functional.interpolate(x, size=(t, size, size), mode="trilinear", antialias=False))
    return clips


@torch.no_grad()
def evaluate(weights: Path, sets: dict[str, list[torch.Tensor]]) -> dict:
    """PSNR of both paths and of frame 0 (discrete) on each set of clips; codebook usage and
    perplexity of the tokens of all of them."""
    model = load_checkpoint(weights)
    usage = CodebookUsage(model.quantizer.codebook_size)
    result: dict[str, float] = {}
    for set_name, clips in sets.items():
        scores: dict[str, list[float]] = {"psnr_continuous": [], "psnr_discrete": [], "psnr_frame0_discrete": []}
        for x in clips:
            out = model(x, sample=False, joint=True)
            cont, disc = out.recon.clamp(-1, 1), out.recon_discrete.clamp(-1, 1)
            scores["psnr_continuous"].append(psnr(x, cont).mean().item())
            scores["psnr_discrete"].append(psnr(x, disc).mean().item())
            scores["psnr_frame0_discrete"].append(psnr(x[:, :, :1], disc[:, :, :1]).mean().item())
            for part in (out.tokens.rest, out.tokens.first):
                if part is not None:
                    usage.update(part)
        result.update({f"{set_name}_{k}": sum(v) / len(v) for k, v in scores.items()})
    result.update({f"codebook_{k}": v for k, v in usage.stats().items()})
    result["bits_per_token"] = math.log2(model.quantizer.codebook_size)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--size", type=int, default=32, help="training crop size")
    p.add_argument("--short-side", type=int, default=64, help="videos are decoded at this short side")
    p.add_argument("--eval-frames", type=int, default=17)
    p.add_argument("--eval-size", type=int, default=64, help="held-out clips: centre crop resized to this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    p.add_argument("--train-clips", default=",".join(TRAIN_CLIPS),
                   help=f"comma-separated sample clips to train on (default: {','.join(TRAIN_CLIPS)})")
    args = p.parse_args()
    train_names = args.train_clips.split(",")
    missing = [c for c in [*train_names, *HELD_OUT] if not (SHARED / c).is_file()]
    if missing:
        raise SystemExit(f"sample clips missing under {SHARED}: {', '.join(missing)}")
    wanted = set(args.only.split(",")) if args.only else None
    args.clips = prepare_training_clips(args.out / "data", args.short_side, train_names)
    sets = {"train": centre_clips(train_names, args.eval_frames, args.eval_size),
            "held_out": centre_clips(list(HELD_OUT), args.eval_frames, args.eval_size)}
    results = {}
    results_path = args.out / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())
    for name, preset, loss, init_from in RUNS:
        if wanted is not None and name not in wanted:
            continue
        init = args.out / init_from / "vae.safetensors" if init_from else None
        start = time.time()
        if not (args.out / name / "vae.safetensors").is_file():
            train(config_from_dict(train_config(name, preset, loss, init, args)))
        results[name] = {"preset": preset, "steps": args.steps, "train_s": time.time() - start,
                         **evaluate(args.out / name / "vae.safetensors", sets)}
        args.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2))
    cols = [f"{s}_{k}" for s in sets for k in ("psnr_continuous", "psnr_discrete", "psnr_frame0_discrete")]
    cols += ["codebook_usage", "codebook_perplexity"]
    print("| run | preset | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name, r in results.items():
        print(f"| {name} | {r['preset']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
