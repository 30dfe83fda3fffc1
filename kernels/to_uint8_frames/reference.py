"""Pure-PyTorch float-to-uint8 frame conversion (the definition of correct).

Input ``x``: ``(N, C, T, H, W)``, any float dtype, values nominally in ``[-1, 1]`` (clamped).
Output: contiguous ``uint8`` ``(N, T, H, W, C)`` (channels-last frames, ready for a video writer)::

    ((x.float().clamp(-1, 1) + 1) * 127.5).round()   # round half to even, as torch.round
"""

from __future__ import annotations

import torch


def check_frames_arg(x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating ``(N, C, T, H, W)`` tensor."""
    if x.dim() != 5 or not x.is_floating_point():
        raise ValueError(f"expected a float (N, C, T, H, W) tensor, got {x.dtype} {tuple(x.shape)}")


def to_uint8_frames_ref(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` float ``(N, C, T, H, W)`` -> ``uint8`` ``(N, T, H, W, C)``."""
    check_frames_arg(x)
    y = x.float().clamp(-1.0, 1.0).add_(1.0).mul_(127.5).round_().to(torch.uint8)
    return y.permute(0, 2, 3, 4, 1).contiguous()
