"""Triton GroupNorm + optional SiLU for NCTHW video tensors, forward and backward.

Layout: ``x`` is a contiguous ``(N, C, T, H, W)`` tensor viewed as ``N * C * T`` rows of ``H * W``
contiguous elements (row ``r`` = ``(n, c, t)``, ``c = (r // T) % C``). Statistics are accumulated in
fp32 whatever the input dtype; the output keeps the input dtype.

Pipeline (forward, three launches): ``group_norm_silu_fwd_partial_kernel`` reduces each row, split
into segments over several programs when rows are few and long, to shifted sums (one read of
``x``); ``group_norm_silu_fwd_combine_kernel`` merges the partials of each group into its mean and
rstd with exact parallel variance combination (one program per statistic, no host-side glue); and
``group_norm_silu_fwd_kernel`` normalises, applies the affine and SiLU (one read, one write). The
block size, split count and warps are tuned per shape on CUDA (a few candidates, timed once,
cached). Backward: ``group_norm_silu_bwd_reduce_kernel`` reduces ``dz`` and ``dz * xhat`` per row
(these give ``dweight`` / ``dbias`` and the two group means of the input gradient) and
``group_norm_silu_bwd_kernel`` writes ``dx``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._utils import as_contiguous, autotune, cdiv, check_out_call, multiprocessor_count, next_pow2
from .reference import check_apply_args, check_group_norm_args, check_stats_args


@triton.jit
def group_norm_silu_fwd_partial_kernel(X, S1, S2, SHIFT, HW, SEG, SPLITS, BLOCK: tl.constexpr):
    """Segment ``split`` (``SEG`` elements) of row ``r``: ``sum(x - k)``, ``sum((x - k)^2)``, ``k = x[r, 0]``.

    Every segment of a row shares the shift ``k``, so a row's sums are the plain sums of its
    segments' partials; splitting a long row over several programs keeps the GPU busy when there are
    few rows (large frames, few channels or a single frame).
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    base = X + row * HW
    k = tl.load(base).to(tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    seg_start = split * SEG
    for start in range(0, SEG, BLOCK):
        offs = seg_start + start + tl.arange(0, BLOCK)
        mask = offs < HW
        v = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, v - k, 0.0)
        acc1 += d
        acc2 += d * d
    out = row * SPLITS + split
    tl.store(S1 + out, tl.sum(acc1, axis=0))
    tl.store(S2 + out, tl.sum(acc2, axis=0))
    if split == 0:
        tl.store(SHIFT + row, k)


@triton.jit
def group_norm_silu_fwd_combine_kernel(
    S1, S2, SHIFT, MEAN, RSTD, HW, T, C, CG, G, SPLITS, eps,
    PER_FRAME: tl.constexpr, FRAME_MAJOR: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One statistic (``(n, g, t)`` per frame, ``(n, g)`` per clip): mean and ``rstd`` of its rows.

    Row ``j`` of a group is ``first + (j % inner) * inner_stride + (j // inner) * outer_stride``:
    channel-major (row ``(n * C + c) * T + t``) per frame ``CG`` rows of stride ``T``, per clip
    ``CG * T`` consecutive rows; frame-major (row ``(n * T + t) * C + c``) per frame ``CG``
    consecutive rows, per clip ``T`` runs of ``CG`` rows, ``C`` apart. Row moments are combined
    exactly (Chan et al.): ``M2 = sum(M2_r) + HW * sum((mean_r - mean)^2)``, with the between-row
    term accumulated about the first row's mean for stability.
    """
    stat = tl.program_id(0).to(tl.int64)
    if PER_FRAME:
        t = stat % T
        ng = stat // T
    else:
        t = stat * 0
        ng = stat
    n = ng // G
    c0 = (ng % G) * CG
    outer_stride = C
    if FRAME_MAJOR:
        first = (n * T + t) * C + c0
        inner_stride = 1
        inner = CG
    elif PER_FRAME:
        first = (n * C + c0) * T + t
        inner_stride = T
        inner = CG
    else:
        first = (n * C + c0) * T
        inner_stride = 1
        inner = CG * T
    nrows = CG if PER_FRAME else CG * T
    s1_first = tl.load(S1 + first * SPLITS)
    for sp in range(1, SPLITS):
        s1_first += tl.load(S1 + first * SPLITS + sp)
    ref_mean = tl.load(SHIFT + first) + s1_first / HW
    m2_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    d_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    dd_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for r0 in range(0, nrows, BLOCK_R):
        j = r0 + tl.arange(0, BLOCK_R)
        mask = j < nrows
        j = j.to(tl.int64)
        rows = first + (j % inner) * inner_stride + (j // inner) * outer_stride
        s1 = tl.zeros([BLOCK_R], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_R], dtype=tl.float32)
        for sp in range(0, SPLITS):
            s1 += tl.load(S1 + rows * SPLITS + sp, mask=mask, other=0.0)
            s2 += tl.load(S2 + rows * SPLITS + sp, mask=mask, other=0.0)
        k = tl.load(SHIFT + rows, mask=mask, other=0.0)
        d = tl.where(mask, k + s1 / HW - ref_mean, 0.0)
        m2_acc += tl.where(mask, tl.maximum(s2 - s1 * s1 / HW, 0.0), 0.0)
        d_acc += d
        dd_acc += d * d
    sum_d = tl.sum(d_acc, axis=0)
    m2 = tl.sum(m2_acc, axis=0) + HW * (tl.sum(dd_acc, axis=0) - sum_d * sum_d / nrows)
    tl.store(MEAN + stat, ref_mean + sum_d / nrows)
    tl.store(RSTD + stat, 1.0 / tl.sqrt(tl.maximum(m2, 0.0) / nrows / HW + eps))


@triton.jit
def group_norm_silu_fwd_kernel(
    X, Y, W, B, MEAN, RSTD, HW, T, C, CG, G, X_SN, X_SC, X_ST, Y_SN, Y_SC, Y_ST,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, PER_FRAME: tl.constexpr,
    FRAME_MAJOR: tl.constexpr, BLOCK: tl.constexpr,
):
    """``y = silu((x - mean) * rstd * w[c] + b[c])`` over one block of one row ``(n, c, t)``: ``x``
    is read at ``n * X_SN + c * X_SC + t * X_ST``, ``y`` written at ``n * Y_SN + c * Y_SC + t * Y_ST``
    (any layouts whose frames are contiguous, e.g. time slices). Rows are numbered frame-major
    (``FRAME_MAJOR``) or channel-major, the order of ``x`` in memory."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HW
    if FRAME_MAJOR:
        c = row % C
        t = (row // C) % T
    else:
        c = (row // T) % C
        t = row % T
    n = row // (T * C)
    ng = n * G + c // CG
    stat = ng * T + t if PER_FRAME else ng
    mean = tl.load(MEAN + stat)
    rstd = tl.load(RSTD + stat)
    x = tl.load(X + n * X_SN + c * X_SC + t * X_ST + offs, mask=mask, other=0.0).to(tl.float32)
    z = (x - mean) * rstd
    if HAS_W:
        z = z * tl.load(W + c).to(tl.float32)
    if HAS_B:
        z = z + tl.load(B + c).to(tl.float32)
    if SILU:
        z = z * tl.sigmoid(z)
    tl.store(Y + n * Y_SN + c * Y_SC + t * Y_ST + offs, z.to(Y.dtype.element_ty), mask=mask)


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


@dataclass(frozen=True)
class FwdConfig:
    """Launch configuration of the forward: ``block`` elements per step, ``splits`` programs per row
    in the reduction, ``num_warps`` per program."""

    block: int
    splits: int
    num_warps: int


def fwd_candidates(rows: int, hw: int, device: torch.device) -> list[FwdConfig]:
    """Forward configurations worth timing for ``rows`` rows of ``hw`` elements; the first is the
    heuristic: enough reduction programs for about four per multiprocessor, segments of whole blocks."""
    programs = 4 * multiprocessor_count(device) if device.type == "cuda" else 1
    out = []
    for block in (1024, 2048, 512, 4096):
        block = min(block, max(next_pow2(hw), 128))
        for want in (cdiv(programs, rows), 1, 4 * cdiv(programs, rows)):
            splits = max(1, min(want, cdiv(hw, block)))
            splits = cdiv(hw, cdiv(cdiv(hw, splits), block) * block)
            for warps in (4, 8):
                cfg = FwdConfig(block, splits, 8 if block >= 4096 else warps)
                if cfg not in out:
                    out.append(cfg)
    return out


def group_norm_silu_fwd(
    x, weight, bias, num_groups, eps, per_frame, silu, config: FwdConfig | None = None, out=None
):
    """Forward host wrapper: ``x`` ``(N, C, T, H, W)``, contiguous or frame-major (a contiguous
    ``(N, T, C, H, W)`` transposed, as per-frame 2D convs produce it); ``y`` has the layout of ``x``,
    or is ``out`` (written in place: any ``x``-shaped view whose frames are contiguous, e.g. the
    frames of a causal conv's time-padded input). Returns ``(y, mean, rstd)``.

    ``mean`` / ``rstd`` are fp32 ``(N, G, T)`` (per frame) or ``(N, G, 1)`` (per clip). Three
    launches: split row partials, one combine program per statistic, the normalising pass.
    ``config`` fixes the launch configuration; by default it is tuned per shape on CUDA (cached).
    """
    n, c, t, h, w = x.shape
    hw = h * w
    rows = n * c * t
    if config is None:
        key = (x.device, "group_norm_silu_fwd", rows, hw, num_groups, t if per_frame else 0, x.dtype,
               is_frame_major(x))
        config = autotune(
            key, fwd_candidates(rows, hw, x.device),
            lambda cfg: _group_norm_silu_fwd(x, weight, bias, num_groups, eps, per_frame, silu, cfg, out),
        )
    return _group_norm_silu_fwd(x, weight, bias, num_groups, eps, per_frame, silu, config, out)


def is_frame_major(x: torch.Tensor) -> bool:
    """``(N, C, T, H, W)`` stored as a contiguous ``(N, T, C, H, W)`` (and not also contiguous)."""
    return not x.is_contiguous() and x.transpose(1, 2).is_contiguous()


def _group_norm_silu_fwd(x, weight, bias, num_groups, eps, per_frame, silu, cfg: FwdConfig, out=None):
    if not is_frame_major(x) and not x.is_contiguous():
        raise ValueError("group_norm_silu_fwd needs a contiguous or frame-major input")
    mean, rstd = _stats(x, num_groups, eps, per_frame, cfg)
    if out is None:
        y = torch.empty_like(x)
    else:
        check_out_call("group_norm_silu", x, out)
        y = out
    _apply(x, weight, bias, mean, rstd, silu, y, cfg.block, cfg.num_warps)
    return y, mean, rstd


def _stats(x, num_groups, eps, per_frame, cfg: FwdConfig):
    """fp32 ``(mean, rstd)`` ``(N, G, T or 1)`` of a contiguous or frame-major ``x``: split row
    partials, then one combine program per statistic."""
    n, c, t, h, w = x.shape
    hw = h * w
    rows = n * c * t
    seg = cdiv(cdiv(hw, cfg.splits), cfg.block) * cfg.block
    splits = cdiv(hw, seg)
    s1 = torch.empty(rows * splits, device=x.device, dtype=torch.float32)
    s2 = torch.empty_like(s1)
    shift = torch.empty(rows, device=x.device, dtype=torch.float32)
    group_norm_silu_fwd_partial_kernel[(rows, splits)](
        x, s1, s2, shift, hw, seg, splits, BLOCK=cfg.block, num_warps=cfg.num_warps
    )
    stats_t = t if per_frame else 1
    mean = torch.empty((n, num_groups, stats_t), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    cg = c // num_groups
    group_norm_silu_fwd_combine_kernel[(mean.numel(),)](
        s1, s2, shift, mean, rstd, hw, t, c, cg, num_groups, splits, eps,
        PER_FRAME=per_frame, FRAME_MAJOR=is_frame_major(x),
        BLOCK_R=min(next_pow2(cg if per_frame else cg * t), 128),
    )
    return mean, rstd


def _apply(x, weight, bias, mean, rstd, silu, y, block, num_warps) -> None:
    """The normalising pass into ``y``: ``x`` and ``y`` any ``(N, C, T, H, W)`` views with
    contiguous frames; ``mean`` / ``rstd`` ``(N, G, T)`` or ``(N, G, 1)``."""
    n, c, t, h, w = x.shape
    hw = h * w
    if x.stride(-1) != 1 or x.stride(-2) != w:
        raise ValueError(f"group_norm_silu needs contiguous frames, got strides {x.stride()}")
    num_groups = mean.shape[1]
    group_norm_silu_fwd_kernel[(n * c * t, triton.cdiv(hw, block))](
        x, y, weight if weight is not None else x, bias if bias is not None else x,
        mean, rstd, hw, t, c, c // num_groups, num_groups, x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, PER_FRAME=mean.shape[2] == t,
        FRAME_MAJOR=x.stride(2) > x.stride(1), BLOCK=block, num_warps=num_warps,
    )


def group_norm_stats(
    x: torch.Tensor, num_groups: int, eps: float = 1e-6, per_frame: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton form of :func:`..reference.group_norm_stats_ref` (the reduction launches of the
    forward, one read of ``x``); an ``x`` neither contiguous nor frame-major is copied first."""
    check_stats_args(x, num_groups)
    x = x if is_frame_major(x) else x.contiguous()
    rows, hw = x.shape[0] * x.shape[1] * x.shape[2], x.shape[3] * x.shape[4]
    return _stats(x, num_groups, eps, per_frame, fwd_candidates(rows, hw, x.device)[0])


def group_norm_apply(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    silu: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton form of :func:`..reference.group_norm_apply_ref` (the normalising launch of the
    forward, reading ``x`` in place: time slices and frame-major views are not copied)."""
    check_apply_args(x, weight, bias, mean, rstd, out)
    if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
        x = x.contiguous()
    if out is not None:
        y = out
    elif x.stride(2) > x.stride(1):  # frame-major in, frame-major out
        y = torch.empty_like(x.transpose(1, 2), memory_format=torch.contiguous_format).transpose(1, 2)
    else:
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
    block, num_warps = _launch_cfg(x.shape[3] * x.shape[4])
    _apply(x, as_contiguous(weight), as_contiguous(bias), mean.contiguous(), rstd.contiguous(), silu, y,
           block, num_warps)
    return y


def group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, num_groups, per_frame, silu):
    """Backward host wrapper (``mean`` / ``rstd`` as returned by the forward); returns
    ``(dx, dweight_fp32 or None, dbias_fp32 or None)``."""
    n, c, t, h, w = x.shape
    hw = h * w
    rows = n * c * t
    cg = c // num_groups
    mean_rows = _expand_rows(mean, n, num_groups, cg, t)
    rstd_rows = _expand_rows(rstd, n, num_groups, cg, t)
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
    """Autograd wrapper around the forward / backward host functions (5-D input; frame-major input
    is normalised in place of layout, anything else is made contiguous)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, per_frame, silu):
        x = x if is_frame_major(x) else x.contiguous()
        weight, bias = as_contiguous(weight), as_contiguous(bias)
        y, mean, rstd = group_norm_silu_fwd(x, weight, bias, num_groups, eps, per_frame, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.cfg = (num_groups, per_frame, silu)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        num_groups, per_frame, silu = ctx.cfg
        dx, dweight, dbias = group_norm_silu_bwd(
            dy.contiguous(), x.contiguous(), weight, bias, mean, rstd, num_groups, per_frame, silu
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton GroupNorm + SiLU; same contract as :func:`..reference.group_norm_silu_ref`."""
    check_group_norm_args(x, weight, bias, num_groups)
    if out is not None:  # checked by the host wrapper
        x = x if is_frame_major(x) else x.contiguous()
        group_norm_silu_fwd(x, as_contiguous(weight), as_contiguous(bias), num_groups, eps, per_frame, silu, out=out)
        return out
    if x.dim() == 4:
        return GroupNormSiLUFunction.apply(x.unsqueeze(2), weight, bias, num_groups, eps, True, silu).squeeze(2)
    return GroupNormSiLUFunction.apply(x, weight, bias, num_groups, eps, per_frame, silu)
