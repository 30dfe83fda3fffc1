"""`videovae bench`: encode/decode frames per second and peak memory for several clip lengths.

Each (length, direction) runs in a fresh worker process so that its peak memory is its own:
the process's peak resident set size on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
Frames come from :func:`videovae.synthetic.synthetic_frames` chunk by chunk and decoded frames
are dropped as they come, so the figures show the engine's own footprint.

A turbo decoder (a ``turbo-*`` preset, or a ``turbo-pair`` checkpoint from ``videovae distill``) is
measured decoding side by side with its teacher's decoder, in the same run and with the same engine
settings (the teacher is built from its preset or from the pair's stored teacher config with random
weights: speed and memory do not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(argv: list[str]) -> None:
    from videovae.checkpoint import load_checkpoint
    from videovae.engine import (
        EngineOptions,
        VideoGeometry,
        decode_frames,
        default_chunk_frames,
        encode_frames,
        padded_length,
    )
    from videovae.models import from_preset
    from videovae.synthetic import synthetic_frames

    p = argparse.ArgumentParser()
    p.add_argument("--direction", choices=["encode", "decode"])
    p.add_argument("--frames", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--model")
    p.add_argument("--weights")
    p.add_argument("--chunk-frames", type=int)
    p.add_argument("--tiling")
    p.add_argument("--tile-norm")
    p.add_argument("--tile", type=int)
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--teacher", action="store_true", help="measure the teacher of the turbo model instead")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    if a.teacher:
        model = teacher_of(a.model, a.weights).to(a.device, dtype)
    else:
        model = load_checkpoint(a.weights, a.device, dtype) if a.weights else from_preset(a.model).to(a.device, dtype)
    model.eval()
    chunk = default_chunk_frames(model, a.device) if a.chunk_frames is None else a.chunk_frames
    opts = EngineOptions(chunk_frames=chunk, tile=a.tile, tiling=a.tiling, tile_norm=a.tile_norm,
                         device=a.device, dtype=dtype)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    baseline = _peak_bytes(a.device)
    start = time.perf_counter()
    if a.direction == "encode":
        encode_frames(model, synthetic_frames(a.frames, a.size, a.size, chunk_frames=16), opts)
        frames = a.frames
    else:
        t = padded_length(a.frames, model.time_factor)
        lat = a.size // model.space_factor
        z = torch.randn(1, model.latent_channels, 1 + (t - 1) // model.time_factor, lat, lat)
        geometry = VideoGeometry(a.frames, a.size, a.size, t, a.size, a.size)
        frames = sum(chunk.shape[0] for chunk in decode_frames(model, z, geometry, opts))
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"direction": a.direction, "frames": frames, "seconds": seconds, "fps": frames / seconds,
                      "peak_bytes": _peak_bytes(a.device), "baseline_bytes": baseline, "chunk_frames": chunk}))


def teacher_of(preset: str | None, weights: str | None) -> torch.nn.Module:
    """The teacher architecture of a turbo preset or of a turbo-pair checkpoint (random weights)."""
    from videovae.checkpoint import read_metadata
    from videovae.models import build_model, from_preset
    from videovae.models.turbo_vaed import TEACHERS

    if weights is not None:
        meta = read_metadata(weights)
        if meta["family"] != "turbo-pair":
            raise ValueError(f"{weights}: a {meta['family']} checkpoint has no teacher (a turbo-pair has)")
        return build_model(meta["config"]["teacher_family"], meta["config"]["teacher"])
    if preset not in TEACHERS:
        raise ValueError(f"{preset!r} is not a turbo preset; known: {', '.join(sorted(TEACHERS))}")
    return from_preset(TEACHERS[preset])


def is_turbo(preset: str | None, weights: str | None) -> bool:
    """Whether the model decodes only (a turbo preset) or pairs a teacher (a turbo-pair checkpoint):
    then decoding is measured against the teacher's decoder."""
    from videovae.checkpoint import read_metadata
    from videovae.models.turbo_vaed import TEACHERS

    if weights is not None:
        return read_metadata(weights)["family"] == "turbo-pair"
    return preset in TEACHERS


def _run_worker(args, direction: str, frames: int, model_args: list[str], chunk: int | None, tile: int) -> dict:
    chunk_args = [] if chunk is None else ["--chunk-frames", str(chunk)]
    cmd = [sys.executable, "-m", "videovae.bench", "--direction", direction, "--frames", str(frames),
           "--size", str(args.size), *model_args, *chunk_args, "--tile", str(tile),
           "--tiling", args.tiling, "--tile-norm", args.tile_norm,
           "--device", args.device, "--dtype", {"fp32": "float32", "bf16": "bfloat16",
                                                "fp16": "float16"}.get(args.dtype, args.dtype)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bench worker failed ({direction}, {frames} frames): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(args) -> list[dict]:
    """Run the workers for every requested length and print a table; returns the rows (for a turbo
    model: decode rows, the student's and then the teacher's for each length)."""
    lengths = [int(v) for v in args.frames.split(",") if v.strip()]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--frames needs positive clip lengths, got {args.frames!r}")
    model_args = ["--weights", args.weights] if args.weights else ["--model", args.model or "tiny"]
    chunk = args.chunk_frames  # None: the engine's default for the device (default_chunk_frames)
    tile = 0 if args.tile is None else args.tile
    turbo = is_turbo(args.model, args.weights)
    with_teacher = turbo and not getattr(args, "no_teacher", False)
    rows = []
    for frames in lengths:
        if turbo:
            rows.append(_run_worker(args, "decode", frames, model_args, chunk, tile))
            if with_teacher:
                rows.append(_run_worker(args, "decode", frames, [*model_args, "--teacher"], chunk, tile))
        else:
            for direction in ("encode", "decode"):
                rows.append(_run_worker(args, direction, frames, model_args, chunk, tile))
    name = args.weights or args.model or "tiny"
    chunk = rows[0]["chunk_frames"]
    print(f"videovae bench: {name}, {args.size}x{args.size}, chunk {chunk} frames, tile {tile or 'off'} "
          f"({args.tiling} tiling, {args.tile_norm} norm statistics), "
          f"{args.device} {args.dtype}")
    if with_teacher:
        print("decoding only: the turbo decoder against its teacher's decoder (same settings, same run)")
        labels = ("student", "teacher")
    elif turbo:
        print("decoding only: the turbo decoder")
        labels = ("student",)
    else:
        labels = ("encode", "decode")
    _print_table(lengths, rows, labels, speedup=with_teacher)
    if len(lengths) > 1:
        for offset, label in enumerate(labels):
            first, last = rows[offset]["peak_bytes"], rows[len(rows) - len(labels) + offset]["peak_bytes"]
            print(f"{label} peak at {lengths[-1]} frames / at {lengths[0]} frames: {last / first:.3f}")
    if args.json:
        from videovae.fileutil import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"size": args.size, "chunk_frames": chunk, "tile": tile, "turbo": turbo,
                                       "labels": list(labels), "rows": rows}, indent=2))
    return rows


def _print_table(lengths: list[int], rows: list[dict], labels: tuple[str, ...], speedup: bool) -> None:
    """One line per length: fps and peak MiB of each label's row (rows are grouped per length)."""
    header = f"{'frames':>7}" + "".join(f" {label + ' fps':>12} {label + ' peak MiB':>17}" for label in labels)
    print(header + (f" {'speed-up':>9}" if speedup else ""))
    k = len(labels)
    for i, frames in enumerate(lengths):
        group = rows[k * i : k * (i + 1)]
        line = f"{frames:>7}" + "".join(f" {r['fps']:>12.2f} {r['peak_bytes'] / 2**20:>17.0f}" for r in group)
        print(line + (f" {group[0]['fps'] / group[1]['fps']:>8.1f}x" if speedup else ""))


if __name__ == "__main__":
    _worker(sys.argv[1:])
