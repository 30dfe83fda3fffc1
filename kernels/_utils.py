"""Small helpers shared by the Triton host wrappers (no Triton import here)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``max(n, 1)``."""
    return 1 << max(int(n) - 1, 0).bit_length()


def as_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x.contiguous()`` that passes ``None`` through."""
    return None if x is None else x.contiguous()


def check_out_call(op: str, x: torch.Tensor, out: torch.Tensor) -> None:
    """The ``out=`` form of a norm takes a 5-D ``x``, records no gradient, and writes an ``x``-shaped
    tensor of ``x``'s dtype and device whose frames are contiguous."""
    if x.dim() != 5 or (torch.is_grad_enabled() and x.requires_grad):
        raise ValueError(f"{op}(out=...) takes a 5-D input and does not record gradients")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype} on {x.device}, got {tuple(out.shape)} "
                         f"{out.dtype} on {out.device}")
    h, w = x.shape[-2:]
    if out.stride(-1) != 1 or out.stride(-2) != w or out.stride(2) < h * w:
        raise ValueError(f"out needs contiguous frames, got strides {out.stride()}")


def prod(shape) -> int:
    """Product of a shape (1 for an empty shape)."""
    out = 1
    for s in shape:
        out *= int(s)
    return out


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive integers."""
    return -(-int(a) // int(b))


def interpreting() -> bool:
    """Whether Triton kernels run through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs serially)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


_TUNED: dict[tuple, object] = {}


def autotune(key: tuple, candidates: list, run: Callable[[object], None], reps: int = 5):
    """The fastest of ``candidates`` for ``key`` (cached for the process), timed by calling ``run(cfg)``.

    ``candidates[0]`` is the heuristic choice: it is returned untimed on the CPU, under the
    interpreter, with a single candidate, and while a CUDA graph is being captured (timing would
    break the capture; warm the cache with one eager call first). Every candidate computes the same
    result, so tuning only changes speed.
    """
    if key in _TUNED:
        return _TUNED[key]
    device = key[0]
    if (len(candidates) == 1 or not isinstance(device, torch.device) or device.type != "cuda"
            or interpreting() or torch.cuda.is_current_stream_capturing()):
        return candidates[0]
    best, best_ms = candidates[0], float("inf")
    for cfg in candidates:
        run(cfg)  # compile + warm up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run(cfg)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / reps
        if ms < best_ms:
            best, best_ms = cfg, ms
    _TUNED[key] = best
    return best
