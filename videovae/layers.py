"""Building blocks shared by every videovae model family.

Layout everywhere: NCTHW (batch, channels, time, height, width). Time is causal: output frame t
depends on input frames <= t only (except the explicitly non-causal ``trilinear`` time upsampler,
kept for parity with OD-VAE). The first frame is compressed alone, so a clip has 1 + k * t_down
frames and an image is a 1-frame video.

Causal state is explicit. Every module that looks back in time takes ``cache`` and returns it:

* ``cache is None``: whole-clip mode. The clip starts at frame 0; nothing is remembered.
* ``cache`` is a :class:`CausalCache`: streaming mode. Each causal module reads the frames it kept
  from the previous chunk under its ``cache_key`` (missing key = this is the first chunk) and stores
  the frames the next chunk will need. Chunked results equal whole-clip results exactly when every
  module of the model is itself exact per frame (see ``CausalVAE.exactly_streamable``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from videovae.kernels import causal_pad3d, group_norm_apply, group_norm_silu, group_norm_stats, rms_norm_silu

TimePad = Literal["replicate", "zeros"]
NormKind = Literal["group_frame", "group_clip", "rms"]
NORM_KINDS = ("group_frame", "group_clip", "rms")
TIME_PADS = ("replicate", "zeros")


@dataclass
class NormSync:
    """Exchange of GroupNorm statistics between the spatial tiles of one time chunk.

    A tile sees only part of each frame, so its own GroupNorm statistics differ from the whole
    frame's. The engine therefore runs *collect* passes: every tile adds the sum and sum of squares
    of each norm's input over its core region (its share of the frame, halo excluded, so each
    pixel counts once) to the shared ``sums``. Pass k normalises the first k - 1 norm layers (in
    execution order) with those totals and the rest per tile, so after pass k the first k layers
    have exactly the whole-frame statistics; with as many passes as norm layers, tiled inference
    equals untiled inference. ``region`` is the tile's core inside the tile, in latent pixels:
    ``(tile_h, tile_w, y0, y1, x0, x1)``; norms scale it to their own resolution.
    """

    sums: dict[str, list[Tensor]]
    stats: dict[str, tuple[Tensor, Tensor]] | None
    collect: bool
    region: tuple[int, int, int, int, int, int]

    def stats_for(self, key: str) -> tuple[Tensor, Tensor] | None:
        return None if self.stats is None else self.stats.get(key)

    def add(self, key: str, x: Tensor, groups: int, per_frame: bool) -> None:
        tile_h, tile_w, y0, y1, x0, x1 = self.region
        sy, sx = x.shape[-2] / tile_h, x.shape[-1] / tile_w
        core = x[..., round(y0 * sy) : round(y1 * sy), round(x0 * sx) : round(x1 * sx)].double()
        n, c, t = core.shape[:3]
        core = core.reshape(n, groups, c // groups, t, -1)
        dims = (2, 4) if per_frame else (2, 3, 4)
        total = core.sum(dim=dims)
        squares = core.square().sum(dim=dims)
        count = core.new_tensor(core.numel() / (n * groups * (t if per_frame else 1)))
        if key in self.sums:
            acc = self.sums[key]
            acc[0] += total
            acc[1] += squares
            acc[2] += count
        else:
            self.sums[key] = [total, squares, count]

    @staticmethod
    def finalize(sums: dict[str, list[Tensor]], exact_layers: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Totals -> (mean, biased variance), shaped (N, G, T) or (N, G), for the first
        ``exact_layers`` norms in execution order (dicts keep insertion order): only those saw
        inputs computed with whole-frame statistics throughout."""
        stats = {}
        for key, (total, squares, count) in list(sums.items())[:exact_layers]:
            mean = total / count
            stats[key] = (mean, (squares / count - mean.square()).clamp_min(0))
        return stats


@dataclass
class CausalCache:
    """Frames carried from one time chunk to the next, keyed by module path.

    ``frames[key]`` holds, for a causal conv, the tail of its (time-padded) input that the next
    chunk's first outputs still need; for an upsampler, a marker that the first chunk is done.
    ``norm_sync`` is set by the engine during tiled inference (see :class:`NormSync`).
    """

    frames: dict[str, Tensor] = field(default_factory=dict)
    norm_sync: NormSync | None = None

    def get(self, key: str) -> Tensor | None:
        return self.frames.get(key)

    def set(self, key: str, value: Tensor) -> None:
        self.frames[key] = value

    def take(self, key: str) -> Tensor | None:
        """Remove and return an entry: a conv's old tail is freed once its padded input holds it,
        before the new tail is kept (two tails of one conv never live at once)."""
        return self.frames.pop(key, None)

    def fork(self, norm_sync: NormSync | None) -> CausalCache:
        """A copy whose updates do not reach this cache (entries are replaced, never mutated)."""
        return CausalCache(dict(self.frames), norm_sync)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.frames.values())


def assign_cache_keys(root: nn.Module) -> None:
    """Give every stateful causal module its path inside ``root`` as its cache key."""
    for name, module in root.named_modules():
        if isinstance(module, CausalModule):
            module.cache_key = name


class CausalModule(nn.Module):
    """Base of modules that read or keep state in a :class:`CausalCache` under ``cache_key``."""

    cache_key: str = ""


def frames_to_batch(x: Tensor) -> Tensor:
    """(N, C, T, H, W) -> (N*T, C, H, W)."""
    return x.transpose(1, 2).flatten(0, 1)


def batch_to_frames(x: Tensor, n: int) -> Tensor:
    """(N*T, C, H, W) -> (N, C, T, H, W)."""
    return x.unflatten(0, (n, -1)).transpose(1, 2)


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)


class CausalConv3d(CausalModule):
    """3D convolution that is causal in time.

    Time padding: ``k_t - 1`` frames in front, either copies of the first frame (``replicate``,
    OD-VAE/CV-VAE encoders) or zeros (``zeros``, Wan/OneVAE). Spatial padding is zeros: symmetric
    ``k // 2`` by default, or explicit ``(left, right, top, bottom)`` (e.g. ``(0, 1, 0, 1)`` before
    a stride-2 downsampler). ``groups=in_channels`` makes it depthwise (Turbo-VAED's separable
    convs). The weight lives in ``self.conv`` so state-dict keys read
    ``<name>.conv.weight`` as in the official checkpoints.

    With stride ``s_t`` the output has ``(T - 1) // s_t + 1`` frames for ``k_t = 3``; in streaming mode
    the cache keeps the padded-input frames from ``n_out * s_t`` on, so any chunking whose chunks
    produce at least one output frame gives the whole-clip answer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        *,
        time_pad: TimePad = "replicate",
        spatial_pad: tuple[int, int, int, int] | None = None,
        bias: bool = True,
        groups: int = 1,
    ):
        super().__init__()
        if time_pad not in TIME_PADS:
            raise ValueError(f"time_pad must be one of {TIME_PADS}, got {time_pad!r}")
        kt, kh, kw = _triple(kernel_size)
        self.time_pad = time_pad
        self.kernel_t = kt
        self.stride_t = _triple(stride)[0]
        # (left, right, top, bottom) zero padding of H and W
        self.spatial_pad = (kw // 2, kw // 2, kh // 2, kh // 2) if spatial_pad is None else tuple(spatial_pad)
        left, right, top, bottom = self.spatial_pad
        # Symmetric zero padding is the convolution's own (no padded copy of the input); only
        # asymmetric padding (before stride-2 downsamplers) is written out by this module.
        self.conv_pads_space = left == right and top == bottom
        self.outer_pad = (0, 0, 0, 0) if self.conv_pads_space else self.spatial_pad
        padding = (0, top, left) if self.conv_pads_space else 0
        self.conv = nn.Conv3d(
            in_channels, out_channels, (kt, kh, kw), stride, padding=padding, bias=bias, groups=groups
        )

    def _pad(self, x: Tensor, tail: Tensor | None) -> Tensor:
        """Time padding (cached tail, or first-frame copies / zeros at clip start) and the spatial
        zeros the convolution does not add itself."""
        left, right, top, bottom = self.outer_pad
        pad_t = self.kernel_t - 1
        if left == right and top == bottom and (tail is None or tail.shape[2] == pad_t):
            # fused single write of the padded buffer (videovae.kernels.causal_pad3d)
            return causal_pad3d(x, pad_t, top, left, cache=tail, time_mode=self.time_pad)
        if tail is None and pad_t:
            if self.time_pad == "replicate":
                tail = x[:, :, :1].expand(-1, -1, pad_t, -1, -1)
            else:
                tail = x.new_zeros(x.shape[0], x.shape[1], pad_t, *x.shape[3:])
        padded = x if tail is None or tail.shape[2] == 0 else torch.cat([tail.to(x.dtype), x], dim=2)
        return F.pad(padded, (left, right, top, bottom, 0, 0))

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        tail = cache.take(self.cache_key) if cache is not None else None
        return self._run_padded(self._pad(x, tail), x.shape[2], cache)

    def forward_normed(
        self, norm: Norm, x: Tensor, cache: CausalCache | None = None, overwrite: bool = False
    ) -> tuple[Tensor, CausalCache | None]:
        """``self(norm(x, silu=True), cache)``. In inference the normalised tensor is written straight
        into the time-padded input buffer, so it never exists as a separate copy (the peak of a
        residual block drops by one activation), and inputs longer than ``WINDOW_FRAMES`` frames go
        through a window of that many frames (:meth:`_forward_normed_in_windows`); with gradients
        it is the plain composition. ``overwrite``: the caller no longer needs ``x``, so a result of
        ``x``'s shape may be written into it as the windows move on."""
        if not self.writes_in_place(x, cache):
            return self(norm(x, silu=True, cache=cache), cache)
        if self.windows(x.shape, x.device, cache):
            return self._forward_normed_in_windows(norm, x, cache, overwrite)
        return self.forward_written(lambda frames: norm(x, silu=True, cache=cache, out=frames), x.shape, x, cache)

    def _forward_normed_in_windows(
        self, norm: Norm, x: Tensor, cache: CausalCache | None, overwrite: bool
    ) -> tuple[Tensor, CausalCache | None]:
        """:meth:`forward_normed` through :meth:`forward_written_in_windows`. Norm statistics are
        those of all of ``x`` (a per-clip GroupNorm's are gathered first), so the result is the
        same as normalising the whole of ``x``."""
        stats = norm.clip_statistics(x)

        def write(t0: int, frames: Tensor) -> None:
            norm(x[:, :, t0 : t0 + frames.shape[2]], silu=True, out=frames, stats=stats)

        return self.forward_written_in_windows(write, x.shape, x, cache, x if overwrite else None)

    def forward_written_in_windows(
        self, write, shape: torch.Size | tuple[int, ...], like: Tensor, cache: CausalCache | None,
        reuse: Tensor | None = None,
    ) -> tuple[Tensor, CausalCache | None]:
        """:meth:`forward_written` ``WINDOW_FRAMES`` output frames at a time (inference, stride 1):
        ``write(t0, frames)`` produces input frames ``t0 : t0 + frames.shape[2]`` into the window, so
        the time-padded input exists only as a window of ``pad_t + WINDOW_FRAMES`` frames, not for
        the whole clip. Output frames ``t0:t1`` need input frames up to ``t1`` only, which the window
        holds by then: ``reuse`` (an input the caller no longer needs, of the result's shape and
        dtype) receives the result."""
        pad_t = self.kernel_t - 1
        tail = cache.take(self.cache_key) if cache is not None else None
        n, c, t, h, w = shape
        window = torch.empty((n, c, pad_t + WINDOW_FRAMES, h, w), dtype=like.dtype, device=like.device)
        y = None
        for t0 in range(0, t, WINDOW_FRAMES):
            frames = min(WINDOW_FRAMES, t - t0)
            write(t0, window[:, :, pad_t : pad_t + frames])
            if t0 == 0:
                self._fill_head(window, tail)
                del tail
            out = self.conv(window[:, :, : pad_t + frames])
            if y is None:  # (N, C_out, T, H_out, W_out)
                result = (n, out.shape[1], t, *out.shape[3:])
                reusable = reuse is not None and reuse.shape == result and reuse.dtype == out.dtype
                y = reuse if reusable else out.new_empty(result)
            y[:, :, t0 : t0 + frames] = out
            del out
            # the last pad_t frames of this window lead the next one (a copy: the ranges may overlap)
            window[:, :, :pad_t] = window[:, :, frames : frames + pad_t].clone()
        if cache is not None and pad_t:
            cache.set(self.cache_key, window[:, :, :pad_t].clone())
        return y, cache

    def windows(self, shape: torch.Size | tuple[int, ...], device: torch.device, cache: CausalCache | None) -> bool:
        """Whether an inference input of ``shape`` (N, C, T, H, W, as the conv reads it) goes through
        :meth:`forward_written_in_windows`: stride 1, longer than one window, no tile-norm statistics
        exchange (which needs whole-chunk norm calls), and on the CPU a window large enough for
        oneDNN: PyTorch runs a 3D conv with N*C*T*H <= 20480 through its slow reference kernel (about
        6x slower here), so small frames keep the whole-chunk buffer."""
        n, c, t, h = shape[:4]
        if self.stride_t != 1 or t <= WINDOW_FRAMES or (cache is not None and cache.norm_sync is not None):
            return False
        return device.type != "cpu" or n * c * (self.kernel_t - 1 + WINDOW_FRAMES) * h > CPU_WINDOW_MIN_NCTH

    def _fill_head(self, padded: Tensor, tail: Tensor | None) -> None:
        """Time padding in front of the frames of ``padded`` (N, C, pad_t + T, H, W): the previous
        chunk's tail, else copies of the first frame (``replicate``) or zeros."""
        pad_t = self.kernel_t - 1
        head = padded[:, :, :pad_t]
        if tail is not None:
            head.copy_(tail)
        elif self.time_pad == "replicate":
            head.copy_(padded[:, :, pad_t : pad_t + 1].expand_as(head))
        else:
            head.zero_()

    def writes_in_place(self, x: Tensor, cache: CausalCache | None) -> bool:
        """Whether an input may be written straight into the padded buffer: inference outside graph
        capture, space padded by the conv itself, and a cached tail (if any) of the expected length."""
        tail = cache.get(self.cache_key) if cache is not None else None
        return (
            not torch.is_grad_enabled()
            and not _capturing_graph()
            and self.conv_pads_space
            and x.dim() == 5
            and (tail is None or tail.shape[2] == self.kernel_t - 1)
        )

    def forward_written(
        self, write, shape: torch.Size, like: Tensor, cache: CausalCache | None
    ) -> tuple[Tensor, CausalCache | None]:
        """Run on an input of ``shape`` (N, C, T, H, W) that ``write(frames)`` produces into the
        frames view of the time-padded buffer (``like`` gives dtype and device); inference only."""
        pad_t = self.kernel_t - 1
        tail = cache.take(self.cache_key) if cache is not None else None
        n, c, t, h, w = shape
        padded = torch.empty((n, c, pad_t + t, h, w), dtype=like.dtype, device=like.device)
        write(padded[:, :, pad_t:])
        self._fill_head(padded, tail)
        del tail
        return self._run_padded(padded, t, cache)

    def _run_padded(self, padded: Tensor, frames: int, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """Convolve the time-padded input of a ``frames``-frame chunk; keep the next chunk's tail."""
        if padded.shape[2] < self.kernel_t:
            raise ValueError(
                f"{self.cache_key or 'CausalConv3d'}: chunk of {frames} frames is too short for "
                f"kernel {self.kernel_t} / stride {self.stride_t}"
            )
        y = self.conv(padded)
        if cache is not None and (self.kernel_t > 1 or self.stride_t > 1):
            # keep the time-padded input frames from the first one the next output needs
            left, right, top, bottom = self.outer_pad
            h, w = padded.shape[3:]
            consumed = y.shape[2] * self.stride_t
            cache.set(self.cache_key, padded[:, :, consumed:, top : h - bottom, left : w - right].detach().clone())
        return y, cache


# Frames per window of CausalConv3d.forward_normed on longer inputs: a few frames keep the calls
# large; the padded copy of a whole clip (one activation of its size) is gone.
WINDOW_FRAMES = 4
# PyTorch's oneDNN threshold for CPU 3D convs (N*C*T*H of the input; smaller ones take the slow kernel)
CPU_WINDOW_MIN_NCTH = 20480


def _capturing_graph() -> bool:
    """Whether torch.compile, torch.export or TorchScript tracing is capturing a graph: they get the
    plain composition (compilers plan buffers themselves; writes into slices export badly)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


class Conv2dPerFrame(nn.Conv2d):
    """A 2D convolution applied to every frame of a 5-D (N, C, T, H, W) tensor."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        n = x.shape[0]
        return batch_to_frames(super().forward(frames_to_batch(x)), n)

    def windows(self, x: Tensor, cache: CausalCache | None) -> bool:
        """Whether ``x`` goes through :meth:`forward_normed_in_windows`: inference outside graph
        capture, longer than one window, and no tile-norm statistics exchange (which needs
        whole-chunk norm calls)."""
        return (
            not torch.is_grad_enabled()
            and not _capturing_graph()
            and x.dim() == 5
            and x.shape[2] > WINDOW_FRAMES
            and (cache is None or cache.norm_sync is None)
        )

    def forward_normed_in_windows(self, norm: Norm, x: Tensor, overwrite: bool = False) -> Tensor:
        """``self(norm(x, silu=True))`` ``WINDOW_FRAMES`` frames at a time (inference). An output
        frame needs its own input frame only, so the normalised input exists for one window, not for
        the whole clip, and with ``overwrite`` (the caller no longer needs ``x``) the result is
        written over ``x`` when the shapes allow. Per-clip GroupNorm statistics are gathered first,
        so the values are those of normalising all of ``x``. Output (N, C_out, T, H', W') with
        frame-major storage, the layout the next per-frame op reads without a copy."""
        n, c, t, h, w = x.shape
        stats = norm.clip_statistics(x)
        window = torch.empty((n, WINDOW_FRAMES, c, h, w), dtype=x.dtype, device=x.device)
        y = None
        for t0 in range(0, t, WINDOW_FRAMES):
            frames = min(WINDOW_FRAMES, t - t0)
            normed = window[:, :frames]
            norm(x[:, :, t0 : t0 + frames], silu=True, out=normed.transpose(1, 2), stats=stats)
            out = super().forward(normed.flatten(0, 1))  # (N * frames, C_out, H', W')
            if y is None:
                result = (n, out.shape[1], t, *out.shape[2:])
                reusable = overwrite and x.shape == result and x.dtype == out.dtype
                y = x if reusable else out.new_empty((n, t, *out.shape[1:])).transpose(1, 2)
            y[:, :, t0 : t0 + frames] = batch_to_frames(out, n)
            del out
        return y


class Norm(CausalModule):
    """Normalisation with an optional fused SiLU.

    ``group_frame``: GroupNorm with statistics per frame over (C/G, H, W): exactly streamable.
    ``group_clip``: GroupNorm over (C/G, T, H, W), the official CV-VAE/OD-VAE behaviour: the
    statistics see the whole chunk, so chunked inference differs from whole-clip inference.
    ``rms``: channel RMSNorm per position (Wan form ``x / ||x||_C * sqrt(C) * weight + bias``):
    pointwise in T, H, W, so streaming and halo tiling are both exact.
    """

    def __init__(self, kind: NormKind, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__()
        if kind not in NORM_KINDS:
            raise ValueError(f"norm must be one of {NORM_KINDS}, got {kind!r}")
        if kind != "rms" and channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible by {groups} groups")
        self.kind = kind
        self.groups = groups
        self.eps = eps if kind != "rms" else min(eps, 1e-12)
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(
        self,
        x: Tensor,
        silu: bool = False,
        cache: CausalCache | None = None,
        out: Tensor | None = None,
        stats: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Normalise ``x`` (N, C, T, H, W); ``out`` (inference only): an ``x``-shaped view with
        contiguous frames that receives the result (see :meth:`CausalConv3d.forward_normed`);
        ``stats``: a per-clip GroupNorm's fp32 (mean, rstd) from :meth:`clip_statistics` of a clip
        that ``x`` is a time slice of."""
        if self.kind == "rms":
            return rms_norm_silu(x, self.weight, self.bias, eps=self.eps, silu=silu, out=out)
        if stats is not None:
            return group_norm_apply(x, self.weight, self.bias, *stats, silu=silu, out=out)
        per_frame = self.kind == "group_frame"
        sync = cache.norm_sync if cache is not None else None
        if sync is not None:
            if sync.collect:
                sync.add(self.cache_key, x, self.groups, per_frame)
            synced = sync.stats_for(self.cache_key)
            if synced is not None:
                mean, var = synced  # (N, G, T) or (N, G)
                mean, rstd = mean.float(), torch.rsqrt(var.float() + self.eps)
                if mean.dim() == 2:
                    mean, rstd = mean[:, :, None], rstd[:, :, None]
                return group_norm_apply(x, self.weight, self.bias, mean, rstd, silu=silu, out=out)
        return group_norm_silu(
            x, self.weight, self.bias, self.groups, eps=self.eps, per_frame=per_frame, silu=silu, out=out
        )

    def clip_statistics(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """A per-clip GroupNorm's fp32 (mean, rstd), each (N, G, 1), so that time slices of ``x``
        can be normalised one at a time as the whole of ``x`` would be (``group_norm_stats``: no
        fp32 copy of all of ``x``); None for the per-frame and per-position norms, whose slices
        normalise on their own."""
        if self.kind != "group_clip":
            return None
        return group_norm_stats(x, self.groups, self.eps, per_frame=False)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.weight.numel()}, groups={self.groups}, eps={self.eps}"


BlockKind = Literal["2d", "3d"]


def make_conv(kind: BlockKind, cin: int, cout: int, kernel: int, time_pad: TimePad) -> nn.Module:
    """A 'same'-padded conv: per-frame 2D (``2d``) or causal 3D (``3d``)."""
    if kind == "2d":
        return Conv2dPerFrame(cin, cout, kernel, padding=kernel // 2)
    if kind == "3d":
        return CausalConv3d(cin, cout, kernel, time_pad=time_pad)
    raise ValueError(f"block kind must be '2d' or '3d', got {kind!r}")


def apply_conv(conv: nn.Module, x: Tensor, cache: CausalCache | None) -> Tensor:
    """Run a conv made by :func:`make_conv`, threading the cache through causal ones."""
    if isinstance(conv, CausalConv3d):
        return conv(x, cache)[0]
    return conv(x)


def norm_silu_conv(
    norm: Norm, conv: nn.Module, x: Tensor, cache: CausalCache | None, overwrite: bool = False
) -> Tensor:
    """``conv(silu(norm(x)))`` for a conv made by :func:`make_conv`; causal 3D convs take the
    normalised tensor straight into their padded input (:meth:`CausalConv3d.forward_normed`) and
    per-frame convs normalise a few frames at a time (:meth:`Conv2dPerFrame.forward_normed_in_windows`);
    either may write the result into ``x`` when ``overwrite``."""
    if isinstance(conv, CausalConv3d):
        return conv.forward_normed(norm, x, cache, overwrite)[0]
    if isinstance(conv, Conv2dPerFrame) and conv.windows(x, cache):
        return conv.forward_normed_in_windows(norm, x, overwrite)
    return conv(norm(x, silu=True, cache=cache))


def add_shortcut(h: Tensor, shortcut: nn.Module, x: Tensor, cache: CausalCache | None) -> Tensor:
    """``h += shortcut(x)`` for a 1x1 conv made by :func:`make_conv` (no time context); in inference
    ``WINDOW_FRAMES`` frames at a time, so the shortcut never exists for the whole clip."""
    if torch.is_grad_enabled() or _capturing_graph():
        return h.add_(apply_conv(shortcut, x, cache))  # h: a conv output, which no backward needs
    for t0 in range(0, x.shape[2], WINDOW_FRAMES):
        h[:, :, t0 : t0 + WINDOW_FRAMES] += apply_conv(shortcut, x[:, :, t0 : t0 + WINDOW_FRAMES], cache)
    return h


@dataclass(frozen=True)
class LayerOptions:
    """Options every block of one model shares."""

    norm: NormKind = "group_frame"
    groups: int = 32
    eps: float = 1e-6
    time_pad: TimePad = "replicate"
    # The norm of per-frame (2D) blocks; OD-VAE's 2D blocks normalise each frame on its own.
    norm_2d: NormKind | None = None

    def norm_for(self, kind: BlockKind) -> NormKind:
        return self.norm_2d if (kind == "2d" and self.norm_2d is not None) else self.norm


class ResBlock(nn.Module):
    """Pre-activation residual block: norm -> SiLU -> conv -> norm -> SiLU -> conv, plus shortcut.

    ``kind`` ``2d`` convolves each frame on its own; ``3d`` uses causal 3D convs. The shortcut is a
    1x1 conv (``nin_shortcut``) when the channel count changes.
    """

    def __init__(self, cin: int, cout: int, kind: BlockKind, opts: LayerOptions):
        super().__init__()
        norm = opts.norm_for(kind)
        self.norm1 = Norm(norm, cin, opts.groups, opts.eps)
        self.conv1 = make_conv(kind, cin, cout, 3, opts.time_pad)
        self.norm2 = Norm(norm, cout, opts.groups, opts.eps)
        self.conv2 = make_conv(kind, cout, cout, 3, opts.time_pad)
        self.nin_shortcut = make_conv(kind, cin, cout, 1, opts.time_pad) if cin != cout else None

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        # one name for the running activation: each intermediate is freed as soon as it is used;
        # conv2 may overwrite its input h (the block's own conv1 output) as its windows move on
        h = norm_silu_conv(self.norm1, self.conv1, x, cache)
        h = norm_silu_conv(self.norm2, self.conv2, h, cache, overwrite=True)
        if self.nin_shortcut is not None:
            return add_shortcut(h, self.nin_shortcut, x, cache), cache
        # in place into h (a conv output, which no backward needs): no third activation-sized
        # tensor, and the sum keeps h's layout (frame-major after a per-frame conv), so the next
        # block's norm and per-frame conv read it without a copy
        return h.add_(x), cache


def attention_backend() -> str:
    """``VIDEOVAE_ATTENTION``: ``sdpa`` (default) or ``xformers`` (optional dependency)."""
    backend = os.environ.get("VIDEOVAE_ATTENTION", "sdpa")
    if backend not in ("sdpa", "xformers"):
        raise ValueError(f"VIDEOVAE_ATTENTION must be 'sdpa' or 'xformers', got {backend!r}")
    return backend


# Bytes of attention scores one CPU attention call may hold (see single_head_attention).
CPU_ATTENTION_SCORE_BYTES = 64 * 2**20


def single_head_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention over (B, L, C) tensors with scale 1/sqrt(C).

    On the CPU, PyTorch's attention holds the whole (L, L) score matrix (and its softmax) per batch
    entry: 1.7 GB per frame at 720p for an 8x latent. There the queries are processed in blocks
    whose scores fit :data:`CPU_ATTENTION_SCORE_BYTES` (softmax is per query row, so the result is
    the same). CUDA uses the fused kernels, which never hold the scores."""
    if attention_backend() == "xformers":
        try:
            import xformers.ops as xops
        except ImportError as err:
            raise ImportError("VIDEOVAE_ATTENTION=xformers needs `pip install videovae[xformers]`") from err
        return xops.memory_efficient_attention(q, k, v)
    b, lq, _ = q.shape
    rows = max(1, CPU_ATTENTION_SCORE_BYTES // (2 * k.shape[1] * max(q.element_size(), 4)))
    if q.device.type != "cpu" or b * lq <= rows:
        return F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
    out = q.new_empty(q.shape[:2] + v.shape[2:])
    for i in range(b):
        for start in range(0, lq, rows):
            block = slice(start, start + rows)
            out[i, block] = F.scaled_dot_product_attention(q[i, None, None, block], k[i, None, None],
                                                           v[i, None, None])[0, 0]
    return out


class SpatialAttention(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (exact per frame).

    q, k, v and the output projection are 1x1x1 convs (``<name>.conv.weight`` as in OD-VAE).
    """

    def __init__(self, channels: int, opts: LayerOptions):
        super().__init__()
        self.norm = Norm(opts.norm, channels, opts.groups, opts.eps)
        self.q = CausalConv3d(channels, channels, 1)
        self.k = CausalConv3d(channels, channels, 1)
        self.v = CausalConv3d(channels, channels, 1)
        self.proj_out = CausalConv3d(channels, channels, 1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        n, _, _, h, w = x.shape
        y = self.norm(x, cache=cache)
        q, k, v = (rearrange(conv(y)[0], "n c t h w -> (n t) (h w) c") for conv in (self.q, self.k, self.v))
        out = rearrange(single_head_attention(q, k, v), "(n t) (h w) c -> n c t h w", n=n, h=h, w=w)
        return x + self.proj_out(out)[0], cache


class MidBlock(nn.Module):
    """ResBlock -> (spatial attention) -> ResBlock, named ``block_1``, ``attn_1``, ``block_2``."""

    def __init__(self, channels: int, opts: LayerOptions, attention: bool):
        super().__init__()
        self.block_1 = ResBlock(channels, channels, "3d", opts)
        self.attn_1 = SpatialAttention(channels, opts) if attention else None
        self.block_2 = ResBlock(channels, channels, "3d", opts)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        x, cache = self.block_1(x, cache)
        if self.attn_1 is not None:
            x, cache = self.attn_1(x, cache)
        return self.block_2(x, cache)


# --- downsamplers: (N, C, T, H, W) -> (N, C, T', H/2, W/2) ---------------------------------------


class SpatialDownsample(nn.Module):
    """Per-frame 3x3 stride-2 conv after zero padding (0, 1, 0, 1): H, W halve, T is kept."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2dPerFrame(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        # pad the frame batch, which the 2D conv reads as is (padding the 5-D tensor would give a
        # channel-major copy that the conv copies once more)
        frames = F.pad(frames_to_batch(x), (0, 1, 0, 1))
        y = F.conv2d(frames, self.conv.weight, self.conv.bias, stride=2)
        return batch_to_frames(y, x.shape[0]), cache


class SpatioTemporalDownsample(nn.Module):
    """Causal 3x3x3 conv with stride 2 in T, H and W: T = 1 + 2k -> 1 + k, H, W halve."""

    def __init__(self, channels: int, time_pad: TimePad):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, 2, time_pad=time_pad, spatial_pad=(0, 1, 0, 1))

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        return self.conv(x, cache)


# --- upsamplers: (N, C, T, H, W) -> (N, C, T', 2H, 2W) -------------------------------------------

TimeUpsample = Literal["nearest", "trilinear", "pixel_shuffle"]
TIME_UPSAMPLES = ("nearest", "trilinear", "pixel_shuffle")


def nearest_upsample_into(x: Tensor, out: Tensor, time_factor: int) -> Tensor:
    """Write the nearest upsampling of ``x`` (N, C, T, H, W), 2x in H and W and ``time_factor`` x in
    T, into ``out`` (N, C, T * time_factor, 2H, 2W; e.g. the frames of a conv's padded buffer): one
    broadcast copy, the same values as ``F.interpolate(mode="nearest")``."""
    n, c, t, h, w = x.shape
    view = out.view(n, c, t, time_factor, h, 2, w, 2)  # raises rather than copy when out is not viewable
    view.copy_(x[:, :, :, None, :, None, :, None].expand(n, c, t, time_factor, h, 2, w, 2))
    return out


class SpatialUpsample(nn.Module):
    """Nearest 2x in H and W per frame, then a causal ``kernel_t`` x 3 x 3 conv. T is kept.

    ``kernel_t=3`` (default) mixes the current and two previous frames; ``kernel_t=1`` is a plain
    per-frame 3x3 conv (OD-VAE's ``SpatialUpsample2x``, weight ``(C, C, 1, 3, 3)``).
    """

    def __init__(self, channels: int, time_pad: TimePad, kernel_t: int = 3):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, (kernel_t, 3, 3), time_pad=time_pad)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        if self.conv.writes_in_place(x, cache):  # inference: upsample straight into the conv's input
            n, c, t, h, w = x.shape
            shape = (n, c, t, 2 * h, 2 * w)
            if self.conv.windows(shape, x.device, cache):
                def write(t0: int, frames: Tensor) -> None:
                    nearest_upsample_into(x[:, :, t0 : t0 + frames.shape[2]], frames, 1)

                return self.conv.forward_written_in_windows(write, shape, x, cache)
            return self.conv.forward_written(lambda f: nearest_upsample_into(x, f, 1), shape, x, cache)
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.conv(x, cache)


class _FirstChunkAware(CausalModule):
    """Knows, through the cache, whether the chunk at hand starts the clip."""

    def _starts_clip(self, x: Tensor, cache: CausalCache | None) -> bool:
        if cache is None:
            return True
        if cache.get(self.cache_key) is not None:
            return False
        cache.set(self.cache_key, x.new_ones(()))
        return True


class SpatioTemporalUpsample(_FirstChunkAware):
    """2x in T, H, W, the first frame of the clip upsampled in space only: T -> 1 + 2(T - 1).

    ``nearest`` repeats each frame twice in time: causal and exactly streamable. ``trilinear``
    interpolates frames 1.. with ``align_corners=False`` (OD-VAE): output frame 2j+1 looks one latent
    frame ahead, so chunk edges differ from the whole clip. A causal 3x3x3 conv follows.
    """

    def __init__(self, channels: int, time_pad: TimePad, mode: Literal["nearest", "trilinear"]):
        super().__init__()
        self.mode = mode
        self.conv = CausalConv3d(channels, channels, 3, time_pad=time_pad)

    def _upsample(self, x: Tensor, first_only_space: bool) -> Tensor:
        parts = []
        if first_only_space:
            head = x[:, :, :1]
            mode = "trilinear" if self.mode == "trilinear" else "nearest"
            parts.append(F.interpolate(head, scale_factor=(1, 2, 2), mode=mode, align_corners=None))
            x = x[:, :, 1:]
        if x.shape[2] > 0:
            if self.mode == "trilinear":
                parts.append(F.interpolate(x, scale_factor=(2, 2, 2), mode="trilinear", align_corners=False))
            else:
                parts.append(F.interpolate(x, scale_factor=(2, 2, 2), mode="nearest"))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        starts_clip = self._starts_clip(x, cache)
        if self.mode == "nearest" and self.conv.writes_in_place(x, cache):
            # inference: upsample straight into the conv's padded input (no separate upsampled copy)
            n, c, t, h, w = x.shape
            frames = 2 * t - 1 if starts_clip else 2 * t
            return self.conv.forward_written(
                lambda f: self._nearest_into(x, f, starts_clip), (n, c, frames, 2 * h, 2 * w), x, cache
            )
        return self.conv(self._upsample(x, starts_clip), cache)

    @staticmethod
    def _nearest_into(x: Tensor, out: Tensor, first_only_space: bool) -> None:
        if first_only_space:
            nearest_upsample_into(x[:, :, :1], out[:, :, :1], 1)
            x, out = x[:, :, 1:], out[:, :, 1:]
        if x.shape[2] > 0:
            nearest_upsample_into(x, out, 2)


class PixelShuffleUpsample(_FirstChunkAware):
    """Channel-to-space upsampler: causal conv to ``C * st * sh * sw`` channels, then move the
    factors into T, H, W and drop the first ``st - 1`` frames of the clip: T -> 1 + st(T - 1)."""

    def __init__(self, channels: int, factors: tuple[int, int, int], time_pad: TimePad):
        super().__init__()
        self.factors = factors
        st, sh, sw = factors
        self.conv = CausalConv3d(channels, channels * st * sh * sw, 3, time_pad=time_pad)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        starts_clip = self._starts_clip(x, cache)
        y, cache = self.conv(x, cache)
        st, sh, sw = self.factors
        y = rearrange(y, "n (c st sh sw) t h w -> n c (t st) (h sh) (w sw)", st=st, sh=sh, sw=sw)
        if starts_clip and st > 1:
            y = y[:, :, st - 1 :]
        return y, cache
