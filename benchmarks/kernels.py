"""Benchmark the fused kernels of ``videovae.kernels`` (not a test).

For every op: Triton vs eager reference vs ``torch.compile(reference)`` on realistic decoder
shapes, in bf16 and fp32, reported as median time and achieved GB/s (minimal bytes read + written
divided by time) next to the card's measured copy bandwidth; then the end-to-end decode time of the
full-size decoder (``CausalVAE(PRESETS["base"])``, latent 1x4x5x32x32 -> 17x256x256) with
``VIDEOVAE_KERNELS=triton`` vs ``reference``. No number is printed unless Triton agrees with the
reference on the benchmark shapes first.

Usage::

    python benchmarks/kernels.py [--json OUT] [--reps 20] [--no-e2e]
    python benchmarks/kernels.py --smoke     # CPU, TRITON_INTERPRET=1, tiny shapes: correctness only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

DECODER_SHAPES = [(1, 128, 17, 256, 256), (1, 512, 5, 64, 64)]
FRAME_SHAPES = [(1, 3, 17, 256, 256), (1, 3, 17, 512, 512)]
SMOKE_DECODER_SHAPES = [(1, 12, 5, 7, 9)]
SMOKE_FRAME_SHAPES = [(1, 3, 5, 13, 11)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Case:
    """One benchmark row: a Triton and a reference callable over the same inputs."""

    op: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int
    triton_fn: Callable[[], object]
    ref_fn: Callable[[], object]
    results: dict = field(default_factory=dict)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _norm_cases(shape, dtype, device) -> list[Case]:
    from videovae.kernels.causal_pad3d import triton as pad_tr
    from videovae.kernels.causal_pad3d.reference import causal_pad3d_ref
    from videovae.kernels.group_norm_silu import triton as gn_tr
    from videovae.kernels.group_norm_silu.reference import (
        group_norm_apply_ref,
        group_norm_silu_ref,
        group_norm_stats_ref,
    )
    from videovae.kernels.rms_norm_silu import triton as rms_tr
    from videovae.kernels.rms_norm_silu.reference import rms_norm_silu_ref

    n, c, t, h, w = shape
    es = torch.finfo(dtype).bits // 8
    numel = n * c * t * h * w
    g = min(32, c)
    x = torch.randn(shape, device=device, dtype=dtype) * 2 + 0.5
    wt = torch.randn(c, device=device, dtype=dtype)
    bs = torch.randn(c, device=device, dtype=dtype)
    dy = torch.randn(shape, device=device, dtype=dtype)
    xg = x.detach().requires_grad_()

    def fwd_bwd(fn):
        def run():
            y = fn(xg)
            (gx,) = torch.autograd.grad(y, xg, dy)
            return gx

        return run

    cases = []
    for per_frame in (True, False):
        tag = "frame" if per_frame else "clip"
        cases.append(Case(
            f"group_norm_silu[{tag}] fwd", shape, dtype, 2 * numel * es,
            lambda pf=per_frame: gn_tr.group_norm_silu(x, wt, bs, g, 1e-6, pf, True),
            lambda pf=per_frame: group_norm_silu_ref(x, wt, bs, g, 1e-6, pf, True),
        ))
    cases.append(Case(
        "group_norm_silu[frame] fwd+bwd", shape, dtype, 5 * numel * es,
        fwd_bwd(lambda v: gn_tr.group_norm_silu(v, wt, bs, g, 1e-6, True, True)),
        fwd_bwd(lambda v: group_norm_silu_ref(v, wt, bs, g, 1e-6, True, True)),
    ))
    # the two-step form of windowed per-clip norms: clip statistics, then a time slice (read in place)
    cases.append(Case(
        "group_norm_stats[clip]", shape, dtype, numel * es,
        lambda: gn_tr.group_norm_stats(x, g, 1e-6, False),
        lambda: group_norm_stats_ref(x, g, 1e-6, False),
    ))
    mean, rstd = group_norm_stats_ref(x, g, 1e-6, False)
    part = x[:, :, t // 2 :]
    cases.append(Case(
        "group_norm_apply[clip] time slice", part.shape, dtype, 2 * part.numel() * es,
        lambda: gn_tr.group_norm_apply(part, wt, bs, mean, rstd, True),
        lambda: group_norm_apply_ref(part, wt, bs, mean, rstd, True),
    ))
    cases.append(Case(
        "rms_norm_silu fwd", shape, dtype, 2 * numel * es,
        lambda: rms_tr.rms_norm_silu(x, wt, bs, 1e-12, True),
        lambda: rms_norm_silu_ref(x, wt, bs, 1e-12, True),
    ))
    cases.append(Case(
        "rms_norm_silu fwd+bwd", shape, dtype, 5 * numel * es,
        fwd_bwd(lambda v: rms_tr.rms_norm_silu(v, wt, bs, 1e-12, True)),
        fwd_bwd(lambda v: rms_norm_silu_ref(v, wt, bs, 1e-12, True)),
    ))
    padded = n * c * (t + 2) * (h + 2) * (w + 2)
    cases.append(Case(
        "causal_pad3d (2,1,1) fwd", shape, dtype, (numel + padded) * es,
        lambda: pad_tr.causal_pad3d(x, 2, 1, 1, None, "replicate"),
        lambda: causal_pad3d_ref(x, 2, 1, 1, None, "replicate"),
    ))
    cache = x[:, :, -2:].contiguous()
    cases.append(Case(
        "causal_pad3d cache (2,0,0) fwd", shape, dtype, 2 * (numel + n * c * 2 * h * w) * es,
        lambda: pad_tr.causal_pad3d(x, 2, 0, 0, cache, "replicate"),
        lambda: causal_pad3d_ref(x, 2, 0, 0, cache, "replicate"),
    ))
    return cases


def _frame_cases(shape, dtype, device) -> list[Case]:
    from videovae.kernels.blend_tile import triton as blend_tr
    from videovae.kernels.blend_tile.reference import blend_tile_ref_, normalize_canvas_ref
    from videovae.kernels.to_uint8_frames import triton as u8_tr
    from videovae.kernels.to_uint8_frames.reference import to_uint8_frames_ref

    n, c, t, h, w = shape
    es = torch.finfo(dtype).bits // 8
    numel = n * c * t * h * w
    x = (torch.rand(shape, device=device) * 2.2 - 1.1).to(dtype)
    # a centre tile covering 9/16 of each side, feathered on all four edges
    th, tw = (h * 9) // 16, (w * 9) // 16
    top, left, ramp = (h - th) // 2, (w - tw) // 2, max(h // 16, 1)
    tile = torch.randn((n, c, t, th, tw), device=device, dtype=dtype)
    canvas = torch.zeros(shape, device=device)
    wsum = torch.zeros((h, w), device=device)
    canvas_ref, wsum_ref = canvas.clone(), wsum.clone()
    norm_canvas = torch.randn(shape, device=device)
    norm_wsum = torch.rand((h, w), device=device) + 0.5
    tile_elems = n * c * t * th * tw

    def blend(fn, cv, ws):
        def run():
            cv.zero_()
            ws.zero_()
            fn(cv, ws, tile, top, left, ramp, ramp, ramp, ramp)
            return cv

        return run

    return [
        Case("to_uint8_frames", shape, dtype, numel * (es + 1),
             lambda: u8_tr.to_uint8_frames(x), lambda: to_uint8_frames_ref(x)),
        Case("blend_tile_ (incl. zero_)", shape, dtype, tile_elems * (es + 8) + th * tw * 8,
             blend(blend_tr.blend_tile_, canvas, wsum), blend(blend_tile_ref_, canvas_ref, wsum_ref)),
        Case("normalize_canvas", shape, torch.float32, numel * 8 + h * w * 4,
             lambda: blend_tr.normalize_canvas(norm_canvas, norm_wsum),
             lambda: normalize_canvas_ref(norm_canvas, norm_wsum)),
        Case("normalize_canvas->uint8", shape, torch.float32, numel * 5 + h * w * 4,
             lambda: blend_tr.normalize_canvas(norm_canvas, norm_wsum, True),
             lambda: normalize_canvas_ref(norm_canvas, norm_wsum, True)),
    ]


def build_cases(device: str, smoke: bool, dtypes) -> list[Case]:
    cases = []
    for dtype in dtypes:
        for shape in SMOKE_DECODER_SHAPES if smoke else DECODER_SHAPES:
            cases += _norm_cases(shape, dtype, device)
        for shape in SMOKE_FRAME_SHAPES if smoke else FRAME_SHAPES:
            cases += _frame_cases(shape, dtype, device)
    return cases


def check_cases(cases: list[Case]) -> list[str]:
    """Run every Triton callable against its reference under the tests' policy
    (``videovae.kernels.tolerance``); return the failures (empty: all agree)."""
    from videovae.kernels.tolerance import check_float, check_uint8

    failures = []
    for case in cases:
        got, want = _first(case.triton_fn()), _first(case.ref_fn())
        what = f"{case.op} {case.shape} {str(case.dtype).removeprefix('torch.')}"
        if got.dtype == torch.uint8:
            problem = check_uint8(got, want, what)
        else:
            problem = check_float(got, want, case.dtype, what)
        if problem is not None:
            failures.append(problem)
    return failures


def cuda_time_ms(fn, warmup: int, reps: int) -> float:
    """Median wall time of ``fn`` in ms, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(reps: int) -> float:
    """Device copy bandwidth: a 1 GiB ``dst.copy_(src)`` counts 2 GiB moved."""
    src = torch.empty(1 << 28, device="cuda", dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), 3, reps)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def time_cases(cases: list[Case], reps: int, use_compile: bool) -> None:
    for case in cases:
        case.results["triton_ms"] = cuda_time_ms(case.triton_fn, 3, reps)
        case.results["eager_ms"] = cuda_time_ms(case.ref_fn, 3, reps)
        if use_compile and "bwd" not in case.op and "blend" not in case.op:
            try:
                compiled = torch.compile(case.ref_fn)
                case.results["compile_ms"] = cuda_time_ms(compiled, 3, reps)
            except Exception as exc:  # report and keep benchmarking
                case.results["compile_error"] = f"{type(exc).__name__}: {exc}"[:200]
        torch.compiler.reset()


def _decode_row(vae, dtype, reps: int) -> dict | str:
    """Decode time and agreement of the two kernel backends; TF32 off throughout (the fp32 rows
    are true fp32, and the comparison is the tests' policy, ``videovae.kernels.tolerance``)."""
    from videovae.kernels.tolerance import check_model, exact_fp32, rel_rms

    z = torch.randn(1, 4, 5, 32, 32, device="cuda", dtype=dtype)
    outs, times = {}, {}
    previous = os.environ.get("VIDEOVAE_KERNELS")
    try:
        with exact_fp32(), torch.no_grad():
            for backend in ("reference", "triton"):
                os.environ["VIDEOVAE_KERNELS"] = backend
                outs[backend] = _first(vae.decode(z)).float()
                times[backend] = cuda_time_ms(lambda: vae.decode(z), 1, max(reps // 4, 3))
    finally:
        if previous is None:
            os.environ.pop("VIDEOVAE_KERNELS", None)
        else:
            os.environ["VIDEOVAE_KERNELS"] = previous
    problem = check_model(outs["triton"], outs["reference"], "decode", dtype)
    if problem is not None:
        return problem
    return {"reference_ms": times["reference"], "triton_ms": times["triton"],
            "speedup": times["reference"] / times["triton"], "rel_rms": rel_rms(outs["triton"], outs["reference"])}


def decode_e2e(reps: int, dtypes) -> list[dict] | str:
    """End-to-end ``vae.decode`` time with kernels on (triton) vs off (reference)."""
    try:
        from videovae.models.causal_vae import PRESETS, CausalVAE
    except ImportError as exc:
        return f"skipped: videovae.models.causal_vae is not available ({exc})"
    rows = []
    for name, dtype in dtypes.items():
        row = _decode_row(CausalVAE(PRESETS["base"]).cuda().eval().to(dtype), dtype, reps)
        torch.cuda.empty_cache()
        if isinstance(row, str):
            return f"refused: decode outputs differ between backends ({name}: {row})"
        rows.append({"dtype": name, **row})
    return rows


def markdown(cases: list[Case], copy_gbs: float, e2e, device_name: str) -> str:
    def gbs(case, key):
        ms = case.results.get(key)
        return f"{case.nbytes / (ms * 1e-3) / 1e9:.0f}" if ms else "n/a"

    def fmt(ms):
        return f"{ms:.3f}" if ms else "n/a"

    def vs_compile(r):
        return f"{r['compile_ms'] / r['triton_ms']:.2f}x" if r.get("compile_ms") else "n/a"

    lines = [f"Device: {device_name}; copy bandwidth {copy_gbs:.0f} GB/s", "",
             "| op | shape | dtype | triton ms | eager ms | compile ms | triton GB/s | eager GB/s | "
             "% of copy | speedup vs eager | speedup vs compile |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        r = c.results
        tri = c.nbytes / (r["triton_ms"] * 1e-3) / 1e9
        lines.append(
            f"| {c.op} | {'x'.join(map(str, c.shape))} | {str(c.dtype).replace('torch.', '')} | "
            f"{fmt(r['triton_ms'])} | {fmt(r['eager_ms'])} | {fmt(r.get('compile_ms'))} | {tri:.0f} | "
            f"{gbs(c, 'eager_ms')} | {100 * tri / copy_gbs:.0f}% | {r['eager_ms'] / r['triton_ms']:.2f}x | "
            f"{vs_compile(r)} |"
        )
    lines.append("")
    if isinstance(e2e, str):
        lines.append(f"End-to-end decode: {e2e}")
    else:
        lines += ["| end-to-end decode 1x4x5x32x32 -> 17x256x256 | reference ms | triton ms | speedup |",
                  "|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['reference_ms']:.1f} | {r['triton_ms']:.1f} | {r['speedup']:.2f}x |"
                  for r in e2e]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny shapes, correctness only")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--dtype", choices=[*DTYPES, "all"], default="all")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode")
    args = parser.parse_args(argv)
    dtypes = DTYPES if args.dtype == "all" else {args.dtype: DTYPES[args.dtype]}

    if args.smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
        start = time.perf_counter()
        failures = check_cases(build_cases("cpu", True, dtypes.values()))
        if failures:
            print("correctness check FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
            return 1
        print(f"smoke: Triton (interpreter) agrees with the reference on all ops "
              f"({time.perf_counter() - start:.1f} s)")
        return 0

    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (use --smoke for the CPU correctness check)",
              file=sys.stderr)
        return 2
    cases = build_cases("cuda", False, dtypes.values())
    failures = check_cases(cases)
    if failures:
        print("correctness check FAILED, refusing to report timings:\n  " + "\n  ".join(failures),
              file=sys.stderr)
        return 1
    copy_gbs = copy_bandwidth_gbs(args.reps)
    time_cases(cases, args.reps, not args.no_compile)
    e2e = "skipped (--no-e2e)" if args.no_e2e else decode_e2e(args.reps, dtypes)
    device_name = torch.cuda.get_device_name()
    print(markdown(cases, copy_gbs, e2e, device_name))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({
                "device": device_name, "copy_gbs": copy_gbs, "e2e": e2e,
                "ops": [{"op": c.op, "shape": c.shape, "dtype": str(c.dtype), "bytes": c.nbytes, **c.results}
                        for c in cases],
            }, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
