"""Measure the memory factor of each model family for the ``--max-memory`` planner.

For every preset, direction (encode, decode) and plan (whole clip, chunked, chunked + tiled), a
fresh subprocess builds the model (random weights, fp32, CPU), runs the engine once and reports its
peak RSS growth (``ru_maxrss``, from before the model was built). The factor a run needs is

    (peak growth - caches - weights) / activations

with the unscaled parts of ``videovae.engine.peak_parts`` (the run has no frame buffers, so ``io``
is left out, which makes the factor conservative). A family's ``MEMORY_FACTORS`` entry is the
largest factor over its runs plus 10%. Prints a markdown table and the suggested factors::

    python benchmarks/calibrate_memory.py --presets tiny od-vae --frames 9 --size 192x320
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from videovae.engine import decode_tensor, encode_tensor, peak_parts
from videovae.models import from_preset

MARGIN = 1.10


def measure(preset: str, direction: str, frames: int, height: int, width: int, chunk: int, tile: int) -> dict:
    """One run in this process: peak RSS growth and the planner's unscaled parts, in bytes. Tiles
    run in chunk order, the order of the streams the planner plans for (the CLI)."""
    torch.manual_seed(0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = from_preset(preset).eval()
    tf, sf = model.time_factor, model.space_factor
    if direction == "encode":
        video = torch.rand(1, 3, frames, height, width) * 2 - 1
        encode_tensor(model, video, chunk_frames=chunk, tile=tile, tile_order="chunk")
    else:
        latent = torch.randn(1, model.latent_channels, (frames - 1) // tf + 1, height // sf, width // sf)
        decode_tensor(model, latent, chunk_frames=chunk, tile=tile, tile_order="chunk")
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    planned_chunk = chunk or frames - 1  # the planner's chunk holds 1 + chunk_frames frames
    tile_h, tile_w = (min(tile, height), min(tile, width)) if tile else (height, width)
    parts = peak_parts(model, planned_chunk, tile_h, tile_w, torch.float32, height, width)
    return {"family": model.family, "growth": growth, "activations": parts.activations, "caches": parts.caches,
            "weights": parts.weights}


def _run_worker(args: argparse.Namespace, preset: str, direction: str, chunk: int, tile: int) -> dict:
    command = [sys.executable, __file__, "--worker", preset, direction, str(args.frames), str(args.height),
               str(args.width), str(chunk), str(tile)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{preset} {direction} chunk={chunk} tile={tile} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        preset, direction, *numbers = sys.argv[2:]
        print(json.dumps(measure(preset, direction, *map(int, numbers))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny"])
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", default="192x320", help="HxW in pixels")
    parser.add_argument("--chunk-frames", type=int, default=4)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--directions", nargs="+", default=["encode", "decode"])
    args = parser.parse_args(argv)
    args.height, args.width = _parse_size(args.size)
    plans = [(0, 0), (args.chunk_frames, 0), (args.chunk_frames, args.tile)]
    print("| preset | direction | chunk | tile | growth MiB | activations MiB | caches MiB | weights MiB | factor |")
    print("|---|---|---|---|---|---|---|---|---|")
    needed: dict[str, float] = {}
    for preset in args.presets:
        for direction in args.directions:
            for chunk, tile in plans:
                r = _run_worker(args, preset, direction, chunk, tile)
                factor = (r["growth"] - r["caches"] - r["weights"]) / r["activations"]
                needed[r["family"]] = max(needed.get(r["family"], 0.0), factor)
                mib = [f"{r[k] / 2**20:.0f}" for k in ("growth", "activations", "caches", "weights")]
                print(f"| {preset} | {direction} | {chunk} | {tile} | {' | '.join(mib)} | {factor:.2f} |", flush=True)
    for family, factor in needed.items():
        print(f"{family}: largest factor {factor:.2f}, MEMORY_FACTORS entry {factor * MARGIN:.1f}")


if __name__ == "__main__":
    main()
