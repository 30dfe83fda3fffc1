"""Exported-decoder benchmark (not a test): ONNX Runtime (CPU EP) and torch.export vs eager PyTorch.

For each preset (default ``turbo-tiny`` and ``tiny``, randomly initialised: speed and numerical
agreement do not depend on training), decodes a latent clip of ``1 + 4 k`` latents (17 frames by
default) at ``--size`` pixels, and reports:

* frames/s of eager PyTorch (``model.decode``), ONNX Runtime and the ``torch.export`` program, all
  streamed with the same chunk length (median of ``--reps`` runs after one warm-up);
* max |frames - eager fp32| of every runtime and export dtype (fp32, and with ``--precision``
  fp16 / bf16 exports: what the cheaper dtypes cost, or what fails).

Usage::

    python benchmarks/deploy_decode.py [--size 256] [--latents 5] [--chunk-latents 4] [--threads 2]
        [--presets turbo-tiny,tiny] [--runtimes onnx,torch-export] [--reps 3] [--precision] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from videovae.deploy.export import export_decoder
from videovae.deploy.runtime import OnnxDecoder, TorchExportDecoder
from videovae.fileutil import atomic_path
from videovae.layers import CausalCache
from videovae.models import from_preset


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up (ORT graph optimisation, allocator)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def _eager_stream(model, z: torch.Tensor, k: int) -> torch.Tensor:
    cache = CausalCache()
    parts = [model.decode_chunk(z[:, :, : 1 + k], cache)[0]]
    for a in range(1 + k, z.shape[2], k):
        parts.append(model.decode_chunk(z[:, :, a : a + k], cache)[0])
    return torch.cat(parts, dim=2)


def _runner(fmt: str, path: Path, threads: int):
    return OnnxDecoder(path, threads=threads) if fmt == "onnx" else TorchExportDecoder(path)


def bench_preset(name: str, args, root: Path) -> list[dict]:
    torch.manual_seed(0)
    model = from_preset(name).eval()
    sf = model.space_factor
    z = torch.randn(1, model.latent_channels, args.latents, args.size // sf, args.size // sf,
                    generator=torch.Generator().manual_seed(1))
    ref = _eager_stream(model, z, args.chunk_latents)
    frames = ref.shape[2]
    rows = []
    eager_s = _median_time(lambda: _eager_stream(model, z, args.chunk_latents), args.reps)
    rows.append({"preset": name, "runtime": "eager", "dtype": "float32", "seconds": eager_s,
                 "fps": frames / eager_s, "max_abs_err": 0.0})
    combos = [("onnx", "float32"), ("torch-export", "float32")]
    if args.precision:
        combos += [("onnx", "float16"), ("torch-export", "float16"), ("torch-export", "bfloat16"),
                   ("onnx", "bfloat16")]
    runtimes = args.runtimes.split(",")
    combos = [(fmt, dtype) for fmt, dtype in combos if fmt in runtimes]
    for fmt, dtype in combos:
        path = root / f"{name}-{dtype}.{'onnx' if fmt == 'onnx' else 'pt2'}"
        row = {"preset": name, "runtime": fmt, "dtype": dtype}
        try:
            t = time.perf_counter()
            export_decoder(model, path, format=fmt, chunk_latents=args.chunk_latents, height=args.size,
                           width=args.size, dtype=dtype)
            row["export_seconds"] = time.perf_counter() - t
            runner = _runner(fmt, path, args.threads)
            out = runner.decode(z)
            row["max_abs_err"] = (out - ref).abs().max().item()
            if dtype == "float32" or args.time_all:
                seconds = _median_time(lambda r=runner: r.decode(z), args.reps)
                row.update(seconds=seconds, fps=frames / seconds)
        except Exception as err:  # a measurement: report what fails and go on
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="turbo-tiny,tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--latents", type=int, default=5, help="latent frames (5 -> 17 frames at 4x)")
    parser.add_argument("--chunk-latents", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--precision", action="store_true", help="also export fp16/bf16 and measure their error")
    parser.add_argument("--runtimes", default="onnx,torch-export", help="comma-separated: onnx, torch-export")
    parser.add_argument("--time-all", action="store_true", help="also time the fp16/bf16 runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            rows += bench_preset(name, args, Path(tmp))
    print(f"{'preset':<12} {'runtime':<13} {'dtype':<9} {'frames/s':>9} {'s/clip':>8} {'max|err|':>10}  notes")
    for r in rows:
        fps = f"{r['fps']:.2f}" if "fps" in r else "-"
        sec = f"{r['seconds']:.3f}" if "seconds" in r else "-"
        err = f"{r['max_abs_err']:.2e}" if "max_abs_err" in r else "-"
        print(f"{r['preset']:<12} {r['runtime']:<13} {r['dtype']:<9} {fps:>9} {sec:>8} {err:>10}  {r.get('error', '')}")
    if args.json:
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
