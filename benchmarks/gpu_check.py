"""The prepared GPU check (``make gpu-check``): one run, one GPU, a few minutes, markdown + JSON out.

1. the kernel tests on CUDA (``pytest tests/kernels``: compiled Triton against the references, with
   the tolerance policy of ``videovae.kernels.tolerance``);
2. the kernel benchmark (``benchmarks/kernels.py``: Triton vs eager vs ``torch.compile``);
3. the end-to-end table of ``od-vae`` and ``od-vae-stream`` (random weights, bf16): encode and
   decode time and peak ``torch.cuda.max_memory_allocated`` at 17x256x256 and 33x512x512, whole
   clip, one latent frame per chunk, 16-frame chunks, and 16-frame chunks with 256 px tiles; for
   each decode also its PSNR against the whole-clip decode (exact streaming gives 100 dB);
4. the chunking accuracy in fp32 with TF32 off (bf16 rounding alone caps the PSNR of the table above
   near 40 dB): PSNR of chunked and tiled decodes against the whole-clip decode at 17x256x256.

Needs only torch, Triton, einops, safetensors, numpy and pytest: no PyAV, no DeepSpeed, nothing
downloaded, and no installation (run from the repository root; the ``videovae`` package, with
``kernels/``, ``train/`` and ``deploy/`` mapped into it as the install does, is put on the path).

Usage::

    python benchmarks/gpu_check.py [--out gpu_check] [--skip-tests] [--skip-kernel-bench]
    python benchmarks/gpu_check.py --smoke      # CPU, tiny model and sizes: the code paths only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"kernels": "kernels", "train": "train", "deploy": "deploy"}  # videovae.<name> -> folder


def make_shim(root: Path = ROOT) -> Path:
    """A folder holding ``videovae/``: links to ``videovae/*`` plus the mapped folders (``kernels``,
    ``train``, ``deploy``), as ``pyproject.toml``'s package-dir installs them."""
    shim = Path(tempfile.mkdtemp(prefix="videovae-shim-")) / "videovae"
    shim.mkdir()
    for entry in (root / "videovae").iterdir():
        (shim / entry.name).symlink_to(entry)
    for name, folder in MAPPED.items():
        (shim / name).symlink_to(root / folder)
    return shim.parent


def package_path() -> str:
    """A folder from which ``import videovae`` works without installing ("" when it already does)."""
    try:
        import videovae.kernels  # noqa: F401

        return ""
    except ImportError:
        pass
    folder = str(make_shim())
    sys.path.insert(0, folder)
    return folder


def run_kernel_tests(env: dict, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-rfE", "-p", "no:cacheprovider"]
    start = time.time()
    # PYTHONSAFEPATH: `python -m` would put the repository root first on the path, where `videovae/`
    # lacks the mapped `kernels` folder; the shim (or the installed package) must win
    env = {**env, "PYTHONSAFEPATH": "1"}
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        # what ran before the limit still says which tests passed and failed
        partial = _text(e.stdout) + _text(e.stderr)
        return {"ok": False, "summary": f"timed out after {timeout} s", "seconds": timeout,
                "output_tail": partial[-3000:]}
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith("FAILED") or line.startswith("ERROR")]
    result = {"ok": done.returncode == 0, "summary": lines[-1] if lines else done.stderr[-500:], "failed": failed,
              "seconds": time.time() - start}
    if done.returncode:
        result["output_tail"] = (done.stdout + done.stderr)[-3000:]
    return result


def run_kernel_benchmark(env: dict, out: Path, timeout: int) -> dict:
    cmd = [sys.executable, "benchmarks/kernels.py", "--json", str(out / "kernels.json")]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"ok": False, "text": _text(e.stdout)[-20000:] + f"\n(timed out after {timeout} s)"}
    return {"ok": done.returncode == 0, "text": done.stdout[-20000:] + done.stderr[-3000:]}


def _text(output: str | bytes | None) -> str:
    """Captured output of a timed-out subprocess (bytes on some Python versions, or None)."""
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def _psnr(a, b) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(4.0 / mse))


def _measure(fn, cuda: bool):
    """(result, seconds, peak bytes above the allocation at the start; 0 off CUDA)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return out, seconds, (torch.cuda.max_memory_allocated() - base) if cuda else 0


def _model_rows(name: str, sizes: list[tuple[int, int]], device: str, dtype) -> list[dict]:
    import torch
    from torch._dynamo.utils import counters

    from videovae.engine import decode_tensor, encode_tensor
    from videovae.models import from_preset

    torch.manual_seed(0)
    model = from_preset(name).eval().to(device, dtype)
    tf, cuda = model.time_factor, device.startswith("cuda")
    modes = {"whole": {"chunk_frames": 0}, "1 latent/chunk": {"chunk_frames": tf},
             "16-frame chunks": {"chunk_frames": 16},
             "16-frame chunks, 256 px tiles": {"chunk_frames": 16, "tile": 256},
             # tile by tile through the clip (the default of decode_tensor): never above untiled
             "1 latent/chunk, 256 px tiles": {"chunk_frames": tf, "tile": 256}}
    if cuda:  # the fixed-shape streaming loop under CUDA graphs (compiled once per chunk length)
        modes["1 latent/chunk, compiled"] = {"chunk_frames": tf, "compile": "reduce-overhead"}
    rows = []
    for frames, size in sizes:
        video = torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(frames * size)) * 2 - 1
        reference = None
        with torch.no_grad():
            for mode, options in modes.items():
                opts = {**options, "device": device, "dtype": dtype}
                # warm-up on the very shapes timed: cuDNN and kernel launch tuning, compilation, allocator
                enc = encode_tensor(model, video, **opts)
                decode_tensor(model, enc.mean, **opts)
                graphs = counters["stats"]["unique_graphs"]
                enc, enc_s, enc_peak = _measure(lambda o=opts, v=video: encode_tensor(model, v, **o), cuda)
                dec, dec_s, dec_peak = _measure(lambda o=opts, e=enc: decode_tensor(model, e.mean, **o), cuda)
                reference = dec if reference is None else reference
                rows.append({"model": name, "frames": frames, "size": size, "mode": mode,
                             "dtype": str(dtype).removeprefix("torch."), "encode_s": enc_s,
                             "encode_peak_gib": enc_peak / 2**30, "decode_s": dec_s,
                             "decode_peak_gib": dec_peak / 2**30, "decode_psnr_vs_whole": _psnr(dec, reference),
                             "graphs_compiled_while_timed": counters["stats"]["unique_graphs"] - graphs})
                print(f"  {name} {frames}x{size}^2 {mode}: encode {enc_s:.3f} s, decode {dec_s:.3f} s "
                      f"(peak {dec_peak / 2**30:.2f} GiB)", flush=True)
    return rows


def accuracy_rows(models: list[str], frames: int, size: int, device: str) -> list[dict]:
    """fp32, TF32 off: PSNR of each chunked / tiled decode against the whole-clip decode of the same
    latents (what chunking itself costs, without bf16 rounding)."""
    import torch

    from videovae.engine import decode_tensor, encode_tensor
    from videovae.models import from_preset

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = []
    try:
        for name in models:
            torch.manual_seed(0)
            model = from_preset(name).eval().to(device)
            plans = {"1 latent/chunk": {"chunk_frames": model.time_factor}, "16-frame chunks": {"chunk_frames": 16},
                     "16-frame chunks, 128 px tiles": {"chunk_frames": 16, "tile": 128}}
            video = torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
            with torch.no_grad():
                latents = encode_tensor(model, video, device=device).mean
                whole = decode_tensor(model, latents, device=device, chunk_frames=0)
                for mode, options in plans.items():
                    dec = decode_tensor(model, latents, device=device, **options)
                    rows.append({"model": name, "frames": frames, "size": size, "mode": mode,
                                 "psnr_vs_whole": _psnr(dec, whole)})
            del model
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return rows


def window_rows(name: str, frames: int, size: int, device: str, dtype_name: str,
                windows: tuple[int, ...] = (4, 8, 16, 0)) -> list[dict]:
    """Whole-clip encode and decode time and peak memory for each ``layers.WINDOW_FRAMES`` (0: no
    windows, every conv on the whole clip at once): the launches-against-memory trade of the
    windowed convs on this device."""
    import torch

    import videovae.layers as layers
    from videovae.engine import decode_tensor, encode_tensor
    from videovae.models import from_preset

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    model = from_preset(name).eval().to(device, dtype)
    video = torch.rand(1, 3, frames, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    opts = {"chunk_frames": 0, "device": device, "dtype": dtype}
    cuda, saved, rows = device.startswith("cuda"), layers.WINDOW_FRAMES, []
    try:
        with torch.no_grad():
            for window in windows:
                layers.WINDOW_FRAMES = window or 1 << 30  # longer than any clip: no windows
                latents = encode_tensor(model, video, **opts).mean  # warm-up
                decode_tensor(model, latents, **opts)
                _, enc_s, enc_peak = _measure(lambda: encode_tensor(model, video, **opts), cuda)
                _, dec_s, dec_peak = _measure(lambda lat=latents: decode_tensor(model, lat, **opts), cuda)
                rows.append({"model": name, "frames": frames, "size": size, "dtype": dtype_name,
                             "window_frames": window, "encode_s": enc_s, "encode_peak_gib": enc_peak / 2**30,
                             "decode_s": dec_s, "decode_peak_gib": dec_peak / 2**30})
                print(f"  {name} {frames}x{size}^2 window {window or 'off'}: encode {enc_s:.3f} s "
                      f"({enc_peak / 2**30:.2f} GiB), decode {dec_s:.3f} s ({dec_peak / 2**30:.2f} GiB)", flush=True)
    finally:
        layers.WINDOW_FRAMES = saved
    return rows


def e2e_rows(models: list[str], sizes: list[tuple[int, int]], device: str, dtype_name: str) -> list[dict]:
    """Encode/decode time and peak memory through the engine, per model, size and mode."""
    import torch

    rows = []
    for name in models:
        rows += _model_rows(name, sizes, device, getattr(torch, dtype_name))
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def markdown(report: dict) -> str:
    lines = [f"# videovae GPU check — {report['device']}", "",
             f"torch {report['torch']}, Triton {report['triton']}, {report['when']}", ""]
    tests = report.get("kernel_tests")
    if tests:
        lines += ["## Kernel tests (CUDA)", "", f"{'passed' if tests['ok'] else 'FAILED'}: {tests['summary']}", ""]
        lines += [f"- {f}" for f in tests.get("failed", [])] + ([""] if tests.get("failed") else [])
        if tests.get("output_tail"):
            lines += ["```", tests["output_tail"], "```", ""]
    bench = report.get("kernel_benchmark")
    if bench:
        lines += ["## Kernel benchmark", "", "```", bench["text"].strip(), "```", ""]
    if report.get("windows"):
        lines += ["## Whole-clip conv windows (`layers.WINDOW_FRAMES`; 0: off)", "",
                  "| model | clip | window frames | encode s | encode peak GiB | decode s | decode peak GiB |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['frames']}x{r['size']}x{r['size']} {r['dtype']} | {r['window_frames']} | "
                  f"{r['encode_s']:.3f} | {r['encode_peak_gib']:.2f} | {r['decode_s']:.3f} | "
                  f"{r['decode_peak_gib']:.2f} |" for r in report["windows"]]
        lines.append("")
    lines += ["## End to end (random weights)", "",
              "| model | clip | mode | encode s | encode peak GiB | decode s | decode peak GiB "
              "| decode PSNR vs whole | graphs compiled while timed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report.get("e2e", []):
        lines.append(f"| {r['model']} | {r['frames']}x{r['size']}x{r['size']} {r['dtype']} | {r['mode']} | "
                     f"{r['encode_s']:.3f} | {r['encode_peak_gib']:.2f} | {r['decode_s']:.3f} | "
                     f"{r['decode_peak_gib']:.2f} | {r['decode_psnr_vs_whole']:.1f} | "
                     f"{r['graphs_compiled_while_timed']} |")
    if report.get("accuracy"):
        lines += ["", "## Chunking accuracy (fp32, TF32 off)", "", "| model | clip | mode | decode PSNR vs whole |",
                  "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['frames']}x{r['size']}x{r['size']} | {r['mode']} | {r['psnr_vs_whole']:.1f} |"
                  for r in report["accuracy"]]
    return "\n".join(lines) + "\n"


def save_report(report: dict, out: Path) -> None:
    """``gpu_check.json`` and ``gpu_check.md`` of the stages done so far (written atomically)."""
    from videovae.fileutil import atomic_path

    with atomic_path(out / "gpu_check.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    with atomic_path(out / "gpu_check.md") as tmp:
        tmp.write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check"))
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model and sizes (code paths only)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-kernel-bench", action="store_true")
    p.add_argument("--skip-windows", action="store_true", help="skip the WINDOW_FRAMES timing")
    p.add_argument("--timeout", type=int, default=240, help="seconds for the tests and for the kernel benchmark")
    args = p.parse_args(argv)
    shim = package_path()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --smoke for a CPU run of the code paths)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [shim, os.environ.get("PYTHONPATH", "")]))}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = "cpu" if args.smoke else "cuda"
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)", "torch": torch.__version__,
              "triton": triton_version, "when": time.strftime("%Y-%m-%d %H:%M:%S")}

    def stage(key: str, title: str, run) -> None:
        """Run one stage and write the report so far: a stage cut short by a time limit leaves
        every earlier stage's results on disk."""
        print(f"{title} ...", flush=True)
        report[key] = run()
        save_report(report, args.out)

    if not args.skip_tests:
        stage("kernel_tests", "kernel tests", lambda: run_kernel_tests(env, args.timeout))
        tests = report["kernel_tests"]
        print(f"  {'passed' if tests['ok'] else 'FAILED'}: {tests['summary']}", flush=True)
        for line in tests.get("failed", []):
            print(f"  {line}", flush=True)
    if not args.skip_kernel_bench and not args.smoke:
        stage("kernel_benchmark", "kernel benchmark", lambda: run_kernel_benchmark(env, args.out, args.timeout))
        print(report["kernel_benchmark"]["text"], flush=True)
    if args.smoke:
        stage("windows", "conv windows", lambda: window_rows("tiny", 9, 32, "cpu", "float32", (4, 0)))
        stage("e2e", "end to end", lambda: e2e_rows(["tiny"], [(9, 32)], "cpu", "float32"))
        stage("accuracy", "chunking accuracy (fp32)", lambda: accuracy_rows(["tiny"], 9, 32, "cpu"))
    else:
        if not args.skip_windows:
            stage("windows", "conv windows", lambda: window_rows("od-vae", 33, 512, "cuda", "bfloat16"))
        stage("e2e", "end to end",
              lambda: e2e_rows(["od-vae-stream", "od-vae"], [(17, 256), (33, 512)], "cuda", "bfloat16"))
        stage("accuracy", "chunking accuracy (fp32)",
              lambda: accuracy_rows(["od-vae-stream", "od-vae"], 17, 256, "cuda"))
    print(markdown(report))
    failed = report.get("kernel_tests", {}).get("ok") is False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
