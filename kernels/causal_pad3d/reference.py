"""Pure-PyTorch causal 3D padding (the definition of correct).

Builds the padded input of a causal 3D convolution in one tensor::

    head = cache                                   if cache is given   (N, C, pad_t, H, W)
         = x[:, :, :1] repeated pad_t times        time_mode="replicate" (CV-VAE / OD-VAE first chunk)
         = zeros                                   time_mode="zeros"     (Wan-2.1 first chunk)
    out  = F.pad(torch.cat([head, x], dim=2), (pad_w, pad_w, pad_h, pad_h))   # spatial zeros

Layouts: ``x`` is ``(N, C, T, H, W)``, any dtype; ``cache`` has ``x``'s N, C, H, W and ``pad_t``
frames (it is cast to ``x``'s dtype). Output: ``(N, C, pad_t + T, H + 2 pad_h, W + 2 pad_w)``, contiguous in
``x``'s memory format (``channels_last_3d`` stays channels-last: CPU convolutions are faster in it)
in ``x``'s dtype. Differentiable in ``x`` and ``cache`` (the backward is a slice-add: the replicated
head frames' gradients are summed into frame 0).
"""

from __future__ import annotations

import torch

TIME_MODES = ("replicate", "zeros")


def check_causal_pad_args(x, pad_t, pad_h, pad_w, cache, time_mode) -> None:
    """Raise ``ValueError`` for inconsistent arguments."""
    if x.dim() != 5:
        raise ValueError(f"causal_pad3d expects (N, C, T, H, W), got {tuple(x.shape)}")
    if min(pad_t, pad_h, pad_w) < 0:
        raise ValueError(f"paddings must be >= 0, got pad_t={pad_t}, pad_h={pad_h}, pad_w={pad_w}")
    if time_mode not in TIME_MODES:
        raise ValueError(f"time_mode must be one of {TIME_MODES}, got {time_mode!r}")
    if x.shape[2] == 0 and cache is None and pad_t > 0 and time_mode == "replicate":
        raise ValueError("cannot replicate the first frame of an empty clip")
    if cache is not None:
        n, c, _, h, w = x.shape
        if tuple(cache.shape) != (n, c, pad_t, h, w):
            raise ValueError(f"cache must have shape {(n, c, pad_t, h, w)}, got {tuple(cache.shape)}")


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``channels_last_3d`` for a 5-D tensor laid out channels-last (and not also plainly contiguous),
    else ``contiguous_format``."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def causal_pad3d_ref(
    x: torch.Tensor,
    pad_t: int,
    pad_h: int = 0,
    pad_w: int = 0,
    cache: torch.Tensor | None = None,
    time_mode: str = "replicate",
) -> torch.Tensor:
    """Cached / replicated / zero causal time padding plus symmetric spatial zero padding."""
    check_causal_pad_args(x, pad_t, pad_h, pad_w, cache, time_mode)
    head = None
    if pad_t > 0:
        if cache is not None:
            head = cache.to(x.dtype)
        elif time_mode == "replicate":
            head = x[:, :, :1].expand(-1, -1, pad_t, -1, -1)
    fmt = memory_format_of(x)
    if pad_t == 0 and pad_h == 0 and pad_w == 0:
        return x.contiguous(memory_format=fmt)
    if pad_h == 0 and pad_w == 0 and fmt == torch.contiguous_format:
        if head is None:
            head = x.new_zeros(x.shape[:2] + (pad_t,) + x.shape[3:])
        return torch.cat([head, x], dim=2)
    # one zero-filled buffer and two interior copies instead of cat + F.pad (two full copies)
    n, c, t, h, w = x.shape
    out = torch.empty((n, c, pad_t + t, h + 2 * pad_h, w + 2 * pad_w), dtype=x.dtype, device=x.device,
                      memory_format=fmt).zero_()
    out[:, :, pad_t:, pad_h:pad_h + h, pad_w:pad_w + w] = x
    if head is not None:
        out[:, :, :pad_t, pad_h:pad_h + h, pad_w:pad_w + w] = head
    return out
