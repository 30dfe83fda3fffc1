"""Small helpers shared by the Triton host wrappers (no Triton import here)."""

from __future__ import annotations

import torch


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``max(n, 1)``."""
    return 1 << max(int(n) - 1, 0).bit_length()


def as_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x.contiguous()`` that passes ``None`` through."""
    return None if x is None else x.contiguous()


def prod(shape) -> int:
    """Product of a shape (1 for an empty shape)."""
    out = 1
    for s in shape:
        out *= int(s)
    return out
