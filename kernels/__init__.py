"""Fused kernels for the video VAE decode path, each a Triton kernel beside its PyTorch reference.

The model layers call the functions below. Each dispatches to the Triton implementation when the
tensor is on CUDA and Triton is importable, and to the pure-PyTorch reference (``<op>/reference.py``,
the definition of correct) otherwise. ``VIDEOVAE_KERNELS`` overrides the choice at call time:

* ``auto`` (default): Triton for CUDA tensors when Triton is installed, else the reference;
* ``reference``: always the reference;
* ``triton``: always Triton (raises if it is not installed; CPU tensors need ``TRITON_INTERPRET=1``).

While ``torch.compile`` or ``torch.export`` captures a graph, every op is the reference whatever the
backend: Inductor fuses the reference composition into kernels of its own, whereas the hand
kernels' host code (shape tuning, environment reads) would break the graph and force recompiles.

Triton is imported lazily, so ``import videovae.kernels`` works without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from .blend_tile.reference import blend_tile_ref_, normalize_canvas_ref
from .causal_pad3d.reference import causal_pad3d_ref, check_causal_pad_args
from .group_norm_silu.reference import group_norm_apply_ref, group_norm_silu_ref, group_norm_stats_ref
from .rms_norm_silu.reference import rms_norm_silu_ref
from .to_uint8_frames.reference import to_uint8_frames_ref

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "blend_tile_",
    "causal_pad3d",
    "group_norm_apply",
    "group_norm_silu",
    "group_norm_stats",
    "kernel_backend",
    "normalize_canvas",
    "rms_norm_silu",
    "to_uint8_frames",
    "triton_available",
]

ENV_VAR = "VIDEOVAE_KERNELS"
BACKENDS = ("auto", "reference", "triton")


def kernel_backend() -> str:
    """The backend requested by ``VIDEOVAE_KERNELS`` (read now): ``auto``, ``reference`` or ``triton``."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is invalid; expected one of {BACKENDS}")
    return value


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _use_triton(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    backend = kernel_backend()
    if backend == "reference":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed")
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(f"{ENV_VAR}=triton on a {x.device.type} tensor needs TRITON_INTERPRET=1")
        return True
    return x.is_cuda and triton_available()


def _triton_impl(op: str):
    return importlib.import_module(f"{__name__}.{op}.triton")


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-6,
    per_frame: bool = True,
    silu: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm + optional SiLU on ``(N, C, T, H, W)`` (or ``(N, C, H, W)``); differentiable.

    ``per_frame=True``: statistics per ``(n, group, t)`` over ``(C/G, H, W)``; ``False``: per
    ``(n, group)`` over ``(C/G, T, H, W)``. fp32 statistics, output in ``x``'s dtype. ``out``
    (inference only): an ``x``-shaped view with contiguous frames to write into, e.g. the frames of a
    causal conv's time-padded input, so the normalised tensor is never a separate copy.
    """
    if _use_triton(x):
        impl = _triton_impl("group_norm_silu")
        return impl.group_norm_silu(x, weight, bias, num_groups, eps, per_frame, silu, out)
    return group_norm_silu_ref(x, weight, bias, num_groups, eps, per_frame, silu, out)


def group_norm_stats(
    x: torch.Tensor, num_groups: int, eps: float = 1e-6, per_frame: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(mean, rstd)`` of ``x`` ``(N, C, T, H, W)``, each ``(N, G, T)`` per frame or
    ``(N, G, 1)`` per clip: the statistics :func:`group_norm_silu` normalises with (inference only).
    With :func:`group_norm_apply` a clip is normalised a few frames at a time, with its own
    statistics, and never exists normalised in full."""
    if _use_triton(x):
        return _triton_impl("group_norm_silu").group_norm_stats(x, num_groups, eps, per_frame)
    return group_norm_stats_ref(x, num_groups, eps, per_frame)


def group_norm_apply(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    silu: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``silu((x - mean) * rstd * weight + bias)`` on ``(N, C, T, H, W)`` with given fp32 statistics
    ``(N, G, T)`` or ``(N, G, 1)`` (from :func:`group_norm_stats`, e.g. of a whole clip that ``x`` is
    a time slice of); output in ``x``'s dtype, or written into ``out`` (an ``x``-shaped view with
    contiguous frames). Inference only."""
    if _use_triton(x):
        return _triton_impl("group_norm_silu").group_norm_apply(x, weight, bias, mean, rstd, silu, out)
    return group_norm_apply_ref(x, weight, bias, mean, rstd, silu, out)


def rms_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-12,
    silu: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Channel RMSNorm (Wan-2.1 form) + optional SiLU on ``(N, C, *spatial)``; differentiable.

    ``y = x / max(||x||_2 over C, eps) * sqrt(C) * weight (+ bias)``, fp32 reduction. ``out``
    (inference only, 5-D): an ``x``-shaped view with contiguous ``(T, H, W)`` per channel to write into.
    """
    if _use_triton(x):
        return _triton_impl("rms_norm_silu").rms_norm_silu(x, weight, bias, eps, silu, out)
    return rms_norm_silu_ref(x, weight, bias, eps, silu, out)


def blend_tile_(
    canvas: torch.Tensor,
    weight_sum: torch.Tensor,
    tile: torch.Tensor,
    top: int,
    left: int,
    ramp_top: int,
    ramp_bottom: int,
    ramp_left: int,
    ramp_right: int,
) -> None:
    """Accumulate a feathered tile into a float32 ``(N, C, T, H, W)`` canvas and its ``(H, W)``
    weight sum, in place (see :mod:`.blend_tile.reference` for the weights); forward only."""
    if _use_triton(canvas):
        _triton_impl("blend_tile").blend_tile_(
            canvas, weight_sum, tile, top, left, ramp_top, ramp_bottom, ramp_left, ramp_right
        )
    else:
        blend_tile_ref_(canvas, weight_sum, tile, top, left, ramp_top, ramp_bottom, ramp_left, ramp_right)


def normalize_canvas(canvas: torch.Tensor, weight_sum: torch.Tensor, to_uint8: bool = False) -> torch.Tensor:
    """``canvas / weight_sum`` (0 where the weight sum is 0), float32 ``(N, C, T, H, W)``; with
    ``to_uint8=True`` fused with :func:`to_uint8_frames` (uint8 ``(N, T, H, W, C)``)."""
    if _use_triton(canvas):
        return _triton_impl("blend_tile").normalize_canvas(canvas, weight_sum, to_uint8)
    return normalize_canvas_ref(canvas, weight_sum, to_uint8)


def to_uint8_frames(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` float ``(N, C, T, H, W)`` -> uint8 ``(N, T, H, W, C)`` (round half to even)."""
    if _use_triton(x):
        return _triton_impl("to_uint8_frames").to_uint8_frames(x)
    return to_uint8_frames_ref(x)


def causal_pad3d(
    x: torch.Tensor,
    pad_t: int,
    pad_h: int = 0,
    pad_w: int = 0,
    cache: torch.Tensor | None = None,
    time_mode: str = "replicate",
) -> torch.Tensor:
    """Padded input of a causal 3D conv in one write: ``cat([cache | x[:, :, :1] * pad_t | zeros, x],
    dim=2)`` then symmetric spatial zero padding; differentiable in ``x`` and ``cache``."""
    if _graph_capture():
        # The reference writes into a zero buffer; exporters turn slice writes into ScatterND with
        # every index spelled out as a constant (megabytes per conv). cat + pad exports as is.
        return _causal_pad3d_functional(x, pad_t, pad_h, pad_w, cache, time_mode)
    if _use_triton(x):
        return _triton_impl("causal_pad3d").causal_pad3d(x, pad_t, pad_h, pad_w, cache, time_mode)
    return causal_pad3d_ref(x, pad_t, pad_h, pad_w, cache, time_mode)


def _graph_capture() -> bool:
    """Whether an exporter (TorchScript tracing for ONNX, or ``torch.export``) is capturing a graph."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def _causal_pad3d_functional(x, pad_t, pad_h, pad_w, cache, time_mode) -> torch.Tensor:
    """Same values as :func:`causal_pad3d_ref`, built from ``cat`` and ``pad`` only."""
    check_causal_pad_args(x, pad_t, pad_h, pad_w, cache, time_mode)
    if pad_t > 0:
        if cache is not None:
            head = cache.to(x.dtype)
        elif time_mode == "replicate":
            head = x[:, :, :1].expand(-1, -1, pad_t, -1, -1)
        else:
            head = torch.zeros_like(x[:, :, :1]).expand(-1, -1, pad_t, -1, -1)
        x = torch.cat([head, x], dim=2)
    return torch.nn.functional.pad(x, (pad_w, pad_w, pad_h, pad_h))
