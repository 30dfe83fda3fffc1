"""Triton GroupNorm + optional SiLU for NCTHW video tensors, forward and backward.

Layout: ``x`` is a contiguous ``(N, C, T, H, W)`` tensor viewed as ``N * C * T`` rows of ``H * W``
contiguous elements (row ``r`` = ``(n, c, t)``, ``c = (r // T) % C``). Statistics are accumulated in
fp32 whatever the input dtype; the output keeps the input dtype.

Pipeline (forward): ``group_norm_silu_fwd_stats_kernel`` reduces each row to shifted sums (one read
of ``x``), the tiny per-row partials are merged into per-group mean / rstd with exact parallel
variance combination, and ``group_norm_silu_fwd_kernel`` normalises, applies the affine and SiLU
(one read, one write). Backward: ``group_norm_silu_bwd_reduce_kernel`` reduces ``dz`` and
``dz * xhat`` per row (these give ``dweight`` / ``dbias`` and the two group means of the input
gradient) and ``group_norm_silu_bwd_kernel`` writes ``dx``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import as_contiguous, next_pow2
from .reference import check_group_norm_args


@triton.jit
def group_norm_silu_fwd_stats_kernel(X, S1, S2, SHIFT, HW, BLOCK: tl.constexpr):
    """Per row ``r`` of ``HW`` elements: ``sum(x - k)``, ``sum((x - k)^2)`` with ``k = x[r, 0]``."""
    row = tl.program_id(0).to(tl.int64)
    base = X + row * HW
    k = tl.load(base).to(tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < HW
        v = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, v - k, 0.0)
        acc1 += d
        acc2 += d * d
    tl.store(S1 + row, tl.sum(acc1, axis=0))
    tl.store(S2 + row, tl.sum(acc2, axis=0))
    tl.store(SHIFT + row, k)


@triton.jit
def group_norm_silu_fwd_kernel(
    X, Y, W, B, MEAN, RSTD, HW, T, C,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr,
):
    """``y = silu((x - mean[r]) * rstd[r] * w[c] + b[c])`` over one block of one row."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    x = tl.load(X + row * HW + offs, mask=mask, other=0.0).to(tl.float32)
    z = (x - mean) * rstd
    c = (row // T) % C
    if HAS_W:
        z = z * tl.load(W + c).to(tl.float32)
    if HAS_B:
        z = z + tl.load(B + c).to(tl.float32)
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(Y + row * HW + offs, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _dz(x, dy, mean, rstd, w, b, SILU: tl.constexpr):
    """Recompute ``xhat`` and the gradient w.r.t. the pre-activation ``z = xhat * w + b``."""
    xhat = (x - mean) * rstd
    if SILU:
        z = xhat * w + b
        s = tl.sigmoid(z)
        dz = dy * s * (1.0 + z * (1.0 - s))
    else:
        dz = dy
    return xhat, dz


@triton.jit
def group_norm_silu_bwd_reduce_kernel(
    X, DY, W, B, MEAN, RSTD, SDZ, SDZX, HW, T, C,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: ``sum(dz)`` and ``sum(dz * xhat)``."""
    row = tl.program_id(0).to(tl.int64)
    c = (row // T) % C
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    w = tl.load(W + c).to(tl.float32) if HAS_W else 1.0
    b = tl.load(B + c).to(tl.float32) if HAS_B else 0.0
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < HW
        x = tl.load(X + row * HW + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * HW + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, dz = _dz(x, dy, mean, rstd, w, b, SILU)
        dz = tl.where(mask, dz, 0.0)
        acc1 += dz
        acc2 += dz * xhat
    tl.store(SDZ + row, tl.sum(acc1, axis=0))
    tl.store(SDZX + row, tl.sum(acc2, axis=0))


@triton.jit
def group_norm_silu_bwd_kernel(
    X, DY, DX, W, B, MEAN, RSTD, C1, C2, HW, T, C,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, BLOCK: tl.constexpr,
):
    """``dx = rstd * (w * dz - c1[r] - xhat * c2[r])`` (c1, c2: group means of dxhat, dxhat*xhat)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    c = (row // T) % C
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    c1 = tl.load(C1 + row)
    c2 = tl.load(C2 + row)
    w = tl.load(W + c).to(tl.float32) if HAS_W else 1.0
    b = tl.load(B + c).to(tl.float32) if HAS_B else 0.0
    x = tl.load(X + row * HW + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * HW + offs, mask=mask, other=0.0).to(tl.float32)
    xhat, dz = _dz(x, dy, mean, rstd, w, b, SILU)
    dx = rstd * (w * dz - c1 - xhat * c2)
    tl.store(DX + row * HW + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _launch_cfg(hw: int) -> tuple[int, int]:
    block = min(max(next_pow2(hw), 128), 2048)
    return block, 8 if block >= 2048 else 4


def _group_view(rows: torch.Tensor, n: int, g: int, cg: int, t: int, per_frame: bool):
    """View per-row fp32 values ``(N*C*T,)`` as ``(N, G, T, Cg)`` or ``(N, G, Cg*T)`` for group sums."""
    v = rows.view(n, g, cg, t)
    return v.transpose(2, 3) if per_frame else v.reshape(n, g, 1, cg * t)


def _expand_rows(per_group: torch.Tensor, n: int, g: int, cg: int, t: int) -> torch.Tensor:
    """Broadcast ``(N, G, T or 1)`` values back to one value per row ``(N*C*T,)`` (fp32, contiguous)."""
    return per_group.view(n, g, 1, -1).expand(n, g, cg, t).reshape(-1).contiguous()


def group_norm_silu_fwd(x, weight, bias, num_groups, eps, per_frame, silu):
    """Forward host wrapper: ``x`` contiguous ``(N, C, T, H, W)``; returns ``(y, mean_rows, rstd_rows)``."""
    n, c, t, h, w = x.shape
    hw = h * w
    rows = n * c * t
    cg = c // num_groups
    s1 = torch.empty(rows, device=x.device, dtype=torch.float32)
    s2 = torch.empty_like(s1)
    shift = torch.empty_like(s1)
    block, num_warps = _launch_cfg(hw)
    group_norm_silu_fwd_stats_kernel[(rows,)](x, s1, s2, shift, hw, BLOCK=block, num_warps=num_warps)
    # exact combination of equal-size row partials (Chan et al.): mean, then M2 within + between rows
    row_mean = shift + s1 / hw
    row_m2 = (s2 - s1 * s1 / hw).clamp_min(0.0)
    gm = _group_view(row_mean, n, num_groups, cg, t, per_frame)
    gm2 = _group_view(row_m2, n, num_groups, cg, t, per_frame)
    mean = gm.mean(dim=-1, keepdim=True)
    m2 = gm2.sum(dim=-1, keepdim=True) + hw * (gm - mean).square().sum(dim=-1, keepdim=True)
    var = m2 / (gm.shape[-1] * hw)
    rstd = torch.rsqrt(var + eps)
    mean_rows = _expand_rows(mean, n, num_groups, cg, t)
    rstd_rows = _expand_rows(rstd, n, num_groups, cg, t)
    y = torch.empty_like(x)
    grid = (rows, triton.cdiv(hw, block))
    group_norm_silu_fwd_kernel[grid](
        x, y, weight if weight is not None else x, bias if bias is not None else x,
        mean_rows, rstd_rows, hw, t, c,
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, BLOCK=block, num_warps=num_warps,
    )
    return y, mean_rows, rstd_rows


def group_norm_silu_bwd(dy, x, weight, bias, mean_rows, rstd_rows, num_groups, per_frame, silu):
    """Backward host wrapper; returns ``(dx, dweight_fp32 or None, dbias_fp32 or None)``."""
    n, c, t, h, w = x.shape
    hw = h * w
    rows = n * c * t
    cg = c // num_groups
    block, num_warps = _launch_cfg(hw)
    has_w, has_b = weight is not None, bias is not None
    wp = weight if has_w else x
    bp = bias if has_b else x
    sdz = torch.empty(rows, device=x.device, dtype=torch.float32)
    sdzx = torch.empty_like(sdz)
    group_norm_silu_bwd_reduce_kernel[(rows,)](
        x, dy, wp, bp, mean_rows, rstd_rows, sdz, sdzx, hw, t, c,
        HAS_W=has_w, HAS_B=has_b, SILU=silu, BLOCK=block, num_warps=num_warps,
    )
    wrow = weight.float().view(1, c, 1).expand(n, c, t).reshape(-1) if has_w else 1.0
    g1 = _group_view(sdz * wrow, n, num_groups, cg, t, per_frame)
    g2 = _group_view(sdzx * wrow, n, num_groups, cg, t, per_frame)
    count = g1.shape[-1] * hw
    c1 = _expand_rows(g1.sum(dim=-1, keepdim=True) / count, n, num_groups, cg, t)
    c2 = _expand_rows(g2.sum(dim=-1, keepdim=True) / count, n, num_groups, cg, t)
    dx = torch.empty_like(x)
    group_norm_silu_bwd_kernel[(rows, triton.cdiv(hw, block))](
        x, dy, dx, wp, bp, mean_rows, rstd_rows, c1, c2, hw, t, c,
        HAS_W=has_w, HAS_B=has_b, SILU=silu, BLOCK=block, num_warps=num_warps,
    )
    dweight = sdzx.view(n, c, t).sum(dim=(0, 2)) if has_w else None
    dbias = sdz.view(n, c, t).sum(dim=(0, 2)) if has_b else None
    return dx, dweight, dbias


class GroupNormSiLUFunction(torch.autograd.Function):
    """Autograd wrapper around the forward / backward host functions (5-D contiguous input)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, per_frame, silu):
        x = x.contiguous()
        weight, bias = as_contiguous(weight), as_contiguous(bias)
        y, mean_rows, rstd_rows = group_norm_silu_fwd(x, weight, bias, num_groups, eps, per_frame, silu)
        ctx.save_for_backward(x, weight, bias, mean_rows, rstd_rows)
        ctx.cfg = (num_groups, per_frame, silu)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean_rows, rstd_rows = ctx.saved_tensors
        num_groups, per_frame, silu = ctx.cfg
        dx, dweight, dbias = group_norm_silu_bwd(
            dy.contiguous(), x, weight, bias, mean_rows, rstd_rows, num_groups, per_frame, silu
        )
        dweight = dweight.to(weight.dtype) if dweight is not None and ctx.needs_input_grad[1] else None
        dbias = dbias.to(bias.dtype) if dbias is not None and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None, None


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-6,
    per_frame: bool = True,
    silu: bool = True,
) -> torch.Tensor:
    """Triton GroupNorm + SiLU; same contract as :func:`..reference.group_norm_silu_ref`."""
    check_group_norm_args(x, weight, bias, num_groups)
    if x.dim() == 4:
        return GroupNormSiLUFunction.apply(x.unsqueeze(2), weight, bias, num_groups, eps, True, silu).squeeze(2)
    return GroupNormSiLUFunction.apply(x, weight, bias, num_groups, eps, per_frame, silu)
