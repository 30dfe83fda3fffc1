"""Quantisers that turn continuous latents into discrete tokens, behind one interface.

Every quantiser is an ``nn.Module`` whose ``forward(z)`` takes a channel-first tensor
``(N, dim, *spatial)`` (any number of trailing dims, including none) and returns a
:class:`QuantizerOutput`: ``values`` (straight-through quantised values, same shape and dtype as
``z``, on a grid inside [-1, 1]) and ``indices`` (int64, ``(N, groups, *spatial)``, one token per
group and position, in ``[0, codebook_size)``). ``codes_to_indices`` and ``indices_to_codes``
convert between the two exactly.

:class:`FSQ` is finite scalar quantisation (Mentzer et al. 2023, "Finite Scalar Quantization:
VQ-VAE Made Simple"): each channel is squashed into a bounded range, rounded to one of ``L``
integer levels, and normalised by ``L // 2``. Grid values per channel, in units of ``1 / (L // 2)``:
``-(L-1)/2 .. (L-1)/2`` for odd ``L``; ``-L/2 .. L/2 - 1`` for even ``L`` (so even grids reach -1 but
not +1). The implicit codebook is the product of the per-channel grids: ``prod(levels)`` codes.
Indices are mixed-radix numbers over the non-negative digits ``grid + L // 2`` with basis
``cumprod([1] + levels[:-1])`` (first channel least significant), the convention of
``vector_quantize_pytorch.FSQ``, so token ids interoperate with it.

Bounds (``u`` is the value before rounding, in level units):

- ``"tanh"`` (Mentzer et al.): ``half_l = (L-1)(1+1e-3)/2``, ``offset = 0.5`` for even ``L`` else 0,
  ``shift = atanh(offset / half_l)``, ``u = tanh(z + shift) * half_l - offset``. The shift centres
  even grids so that ``z = 0`` maps to level 0. ``L = 2`` is refused: its shift is ``atanh(0.999)``
  ~ 3.8, so the lower code needs ``z < -3.8`` and the gradient almost vanishes (the reference
  implementation refuses it too).
- ``"isigmoid"`` (iFSQ, Lin et al. 2026, "iFSQ: Improving FSQ for Image Generation with 1 Line of
  Code"): ``act = 2 * sigmoid(1.6 z) - 1`` (which equals ``tanh(0.8 z)``), chosen so that a unit
  Gaussian ``z`` gives a near-uniform ``act`` and so near-equal use of the levels;
  ``u = act * (L-1)/2 - offset``, no epsilon and no shift. For odd ``L`` this is exactly the iFSQ
  code (``simple_bound``), which supports only odd levels. For even ``L`` (our extension) the
  ``-0.5`` offset keeps every grid value reachable (``u`` spans ``(-L/2, L/2 - 1)``) and puts the
  boundary between levels -1 and 0 at ``z = 0``, so the partition of ``act`` stays symmetric; the two
  outermost bins are half as wide, as they are for odd ``L``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

BOUNDS = ("tanh", "isigmoid")
_TANH_EPS = 1e-3
_ISIGMOID_SLOPE = 1.6
# Largest distance (in level units) a stored code may be from the grid: bf16 storage of k / (L // 2)
# is off by at most ~(L // 2) * 2**-9, far below this; real (unquantised) latents are far above it.
_GRID_TOLERANCE = 0.25


@dataclass
class QuantizerOutput:
    """``values``: quantised values, the input's shape and dtype, in [-1, 1], straight-through
    gradients. ``indices``: int64 ``(N, groups, *spatial)`` token ids in ``[0, codebook_size)``."""

    values: Tensor
    indices: Tensor


def _round_ste(x: Tensor) -> Tensor:
    """Round to the nearest integer; the gradient passes through unchanged."""
    return x + (x.round() - x).detach()


def _check_levels(levels: Sequence[int], bound: str) -> tuple[int, ...]:
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    levels = tuple(levels)
    if not levels:
        raise ValueError("levels must name at least one level count")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, int):
            raise ValueError(f"levels must be integers, got {levels!r}")
        if level < 2:
            raise ValueError(f"every level count must be at least 2, got {levels!r}")
    if bound == "tanh" and 2 in levels:
        raise ValueError(
            f"levels {levels!r}: a level count of 2 with bound='tanh' leaves one code nearly unreachable "
            "(shift atanh(0.999)); use bound='isigmoid' or at least 3 levels"
        )
    return levels


class FSQ(nn.Module):
    """Finite scalar quantiser; see the module docstring for the grid, the bounds and the indices.

    ``dim = groups * len(levels)`` input channels are split into ``groups`` consecutive groups of
    ``len(levels)`` channels; each group is quantised with the same levels into one token, so every
    position yields ``groups`` tokens, each in ``[0, codebook_size)`` with
    ``codebook_size = prod(levels)``. No parameters; computation is always fp32.
    """

    def __init__(self, levels: Sequence[int], groups: int = 1, bound: str = "tanh") -> None:
        super().__init__()
        self.levels: tuple[int, ...] = _check_levels(levels, bound)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive integer, got {groups!r}")
        self.groups = groups
        self.bound = bound
        self.dim = groups * len(self.levels)
        self.codebook_size = math.prod(self.levels)
        self._basis = tuple(math.prod(self.levels[:i]) for i in range(len(self.levels)))

    def extra_repr(self) -> str:
        return f"levels={self.levels}, groups={self.groups}, bound={self.bound!r}"

    # --- per-channel constants, shaped to broadcast over (N, groups, len(levels), *spatial) -----

    def _const(self, values: Sequence[float | int], ref: Tensor, dtype: torch.dtype) -> Tensor:
        shape = (1, 1, len(self.levels)) + (1,) * (ref.ndim - 3)
        return torch.tensor(values, dtype=dtype, device=ref.device).view(shape)

    def _grouped(self, x: Tensor) -> Tensor:
        """(N, dim, *spatial) -> (N, groups, len(levels), *spatial)."""
        return x.reshape(x.shape[0], self.groups, len(self.levels), *x.shape[2:])

    def _check_channels(self, x: Tensor, what: str) -> None:
        if x.ndim < 2 or x.shape[1] != self.dim:
            raise ValueError(
                f"{what} must be channel-first (N, {self.dim}, *spatial) for levels {self.levels} x "
                f"{self.groups} groups, got shape {tuple(x.shape)}"
            )

    # --- quantisation --------------------------------------------------------------------------

    def _bound(self, z: Tensor) -> Tensor:
        """Grouped fp32 ``z`` -> ``u`` in level units, before rounding (see module docstring)."""
        offset = self._const([0.5 if level % 2 == 0 else 0.0 for level in self.levels], z, torch.float32)
        if self.bound == "tanh":
            half_l = self._const([(level - 1) * (1 + _TANH_EPS) / 2 for level in self.levels], z, torch.float32)
            shift = torch.atanh(offset / half_l)
            return torch.tanh(z + shift) * half_l - offset
        half_l = self._const([(level - 1) / 2 for level in self.levels], z, torch.float32)
        return (2 * torch.sigmoid(_ISIGMOID_SLOPE * z) - 1) * half_l - offset

    def forward(self, z: Tensor) -> QuantizerOutput:
        self._check_channels(z, "z")
        if not z.is_floating_point():
            raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")
        # fp32 whatever autocast or the input says: in bf16 the rounding boundaries move and
        # nearby inputs land on different codes.
        with torch.autocast(device_type=z.device.type, enabled=False):
            digits = _round_ste(self._bound(self._grouped(z.float())))
            indices = self._digits_to_indices(digits.detach())
            half_width = self._const([level // 2 for level in self.levels], digits, torch.float32)
            values = (digits / half_width).reshape(z.shape)
        return QuantizerOutput(values=values.to(z.dtype), indices=indices)

    # --- codes <-> indices ---------------------------------------------------------------------

    def _digits_to_indices(self, digits: Tensor) -> Tensor:
        """Grouped centred integer digits (float) -> int64 (N, groups, *spatial)."""
        centred = digits.round().to(torch.int64)
        non_negative = centred + self._const([level // 2 for level in self.levels], centred, torch.int64)
        return (non_negative * self._const(self._basis, centred, torch.int64)).sum(dim=2)

    def codes_to_indices(self, values: Tensor) -> Tensor:
        """Quantised values ``(N, dim, *spatial)`` (on the grid, any float dtype) -> int64 indices
        ``(N, groups, *spatial)``. Values off the grid raise rather than being rounded onto it."""
        self._check_channels(values, "values")
        if not values.is_floating_point():
            raise TypeError(f"values must be a floating-point tensor, got {values.dtype}")
        grouped = self._grouped(values.float())
        scaled = grouped * self._const([level // 2 for level in self.levels], grouped, torch.float32)
        digits = scaled.round()
        low = self._const([-(level // 2) for level in self.levels], grouped, torch.float32)
        high = self._const([(level - 1) // 2 for level in self.levels], grouped, torch.float32)
        off_grid = ((scaled - digits).abs() > _GRID_TOLERANCE) | (digits < low) | (digits > high)
        if bool(off_grid.any()):
            raise ValueError(
                f"values are not on the FSQ grid of levels {self.levels} ({int(off_grid.sum())} entries off it): "
                "pass the values this quantiser produced"
            )
        return self._digits_to_indices(digits)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Integer indices ``(N, groups, *spatial)`` in ``[0, codebook_size)`` -> float32 values
        ``(N, dim, *spatial)`` on the grid in [-1, 1]."""
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.ndim < 2 or indices.shape[1] != self.groups:
            raise ValueError(
                f"indices must be (N, {self.groups}, *spatial) for {self.groups} groups, "
                f"got shape {tuple(indices.shape)}"
            )
        # int64 first: uint16 and friends support almost no arithmetic in torch
        wide = indices.to(torch.int64)
        _check_index_range(wide, self.codebook_size)
        expanded = wide.unsqueeze(2)
        levels = self._const(self.levels, expanded, torch.int64)
        digits = torch.div(expanded, self._const(self._basis, expanded, torch.int64), rounding_mode="floor") % levels
        centred = (digits - levels // 2).float()
        values = centred / (levels // 2).float()
        return values.reshape(indices.shape[0], self.dim, *indices.shape[2:])


def _check_index_range(indices: Tensor, codebook_size: int) -> None:
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook_size):
        raise ValueError(
            f"indices must lie in [0, {codebook_size}), got values in [{int(indices.min())}, {int(indices.max())}]"
        )


# --- codebook statistics -------------------------------------------------------------------------


def _stats_from_counts(counts: Tensor) -> dict[str, float]:
    """``counts``: int64 histogram over the codebook. Returns usage (fraction of codes seen at
    least once, in [0, 1]), perplexity (exp of the histogram entropy, in [1, codebook_size]) and
    tokens (the number counted)."""
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no tokens counted: codebook statistics need at least one index")
    probs = counts[counts > 0].double() / total
    entropy = float(-(probs * probs.log()).sum())
    return {
        "usage": int((counts > 0).sum()) / counts.numel(),
        "perplexity": math.exp(entropy),
        "tokens": total,
    }


def _histogram(indices: Tensor, codebook_size: int) -> Tensor:
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 1:
        raise ValueError(f"codebook_size must be a positive integer, got {codebook_size!r}")
    flat = indices.reshape(-1).to(torch.int64)
    _check_index_range(flat, codebook_size)
    return torch.bincount(flat, minlength=codebook_size)


def codebook_stats(indices: Tensor, codebook_size: int) -> dict[str, float]:
    """Usage and perplexity of the codes in ``indices`` (any shape; all groups share one codebook
    of ``codebook_size`` codes and are counted together). Keys: ``usage`` in [0, 1], ``perplexity``
    in [1, codebook_size], ``tokens`` (count)."""
    return _stats_from_counts(_histogram(indices, codebook_size))


class CodebookUsage:
    """Streaming code histogram: ``update(indices)`` per batch, ``stats()`` as :func:`codebook_stats`
    over everything seen. The histogram lives on the device of the first batch (no host sync per
    update) and costs ``codebook_size`` int64 counters."""

    def __init__(self, codebook_size: int) -> None:
        if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 1:
            raise ValueError(f"codebook_size must be a positive integer, got {codebook_size!r}")
        self.codebook_size = codebook_size
        self.counts: Tensor | None = None

    def update(self, indices: Tensor) -> None:
        hist = _histogram(indices, self.codebook_size)
        self.counts = hist if self.counts is None else self.counts + hist.to(self.counts.device)

    def reset(self) -> None:
        self.counts = None

    def stats(self) -> dict[str, float]:
        if self.counts is None:
            raise ValueError("no tokens counted: call update() before stats()")
        return _stats_from_counts(self.counts)


# --- storage -------------------------------------------------------------------------------------

_INDEX_DTYPES = ((torch.uint8, 2**8), (torch.uint16, 2**16), (torch.int32, 2**31), (torch.int64, 2**63))


def smallest_index_dtype(codebook_size: int) -> torch.dtype:
    """The narrowest integer dtype holding indices ``0 .. codebook_size - 1`` that safetensors stores:
    uint8, uint16, int32 or int64 (uint16 has almost no arithmetic in torch: widen before use)."""
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 1:
        raise ValueError(f"codebook_size must be a positive integer, got {codebook_size!r}")
    for dtype, limit in _INDEX_DTYPES:
        if codebook_size <= limit:
            return dtype
    raise ValueError(f"codebook_size {codebook_size} does not fit in int64 indices")
