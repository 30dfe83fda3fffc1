"""OneVAE: the Wan 2.1 causal video VAE layout, continuous latents and FSQ tokens from one network.

Architecture (Wan 2.1 ``WanVAE_`` / diffusers ``AutoencoderKLWan``; OneVAE keeps it and adds a
discrete head):

* every norm is a per-position RMSNorm over channels, ``F.normalize(x, dim=C) * sqrt(C) * gamma``
  (no bias): pointwise in T, H and W, so chunked streaming and halo tiling are both exact;
* every 3x3x3 conv is causal with two zero frames in front of the clip (``time_pad='zeros'``);
* encoder: ``conv_in``, levels of residual blocks each followed (but the last) by a stride-2
  downsampler (per-frame 3x3 conv after zero padding right/bottom; ``downsample3d`` adds a
  ``time_conv`` (3, 1, 1) with stride 2 whose windows start at frame 0, frame 0 passing through
  untouched), a mid block with single-head per-frame attention, RMSNorm, SiLU, ``conv_out`` to 2 z
  channels and the 1x1x1 ``conv1`` (Wan's quant conv) -> posterior moments;
* decoder: the 1x1x1 ``conv2`` (Wan's post-quant conv), ``conv_in``, mid block, levels of
  ``num_res_blocks + 1`` residual blocks each followed (but the last) by an upsampler (nearest 2x
  per frame and a 3x3 conv to C/2 channels; ``upsample3d`` first runs a causal ``time_conv``
  (3, 1, 1) to 2C channels that become two frames, on every frame but frame 0 of the clip).

Discrete path (OneVAE, when ``fsq_levels`` is set): the posterior mean goes through
``quant_conv`` (a per-position Linear z -> groups * len(levels)), FSQ, and ``post_quant_conv``
(Linear back to z) before ``conv2``. With ``first_frame_boost`` the tokens of frame 0 come from a
latent at twice the resolution (see :meth:`OneVAE.tokenize`).

Layout: video NCTHW, values in [-1, 1], T = 1 + k * time_factor, H and W multiples of
space_factor. Latents (N, z, 1 + k, H / s, W / s), raw (unscaled) posterior values.

State-dict names are ours (``encoder.down.{i}.block.{j}.conv1.conv.weight``, ...; decoder levels
indexed like the encoder's, ``decoder.up.{L-1}`` runs first); :func:`convert_wan` and
:func:`convert_official` map the Wan 2.1, diffusers and official OneVAE names onto them with an
explicit table built from the architecture.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from videovae.kernels import rms_norm_silu
from videovae.layers import (
    CausalCache,
    CausalConv3d,
    CausalModule,
    Conv2dPerFrame,
    assign_cache_keys,
    batch_to_frames,
    frames_to_batch,
    single_head_attention,
)
from videovae.models.causal_vae import DiagonalGaussian
from videovae.quantizers import BOUNDS, FSQ
from videovae.statedict import (
    CheckpointError,
    find_weights,
    load_state_dict_strict,
    read_weights,
    strip_module,
    unwrap_training_state,
)

FSQ_BOUNDS = BOUNDS


@dataclass(frozen=True)
class OneVAEConfig:
    """Architecture of a :class:`OneVAE`. Stored in every checkpoint and latent file.

    ``channel_mult`` gives one level per entry (channels ``base_channels * m``); every level but
    the last halves H and W, and ``temporal_down[i]`` says whether level i also halves time.
    ``latents_mean`` / ``latents_std`` (one value per latent channel, or empty for none) define
    :meth:`OneVAE.scale_latents`. ``fsq_levels`` empty: continuous only; otherwise the discrete
    head quantises ``fsq_groups`` tokens per latent position with an FSQ of these levels.
    """

    # fields that only shape the discrete head: a checkpoint differing from a config only in these
    # can start it (``model.init_backbone`` in training, e.g. continuous -> discrete)
    head_fields: ClassVar[tuple[str, ...]] = ("fsq_levels", "fsq_groups", "fsq_bound", "first_frame_boost")

    in_channels: int = 3
    base_channels: int = 96
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_down: tuple[bool, ...] = (False, True, True)
    latent_channels: int = 16
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()
    fsq_levels: tuple[int, ...] = ()
    fsq_groups: int = 1
    fsq_bound: str = "tanh"
    first_frame_boost: bool = False
    logvar_min: float = -30.0
    logvar_max: float = 20.0

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        problems = []
        if levels < 2:
            problems.append("channel_mult needs at least 2 levels")
        if len(self.temporal_down) != levels - 1:
            problems.append(f"temporal_down needs {levels - 1} entries, got {len(self.temporal_down)}")
        if self.base_channels < 1 or any(m < 1 for m in self.channel_mult):
            problems.append("base_channels and channel_mult must be positive")
        if any((self.base_channels * m) % 2 for m in self.channel_mult[1:]):
            problems.append("decoder upsamplers halve channels: base_channels * channel_mult[1:] must be even")
        if self.num_res_blocks < 1:
            problems.append("num_res_blocks must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("latents_mean", "latents_std"):
            values = getattr(self, name)
            if values and len(values) != self.latent_channels:
                problems.append(f"{name} needs {self.latent_channels} values (or none), got {len(values)}")
        if bool(self.latents_mean) != bool(self.latents_std):
            problems.append("latents_mean and latents_std go together")
        if any(s <= 0 for s in self.latents_std):
            problems.append("latents_std must be positive")
        if any(level < 2 for level in self.fsq_levels):
            problems.append(f"fsq_levels must all be >= 2, got {self.fsq_levels}")
        if self.fsq_groups < 1:
            problems.append("fsq_groups must be >= 1")
        if self.fsq_bound not in FSQ_BOUNDS:
            problems.append(f"fsq_bound must be one of {FSQ_BOUNDS}")
        if self.first_frame_boost and not self.fsq_levels:
            problems.append("first_frame_boost applies to the discrete path: set fsq_levels")
        if problems:
            raise ValueError("invalid OneVAEConfig: " + "; ".join(problems))

    @property
    def time_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_down)

    @property
    def space_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    # Latent files record a scalar (scale, shift) pair for diffusion users; OneVAE normalises per
    # channel instead (latents_mean / latents_std, stored with the config in every latent file and
    # applied by OneVAE.scale_latents), so the scalar pair is the identity.
    @property
    def scaling_factor(self) -> float:
        return 1.0

    @property
    def shift_factor(self) -> float:
        return 0.0

    @property
    def discrete(self) -> bool:
        return bool(self.fsq_levels)

    @property
    def exactly_streamable(self) -> bool:
        """Chunked inference equals whole-clip inference: RMSNorm is per position, convs are causal
        with zero padding, attention is per frame and the time resamplers carry their state."""
        return True

    @property
    def halo_tiling_exact(self) -> bool:
        """Tiled equals untiled: the tiled parts hold convolutions and per-position RMSNorm only."""
        return True

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OneVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown OneVAEConfig fields: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# --- blocks ---------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Wan's RMS_norm: ``F.normalize(x, dim=1) * sqrt(C) * weight`` per position (no bias), with an
    optional fused SiLU. ``weight`` is the official ``gamma`` flattened to (C,)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor, silu: bool = False) -> Tensor:
        # eps 1e-12 is F.normalize's default: the norm is clamped from below exactly as in Wan.
        return rms_norm_silu(x, self.weight, None, eps=1e-12, silu=silu)


def _conv3(cin: int, cout: int) -> CausalConv3d:
    return CausalConv3d(cin, cout, 3, time_pad="zeros")


def _conv1(cin: int, cout: int) -> CausalConv3d:
    return CausalConv3d(cin, cout, 1, time_pad="zeros")


class ResidualBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> dropout -> conv2, plus the input (through a
    1x1x1 ``nin_shortcut`` when the channel count changes)."""

    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = _conv3(cin, cout)
        self.norm2 = RMSNorm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3(cout, cout)
        self.nin_shortcut = _conv1(cin, cout) if cin != cout else None

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        h, cache = self.conv1(self.norm1(x, silu=True), cache)
        h, cache = self.conv2(self.dropout(self.norm2(h, silu=True)), cache)
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)[0]
        return skip + h, cache


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (exact per frame)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        n, _, _, h, w = x.shape
        y = self.to_qkv(frames_to_batch(self.norm(x)))
        q, k, v = rearrange(y, "b c h w -> b (h w) c").chunk(3, dim=-1)
        out = rearrange(single_head_attention(q.contiguous(), k.contiguous(), v.contiguous()),
                        "b (h w) c -> b c h w", h=h, w=w)
        return x + batch_to_frames(self.proj(out), n), cache


class MidBlock(nn.Module):
    """ResidualBlock -> attention -> ResidualBlock (``block_1``, ``attn_1``, ``block_2``)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResidualBlock(channels, channels, dropout)
        self.attn_1 = AttentionBlock(channels)
        self.block_2 = ResidualBlock(channels, channels, dropout)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        x, cache = self.block_1(x, cache)
        x, cache = self.attn_1(x, cache)
        return self.block_2(x, cache)


class Downsample(CausalModule):
    """Wan ``downsample2d`` / ``downsample3d``: per-frame zero pad (0, 1, 0, 1) and 3x3 stride-2 conv;
    with ``temporal``, then a (3, 1, 1) stride-2 ``time_conv`` over windows starting at frame 0 of
    the clip, frame 0 itself passing through: T = 1 + 2k -> 1 + k.

    Streaming: the cache keeps the (spatially downsampled) frames from the next window start on
    (one frame for chunks of 1 + 2k then 2k frames), so any chunking gives the whole-clip answer.
    """

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)
        self.time_conv = nn.Conv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        n = x.shape[0]
        x = batch_to_frames(self.conv(F.pad(frames_to_batch(x), (0, 1, 0, 1))), n)
        if self.time_conv is None:
            return x, cache
        tail = cache.get(self.cache_key) if cache is not None else None
        if tail is None:
            head, inp = x[:, :, :1], x  # clip start
        else:
            head, inp = None, torch.cat([tail.to(x.dtype), x], dim=2)
        if inp.shape[2] >= 3:
            out = self.time_conv(inp)
        else:
            out = inp.new_zeros(n, inp.shape[1], 0, *inp.shape[3:])
        if cache is not None:
            cache.set(self.cache_key, inp[:, :, 2 * out.shape[2] :].detach().clone())
        return (out if head is None else torch.cat([head, out], dim=2)), cache


class Upsample(CausalModule):
    """Wan ``upsample2d`` / ``upsample3d``: with ``temporal``, first a causal (3, 1, 1) ``time_conv``
    to 2C channels whose halves become two consecutive frames, applied to every frame but frame 0
    of the clip (its history starts with zeros after frame 0): T -> 1 + 2(T - 1). Then nearest 2x
    per frame and a 3x3 conv to C/2 channels."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1), time_pad="zeros") if temporal else None
        self.conv = nn.Conv2d(channels, channels // 2, 3, padding=1)

    def _starts_clip(self, x: Tensor, cache: CausalCache | None) -> bool:
        if cache is None:
            return True
        if cache.get(self.cache_key) is not None:
            return False
        cache.set(self.cache_key, x.new_ones(()))
        return True

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        if self.time_conv is not None:
            first = self._starts_clip(x, cache)
            head, rest = (x[:, :, :1], x[:, :, 1:]) if first else (None, x)
            parts = [] if head is None else [head]
            if rest.shape[2]:
                y, cache = self.time_conv(rest, cache)
                parts.append(rearrange(y, "n (s c) t h w -> n c (t s) h w", s=2))
            x = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        n = x.shape[0]
        y = F.interpolate(frames_to_batch(x), scale_factor=2.0, mode="nearest-exact")
        return batch_to_frames(self.conv(y), n), cache


class _Level(nn.Module):
    """One resolution level: residual blocks then an optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.downsample: Downsample | None = None
        self.upsample: Upsample | None = None


def _run(blocks, x: Tensor, cache: CausalCache | None, use_checkpoint: bool) -> Tensor:
    for block in blocks:
        if use_checkpoint:
            x = checkpoint(lambda t, b=block: b(t, None)[0], x, use_reentrant=False)
        else:
            x, cache = block(x, cache)
    return x


def _encoder_channels(cfg: OneVAEConfig) -> list[int]:
    return [cfg.base_channels * m for m in (1, *cfg.channel_mult)]


class Encoder(nn.Module):
    """(N, 3, T, H, W) in [-1, 1] -> (N, 2 z, 1 + (T - 1) / t, H / s, W / s) (before ``conv1``)."""

    def __init__(self, cfg: OneVAEConfig):
        super().__init__()
        dims = _encoder_channels(cfg)
        self.conv_in = _conv3(cfg.in_channels, dims[0])
        self.down = nn.ModuleList()
        levels = len(cfg.channel_mult)
        for i in range(levels):
            level = _Level()
            cin = dims[i]
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResidualBlock(cin, dims[i + 1], cfg.dropout))
                cin = dims[i + 1]
            if i < levels - 1:
                level.downsample = Downsample(cin, cfg.temporal_down[i])
            self.down.append(level)
        self.mid = MidBlock(dims[-1], cfg.dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = _conv3(dims[-1], 2 * cfg.latent_channels)
        self.gradient_checkpointing = False

    def _ckpt(self, cache: CausalCache | None) -> bool:
        return self.gradient_checkpointing and self.training and cache is None

    def body(
        self, x: Tensor, cache: CausalCache | None = None, keep_first: bool = False
    ) -> tuple[Tensor, CausalCache | None, Tensor | None]:
        """conv_in and the down levels -> (features (N, C, t', h, w), cache, first). With
        ``keep_first`` and a chunk that starts the clip, ``first`` is frame 0's features just before
        the last downsampler (2h x 2w; the first-frame-boost branch), else None."""
        ckpt = self._ckpt(cache)
        starts = cache is None or cache.get(self.conv_in.cache_key) is None
        h, cache = self.conv_in(x, cache)
        first = None
        last = len(self.down) - 2
        for i, level in enumerate(self.down):
            h = _run(level.block, h, cache, ckpt)
            if level.downsample is not None:
                if i == last and keep_first and starts:
                    first = h[:, :, :1]
                h, cache = level.downsample(h, cache)
        return h, cache, first

    def first_frame_tail(self, first: Tensor) -> Tensor:
        """The last level's blocks on frame 0's pre-downsample features, cache-free (frame 0 of a
        clip sees only zero padding in time, so no state is needed)."""
        return _run(self.down[-1].block, first, None, False)

    def head(self, h: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        """Mid block (attention), norm_out, SiLU, conv_out -> (N, 2 z, t', h, w)."""
        h = _run([self.mid], h, cache, self._ckpt(cache))
        return self.conv_out(self.norm_out(h, silu=True), cache)


def _decoder_channels(cfg: OneVAEConfig) -> list[int]:
    """Channels entering the decoder levels in execution order, then the output channels."""
    return [cfg.base_channels * m for m in (cfg.channel_mult[-1], *reversed(cfg.channel_mult))]


class Decoder(nn.Module):
    """(N, z, 1 + k, h, w) (after ``conv2``) -> (N, 3, 1 + k t, h s, w s), nominally in [-1, 1]."""

    def __init__(self, cfg: OneVAEConfig):
        super().__init__()
        dims = _decoder_channels(cfg)
        levels = len(cfg.channel_mult)
        self.conv_in = _conv3(cfg.latent_channels, dims[0])
        self.mid = MidBlock(dims[0], cfg.dropout)
        stages = [_Level() for _ in range(levels)]
        for step in range(levels):  # execution order; level index levels - 1 - step
            level = stages[levels - 1 - step]
            cin = dims[step] // 2 if step > 0 else dims[step]  # the previous upsampler halved it
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResidualBlock(cin, dims[step + 1], cfg.dropout))
                cin = dims[step + 1]
            if step < levels - 1:
                level.upsample = Upsample(cin, cfg.temporal_down[levels - 2 - step])
        self.up = nn.ModuleList(stages)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = _conv3(dims[-1], cfg.in_channels)
        if cfg.first_frame_boost:
            # OneVAE's hi-res first-frame branch (official names): the frame-0 latent slot of the
            # stream is a stride-2 conv of the 2x latent; the 2x latent's own features replace
            # frame 0 after the first up level's upsampler (a 1x1 conv C -> C/2 stands in for it).
            self.downsample_highres_first = Downsample(cfg.latent_channels, temporal=False)
            self.upsample_highres = Conv2dPerFrame(dims[1], dims[1] // 2, 1)
        else:
            self.downsample_highres_first = None
            self.upsample_highres = None
        self.gradient_checkpointing = False

    def _ckpt(self, cache: CausalCache | None) -> bool:
        return self.gradient_checkpointing and self.training and cache is None

    def stem(self, z: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        """conv_in and the mid block (attention) -> (N, C, T', h, w)."""
        h, cache = self.conv_in(z, cache)
        return _run([self.mid], h, cache, self._ckpt(cache)), cache

    def first_frame_features(self, z_first: Tensor) -> Tensor:
        """The hi-res branch, cache-free: (N, z, 1, 2h, 2w) -> frame 0's features after the first
        up level (N, C/2, 1, 4h, 4w)."""
        h, _ = self.stem(z_first, None)
        h = _run(self.up[-1].block, h, None, False)
        return self.upsample_highres(h)

    def body(
        self, h: Tensor, cache: CausalCache | None = None, first: Tensor | None = None
    ) -> tuple[Tensor, CausalCache | None]:
        """Up levels, norm_out, SiLU, conv_out -> (N, 3, T, H, W). ``first``: features replacing
        frame 0 after the first up level (first-frame boost, chunk that starts the clip)."""
        ckpt = self._ckpt(cache)
        for i, level in enumerate(reversed(self.up)):
            h = _run(level.block, h, cache, ckpt)
            if level.upsample is not None:
                h, cache = level.upsample(h, cache)
            if i == 0 and first is not None:
                h = torch.cat([first.to(h.dtype), h[:, :, 1:]], dim=2)
        return self.conv_out(self.norm_out(h, silu=True), cache)

    def unpatchify(self, y: Tensor) -> Tensor:
        """No patching in this family: conv_out's output is the video."""
        return y

    def last_layer_weight(self) -> Tensor:
        """The weight the adaptive GAN weight takes gradient norms against."""
        return self.conv_out.conv.weight


# --- tokens ---------------------------------------------------------------------------------------


@dataclass
class Tokens:
    """FSQ token indices of a clip, int64 in [0, codebook_size).

    ``rest``: (N, groups, T', h, w), one index per group and latent position; with first-frame
    boost it covers latents 1.. only (T' = latent frames - 1). ``first``: (N, groups, 1, 2h, 2w),
    frame 0's tokens at twice the latent resolution (first-frame boost), else None.
    """

    rest: Tensor
    first: Tensor | None = None

    def to(self, device: torch.device | str) -> Tokens:
        return Tokens(self.rest.to(device), None if self.first is None else self.first.to(device))

    @property
    def latent_frames(self) -> int:
        """Latent frames these tokens decode from (frame 0's slot included)."""
        return self.rest.shape[2] + (0 if self.first is None else 1)


@dataclass
class JointOutput:
    """One encoder pass decoded both ways (:meth:`OneVAE.joint`): ``recon`` from the (sampled)
    continuous latent, ``recon_discrete`` through the FSQ (straight-through gradients), NCTHW."""

    recon: Tensor
    recon_discrete: Tensor
    posterior: DiagonalGaussian
    tokens: Tokens


# --- model ----------------------------------------------------------------------------------------


class OneVAE(nn.Module):
    """Wan 2.1 / OneVAE causal video VAE. ``encode`` / ``decode`` run whole clips; ``encode_chunk`` /
    ``decode_chunk`` carry an explicit :class:`CausalCache` for streaming; ``encode_video`` /
    ``decode_video`` run the chunked + tiled engine (:mod:`videovae.engine`)."""

    family = "onevae"
    config_class = OneVAEConfig

    def __init__(self, config: OneVAEConfig):
        super().__init__()
        self.config = config
        z = config.latent_channels
        self.encoder = Encoder(config)
        # Wan's 1x1x1 quant / post-quant convs keep their official names; quant_conv and
        # post_quant_conv are OneVAE's Linear projections around the FSQ (discrete path only).
        self.conv1 = _conv1(2 * z, 2 * z)
        self.conv2 = _conv1(z, z)
        self.decoder = Decoder(config)
        if config.discrete:
            width = config.fsq_groups * len(config.fsq_levels)
            self.quant_conv = nn.Linear(z, width)
            self.quantizer = FSQ(config.fsq_levels, groups=config.fsq_groups, bound=config.fsq_bound)
            self.post_quant_conv = nn.Linear(width, z)
        else:
            self.quant_conv = self.quantizer = self.post_quant_conv = None
        assign_cache_keys(self)

    # --- geometry ------------------------------------------------------------------------------
    @property
    def time_factor(self) -> int:
        return self.config.time_factor

    @property
    def space_factor(self) -> int:
        return self.config.space_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error unless ``x`` is a float (N, 3, 1 + k * t, H, W) with H, W multiples of s."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected video NCTHW with C={cfg.in_channels}, got shape {tuple(x.shape)}")
        t, h, w = x.shape[2:]
        if t < 1 or (t - 1) % self.time_factor:
            raise ValueError(f"frame count {t} is not 1 + k*{self.time_factor}")
        if h == 0 or w == 0 or h % self.space_factor or w % self.space_factor:
            raise ValueError(f"size {h}x{w} is not a (positive) multiple of {self.space_factor}")
        if not x.is_floating_point():
            raise TypeError(f"expected a float video in [-1, 1], got dtype {x.dtype}")

    def _check_latents(self, z: Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.latent_channels or z.shape[2] < 1:
            raise ValueError(f"expected latents (N, {self.latent_channels}, T, h, w), got {tuple(z.shape)}")

    # --- whole clip ----------------------------------------------------------------------------
    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x: NCTHW in [-1, 1] -> posterior over raw latents (N, z, 1 + (T - 1) / t, H / s, W / s)."""
        self.check_input(x)
        moments, _ = self.encode_chunk(x, None)
        return self.posterior(moments)

    def decode(self, z: Tensor) -> Tensor:
        """z: raw latents (N, z, T', h, w) -> NCTHW, nominally in [-1, 1] (not clamped; the
        official Wan / diffusers decode clamps to [-1, 1])."""
        self._check_latents(z)
        return self.decode_chunk(z, None)[0]

    def forward(
        self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None, discrete: bool = False,
        joint: bool = False,
    ) -> tuple[Tensor, DiagonalGaussian] | JointOutput:
        """Training pass: returns (reconstruction, posterior). ``discrete``: decode through the FSQ
        (the posterior mean is quantised; ``sample`` does not apply) instead of the continuous latent.
        ``joint``: both paths from one encoding, as :meth:`joint` (a forward option so that training
        engines, which wrap ``forward``, run it)."""
        if joint:
            if discrete:
                raise ValueError("forward: joint already decodes both paths; do not also pass discrete=True")
            return self.joint(x, sample, generator)
        if not discrete:
            posterior = self.encode(x)
            z = posterior.sample(generator) if sample else posterior.mode()
            return self.decode(z), posterior
        posterior, mean_first = self._encode_parts(x)
        values, first_values, _ = self._quantise_parts(posterior.mean, mean_first)
        return self._decode_values(values, first_values), posterior

    def joint(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> JointOutput:
        """Run the encoder once and decode both paths (OneVAE's joint objective): the continuous
        reconstruction of a posterior sample (or the mean) and the discrete one of the quantised mean."""
        posterior, mean_first = self._encode_parts(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        values, first_values, tokens = self._quantise_parts(posterior.mean, mean_first)
        return JointOutput(self.decode(z), self._decode_values(values, first_values), posterior, tokens)

    # --- discrete path ----------------------------------------------------------------------------
    def _require_discrete(self) -> None:
        if self.quantizer is None:
            raise ValueError("this OneVAE has no discrete head (config.fsq_levels is empty)")

    def _encode_parts(self, x: Tensor) -> tuple[DiagonalGaussian, Tensor | None]:
        """Whole clip -> (posterior, frame 0's hi-res latent mean (N, z, 1, 2h, 2w) or None)."""
        self._require_discrete()
        self.check_input(x)
        moments, first, _ = self.encode_chunk_parts(x, None)
        return self.posterior(moments), first

    def encode_chunk_parts(
        self, x: Tensor, cache: CausalCache | None
    ) -> tuple[Tensor, Tensor | None, CausalCache | None]:
        """Like :meth:`encode_chunk`, plus, with first-frame boost and a chunk that starts the clip,
        frame 0's hi-res latent mean: frame 0's features before the encoder's last downsampler run
        the remaining layers cache-free (frame 0 sees only zero padding in time anyway)."""
        h, cache, first = self.encoder.body(x, cache, keep_first=self.config.first_frame_boost)
        moments, cache = self.encode_head(h, cache)
        if first is not None:
            first_moments, _ = self.encode_head(self.encoder.first_frame_tail(first), None)
            first = first_moments[:, : self.latent_channels]
        return moments, first, cache

    def quantise(self, mean: Tensor) -> tuple[Tensor, Tensor]:
        """Raw latent means (N, z, T, h, w) -> (FSQ values (N, groups * len(levels), T, h, w) with
        straight-through gradients, token indices int64 (N, groups, T, h, w))."""
        self._require_discrete()
        h = self.quant_conv(mean.movedim(1, -1)).movedim(-1, 1)
        out = self.quantizer(h)
        return out.values, out.indices

    def _quantise_parts(self, mean: Tensor, mean_first: Tensor | None) -> tuple[Tensor, Tensor | None, Tokens]:
        if self.config.first_frame_boost:
            # frame 0's regular latent is not tokenised: its hi-res latent stands in for it
            mean = mean[:, :, 1:]
        values, indices = self.quantise(mean)
        first_values = first_indices = None
        if mean_first is not None:
            first_values, first_indices = self.quantise(mean_first)
        return values, first_values, Tokens(indices, first_indices)

    def dequantise(self, values: Tensor) -> Tensor:
        """FSQ values (N, groups * len(levels), ...) -> latents (N, z, ...) (``post_quant_conv``)."""
        self._require_discrete()
        return self.post_quant_conv(values.movedim(1, -1)).movedim(-1, 1)

    def tokens_to_latents(self, tokens: Tokens) -> tuple[Tensor, Tensor | None]:
        """Token indices -> (latents of ``rest``, frame 0's hi-res latent or None), both after
        ``post_quant_conv`` (what the decoder's stream and hi-res branch take)."""
        self._require_discrete()
        if tokens.rest.ndim != 5 or tokens.rest.shape[1] != self.config.fsq_groups:
            raise ValueError(
                f"expected tokens.rest (N, {self.config.fsq_groups}, T, h, w), got {tuple(tokens.rest.shape)}"
            )
        if (tokens.first is not None) != self.config.first_frame_boost:
            raise ValueError("tokens.first must be given exactly when the model has first_frame_boost")
        z = self.dequantise(self.quantizer.indices_to_codes(tokens.rest).to(self.post_quant_conv.weight.dtype))
        first = None
        if tokens.first is not None:
            n, g, _, h, w = tokens.rest.shape
            if tokens.first.shape != (n, g, 1, 2 * h, 2 * w):
                raise ValueError(
                    f"tokens.first {tuple(tokens.first.shape)} does not match rest {tuple(tokens.rest.shape)}"
                )
            codes = self.quantizer.indices_to_codes(tokens.first).to(self.post_quant_conv.weight.dtype)
            first = self.dequantise(codes)
        return z, first

    def decode_parts_chunk(
        self, z: Tensor, cache: CausalCache | None, z_first: Tensor | None = None
    ) -> tuple[Tensor, CausalCache | None]:
        """Decode one chunk of dequantised latents (after ``post_quant_conv``). ``z_first``: frame 0's
        hi-res latent (first-frame boost, chunk that starts the clip only).

        Frame 0's slot in the latent stream is ``decoder.downsample_highres_first(z_first)`` (not
        through ``conv2``, as in the official code) and latents 1.. follow it; the hi-res branch's own
        features replace frame 0 after the first up level. The official ``VAE_.decode`` (vae81616_hybrid)
        instead builds ``conv2(z)`` with its first latent duplicated in front, runs 1 + T' steps and
        overwrites the duplicate (and later frame 0's features) in place: given exactly ``z`` =
        latents 1.. it decodes what we do, but handed all latents (frame 0's included) it silently
        decodes one latent too many. We build [slot, latents 1..] and write into no tensor."""
        h, cache = self.decode_parts_stem(z, cache, z_first)
        first = None if z_first is None else self.decoder.first_frame_features(z_first)
        return self.decoder.body(h, cache, first)

    def decode_parts_stem(
        self, z: Tensor, cache: CausalCache | None, z_first: Tensor | None = None
    ) -> tuple[Tensor, CausalCache | None]:
        """conv2 (for ``z``), frame 0's slot (for ``z_first``), conv_in and mid block."""
        parts = []
        if z_first is not None:
            parts.append(self.decoder.downsample_highres_first(z_first)[0])
        if z.shape[2]:
            h, cache = self.conv2(z, cache)
            parts.append(h)
        if not parts:
            raise ValueError("nothing to decode: no latent frames")
        return self.decoder.stem(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0], cache)

    def _decode_values(self, values: Tensor, first_values: Tensor | None) -> Tensor:
        z_first = None if first_values is None else self.dequantise(first_values)
        return self.decode_parts_chunk(self.dequantise(values), None, z_first)[0]

    def make_tokens(self, rest: Tensor, first: Tensor | None) -> Tokens:
        """Wrap index tensors as :class:`Tokens` (lets the engine stay model-agnostic)."""
        return Tokens(rest, first)

    def tokenize(self, x: Tensor) -> Tokens:
        """Whole clip NCTHW in [-1, 1] -> :class:`Tokens` of the quantised posterior mean."""
        posterior, mean_first = self._encode_parts(x)
        return self._quantise_parts(posterior.mean, mean_first)[2]

    def detokenize(self, tokens: Tokens) -> Tensor:
        """:class:`Tokens` -> video NCTHW, nominally in [-1, 1] (not clamped)."""
        z, z_first = self.tokens_to_latents(tokens)
        return self.decode_parts_chunk(z, None, z_first)[0]

    def tokenize_video(self, video: Tensor, **engine_options):
        """Chunked (and, without first-frame boost, tiled) tokenisation of a (1, 3, T, H, W) clip in
        [-1, 1] of any size through :mod:`videovae.engine`; returns
        :class:`videovae.engine.TokenizeResult` (``.tokens``, ``.geometry``)."""
        from videovae.engine import tokenize_tensor

        return tokenize_tensor(self, video, **engine_options)

    def detokenize_video(self, tokens: Tokens, geometry=None, **engine_options) -> Tensor:
        """Chunked decode of :class:`Tokens` to (1, 3, T, H, W) float32 in [-1, 1] (not clamped),
        cropped to ``geometry`` when given."""
        from videovae.engine import detokenize_tensor

        return detokenize_tensor(self, tokens, geometry, **engine_options)

    def posterior(self, moments: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(moments, self.config.logvar_min, self.config.logvar_max)

    # --- chunks ---------------------------------------------------------------------------------
    def encode_chunk(self, x: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """One time chunk of video -> moments (N, 2z, t', h, w); the cache carries state forward."""
        h, cache = self.encode_body(x, cache)
        return self.encode_head(h, cache)

    def encode_body(self, x: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """The full-resolution, convolution-only part of encoding (what the engine tiles)."""
        h, cache, _ = self.encoder.body(x, cache)
        return h, cache

    def encode_head(self, h: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """The latent-resolution part of encoding (mid block with attention, conv1): run untiled."""
        h, cache = self.encoder.head(h, cache)
        return self.conv1(h, cache)

    def decode_chunk(self, z: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        h, cache = self.decode_stem(z, cache)
        return self.decode_body(h, cache)

    def decode_stem(self, z: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """The latent-resolution part of decoding (conv2, conv_in, mid block): run untiled."""
        z, cache = self.conv2(z, cache)
        return self.decoder.stem(z, cache)

    def decode_body(self, h: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """The upsampling, convolution-only part of decoding (what the engine tiles)."""
        return self.decoder.body(h, cache)

    # --- latent scaling ---------------------------------------------------------------------------
    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor] | None:
        cfg = self.config
        if not cfg.latents_mean:
            return None
        shape = (1, -1) + (1,) * (z.ndim - 2)
        mean = torch.tensor(cfg.latents_mean, dtype=z.dtype, device=z.device).view(shape)
        std = torch.tensor(cfg.latents_std, dtype=z.dtype, device=z.device).view(shape)
        return mean, std

    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw latents (N, z, ...) -> diffusion-ready ``(z - latents_mean) / latents_std`` per channel."""
        stats = self._stats(z)
        return z if stats is None else (z - stats[0]) / stats[1]

    def unscale_latents(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`scale_latents`."""
        stats = self._stats(z)
        return z if stats is None else z * stats[1] + stats[0]

    # --- engine -----------------------------------------------------------------------------------
    def encode_video(self, video: Tensor, **engine_options):
        """Chunked/tiled encode of a (1, 3, T, H, W) clip in [-1, 1] of any T, H, W (padded, and the
        padding recorded). Returns :class:`videovae.engine.EncodeResult`. Options:
        :class:`videovae.engine.EngineOptions`."""
        from videovae.engine import encode_tensor

        return encode_tensor(self, video, **engine_options)

    def decode_video(self, z: Tensor, geometry=None, **engine_options) -> Tensor:
        """Chunked/tiled decode of raw latents (1, z, T', h, w) to (1, 3, T, H, W) float32 in
        [-1, 1] (not clamped), cropped back to ``geometry`` (from ``encode_video``) when given."""
        from videovae.engine import decode_tensor

        return decode_tensor(self, z, geometry, **engine_options)

    def decoder_receptive_radius(self) -> float:
        """Spatial receptive radius of the decoder body (the tiled part) in latent pixels."""
        return _decoder_radius(self.config)

    def encoder_receptive_radius(self) -> float:
        """Spatial receptive radius of the encoder body (the tiled part) in latent pixels."""
        return _encoder_radius(self.config)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: encoder side (encoder, conv1, quant_conv), decoder side (the rest)."""

        def count(m: nn.Module | None) -> int:
            return 0 if m is None else sum(p.numel() for p in m.parameters())

        enc = count(self.encoder) + count(self.conv1) + count(getattr(self, "quant_conv", None))
        total = count(self)
        return {"encoder": enc, "decoder": total - enc, "total": total}


def _encoder_radius(cfg: OneVAEConfig) -> float:
    """Reach of the encoder body (conv_in and down levels) in latent pixels: every 3x3 conv adds one
    pixel at its own resolution, a stride-2 conv after (0, 1) padding two input pixels."""
    levels = len(cfg.channel_mult)
    scale = float(cfg.space_factor)  # input pixels per latent pixel at the current level
    radius = 1.0 / scale  # conv_in
    for i in range(levels):
        radius += 2 * cfg.num_res_blocks / scale
        if i < levels - 1:
            radius += 2.0 / scale
            scale /= 2
    return radius


def _decoder_radius(cfg: OneVAEConfig) -> float:
    """Reach of the decoder body (up levels, conv_out) in latent pixels; the upsampler's 3x3 conv
    runs after the nearest 2x, so it reaches one pixel of the finer level."""
    levels = len(cfg.channel_mult)
    scale = 1.0  # output pixels per latent pixel at the current level
    radius = 0.0
    for i in range(levels):
        radius += 2 * (cfg.num_res_blocks + 1) / scale
        if i < levels - 1:
            scale *= 2
            radius += 1.0 / scale
    return radius + 1.0 / scale  # conv_out


# Wan 2.1's published per-channel latent statistics (diffusers AutoencoderKLWan config defaults).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

_TOKEN_FSQ = dict(fsq_levels=(8, 8, 8, 5, 5, 5), fsq_groups=2)

PRESETS: dict[str, OneVAEConfig] = {
    # The released Wan 2.1 VAE: 4x8x8, z=16, 96 x [1, 2, 4, 4], ~127 M parameters.
    "wan2.1": OneVAEConfig(latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD),
    # The Wan 2.1 backbone with OneVAE's token head: starts from converted Wan 2.1 weights
    # (`model.init_backbone`), the recipe of quantising a trained continuous VAE.
    "wan2.1-fsq": OneVAEConfig(latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD, **_TOKEN_FSQ),
    # Small, for tests and CPU demos: 4x8x8, z=8.
    "onevae-tiny": OneVAEConfig(
        base_channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, latent_channels=8,
        fsq_levels=(5, 5, 5), fsq_groups=2,
    ),
    # Small token models for CPU studies (benchmarks/onevae_study.py), one backbone: 4x8x8, z=16,
    # 2 tokens of FSQ(8, 5, 5, 5) (1000 codes) per position; one token; first-frame strengthening.
    "onevae-small": OneVAEConfig(
        base_channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=1, fsq_levels=(8, 5, 5, 5), fsq_groups=2,
    ),
    "onevae-small-1tok": OneVAEConfig(
        base_channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=1, fsq_levels=(8, 5, 5, 5), fsq_groups=1,
    ),
    "onevae-small-fe": OneVAEConfig(
        base_channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=1, fsq_levels=(8, 5, 5, 5), fsq_groups=2,
        first_frame_boost=True,
    ),
    # OneVAE token models: the z=256 Wan backbone with a 2 x FSQ(8, 8, 8, 5, 5, 5) head
    # (2 tokens of a 64000-entry codebook per latent position).
    "onevae-488": OneVAEConfig(latent_channels=256, **_TOKEN_FSQ),
    # config_OneVAE/OneVAE_64000_FSQ_888_33_mt2.yaml
    "onevae-888": OneVAEConfig(latent_channels=256, temporal_down=(True, True, True), **_TOKEN_FSQ),
    # vae81616_hybrid.py defaults (dim_mult [1, 2, 4, 4, 4], temporal_down [F, F, T, T]): 4x16x16
    "onevae-41616": OneVAEConfig(
        latent_channels=256, channel_mult=(1, 2, 4, 4, 4), temporal_down=(False, False, True, True),
        first_frame_boost=True, **_TOKEN_FSQ,
    ),
    # config_OneVAE/OneVAE_64000_FSQ_81616_33_mt2_fe.yaml (temporal_down [F, T, T, T]): 8x16x16
    "onevae-81616": OneVAEConfig(
        latent_channels=256, channel_mult=(1, 2, 4, 4, 4), temporal_down=(False, True, True, True),
        first_frame_boost=True, **_TOKEN_FSQ,
    ),
}


# --- conversion of Wan 2.1 / diffusers / official OneVAE weights ------------------------------------

# Official layouts: "wan" (Wan2.1_VAE.pth and the ``model.`` part of OneVAE checkpoints, module
# names of WanVAE_ / VAE_) and "diffusers" (AutoencoderKLWan).
_LAYOUTS = ("wan", "diffusers")
# leaf names (ours, theirs) per kind of module: our CausalConv3d keeps its weight in ``.conv``, our
# RMSNorm calls the official ``gamma`` ``weight``.
_LEAVES = {
    "conv": (("conv.weight", "weight"), ("conv.bias", "bias")),
    "plain": (("weight", "weight"), ("bias", "bias")),
    "norm": (("weight", "gamma"),),
}


def _res_pairs(ours: str, theirs: str, layout: str, shortcut: bool) -> list[tuple[str, str, str]]:
    if layout == "wan":  # ResidualBlock.residual = [norm, SiLU, conv, norm, SiLU, Dropout, conv]
        names = (("norm1", "residual.0"), ("conv1", "residual.2"), ("norm2", "residual.3"), ("conv2", "residual.6"),
                 ("nin_shortcut", "shortcut"))
    else:
        names = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                 ("nin_shortcut", "conv_shortcut"))
    pairs = []
    for a, b in names:
        if a == "nin_shortcut" and not shortcut:
            continue
        pairs.append((f"{ours}.{a}", f"{theirs}.{b}", "norm" if a.startswith("norm") else "conv"))
    return pairs


def _mid_pairs(ours: str, side: str, layout: str) -> list[tuple[str, str, str]]:
    if layout == "wan":
        blocks = (f"{side}.middle.0", f"{side}.middle.1", f"{side}.middle.2")
    else:
        blocks = (f"{side}.mid_block.resnets.0", f"{side}.mid_block.attentions.0", f"{side}.mid_block.resnets.1")
    pairs = _res_pairs(f"{ours}.block_1", blocks[0], layout, False)
    pairs += [
        (f"{ours}.attn_1.norm", f"{blocks[1]}.norm", "norm"),
        (f"{ours}.attn_1.to_qkv", f"{blocks[1]}.to_qkv", "plain"),
        (f"{ours}.attn_1.proj", f"{blocks[1]}.proj", "plain"),
    ]
    return pairs + _res_pairs(f"{ours}.block_2", blocks[2], layout, False)


def official_name_table(cfg: OneVAEConfig, layout: str) -> list[tuple[str, str, str]]:
    """(our module prefix, official module prefix, kind) for every weight-carrying module of the
    Wan / OneVAE VAE in ``layout`` ('wan': WanVAE_ / OneVAE VAE_ names; 'diffusers':
    AutoencoderKLWan names), built by walking the architecture as the official constructors do:
    encoder and decoder blocks are one flat, numbered list of residual blocks and resamplers."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    wan = layout == "wan"
    levels = len(cfg.channel_mult)
    enc_dims, dec_dims = _encoder_channels(cfg), _decoder_channels(cfg)
    table = [("encoder.conv_in", "encoder.conv1" if wan else "encoder.conv_in", "conv")]
    flat = 0
    blocks = "encoder.downsamples" if wan else "encoder.down_blocks"
    for i in range(levels):
        cin = enc_dims[i]
        for j in range(cfg.num_res_blocks):
            table += _res_pairs(f"encoder.down.{i}.block.{j}", f"{blocks}.{flat}", layout, cin != enc_dims[i + 1])
            cin = enc_dims[i + 1]
            flat += 1
        if i < levels - 1:
            table.append((f"encoder.down.{i}.downsample.conv", f"{blocks}.{flat}.resample.1", "plain"))
            if cfg.temporal_down[i]:
                table.append((f"encoder.down.{i}.downsample.time_conv", f"{blocks}.{flat}.time_conv", "plain"))
            flat += 1
    table += _mid_pairs("encoder.mid", "encoder", layout)
    table.append(("encoder.norm_out", "encoder.head.0" if wan else "encoder.norm_out", "norm"))
    table.append(("encoder.conv_out", "encoder.head.2" if wan else "encoder.conv_out", "conv"))
    table.append(("conv1", "conv1" if wan else "quant_conv", "conv"))
    table.append(("conv2", "conv2" if wan else "post_quant_conv", "conv"))
    table.append(("decoder.conv_in", "decoder.conv1" if wan else "decoder.conv_in", "conv"))
    table += _mid_pairs("decoder.mid", "decoder", layout)
    flat = 0
    for step in range(levels):
        ours = f"decoder.up.{levels - 1 - step}"
        cin = dec_dims[step] // 2 if step > 0 else dec_dims[step]
        for j in range(cfg.num_res_blocks + 1):
            theirs = f"decoder.upsamples.{flat}" if wan else f"decoder.up_blocks.{step}.resnets.{j}"
            table += _res_pairs(f"{ours}.block.{j}", theirs, layout, cin != dec_dims[step + 1])
            cin = dec_dims[step + 1]
            flat += 1
        if step < levels - 1:
            theirs = f"decoder.upsamples.{flat}" if wan else f"decoder.up_blocks.{step}.upsamplers.0"
            table.append((f"{ours}.upsample.conv", f"{theirs}.resample.1", "plain"))
            if cfg.temporal_down[levels - 2 - step]:
                table.append((f"{ours}.upsample.time_conv", f"{theirs}.time_conv", "conv"))
            flat += 1
    table.append(("decoder.norm_out", "decoder.head.0" if wan else "decoder.norm_out", "norm"))
    table.append(("decoder.conv_out", "decoder.head.2" if wan else "decoder.conv_out", "conv"))
    if cfg.first_frame_boost:
        if not wan:
            raise ValueError("first_frame_boost exists in the official OneVAE layout only")
        table.append(("decoder.downsample_highres_first.conv", "decoder.downsample_highres_first.resample.1", "plain"))
        table.append(("decoder.upsample_highres", "decoder.upsample_highres.resample", "plain"))
    return table


def official_key_map(cfg: OneVAEConfig, layout: str, prefix: str = "") -> dict[str, tuple[str, str]]:
    """Official key (with ``prefix`` in front) -> (our key, kind), for every weight of the VAE."""
    out = {}
    for ours, theirs, kind in official_name_table(cfg, layout):
        for a, b in _LEAVES[kind]:
            out[f"{prefix}{theirs}.{b}"] = (f"{ours}.{a}", kind)
    return out


def _map_state(state: dict[str, Tensor], key_map: dict[str, tuple[str, str]], model: nn.Module,
               source: str, what: str) -> dict[str, Tensor]:
    """Rename ``state`` through ``key_map`` (unknown keys: error naming them); RMSNorm gammas
    ((C, 1, 1[, 1]) officially) are flattened to our (C,)."""
    unknown = sorted(k for k in state if k not in key_map)
    if unknown:
        shown = ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        raise CheckpointError(f"{source}: keys that are not {what} weights: {shown}")
    own = model.state_dict()
    mapped = {}
    for key, value in state.items():
        ours, kind = key_map[key]
        value = value.float()
        if kind == "norm" and ours in own and value.numel() == own[ours].numel() and value.ndim > 1:
            value = value.reshape(own[ours].shape)
        mapped[ours] = value
    return mapped


def _infer_architecture(state: dict[str, Tensor], layout: str, source: str) -> dict[str, Any]:
    """Base channels, channel_mult, num_res_blocks, temporal_down and z of an official state dict,
    read from the weight shapes of its flat encoder block list."""
    wan = layout == "wan"
    conv_in = "encoder.conv1.weight" if wan else "encoder.conv_in.weight"
    post = "conv2.weight" if wan else "post_quant_conv.weight"
    blocks = "encoder.downsamples." if wan else "encoder.down_blocks."
    res_leaf = "residual.2.weight" if wan else "conv1.weight"
    if conv_in not in state or post not in state:
        raise CheckpointError(f"{source}: no {conv_in} / {post}: not a Wan/OneVAE VAE state dict "
                              f"in the {layout} layout")
    base = state[conv_in].shape[0]
    mult: list[int] = []
    temporal: list[bool] = []
    res_counts: list[int] = []
    count = 0
    index = 0
    while True:
        p = f"{blocks}{index}."
        if p + res_leaf in state:
            count += 1
            cout = state[p + res_leaf].shape[0]
        elif p + "resample.1.weight" in state:
            mult.append(cout // base)
            temporal.append(p + "time_conv.weight" in state)
            res_counts.append(count)
            count = 0
        else:
            break
        index += 1
    if count == 0:
        raise CheckpointError(f"{source}: cannot read the encoder levels from {blocks}*")
    mult.append(cout // base)
    res_counts.append(count)
    if len(set(res_counts)) != 1:
        raise CheckpointError(f"{source}: levels have different residual block counts {res_counts}")
    return dict(base_channels=base, channel_mult=tuple(mult), num_res_blocks=res_counts[0],
                temporal_down=tuple(temporal), latent_channels=state[post].shape[0])


# diffusers AutoencoderKLWan config.json fields that do not change the weights (or that we check).
_DIFFUSERS_FIELDS = {
    "_class_name", "_diffusers_version", "_name_or_path", "base_dim", "decoder_base_dim", "z_dim", "dim_mult",
    "num_res_blocks", "attn_scales", "temperal_downsample", "dropout", "latents_mean", "latents_std", "is_residual",
    "in_channels", "out_channels", "patch_size", "scale_factor_temporal", "scale_factor_spatial", "clip_output",
}


def config_from_diffusers(cfg: dict[str, Any]) -> OneVAEConfig:
    """An ``AutoencoderKLWan`` config.json -> :class:`OneVAEConfig` (missing fields: the diffusers
    defaults, i.e. Wan 2.1). Wan 2.2 options (residual blocks, patching) raise ``ValueError``."""
    problems = []
    unknown = sorted(set(cfg) - _DIFFUSERS_FIELDS)
    if unknown:
        problems.append(f"unknown fields {', '.join(unknown)}")
    if cfg.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        problems.append(f"_class_name={cfg.get('_class_name')!r} (expected AutoencoderKLWan)")
    base = int(cfg.get("base_dim", 96))
    if cfg.get("decoder_base_dim") not in (None, base):
        problems.append("decoder_base_dim must equal base_dim")
    if cfg.get("attn_scales", []):
        problems.append("attn_scales must be empty")
    if cfg.get("is_residual", False):
        problems.append("is_residual=True (Wan 2.2 layout) is not supported")
    if cfg.get("patch_size") not in (None, 1):
        problems.append("patch_size is not supported")
    if cfg.get("in_channels", 3) != 3 or cfg.get("out_channels", 3) != 3:
        problems.append("in_channels / out_channels must be 3")
    if problems:
        raise ValueError("unsupported AutoencoderKLWan config: " + "; ".join(problems))
    z = int(cfg.get("z_dim", 16))
    mean = tuple(float(v) for v in cfg.get("latents_mean", WAN21_LATENTS_MEAN if z == 16 else ()))
    std = tuple(float(v) for v in cfg.get("latents_std", WAN21_LATENTS_STD if z == 16 else ()))
    return OneVAEConfig(
        base_channels=base,
        channel_mult=tuple(int(m) for m in cfg.get("dim_mult", (1, 2, 4, 4))),
        num_res_blocks=int(cfg.get("num_res_blocks", 2)),
        temporal_down=tuple(bool(t) for t in cfg.get("temperal_downsample", (False, True, True))),
        latent_channels=z,
        dropout=float(cfg.get("dropout", 0.0)),
        latents_mean=mean,
        latents_std=std,
    )


def _read_source(src: str | os.PathLike) -> tuple[Path, Any, dict | None]:
    """(weights file, its object, config.json beside it or None)."""
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    weights = find_weights(path) if path.is_dir() else path
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
    return weights, read_weights(weights), config


def convert_wan(src: str | os.PathLike, *, prefer_ema: bool = True, config: dict | None = None) -> OneVAE:
    """Load Wan 2.1 VAE weights into a :class:`OneVAE` (fp32, eval mode).

    ``src``: the original ``Wan2.1_VAE.pth`` (a plain state dict with WanVAE_ names, read with
    ``torch.load(weights_only=True)``), or a diffusers ``AutoencoderKLWan`` folder (``config.json``
    + ``diffusion_pytorch_model.safetensors``, fp16 or fp32) or weights file. The layout is told
    by the key names. The architecture comes from ``config`` (an AutoencoderKLWan config dict),
    else ``config.json`` beside the weights, else the weight shapes (latent statistics: Wan 2.1's
    for z=16). Unknown, missing or mis-shaped keys raise :class:`CheckpointError` naming them.
    ``prefer_ema`` is accepted for a uniform converter signature (Wan releases have no EMA).
    """
    weights, obj, found = _read_source(src)
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{weights}: expected a plain state dict of tensors")
    state = {k[len("vae.") :] if k.startswith("vae.") else k: v for k, v in obj.items()}
    layout = "diffusers" if "encoder.conv_in.weight" in state else "wan"
    config = config if config is not None else found
    if config is not None:
        cfg = config_from_diffusers(config)
    else:
        arch = _infer_architecture(state, layout, str(weights))
        stats = {}
        if arch["latent_channels"] == 16:
            stats = dict(latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD)
        cfg = OneVAEConfig(**arch, **stats)
    model = OneVAE(cfg)
    mapped = _map_state(state, official_key_map(cfg, layout), model, str(weights), f"Wan 2.1 VAE ({layout})")
    load_state_dict_strict(model, mapped, source=str(weights))
    return model.eval()


# Official OneVAE (models/video_base_model.py VideoBaseModel, a LightningModule): the VAE is
# ``model.`` (VAE_One, Wan names), the FSQ projections are ``quant_conv`` / ``post_quant_conv``
# (Linear), EMA copies are LitEma buffers named without dots (``ema_model.encoderconv1weight``,
# ``ema_quant_conv.weight``, ...). Dropped: the loss / discriminator, the codebook usage counter,
# the EMA bookkeeping and the FSQ's constant buffers (levels and basis follow from the config).
_OFFICIAL_DROPPED = ("loss.", "discriminator.", "disc_model.", "codebook_used", "ema_quantize.")
_OFFICIAL_CONSTANT = re.compile(r"(ema_model|ema_quant_conv|ema_post_quant_conv)\.(decay|num_updates)$|"
                                r"quantize\.(_levels|_basis|implicit_codebook)$")
# The one FSQ setting of the released OneVAE configs (config_OneVAE/*.yaml quant_config).
OFFICIAL_FSQ_LEVELS = (8, 8, 8, 5, 5, 5)


def official_config(state: dict[str, Tensor], source: str = "checkpoint", **overrides) -> OneVAEConfig:
    """The :class:`OneVAEConfig` of an official OneVAE state dict (``model.`` keys, ``quant_conv``),
    read from the weight shapes: levels, blocks, time downsampling (``time_conv`` present), z,
    first-frame boost (``upsample_highres`` present), and FSQ groups = quant_conv width / 6 with the
    released levels (8, 8, 8, 5, 5, 5). ``overrides`` replace any field."""
    inner = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    fields_ = _infer_architecture(inner, "wan", source)
    if "quant_conv.weight" in state:
        width = state["quant_conv.weight"].shape[0]
        levels = overrides.get("fsq_levels", OFFICIAL_FSQ_LEVELS)
        if width % len(levels):
            raise CheckpointError(f"{source}: quant_conv width {width} is not a multiple of {len(levels)} FSQ "
                                  "levels: pass the config")
        fields_.update(fsq_levels=tuple(levels), fsq_groups=width // len(levels))
    fields_["first_frame_boost"] = "model.decoder.upsample_highres.resample.weight" in state
    fields_.update(overrides)
    return OneVAEConfig(**fields_)


def _official_key_map(cfg: OneVAEConfig) -> dict[str, tuple[str, str]]:
    key_map = official_key_map(cfg, "wan", prefix="model.")
    if cfg.discrete:
        for name in ("quant_conv", "post_quant_conv"):
            for leaf in ("weight", "bias"):
                key_map[f"{name}.{leaf}"] = (f"{name}.{leaf}", "plain")
    return key_map


def _ema_name(key: str) -> str:
    """LitEma's buffer for official key ``key`` (dots are not allowed in buffer names)."""
    module, rest = key.split(".", 1)
    return f"ema_{module}.{rest.replace('.', '')}" if module == "model" else f"ema_{module}.{rest}"


def convert_official(src: str | os.PathLike, *, prefer_ema: bool = True, config: dict | None = None) -> OneVAE:
    """Load an official OneVAE checkpoint (the Lightning ``.ckpt`` of models/video_base_model.py, or
    its plain state dict) into a :class:`OneVAE` (fp32, eval mode). With ``prefer_ema`` the EMA
    weights are used when the checkpoint has a complete set. The architecture is read from the
    weights (:func:`official_config`); ``config`` (OneVAEConfig fields) overrides it. Unknown,
    missing or mis-shaped keys raise :class:`CheckpointError` naming them."""
    weights, obj, _ = _read_source(src)
    state = unwrap_training_state(obj, prefer_ema=False, source=str(weights), rename=strip_module,
                                  dropped=_OFFICIAL_DROPPED)
    state = {k: v for k, v in state.items() if not _OFFICIAL_CONSTANT.fullmatch(k)}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in (config or {}).items()}
    cfg = official_config(state, str(weights), **overrides)
    key_map = _official_key_map(cfg)
    ema = {_ema_name(k): k for k in key_map}
    ema_state = {ema[k]: v for k, v in state.items() if k in ema}
    if prefer_ema and ema_state and set(ema_state) == {k for k in key_map if k in state}:
        chosen = ema_state
    else:
        chosen = {k: v for k, v in state.items() if k not in ema}
    model = OneVAE(cfg)
    mapped = _map_state(chosen, key_map, model, str(weights), "OneVAE")
    load_state_dict_strict(model, mapped, source=str(weights))
    return model.eval()
