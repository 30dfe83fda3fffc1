"""Triton causal 3D padding: cache concat / first-frame replication + spatial zero pad in one write.

Layouts as in :mod:`.reference`: ``x`` contiguous ``(N, C, T, H, W)``, optional ``cache`` contiguous
``(N, C, pad_t, H, W)``, output contiguous ``(N, C, pad_t + T, Hp, Wp)`` with ``Hp = H + 2 pad_h``,
``Wp = W + 2 pad_w``. ``causal_pad3d_fwd_kernel`` runs over ``(N*C*(pad_t+T) output frames,
blocks of Hp*Wp pixels)``: each output element is written exactly once, each source element read
once (the replicated first frame ``pad_t + 1`` times). ``causal_pad3d_bwd_kernel`` runs over the
input frames and gathers the interior of the output gradient, adding the ``pad_t`` head-frame
gradients into frame 0 in replicate mode; the cache gradient is a strided view of the head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import next_pow2
from .reference import check_causal_pad_args

# HEAD_MODE values
_ZEROS, _REPLICATE, _CACHE = 0, 1, 2


@triton.jit
def causal_pad3d_fwd_kernel(
    X, CACHE, OUT, T, PT, H, W, PH, PW, HEAD_MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block of output frame ``(nc, tt)``: source frame, then zero border."""
    row = tl.program_id(0).to(tl.int64)
    TP = PT + T
    nc = row // TP
    tt = row % TP
    Hp = H + 2 * PH
    Wp = W + 2 * PW
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < Hp * Wp
    i = offs // Wp - PH
    j = offs % Wp - PW
    inside = mask & (i >= 0) & (i < H) & (j >= 0) & (j < W)
    pix = i * W + j
    if tt >= PT:
        src = X + (nc * T + tt - PT) * H * W + pix
    elif HEAD_MODE == 2:
        src = CACHE + (nc * PT + tt) * H * W + pix
    elif HEAD_MODE == 1:
        src = X + nc * T * H * W + pix
    else:
        src = X + pix
        inside = tl.zeros([BLOCK], dtype=tl.int1)
    v = tl.load(src, mask=inside, other=0.0)
    tl.store(OUT + row * Hp * Wp + offs, v, mask=mask)


@triton.jit
def causal_pad3d_bwd_kernel(
    DOUT, DX, T, PT, H, W, PH, PW, REPLICATE: tl.constexpr, BLOCK: tl.constexpr,
):
    """``dx[nc, t] = dout[nc, PT + t, interior]`` (+ sum of the head frames for ``t == 0``)."""
    row = tl.program_id(0).to(tl.int64)
    nc = row // T
    t = row % T
    TP = PT + T
    Hp = H + 2 * PH
    Wp = W + 2 * PW
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H * W
    src = (offs // W + PH) * Wp + offs % W + PW
    g = tl.load(DOUT + (nc * TP + PT + t) * Hp * Wp + src, mask=mask, other=0.0).to(tl.float32)
    if REPLICATE:
        if t == 0:
            for k in range(0, PT):
                g += tl.load(DOUT + (nc * TP + k) * Hp * Wp + src, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + row * H * W + offs, g.to(DX.dtype.element_ty), mask=mask)


def _block(n: int) -> tuple[int, int]:
    block = min(max(next_pow2(n), 128), 2048)
    return block, 8 if block >= 2048 else 4


def causal_pad3d_fwd(x, pad_t, pad_h, pad_w, cache, head_mode):
    """Forward host wrapper (contiguous inputs, ``cache`` already in ``x``'s dtype or ``None``)."""
    n, c, t, h, w = x.shape
    hp, wp = h + 2 * pad_h, w + 2 * pad_w
    out = torch.empty((n, c, pad_t + t, hp, wp), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    block, num_warps = _block(hp * wp)
    causal_pad3d_fwd_kernel[(n * c * (pad_t + t), triton.cdiv(hp * wp, block))](
        x, cache if cache is not None else x, out, t, pad_t, h, w, pad_h, pad_w,
        HEAD_MODE=head_mode, BLOCK=block, num_warps=num_warps,
    )
    return out


def causal_pad3d_bwd(dout, x_shape, pad_t, pad_h, pad_w, replicate):
    """Backward host wrapper: gradient of ``x`` from the contiguous output gradient."""
    n, c, t, h, w = x_shape
    dx = torch.empty(x_shape, device=dout.device, dtype=dout.dtype)
    if dx.numel() == 0:
        return dx
    block, num_warps = _block(h * w)
    causal_pad3d_bwd_kernel[(n * c * t, triton.cdiv(h * w, block))](
        dout, dx, t, pad_t, h, w, pad_h, pad_w, REPLICATE=replicate, BLOCK=block, num_warps=num_warps,
    )
    return dx


class CausalPad3dFunction(torch.autograd.Function):
    """Autograd wrapper; the cache gradient is the head slice of the output gradient."""

    @staticmethod
    def forward(ctx, x, cache, pad_t, pad_h, pad_w, head_mode):
        ctx.cfg = (tuple(x.shape), x.dtype, pad_t, pad_h, pad_w, head_mode)
        ctx.cache_dtype = cache.dtype if cache is not None else None
        return causal_pad3d_fwd(x.contiguous(), pad_t, pad_h, pad_w,
                                None if cache is None else cache.to(x.dtype).contiguous(), head_mode)

    @staticmethod
    def backward(ctx, dout):
        x_shape, x_dtype, pad_t, pad_h, pad_w, head_mode = ctx.cfg
        dout = dout.contiguous()
        dx = causal_pad3d_bwd(dout, x_shape, pad_t, pad_h, pad_w, head_mode == _REPLICATE)
        dcache = None
        if ctx.needs_input_grad[1]:
            h, w = x_shape[-2:]
            dcache = dout[:, :, :pad_t, pad_h:pad_h + h, pad_w:pad_w + w].to(ctx.cache_dtype)
        return dx.to(x_dtype), dcache, None, None, None, None


def causal_pad3d(
    x: torch.Tensor,
    pad_t: int,
    pad_h: int = 0,
    pad_w: int = 0,
    cache: torch.Tensor | None = None,
    time_mode: str = "replicate",
) -> torch.Tensor:
    """Triton version of :func:`.reference.causal_pad3d_ref` (same contract, differentiable)."""
    check_causal_pad_args(x, pad_t, pad_h, pad_w, cache, time_mode)
    if cache is not None:
        head_mode = _CACHE
    else:
        head_mode = _REPLICATE if time_mode == "replicate" else _ZEROS
    return CausalPad3dFunction.apply(x, cache, int(pad_t), int(pad_h), int(pad_w), head_mode)
