"""Triton feathered tile blending and canvas normalisation (forward only).

Layouts as in :mod:`.reference`: ``canvas`` contiguous float32 ``(N, C, T, H, W)``, ``weight_sum``
contiguous float32 ``(H, W)``, ``tile`` ``(N, C, T, h, w)`` (made contiguous). ``blend_tile_fwd_kernel``
runs over ``(N*C*T frames, blocks of h*w tile pixels)``; the feather weight of each pixel is computed
in registers (never materialised), each touched canvas element is read and written once, and the
programs of frame 0 also accumulate the weights into ``weight_sum``. ``normalize_canvas_fwd_kernel``
divides every frame by the weight sum (0 where it is 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import next_pow2
from ..to_uint8_frames.triton import to_uint8_frames_launch
from .reference import check_blend_args


@triton.jit
def blend_tile_fwd_kernel(
    CANVAS, WSUM, TILE, h, w, H, W, top, left, ramp_top, ramp_bottom, ramp_left, ramp_right,
    BLOCK: tl.constexpr,
):
    """Accumulate one block of one tile frame, weighted by its linear feather, into the canvas."""
    frame = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < h * w
    i = offs // w
    j = offs % w
    fi = i.to(tl.float32)
    fj = j.to(tl.float32)
    # IEEE-rounded divisions so that the weights match the reference bit for bit
    wy = tl.minimum(tl.div_rn(fi + 1.0, ramp_top + 1.0), 1.0) * tl.minimum(tl.div_rn(h - fi, ramp_bottom + 1.0), 1.0)
    wx = tl.minimum(tl.div_rn(fj + 1.0, ramp_left + 1.0), 1.0) * tl.minimum(tl.div_rn(w - fj, ramp_right + 1.0), 1.0)
    wgt = wy * wx
    t = tl.load(TILE + frame * h * w + offs, mask=mask, other=0.0).to(tl.float32)
    pix = (top + i) * W + left + j
    cptr = CANVAS + frame * H * W + pix
    acc = tl.load(cptr, mask=mask, other=0.0)
    tl.store(cptr, acc + t * wgt, mask=mask)
    if tl.program_id(0) == 0:
        ws = tl.load(WSUM + pix, mask=mask, other=0.0)
        tl.store(WSUM + pix, ws + wgt, mask=mask)


@triton.jit
def normalize_canvas_fwd_kernel(CANVAS, WSUM, OUT, HW, BLOCK: tl.constexpr):
    """``out = canvas / weight_sum`` for one block of one frame (0 where the weight sum is 0)."""
    frame = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    v = tl.load(CANVAS + frame * HW + offs, mask=mask, other=0.0)
    ws = tl.load(WSUM + offs, mask=mask, other=1.0)
    tl.store(OUT + frame * HW + offs, tl.where(ws > 0.0, tl.div_rn(v, ws), 0.0), mask=mask)


def _block(n: int) -> tuple[int, int]:
    block = min(max(next_pow2(n), 128), 2048)
    return block, 8 if block >= 2048 else 4


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
    """Triton version of :func:`.reference.blend_tile_ref_` (same contract, in place)."""
    check_blend_args(canvas, weight_sum, tile, top, left, (ramp_top, ramp_bottom, ramp_left, ramp_right))
    tile = tile.contiguous()
    n, c, t, h, w = tile.shape
    if tile.numel() == 0:
        return
    H, W = canvas.shape[-2:]
    block, num_warps = _block(h * w)
    blend_tile_fwd_kernel[(n * c * t, triton.cdiv(h * w, block))](
        canvas, weight_sum, tile, h, w, H, W, top, left,
        int(ramp_top), int(ramp_bottom), int(ramp_left), int(ramp_right),
        BLOCK=block, num_warps=num_warps,
    )


def normalize_canvas(canvas: torch.Tensor, weight_sum: torch.Tensor, to_uint8: bool = False) -> torch.Tensor:
    """Triton version of :func:`.reference.normalize_canvas_ref`; ``to_uint8=True`` fuses the division
    into the uint8 frame conversion (one read of the canvas, bytes out)."""
    canvas, weight_sum = canvas.contiguous(), weight_sum.contiguous().float()
    if to_uint8:
        return to_uint8_frames_launch(canvas, weight_sum)
    n, c, t, h, w = canvas.shape
    out = torch.empty_like(canvas)
    block, num_warps = _block(h * w)
    normalize_canvas_fwd_kernel[(n * c * t, triton.cdiv(h * w, block))](
        canvas, weight_sum, out, h * w, BLOCK=block, num_warps=num_warps
    )
    return out
