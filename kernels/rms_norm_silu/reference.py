"""Pure-PyTorch channel RMSNorm + optional SiLU (the definition of correct).

Layout: ``x`` is ``(N, C, *spatial)`` (``(N, C, T, H, W)`` mainly, also ``(N, C, H, W)``), any float
dtype; ``weight`` is ``(C,)``, ``bias`` ``(C,)`` or ``None``. For every position the channel vector is
normalised as in the Wan-2.1 VAE ``RMS_norm``::

    y = x / max(||x||_2 over C, eps) * sqrt(C) * weight[c] (+ bias[c]),  then optional SiLU

The reduction runs in fp32; the output has the dtype and shape of ``x``. With ``out`` (inference
only, 5-D) the result is written into that ``x``-shaped view, whose frames must be contiguous (e.g.
the frames of a causal conv's time-padded input buffer), and ``out`` is returned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import check_out_call


def check_rms_norm_args(x: torch.Tensor, weight, bias) -> None:
    """Raise ``ValueError`` for shapes ``rms_norm_silu`` does not accept."""
    if x.dim() < 2:
        raise ValueError(f"rms_norm_silu expects (N, C, *spatial), got {tuple(x.shape)}")
    c = x.shape[1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.numel() != c:
            raise ValueError(f"{name} must have {c} elements, got shape {tuple(p.shape)}")


def _per_channel(p: torch.Tensor, ndim: int) -> torch.Tensor:
    return p.reshape((1, -1) + (1,) * (ndim - 2))


def rms_norm_silu_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-12,
    silu: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``silu(F.normalize(x, dim=1, eps=eps) * sqrt(C) * weight + bias)`` with an fp32 reduction."""
    check_rms_norm_args(x, weight, bias)
    if out is not None:
        check_out_call("rms_norm_silu", x, out)
        for i in range(x.shape[2]):
            out[:, :, i].copy_(rms_norm_silu_ref(x[:, :, i], weight, bias, eps, silu))
        return out
    c = x.shape[1]
    xf = x.float()
    # same value and gradient as F.normalize (norm clamped from below), in fewer passes over x
    inv = torch.linalg.vector_norm(xf, dim=1, keepdim=True).clamp_min(eps).reciprocal() * (c**0.5)
    y = xf * inv
    if weight is not None:
        w = _per_channel(weight.float(), x.dim())
        y = torch.addcmul(_per_channel(bias.float(), x.dim()), y, w) if bias is not None else y * w
    elif bias is not None:
        y = y + _per_channel(bias.float(), x.dim())
    if silu:
        y = F.silu(y, inplace=not y.requires_grad)
    return y.to(x.dtype)
