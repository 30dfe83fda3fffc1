"""Triton float-to-uint8 frame conversion in one pass (clamp, scale, round, transpose).

Input ``x``: contiguous ``(N, C, T, H, W)``, any float dtype, values nominally in ``[-1, 1]``.
Output: contiguous ``uint8`` ``(N, T, H, W, C)``. Each program reads a ``BLOCK_P`` pixel strip of
every channel of one frame (coalesced per channel) and writes it as one contiguous
``BLOCK_P * C`` byte run. Optionally divides by a per-pixel weight sum first (the tiled decoder's
canvas normalisation fused into the conversion; pixels with weight 0 become 0 -> byte 128).

Rounding is half-to-even like ``torch.round``: for ``v`` in ``[0, 255]``, ``(v + 2**23) - 2**23``
in fp32 round-to-nearest-even arithmetic is exactly ``rint(v)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import next_pow2
from .reference import check_frames_arg


@triton.jit
def to_uint8_frames_fwd_kernel(
    X, WSUM, OUT, C, T, HW,
    HAS_WSUM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One strip of ``BLOCK_P`` pixels of frame ``(n, t)``, all channels."""
    nt = tl.program_id(0).to(tl.int64)
    n = nt // T
    t = nt % T
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    mask_p = offs_p < HW
    mask = mask_p[:, None] & (offs_c < C)[None, :]
    src = X + (n * C * T + t) * HW + offs_c.to(tl.int64)[None, :] * T * HW + offs_p[:, None]
    v = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    if HAS_WSUM:
        ws = tl.load(WSUM + offs_p, mask=mask_p, other=1.0)[:, None]
        v = tl.where(ws > 0.0, tl.div_rn(v, ws), 0.0)
    v = (tl.minimum(tl.maximum(v, -1.0), 1.0) + 1.0) * 127.5
    v = (v + 8388608.0) - 8388608.0
    dst = OUT + nt * HW * C + offs_p[:, None] * C + offs_c[None, :]
    tl.store(dst, v.to(tl.uint8), mask=mask)


def to_uint8_frames_launch(x: torch.Tensor, weight_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Host wrapper: contiguous ``x`` ``(N, C, T, H, W)`` (+ optional fp32 ``(H, W)`` weight sum)."""
    n, c, t, h, w = x.shape
    hw = h * w
    block_c = next_pow2(c)
    block_p = max(min(next_pow2(hw), 4096 // block_c), 1)
    out = torch.empty((n, t, h, w, c), device=x.device, dtype=torch.uint8)
    grid = (n * t, triton.cdiv(hw, block_p))
    to_uint8_frames_fwd_kernel[grid](
        x, weight_sum if weight_sum is not None else x, out, c, t, hw,
        HAS_WSUM=weight_sum is not None, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
    )
    return out


def to_uint8_frames(x: torch.Tensor) -> torch.Tensor:
    """Triton ``[-1, 1]`` float ``(N, C, T, H, W)`` -> ``uint8`` ``(N, T, H, W, C)``."""
    check_frames_arg(x)
    return to_uint8_frames_launch(x.contiguous())
