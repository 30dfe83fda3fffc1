"""Triton channel RMSNorm + optional SiLU, forward and backward.

Layout: ``x`` is a contiguous ``(N, C, S)`` view of ``(N, C, *spatial)`` (``S`` = product of the
spatial dims); every program owns ``BLOCK_S`` contiguous positions of one sample and reduces over
all ``C`` channels (stride ``S``) in fp32. When ``next_pow2(C) * BLOCK_S`` fits the register budget
the whole channel column is held in registers (one read of ``x``); otherwise the channels are
walked in ``BLOCK_C`` chunks twice (the second read is mostly served by L2).

Forward stores the per-position L2 norm (fp32, ``(N, S)``) for the backward. With
``r = sqrt(C) / max(norm, eps)``, ``xhat = x * r``, ``z = xhat * w + b``, ``dz = dy * silu'(z)`` and
``u = dz * w``::

    dx = r * (u - x * <x, u> / norm^2)   (norm > eps),   dx = r * u  otherwise
    dw = sum(dz * xhat),  db = sum(dz)   (per-program partials, summed on the host)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import as_contiguous, autotune, check_out_call, next_pow2, prod
from .reference import check_rms_norm_args

_REG_BUDGET = 8192


@triton.jit
def _act(z, SILU: tl.constexpr):
    if SILU:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _dact(z, dy, SILU: tl.constexpr):
    if SILU:
        s = tl.sigmoid(z)
        dy = dy * s * (1.0 + z * (1.0 - s))
    return dy


@triton.jit
def rms_norm_silu_fwd_kernel(
    X, Y, W, B, NORM, C, S, Y_SN, Y_SC, scale, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE: tl.constexpr,
):
    """One block of ``BLOCK_S`` positions of sample ``n``: norm over C, scale, affine, SiLU. ``y`` of
    ``(n, c)`` starts at ``n * Y_SN + c * Y_SC`` and holds its S positions contiguously."""
    n = tl.program_id(1).to(tl.int64)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    base = n * C * S
    if SINGLE:
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        ptrs = base + offs_c.to(tl.int64)[:, None] * S + offs_s[None, :]
        y_ptrs = n * Y_SN + offs_c.to(tl.int64)[:, None] * Y_SC + offs_s[None, :]
        mask = mask_c[:, None] & mask_s[None, :]
        x = tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=0))
        r = scale / tl.maximum(norm, eps)
        z = x * r[None, :]
        if HAS_W:
            z = z * tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
        if HAS_B:
            z = z + tl.load(B + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
        tl.store(Y + y_ptrs, _act(z, SILU).to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_S], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            ptrs = base + offs_c.to(tl.int64)[:, None] * S + offs_s[None, :]
            mask = (offs_c < C)[:, None] & mask_s[None, :]
            x = tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(x * x, axis=0)
        norm = tl.sqrt(acc)
        r = scale / tl.maximum(norm, eps)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            ptrs = base + offs_c.to(tl.int64)[:, None] * S + offs_s[None, :]
            y_ptrs = n * Y_SN + offs_c.to(tl.int64)[:, None] * Y_SC + offs_s[None, :]
            mask = mask_c[:, None] & mask_s[None, :]
            x = tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32)
            z = x * r[None, :]
            if HAS_W:
                z = z * tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
            if HAS_B:
                z = z + tl.load(B + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
            tl.store(Y + y_ptrs, _act(z, SILU).to(Y.dtype.element_ty), mask=mask)
    tl.store(NORM + n * S + offs_s, norm, mask=mask_s)


@triton.jit
def _bwd_tile(X, DY, W, B, ptrs, offs_c, mask_c, mask, r, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              SILU: tl.constexpr):
    """Load one (channels x positions) tile; return ``x``, ``xhat``, ``dz`` and ``u = dz * w``."""
    x = tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + ptrs, mask=mask, other=0.0).to(tl.float32)
    xhat = x * r[None, :]
    w = tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None] if HAS_W else 1.0
    b = tl.load(B + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None] if HAS_B else 0.0
    dz = tl.where(mask, _dact(xhat * w + b, dy, SILU), 0.0)
    return x, xhat, dz, dz * w


@triton.jit
def rms_norm_silu_bwd_kernel(
    X, DY, DX, W, B, NORM, DW_PART, DB_PART, C, S, NUM_SB, scale, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE: tl.constexpr,
):
    """Input gradient for one block of positions, plus per-program partial ``dw`` / ``db`` rows."""
    n = tl.program_id(1).to(tl.int64)
    sb = tl.program_id(0)
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    base = n * C * S
    part = (n * NUM_SB + sb) * C
    norm = tl.load(NORM + n * S + offs_s, mask=mask_s, other=1.0)
    denom = tl.maximum(norm, eps)
    r = scale / denom
    # coefficient of x in dx: r * <x, u> / norm^2 when the norm is not clamped
    clamped = norm <= eps
    if SINGLE:
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        ptrs = base + offs_c.to(tl.int64)[:, None] * S + offs_s[None, :]
        mask = mask_c[:, None] & mask_s[None, :]
        x, xhat, dz, u = _bwd_tile(X, DY, W, B, ptrs, offs_c, mask_c, mask, r, HAS_W, HAS_B, SILU)
        dot = tl.sum(x * u, axis=0)
        k = tl.where(clamped, 0.0, dot / (denom * denom))
        dx = r[None, :] * (u - x * k[None, :])
        tl.store(DX + ptrs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            tl.store(DW_PART + part + offs_c, tl.sum(dz * xhat, axis=1), mask=mask_c)
        if HAS_B:
            tl.store(DB_PART + part + offs_c, tl.sum(dz, axis=1), mask=mask_c)
    else:
        dot = tl.zeros([BLOCK_S], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            ptrs = base + offs_c.to(tl.int64)[:, None] * S + offs_s[None, :]
            mask = mask_c[:, None] & mask_s[None, :]
            x, xhat, dz, u = _bwd_tile(X, DY, W, B, ptrs, offs_c, mask_c, mask, r, HAS_W, HAS_B, SILU)
            dot += tl.sum(x * u, axis=0)
        k = tl.where(clamped, 0.0, dot / (denom * denom))
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            ptrs = base + offs_c.to(tl.int64)[:, None] * S + offs_s[None, :]
            mask = mask_c[:, None] & mask_s[None, :]
            x, xhat, dz, u = _bwd_tile(X, DY, W, B, ptrs, offs_c, mask_c, mask, r, HAS_W, HAS_B, SILU)
            dx = r[None, :] * (u - x * k[None, :])
            tl.store(DX + ptrs, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_W:
                tl.store(DW_PART + part + offs_c, tl.sum(dz * xhat, axis=1), mask=mask_c)
            if HAS_B:
                tl.store(DB_PART + part + offs_c, tl.sum(dz, axis=1), mask=mask_c)


def _launch_cfg(c: int, s: int, max_block_s: int = 64) -> tuple[int, int, bool, int]:
    """``(BLOCK_C, BLOCK_S, SINGLE, num_warps)`` for ``C`` channels and ``S`` positions."""
    block_s = min(next_pow2(s), max_block_s)
    full_c = next_pow2(c)
    if full_c * block_s <= _REG_BUDGET:
        return full_c, block_s, True, 4 if full_c * block_s <= 4096 else 8
    return max(_REG_BUDGET // (2 * block_s), 1), block_s, False, 8


def rms_norm_silu_fwd(x, weight, bias, eps, silu, max_block_s: int | None = None, out=None):
    """Forward host wrapper: ``x`` contiguous ``(N, C, *spatial)``; returns ``(y, norm (N, S) fp32)``.
    ``y`` is ``out`` when given (an ``x``-shaped 5-D view with contiguous ``(T, H, W)`` per channel).

    ``max_block_s`` (positions per program) is tuned per shape on CUDA (cached) unless given.
    """
    n, c = x.shape[:2]
    s = prod(x.shape[2:])
    if max_block_s is None:
        key = (x.device, "rms_norm_silu_fwd", n, c, s, x.dtype)
        max_block_s = autotune(
            key, [64, 32, 128, 16], lambda b: _rms_norm_silu_fwd(x, weight, bias, eps, silu, b, out)
        )
    return _rms_norm_silu_fwd(x, weight, bias, eps, silu, max_block_s, out)


def _rms_norm_silu_fwd(x, weight, bias, eps, silu, max_block_s: int, out=None):
    n, c = x.shape[:2]
    s = prod(x.shape[2:])
    block_c, block_s, single, num_warps = _launch_cfg(c, s, max_block_s)
    if out is None:
        y = torch.empty_like(x)
    else:
        check_out_call("rms_norm_silu", x, out)
        if out.stride(2) != s // x.shape[2]:
            raise ValueError(f"out needs contiguous (T, H, W) per channel, got strides {out.stride()}")
        y = out
    norm = torch.empty((n, s), device=x.device, dtype=torch.float32)
    # position blocks on grid axis 0 (up to 2^31 - 1 programs; axis 1 allows only 65535)
    rms_norm_silu_fwd_kernel[(triton.cdiv(s, block_s), n)](
        x, y, weight if weight is not None else x, bias if bias is not None else x, norm,
        c, s, y.stride(0), y.stride(1), float(c) ** 0.5, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
        BLOCK_C=block_c, BLOCK_S=block_s, SINGLE=single, num_warps=num_warps,
    )
    return y, norm


def rms_norm_silu_bwd(dy, x, weight, bias, norm, eps, silu):
    """Backward host wrapper; returns ``(dx, dweight_fp32 or None, dbias_fp32 or None)``."""
    n, c = x.shape[:2]
    s = prod(x.shape[2:])
    block_c, block_s, single, num_warps = _launch_cfg(c, s)
    num_sb = triton.cdiv(s, block_s)
    has_w, has_b = weight is not None, bias is not None
    dx = torch.empty_like(x)
    dw_part = torch.empty((n * num_sb, c), device=x.device, dtype=torch.float32) if has_w else norm
    db_part = torch.empty((n * num_sb, c), device=x.device, dtype=torch.float32) if has_b else norm
    rms_norm_silu_bwd_kernel[(num_sb, n)](
        x, dy, dx, weight if has_w else x, bias if has_b else x, norm, dw_part, db_part,
        c, s, num_sb, float(c) ** 0.5, eps,
        HAS_W=has_w, HAS_B=has_b, SILU=silu,
        BLOCK_C=block_c, BLOCK_S=block_s, SINGLE=single, num_warps=num_warps,
    )
    return dx, dw_part.sum(dim=0) if has_w else None, db_part.sum(dim=0) if has_b else None


class RMSNormSiLUFunction(torch.autograd.Function):
    """Autograd wrapper around the forward / backward host functions."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, silu):
        x = x.contiguous()
        weight, bias = as_contiguous(weight), as_contiguous(bias)
        y, norm = rms_norm_silu_fwd(x, weight, bias, eps, silu)
        ctx.save_for_backward(x, weight, bias, norm)
        ctx.cfg = (eps, silu)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, norm = ctx.saved_tensors
        eps, silu = ctx.cfg
        dx, dweight, dbias = rms_norm_silu_bwd(dy.contiguous(), x, weight, bias, norm, eps, silu)
        dweight = dweight.view(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = dbias.view(bias.shape).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


def rms_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-12,
    silu: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton channel RMSNorm + SiLU; same contract as :func:`..reference.rms_norm_silu_ref`."""
    check_rms_norm_args(x, weight, bias)
    if out is not None:  # checked by the host wrapper
        rms_norm_silu_fwd(x.contiguous(), as_contiguous(weight), as_contiguous(bias), eps, silu, out=out)
        return out
    return RMSNormSiLUFunction.apply(x, weight, bias, eps, silu)
