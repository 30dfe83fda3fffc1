"""Pure-PyTorch GroupNorm + optional SiLU for video tensors (the definition of correct).

Layout: ``x`` is ``(N, C, T, H, W)`` (a 4-D ``(N, C, H, W)`` tensor is treated as ``T = 1``), any
float dtype; ``weight`` / ``bias`` are ``(C,)`` or ``None``. Statistics are biased (as
``F.group_norm``):

* ``per_frame=True``: per ``(n, group, t)`` over ``(C / G, H, W)`` -- exactly streamable in time.
* ``per_frame=False``: per ``(n, group)`` over ``(C / G, T, H, W)`` (``F.group_norm`` on the 5-D
  tensor, the CV-VAE / OD-VAE behaviour).

A frame-major ``x`` (a contiguous ``(N, T, C, H, W)`` transposed to NCTHW, as per-frame 2D convs
produce it) is normalised in that layout and the output keeps it; other inputs give contiguous output.

Output has the dtype and shape of ``x``; values unbounded (``>= -0.2785`` after SiLU). With ``out``
(inference only) the result is written into that ``x``-shaped view, whose frames must be contiguous
(e.g. the frames of a causal conv's time-padded input buffer), and ``out`` is returned.

Two-step form (inference): :func:`group_norm_stats_ref` gives the fp32 ``(mean, rstd)`` of a tensor,
each ``(N, G, T)`` per frame or ``(N, G, 1)`` per clip, and :func:`group_norm_apply_ref` normalises
any tensor with given statistics, e.g. the time slices of a clip with the whole clip's statistics,
so that a clip can be normalised a few frames at a time without ever existing normalised in full.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import check_out_call


def check_group_norm_args(x: torch.Tensor, weight, bias, num_groups: int) -> None:
    """Raise ``ValueError`` for shapes ``group_norm_silu`` does not accept."""
    if x.dim() not in (4, 5):
        raise ValueError(f"group_norm_silu expects (N, C, T, H, W) or (N, C, H, W), got {tuple(x.shape)}")
    c = x.shape[1]
    if num_groups <= 0 or c % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide the channel count C={c}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (c,):
            raise ValueError(f"{name} must have shape ({c},), got {tuple(p.shape)}")


def group_norm_silu_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-6,
    per_frame: bool = True,
    silu: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """GroupNorm with per-frame or whole-clip statistics, then optional SiLU (see module doc)."""
    check_group_norm_args(x, weight, bias, num_groups)
    if out is not None:
        return _into(x, weight, bias, num_groups, eps, per_frame, silu, out)
    if x.dim() == 5 and not x.is_contiguous() and x.transpose(1, 2).is_contiguous():
        return _frame_major(x, weight, bias, num_groups, eps, per_frame, silu)
    if x.dim() == 4 or not per_frame or x.shape[2] == 1:
        if weight is not None and weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        y = F.group_norm(x, num_groups, weight, bias, eps)
        return F.silu(y) if silu else y
    return _per_frame(x, weight, bias, num_groups, eps, silu)


def _per_frame(x, weight, bias, num_groups, eps, silu):
    """Per-frame statistics without folding copies: one fp32 ``var_mean`` read of ``x``, then a single
    ``addcmul`` with per-(n, c, t) scale and shift (and SiLU in place when no gradient is needed).

    Equal (to rounding) to ``F.group_norm(x.transpose(1, 2).reshape(N*T, C, H, W), ...)`` folded back.
    """
    scale, shift = _scale_shift(x, weight, bias, num_groups, eps, per_frame=True)
    y = torch.addcmul(shift, x, scale)
    if silu:
        y = F.silu(y, inplace=not y.requires_grad)
    return y.to(x.dtype)


def _scale_shift(x, weight, bias, num_groups, eps, per_frame):
    """fp32 ``(scale, shift)`` of shape ``(N, C, T or 1, 1, 1)`` with ``norm(x) = x * scale + shift``
    for a contiguous ``x``: statistics per frame, or per clip over all T."""
    n, c, t, h, w = x.shape
    g, cg = num_groups, c // num_groups
    dims = (2, 4) if per_frame else (2, 3, 4)
    var, mean = torch.var_mean(x.reshape(n, g, cg, t, h * w).float(), dim=dims, keepdim=True, correction=0)
    stats_t = t if per_frame else 1
    rstd = torch.rsqrt(var + eps).expand(n, g, cg, stats_t, 1).reshape(n, c, stats_t, 1, 1)
    mean = mean.expand(n, g, cg, stats_t, 1).reshape(n, c, stats_t, 1, 1)
    scale = rstd if weight is None else rstd * weight.float().view(1, c, 1, 1, 1)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float().view(1, c, 1, 1, 1)
    return scale, shift


def _frame_major(x, weight, bias, num_groups, eps, per_frame, silu):
    """Frame-major input (a contiguous ``(N, T, C, H, W)`` seen as NCTHW, what per-frame 2D convs
    produce): normalised in that layout, so that neither this op nor the next per-frame conv copies
    the tensor. Same statistics as above (per frame, or per clip over all T)."""
    n, c, t, h, w = x.shape
    g, cg = num_groups, c // num_groups
    frames = x.transpose(1, 2)  # (n, t, c, h, w), contiguous
    dims = (3, 4) if per_frame else (1, 3, 4)
    var, mean = torch.var_mean(frames.reshape(n, t, g, cg, h * w).float(), dim=dims, keepdim=True, correction=0)
    stats_t = t if per_frame else 1
    rstd = torch.rsqrt(var + eps).expand(n, stats_t, g, cg, 1).reshape(n, stats_t, c, 1, 1)
    mean = mean.expand(n, stats_t, g, cg, 1).reshape(n, stats_t, c, 1, 1)
    scale = rstd if weight is None else rstd * weight.float().view(1, 1, c, 1, 1)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float().view(1, 1, c, 1, 1)
    y = torch.addcmul(shift, frames, scale)
    if silu:
        y = F.silu(y, inplace=not y.requires_grad)
    return y.to(x.dtype).transpose(1, 2)


def _into(x, weight, bias, num_groups, eps, per_frame, silu, out):
    """``out``-writing form: fp32 statistics of ``x`` (per frame, or per clip over all T), then one
    ``addcmul`` straight into an fp32 ``out`` (other dtypes: frame by frame through an fp32 frame)."""
    check_out_call("group_norm_silu", x, out)
    x = x.contiguous()
    scale, shift = _scale_shift(x, weight, bias, num_groups, eps, per_frame)
    return _affine_into(x, scale, shift, silu, out)


def _affine_into(x, scale, shift, silu, out):
    """``silu(x * scale + shift)`` into ``out``; ``scale`` / ``shift`` fp32 ``(N, C, T or 1, 1, 1)``."""
    stats_t = scale.shape[2]
    if out.dtype == torch.float32:
        torch.addcmul(shift, x, scale, out=out)
        return F.silu(out, inplace=True) if silu else out
    for i in range(x.shape[2]):
        s = min(i, stats_t - 1)
        y = torch.addcmul(shift[:, :, s], x[:, :, i], scale[:, :, s])
        out[:, :, i].copy_(F.silu(y, inplace=True) if silu else y)
    return out


# Frames per slice of the two-step form's reductions: fp32 copies of a few frames, not of the clip.
STATS_FRAMES = 4


def group_norm_stats_ref(
    x: torch.Tensor, num_groups: int, eps: float = 1e-6, per_frame: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(mean, rstd)`` of ``x`` ``(N, C, T, H, W)`` (any layout), each ``(N, G, T)`` per frame
    or ``(N, G, 1)`` per clip, the statistics :func:`group_norm_silu_ref` normalises with. Reduced
    over slices of :data:`STATS_FRAMES` frames (fp32 per frame, combined in fp64), so no fp32 copy
    of all of ``x`` is made (inference only)."""
    check_stats_args(x, num_groups)
    c, t = x.shape[1:3]
    means, squares = [], []
    for t0 in range(0, t, STATS_FRAMES):
        part = x[:, :, t0 : t0 + STATS_FRAMES].unflatten(1, (num_groups, c // num_groups)).float()
        var, mean = torch.var_mean(part, dim=(2, 4, 5), correction=0)  # (N, G, frames)
        means.append(mean.double())
        squares.append(var.double() + mean.double().square())
    mean, mean_square = torch.cat(means, dim=2), torch.cat(squares, dim=2)  # (N, G, T)
    if not per_frame:  # every frame has the same number of elements
        mean, mean_square = mean.mean(dim=2, keepdim=True), mean_square.mean(dim=2, keepdim=True)
    var = (mean_square - mean.square()).clamp_min(0)
    return mean.float(), torch.rsqrt(var + eps).float()


def group_norm_apply_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    silu: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``silu((x - mean) * rstd * weight + bias)`` for ``x`` ``(N, C, T, H, W)`` (any layout) with
    given fp32 statistics ``mean`` / ``rstd`` ``(N, G, T)`` (per frame) or ``(N, G, 1)`` (per clip;
    e.g. those of a whole clip that ``x`` is a time slice of). Output in ``x``'s dtype, or written
    into ``out`` (an ``x``-shaped view with contiguous frames). Inference only."""
    check_apply_args(x, weight, bias, mean, rstd, out)
    n, c, t = x.shape[:3]
    g, stats_t = mean.shape[1], mean.shape[2]
    rstd_c = rstd.float().repeat_interleave(c // g, dim=1)  # (N, C, T or 1)
    scale = rstd_c if weight is None else rstd_c * weight.float().view(1, c, 1)
    shift = -mean.float().repeat_interleave(c // g, dim=1) * scale
    if bias is not None:
        shift = shift + bias.float().view(1, c, 1)
    scale, shift = scale.view(n, c, stats_t, 1, 1), shift.view(n, c, stats_t, 1, 1)
    if out is not None:
        return _affine_into(x, scale, shift, silu, out)
    # fp32 result in x's layout when x is dense (frame-major stays frame-major), else contiguous
    y = torch.addcmul(shift, x, scale, out=torch.empty_like(x, dtype=torch.float32))
    return (F.silu(y, inplace=True) if silu else y).to(x.dtype)


def check_stats_args(x: torch.Tensor, num_groups: int) -> None:
    """Raise ``ValueError`` for inputs :func:`group_norm_stats_ref` does not accept."""
    if x.dim() != 5:
        raise ValueError(f"group_norm_stats expects (N, C, T, H, W), got {tuple(x.shape)}")
    check_group_norm_args(x, None, None, num_groups)
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("group_norm_stats is inference only: it does not record gradients")


def check_apply_args(x, weight, bias, mean, rstd, out) -> None:
    """Raise ``ValueError`` for inputs :func:`group_norm_apply_ref` does not accept."""
    if x.dim() != 5:
        raise ValueError(f"group_norm_apply expects (N, C, T, H, W), got {tuple(x.shape)}")
    n, c, t = x.shape[:3]
    if mean.dim() != 3 or mean.shape != rstd.shape or mean.shape[0] != n or mean.shape[2] not in (1, t):
        raise ValueError(f"mean and rstd must both be (N={n}, G, T={t} or 1), got {tuple(mean.shape)} and "
                         f"{tuple(rstd.shape)}")
    check_group_norm_args(x, weight, bias, mean.shape[1])
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (x, weight, bias)):
        raise ValueError("group_norm_apply is inference only: it does not record gradients")
    if out is not None:
        check_out_call("group_norm_apply", x, out)
