"""Pure-PyTorch feathered tile blending (the definition of correct).

Layouts: ``canvas`` is a contiguous float32 ``(N, C, T, H, W)`` accumulator, ``weight_sum`` a
contiguous float32 ``(H, W)`` accumulator, ``tile`` an ``(N, C, T, h, w)`` tensor of any float dtype
placed at rows ``[top, top + h)`` and columns ``[left, left + w)``. The feather weight of tile row
``i`` (0-based) is::

    wy(i) = min(1, (i + 1) / (ramp_top + 1)) * min(1, (h - i) / (ramp_bottom + 1))

and likewise ``wx(j)`` with ``ramp_left`` / ``ramp_right``; a ramp of 0 is a hard edge (weight 1).
``w = wy * wx`` lies in ``(0, 1]``. ``blend_tile_`` accumulates ``tile * w`` into the canvas and
``w`` into ``weight_sum`` in place; ``normalize_canvas`` returns ``canvas / weight_sum`` (0 where
the weight sum is 0, i.e. pixels no tile covered).
"""

from __future__ import annotations

import torch

from ..to_uint8_frames.reference import to_uint8_frames_ref


def check_blend_args(canvas, weight_sum, tile, top, left, ramps) -> None:
    """Raise ``ValueError`` for inconsistent shapes, dtypes, negative ramps or an out-of-canvas tile."""
    if canvas.dim() != 5 or canvas.dtype != torch.float32 or not canvas.is_contiguous():
        raise ValueError(f"canvas must be a contiguous float32 (N, C, T, H, W) tensor, got "
                         f"{canvas.dtype} {tuple(canvas.shape)}")
    H, W = canvas.shape[-2:]
    if tuple(weight_sum.shape) != (H, W) or weight_sum.dtype != torch.float32 or not weight_sum.is_contiguous():
        raise ValueError(f"weight_sum must be a contiguous float32 ({H}, {W}) tensor, got "
                         f"{weight_sum.dtype} {tuple(weight_sum.shape)}")
    if tile.dim() != 5 or tuple(tile.shape[:3]) != tuple(canvas.shape[:3]) or not tile.is_floating_point():
        raise ValueError(f"tile must be a float (N, C, T, h, w) tensor matching canvas {tuple(canvas.shape[:3])} "
                         f"in (N, C, T), got {tile.dtype} {tuple(tile.shape)}")
    h, w = tile.shape[-2:]
    if top < 0 or left < 0 or top + h > H or left + w > W:
        raise ValueError(f"tile rows [{top}, {top + h}) x cols [{left}, {left + w}) lie outside the "
                         f"{H}x{W} canvas")
    if any(r < 0 for r in ramps):
        raise ValueError(f"ramps must be >= 0, got {tuple(ramps)}")


def feather_weights(n: int, ramp_lo: int, ramp_hi: int, device) -> torch.Tensor:
    """1-D float32 feather weights of length ``n`` (see module doc)."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    lo = ((i + 1.0) / (ramp_lo + 1.0)).clamp_max(1.0)
    hi = ((n - i) / (ramp_hi + 1.0)).clamp_max(1.0)
    return lo * hi


def blend_tile_ref_(
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
    """``canvas[..., top:top+h, left:left+w] += tile * w``; ``weight_sum[...] += w`` (in place)."""
    check_blend_args(canvas, weight_sum, tile, top, left, (ramp_top, ramp_bottom, ramp_left, ramp_right))
    h, w = tile.shape[-2:]
    wgt = torch.outer(feather_weights(h, ramp_top, ramp_bottom, tile.device),
                      feather_weights(w, ramp_left, ramp_right, tile.device))
    canvas[..., top:top + h, left:left + w].addcmul_(tile.float(), wgt)
    weight_sum[top:top + h, left:left + w] += wgt


def normalize_canvas_ref(canvas: torch.Tensor, weight_sum: torch.Tensor, to_uint8: bool = False) -> torch.Tensor:
    """``canvas / weight_sum`` (0 where ``weight_sum == 0``) as float32 ``(N, C, T, H, W)``; with
    ``to_uint8=True`` the result goes through ``to_uint8_frames`` (uint8 ``(N, T, H, W, C)``)."""
    out = torch.where(weight_sum > 0, canvas / weight_sum, torch.zeros((), device=canvas.device))
    return to_uint8_frames_ref(out) if to_uint8 else out
