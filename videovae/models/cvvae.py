"""CV-VAE (AILab-CVC/CV-VAE): a causal 3D VAE whose latent space stays compatible with an image VAE.

Two official layouts, one module tree (state-dict names follow the SD 2.1 ``CVVAEModel``):

* ``sd21`` (``CVVAEModel``, compatible with SD 2.1): 4x8x8, z=4, 128 x [1, 2, 4, 4], 2 encoder /
  3 decoder residual blocks per level, GroupNorm(32, eps 1e-5) over (C/G, T, H, W) of the clip
  in the residual blocks and per frame in the attention blocks, spatial zero padding everywhere;
* ``sd3`` (``CVVAESD3Model``, compatible with SD3): the same layout with 16 latent channels,
  GroupNorm eps 1e-6, 3D convs padded by replication in space and time, 1x1 shortcuts per frame,
  no temporal attention, diffusers-style names (mapped by :func:`convert_official`).

Blocks: "2D+3D" residual blocks (``conv1`` 3D, ``conv2`` a per-frame 2D conv; ``half_3d=False``
makes both 3D). Encoder 3D convs are causal: the first frame is repeated twice in front. Decoder
3D convs pad time on both sides (zeros in ``sd21``, replication in ``sd3``): they look one frame
ahead, so the official decoder is not causal. Time is halved by the encoder downsamplers of
levels 0 and 2 (3x3x3 stride 2 after causal time padding) and doubled by the decoder upsamplers
of levels 3 and 1: nearest 2x in space, a 3x3x3 conv to 2C channels, the two halves interleaved
into 2T frames, the first frame of the clip dropped (T -> 2T - 1). Mid blocks: per-frame spatial
single-head attention in the encoder; in the ``sd21`` decoder, spatial attention followed by
attention over all frames at each position (one residual around both). No quant_conv or
post_quant_conv; latents are scaled by 0.18215 (``sd21``).

Video in: NCTHW, values in [-1, 1], T = 1 + 4k, H and W multiples of 8. Latent:
(N, z, 1 + k, H/8, W/8). Decoder output: NCTHW, nominally in [-1, 1], not clamped.

Streaming: clip GroupNorm, two-sided time padding and full temporal attention make chunked
inference of ``cv-vae`` inexact (chunks see only themselves; the decoder pads the front of a
chunk with the previous chunk's last frame and the back with zeros). ``cv-vae-stream`` has the
same weight shapes with per-frame GroupNorm, causal time padding in the decoder (first frame
repeated, as the encoder) and causal temporal attention (a latent frame attends to itself and
the frames before it; keys and values of earlier chunks are kept in the cache, so the cache
grows by 2 x C x h x w values per latent frame): chunked equals whole clip exactly.

Nothing here is copied from the official code; the behaviour was read from AILab-CVC/CV-VAE
(``models/modeling_vae.py``, ``models/vae_models.py``, ``models/vae_blocks3d_sd3.py``).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from videovae.layers import (
    CausalCache,
    CausalModule,
    Conv2dPerFrame,
    Norm,
    assign_cache_keys,
    single_head_attention,
)
from videovae.models.causal_vae import DiagonalGaussian
from videovae.statedict import (
    CheckpointError,
    find_weights,
    load_state_dict_strict,
    read_weights,
    unwrap_training_state,
)

LAYOUTS = ("sd21", "sd3")
TEMPORAL_ATTENTIONS = ("full", "causal", "none")
DECODER_TIME_PADS = ("both", "causal")
CV_NORMS = ("group_clip", "group_frame")


@dataclass(frozen=True)
class CVVAEConfig:
    """Architecture of a :class:`CVVAE` (stored in checkpoints and latent files).

    ``temporal_down[i]``: encoder level i halves time (the decoder mirrors it). ``norm``: the
    residual blocks' GroupNorm, ``group_clip`` (official, statistics over the clip) or
    ``group_frame``. ``decoder_time_pad``: ``both`` (official) or ``causal``.
    ``temporal_attention``: the decoder mid block's attention over time: ``full`` (official
    ``sd21``), ``causal`` or ``none`` (``sd3``). ``official_*``: the official windowed tiling
    (``en_de_n_frames_a_time``, ``tile_spatial_size``, ``tile_overlap_ratio``) used by
    ``--tiling official``; the official decode windows are ``official_decode_latents =
    official_frames / 4`` latents.
    """

    layout: str = "sd21"
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    half_3d: bool = True
    temporal_down: tuple[bool, ...] = (True, False, True)
    norm: str = "group_clip"
    norm_groups: int = 32
    norm_eps: float = 1e-5
    decoder_time_pad: str = "both"
    temporal_attention: str = "full"
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    official_frames: int = 16
    official_decode_latents: int = 4
    official_tile: int = 576
    official_overlap: float = 0.2222

    def __post_init__(self) -> None:
        problems = []
        levels = len(self.channel_mult)
        if self.layout not in LAYOUTS:
            problems.append(f"layout must be one of {LAYOUTS}")
        if len(self.temporal_down) != levels - 1:
            problems.append(f"temporal_down needs {levels - 1} entries, got {len(self.temporal_down)}")
        if self.norm not in CV_NORMS:
            problems.append(f"norm must be one of {CV_NORMS}")
        if self.decoder_time_pad not in DECODER_TIME_PADS:
            problems.append(f"decoder_time_pad must be one of {DECODER_TIME_PADS}")
        if self.temporal_attention not in TEMPORAL_ATTENTIONS:
            problems.append(f"temporal_attention must be one of {TEMPORAL_ATTENTIONS}")
        if self.layout == "sd3" and self.temporal_attention != "none":
            problems.append("the sd3 layout has no temporal attention (temporal_attention='none')")
        if any(self.base_channels * m % self.norm_groups for m in self.channel_mult):
            problems.append(f"channel counts must be multiples of norm_groups={self.norm_groups}")
        if self.official_frames % self.time_factor:
            problems.append("official_frames must be a multiple of the time factor")
        if problems:
            raise ValueError("invalid CVVAEConfig: " + "; ".join(problems))

    @property
    def time_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_down)

    @property
    def space_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def exactly_streamable(self) -> bool:
        """Chunked (cache-carrying) inference equals whole-clip inference."""
        return self.norm == "group_frame" and self.decoder_time_pad == "causal" and self.temporal_attention != "full"

    @property
    def halo_tiling_exact(self) -> bool:
        """GroupNorm statistics are per tile unless exchanged (``--tile-norm exact``)."""
        return False

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CVVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CVVAEConfig fields: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


# --- layers ----------------------------------------------------------------------------------------


class TimeConv3d(CausalModule):
    """3D convolution with CV-VAE's time padding; weight ``<name>.weight`` (o, i, kt, kh, kw).

    ``time_pad``: ``causal`` repeats the first frame ``kt - 1`` times in front (or, in streaming
    mode, takes the cached tail of the previous chunk); ``both`` pads ``(kt - 1) // 2`` frames on
    each side with zeros or copies (``time_fill``); in streaming mode the front comes from the
    previous chunk and only the back is filled, so chunked output differs near chunk ends.
    ``spatial_pad`` (left, right, top, bottom) is filled with zeros or copies (``space_fill``).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        *,
        time_pad: str = "causal",
        time_fill: str = "replicate",
        space_fill: str = "zeros",
        spatial_pad: tuple[int, int, int, int] | None = None,
    ):
        super().__init__()
        kt, kh, kw = (kernel,) * 3 if isinstance(kernel, int) else kernel
        self.kernel = (kt, kh, kw)
        self.stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        self.time_pad = time_pad
        self.time_fill = time_fill
        self.space_fill = space_fill
        self.spatial_pad = (kw // 2, kw // 2, kh // 2, kh // 2) if spatial_pad is None else tuple(spatial_pad)
        self.weight = nn.Parameter(torch.empty(cout, cin, kt, kh, kw))
        self.bias = nn.Parameter(torch.empty(cout))
        bound = 1 / math.sqrt(cin * kt * kh * kw)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def _fill(self, x: Tensor, frame: Tensor, count: int) -> Tensor:
        if self.time_fill == "zeros":
            return x.new_zeros(x.shape[0], x.shape[1], count, *x.shape[3:])
        return frame.expand(-1, -1, count, -1, -1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        kt, st = self.kernel[0], self.stride[0]
        tail = cache.get(self.cache_key) if cache is not None else None
        if self.time_pad == "causal":
            front = tail if tail is not None else self._fill(x, x[:, :, :1], kt - 1)
            padded = torch.cat([front.to(x.dtype), x], dim=2) if front.shape[2] else x
        else:
            half = (kt - 1) // 2
            front = tail if tail is not None else self._fill(x, x[:, :, :1], half)
            padded = torch.cat([front.to(x.dtype), x, self._fill(x, x[:, :, -1:], half)], dim=2)
        if padded.shape[2] < kt:
            raise ValueError(f"{self.cache_key or 'TimeConv3d'}: a chunk of {x.shape[2]} frames is too short")
        if any(self.spatial_pad):
            mode = "constant" if self.space_fill == "zeros" else "replicate"
            spatial = F.pad(padded.flatten(1, 2), self.spatial_pad, mode=mode).unflatten(1, padded.shape[1:3])
        else:
            spatial = padded
        y = F.conv3d(spatial, self.weight, self.bias, self.stride)
        if cache is not None and kt > 1:
            if self.time_pad == "causal":
                keep = padded[:, :, y.shape[2] * st :]
            else:
                keep = x[:, :, x.shape[2] - (kt - 1) // 2 :]
            cache.set(self.cache_key, keep.detach().clone())
        return y, cache


def _norm(cfg: CVVAEConfig, channels: int, per_frame: bool = False) -> Norm:
    return Norm("group_frame" if per_frame else cfg.norm, channels, cfg.norm_groups, cfg.norm_eps)


def _conv3d(cfg: CVVAEConfig, cin: int, cout: int, kernel: int, decoder: bool, **kw) -> TimeConv3d:
    sd3 = cfg.layout == "sd3"
    time_pad = cfg.decoder_time_pad if decoder else "causal"
    time_fill = "replicate" if (sd3 or time_pad == "causal") else "zeros"
    return TimeConv3d(
        cin, cout, kernel, time_pad=time_pad, time_fill=time_fill, space_fill="replicate" if sd3 else "zeros", **kw
    )


def _apply(conv: nn.Module, x: Tensor, cache: CausalCache | None) -> Tensor:
    return conv(x, cache)[0] if isinstance(conv, TimeConv3d) else conv(x)


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 (3D) -> norm2 -> SiLU -> conv2 (per-frame 2D, or 3D) + shortcut."""

    def __init__(self, cfg: CVVAEConfig, cin: int, cout: int, decoder: bool):
        super().__init__()
        self.norm1 = _norm(cfg, cin)
        self.conv1 = _conv3d(cfg, cin, cout, 3, decoder)
        self.norm2 = _norm(cfg, cout)
        if cfg.half_3d:
            self.conv2 = Conv2dPerFrame(cout, cout, 3, padding=1)
        else:
            self.conv2 = _conv3d(cfg, cout, cout, 3, decoder)
        if cin == cout:
            self.nin_shortcut = None
        elif cfg.layout == "sd3":
            self.nin_shortcut = Conv2dPerFrame(cin, cout, 1)
        else:
            self.nin_shortcut = _conv3d(cfg, cin, cout, 1, decoder)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        h = _apply(self.conv1, self.norm1(x, silu=True, cache=cache), cache)
        h = _apply(self.conv2, self.norm2(h, silu=True, cache=cache), cache)
        skip = x if self.nin_shortcut is None else _apply(self.nin_shortcut, x, cache)
        return skip + h, cache


class Downsample(nn.Module):
    """Causal 3x3x3 conv, stride 2 in T, H, W (``time``) or in H, W only: T = 1 + 2k -> 1 + k.

    ``sd21``: zero padding (0, 1, 0, 1) in space; ``sd3``: one copied pixel on every side."""

    def __init__(self, cfg: CVVAEConfig, channels: int, time: bool):
        super().__init__()
        stride = (2 if time else 1, 2, 2)
        spatial = (1, 1, 1, 1) if cfg.layout == "sd3" else (0, 1, 0, 1)
        self.conv = TimeConv3d(
            channels,
            channels,
            3,
            stride,
            time_pad="causal",
            space_fill="replicate" if cfg.layout == "sd3" else "zeros",
            spatial_pad=spatial,
        )

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        return self.conv(x, cache)


class Upsample(CausalModule):
    """Nearest 2x in H, W, then a 3x3x3 conv; with ``time`` the conv gives 2C channels whose two
    halves become frames 2t and 2t + 1, and the first frame of the clip is dropped: T -> 2T - 1."""

    def __init__(self, cfg: CVVAEConfig, channels: int, time: bool):
        super().__init__()
        self.factor = 2 if time else 1
        causal = cfg.decoder_time_pad == "causal"
        self.conv = TimeConv3d(
            channels,
            channels * self.factor,
            3,
            time_pad="causal" if causal else "both",
            time_fill="replicate",
            space_fill="replicate" if cfg.layout == "sd3" else "zeros",
        )

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        starts_clip = cache is None or cache.get(self.cache_key) is None
        if cache is not None:
            cache.set(self.cache_key, x.new_ones(()))
        y, cache = self.conv(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"), cache)
        if self.factor == 1:
            return y, cache
        y = rearrange(y, "n (f c) t h w -> n c (t f) h w", f=self.factor)
        return (y[:, :, 1:] if starts_clip else y), cache


class Attention(CausalModule):
    """Mid-block attention, residual around the whole block.

    Spatial: per-frame GroupNorm, single-head attention over the H*W positions of each frame
    (``sd21``: 1x1 conv projections ``q/k/v/proj_out``; ``sd3``: linear ones). Temporal (decoder,
    ``sd21``): LayerNorm, then attention over the frames of each position (``full``: all frames;
    ``causal``: the frame itself and earlier ones), projections ``q_t/k_t/v_t/proj_out_t``. The
    spatial result feeds the temporal part without a residual in between (as the official code).
    """

    def __init__(self, cfg: CVVAEConfig, channels: int, temporal: str):
        super().__init__()
        self.norm = _norm(cfg, channels, per_frame=True)
        self.linear = cfg.layout == "sd3"
        if self.linear:
            self.q, self.k, self.v, self.proj_out = (nn.Linear(channels, channels) for _ in range(4))
        else:
            self.q, self.k, self.v, self.proj_out = (Conv2dPerFrame(channels, channels, 1) for _ in range(4))
        self.temporal = temporal
        if temporal != "none":
            self.norm_t = nn.LayerNorm(channels)
            self.q_t = nn.Linear(channels, channels)
            self.k_t = nn.Linear(channels, channels)
            self.v_t = nn.Linear(channels, channels)
            self.proj_out_t = nn.Linear(channels, channels)

    def _spatial(self, x: Tensor, cache: CausalCache | None) -> Tensor:
        n, c, t, h, w = x.shape
        y = self.norm(x, cache=cache)
        if self.linear:
            seq = rearrange(y, "n c t h w -> (n t) (h w) c")
            out = self.proj_out(single_head_attention(self.q(seq), self.k(seq), self.v(seq)))
            return rearrange(out, "(n t) (h w) c -> n c t h w", n=n, h=h, w=w)
        q, k, v = (rearrange(m(y), "n c t h w -> (n t) (h w) c") for m in (self.q, self.k, self.v))
        out = rearrange(single_head_attention(q, k, v), "(n t) (h w) c -> n c t h w", n=n, h=h, w=w)
        return self.proj_out(out)

    def _temporal(self, x: Tensor, cache: CausalCache | None) -> Tensor:
        n, c, t, h, w = x.shape
        seq = self.norm_t(rearrange(x, "n c t h w -> (n h w) t c"))
        q, k, v = self.q_t(seq), self.k_t(seq), self.v_t(seq)
        if self.temporal == "full":
            out = single_head_attention(q, k, v)
        else:
            past = cache.get(self.cache_key) if cache is not None else None
            if past is not None:
                k = torch.cat([past[0].to(k.dtype), k], dim=1)
                v = torch.cat([past[1].to(v.dtype), v], dim=1)
            if cache is not None:
                cache.set(self.cache_key, torch.stack([k, v]).detach())
            seen = k.shape[1] - t
            mask = torch.ones(t, k.shape[1], dtype=torch.bool, device=x.device).tril(diagonal=seen)
            out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=mask)
            out = out.squeeze(1)
        return rearrange(self.proj_out_t(out), "(n h w) t c -> n c t h w", n=n, h=h, w=w)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        h = self._spatial(x, cache)
        if self.temporal != "none":
            h = self._temporal(h, cache)
        return x + h, cache


class MidBlock(nn.Module):
    """``block_1`` -> ``attn_1`` -> ``block_2``."""

    def __init__(self, cfg: CVVAEConfig, channels: int, decoder: bool):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels, decoder)
        self.attn_1 = Attention(cfg, channels, cfg.temporal_attention if decoder else "none")
        self.block_2 = ResnetBlock(cfg, channels, channels, decoder)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        x, cache = self.block_1(x, cache)
        x, cache = self.attn_1(x, cache)
        return self.block_2(x, cache)


class _Level(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.downsample: nn.Module | None = None
        self.upsample: nn.Module | None = None


def _run(blocks, x: Tensor, cache: CausalCache | None, use_checkpoint: bool) -> Tensor:
    for block in blocks:
        if use_checkpoint:
            x = checkpoint(lambda t, b=block: b(t, None)[0], x, use_reentrant=False)
        else:
            x, cache = block(x, cache)
    return x


class Encoder(nn.Module):
    """(N, 3, T, H, W) in [-1, 1] -> moments (N, 2z, 1 + (T - 1) / 4, H / 8, W / 8)."""

    def __init__(self, cfg: CVVAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = _conv3d(cfg, cfg.in_channels, chans[0], 3, decoder=False)
        self.down = nn.ModuleList()
        cin = chans[0]
        for i, cout in enumerate(chans):
            level = _Level()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cfg, cin, cout, decoder=False))
                cin = cout
            if i < len(chans) - 1:
                level.downsample = Downsample(cfg, cout, cfg.temporal_down[i])
            self.down.append(level)
        self.mid = MidBlock(cfg, cin, decoder=False)
        self.norm_out = _norm(cfg, cin)
        self.conv_out = _conv3d(cfg, cin, 2 * cfg.latent_channels, 3, decoder=False)
        self.gradient_checkpointing = False

    def body(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        ckpt = self.gradient_checkpointing and self.training and cache is None
        h, cache = self.conv_in(x, cache)
        for level in self.down:
            h = _run(level.block, h, cache, ckpt)
            if level.downsample is not None:
                h, cache = level.downsample(h, cache)
        return h, cache

    def head(self, h: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        h = _run([self.mid], h, cache, self.gradient_checkpointing and self.training and cache is None)
        return self.conv_out(self.norm_out(h, silu=True, cache=cache), cache)


class Decoder(nn.Module):
    """(N, z, T', h, w) -> (N, 3, 1 + 4(T' - 1), 8h, 8w), nominally in [-1, 1]."""

    def __init__(self, cfg: CVVAEConfig):
        super().__init__()
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        cin = chans[-1]
        self.conv_in = _conv3d(cfg, cfg.latent_channels, cin, 3, decoder=True)
        self.mid = MidBlock(cfg, cin, decoder=True)
        levels = [_Level() for _ in chans]
        for i in reversed(range(len(chans))):
            for _ in range(cfg.num_res_blocks + 1):
                levels[i].block.append(ResnetBlock(cfg, cin, chans[i], decoder=True))
                cin = chans[i]
            if i > 0:
                levels[i].upsample = Upsample(cfg, cin, cfg.temporal_down[i - 1])
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cfg, cin)
        self.conv_out = _conv3d(cfg, cin, cfg.in_channels, 3, decoder=True)
        self.gradient_checkpointing = False

    def stem(self, z: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        h, cache = self.conv_in(z, cache)
        return _run([self.mid], h, cache, self.gradient_checkpointing and self.training and cache is None), cache

    def body(self, h: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        ckpt = self.gradient_checkpointing and self.training and cache is None
        for level in reversed(self.up):
            h = _run(level.block, h, cache, ckpt)
            if level.upsample is not None:
                h, cache = level.upsample(h, cache)
        return self.conv_out(self.norm_out(h, silu=True, cache=cache), cache)


class CVVAE(nn.Module):
    """CV-VAE. ``encode`` / ``decode`` run whole clips; ``encode_chunk`` / ``decode_chunk`` carry
    an explicit :class:`CausalCache`; ``official_encode`` / ``official_decode`` reproduce the
    official windowed tiling; ``encode_video`` / ``decode_video`` run the engine."""

    family = "cv-vae"
    config_class = CVVAEConfig

    def __init__(self, config: CVVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        assign_cache_keys(self)

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
        """Raise a clear error unless ``x`` is float (N, 3, 1 + 4k, H, W) with H, W multiples of 8."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected video NCTHW with C={cfg.in_channels}, got shape {tuple(x.shape)}")
        t, h, w = x.shape[2:]
        if (t - 1) % self.time_factor:
            raise ValueError(f"frame count {t} is not 1 + k*{self.time_factor}")
        if h % self.space_factor or w % self.space_factor:
            raise ValueError(f"size {h}x{w} is not a multiple of {self.space_factor}")
        if not x.is_floating_point():
            raise TypeError(f"expected a float video in [-1, 1], got dtype {x.dtype}")

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x: NCTHW in [-1, 1] -> posterior over latents (N, z, 1 + (T - 1) / 4, H / 8, W / 8)."""
        self.check_input(x)
        return self.posterior(self.encode_chunk(x, None)[0])

    def decode(self, z: Tensor) -> Tensor:
        """z: unscaled latents (N, z, T', h, w) -> NCTHW, nominally in [-1, 1]."""
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected latents (N, {self.latent_channels}, T, h, w), got {tuple(z.shape)}")
        return self.decode_chunk(z, None)[0]

    def forward(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Training pass: returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def posterior(self, moments: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(moments, self.config.logvar_min, self.config.logvar_max)

    def encode_chunk(self, x: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        h, cache = self.encode_body(x, cache)
        return self.encode_head(h, cache)

    def encode_body(self, x: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """conv_in and the down levels (full resolution, convolutions only: the engine tiles it)."""
        return self.encoder.body(x, cache)

    def encode_head(self, h: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """Mid block (attention), norm_out, conv_out: run untiled at latent resolution."""
        return self.encoder.head(h, cache)

    def decode_chunk(self, z: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        h, cache = self.decode_stem(z, cache)
        return self.decode_body(h, cache)

    def decode_stem(self, z: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """conv_in and the mid block (spatial + temporal attention): run untiled."""
        return self.decoder.stem(z, cache)

    def decode_body(self, h: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """Up levels, norm_out, conv_out (the engine tiles it)."""
        return self.decoder.body(h, cache)

    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw latents -> diffusion-ready ``(z - shift) * scale``."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        return z / self.config.scaling_factor + self.config.shift_factor

    def encode_video(self, video: Tensor, **engine_options):
        """Engine encode of a (1, 3, T, H, W) clip in [-1, 1] (see :mod:`videovae.engine`)."""
        from videovae.engine import encode_tensor

        return encode_tensor(self, video, **engine_options)

    def decode_video(self, z: Tensor, geometry=None, **engine_options) -> Tensor:
        """Engine decode of latents (1, z, T', h, w) to (1, 3, T, H, W) float32 in [-1, 1]."""
        from videovae.engine import decode_tensor

        return decode_tensor(self, z, geometry, **engine_options)

    def encoder_receptive_radius(self) -> float:
        """Spatial reach of the encoder body in latent pixels."""
        levels = len(self.config.channel_mult)
        scale = float(self.space_factor)
        radius = 1.0 / scale
        for i in range(levels):
            radius += 2 * self.config.num_res_blocks / scale
            if i < levels - 1:
                radius += 2.0 / scale
                scale /= 2
        return radius

    def decoder_receptive_radius(self) -> float:
        """Spatial reach of the decoder body in latent pixels."""
        scale, radius = 1.0, 0.0
        for i in reversed(range(len(self.config.channel_mult))):
            radius += 2 * (self.config.num_res_blocks + 1) / scale
            if i > 0:
                radius += 0.5 / scale
                scale *= 2
        return radius + 1.0 / scale

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = enabled
        self.decoder.gradient_checkpointing = enabled

    def num_parameters(self) -> dict[str, int]:
        enc = sum(p.numel() for p in self.encoder.parameters())
        dec = sum(p.numel() for p in self.decoder.parameters())
        return {"encoder": enc, "decoder": dec, "total": enc + dec}

    def decoder_last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight

    # --- official windowed tiling -------------------------------------------------------------------
    def official_tiling_for(
        self,
        frames: int | None = None,
        decode_latents: int | None = None,
        tile: int | None = None,
        overlap: float | None = None,
    ) -> OfficialTiling:
        """The official tiling of this config, each given value overriding one setting: ``frames``
        (encode windows of ``1 + frames`` frames every ``frames``: ``en_de_n_frames_a_time``),
        ``decode_latents`` (decode windows of ``1 + decode_latents`` latents; when only ``frames``
        is given it follows as ``frames / 4``, as in the official code), ``tile`` (pixels,
        ``tile_spatial_size``), ``overlap`` (``tile_overlap_ratio``). 0 = untiled in that dimension."""
        cfg = self.config
        if decode_latents is None:
            decode_latents = cfg.official_decode_latents if frames is None else frames // self.time_factor
        return OfficialTiling(
            encode_frames=cfg.official_frames if frames is None else frames,
            decode_latents=decode_latents,
            tile=cfg.official_tile if tile is None else tile,
            overlap=cfg.official_overlap if overlap is None else overlap,
        )

    def official_encode(self, x: Tensor, tiling: OfficialTiling | None = None) -> Tensor:
        """x: NCTHW in [-1, 1] -> raw moments, windowed and tiled as the official ``encode``."""
        return official_tiled_encode(self, x, tiling or self.official_tiling_for())

    def official_decode(self, z: Tensor, tiling: OfficialTiling | None = None) -> Tensor:
        """Unscaled latents -> NCTHW (input size kept), windowed and tiled as the official ``decode``."""
        return official_tiled_decode(self, z, tiling or self.official_tiling_for())


# --- presets ------------------------------------------------------------------------------------------

PRESETS: dict[str, CVVAEConfig] = {
    # The released SD 2.1-compatible model (CVVAEModel defaults): 2D+3D blocks, 4x8x8, z=4.
    "cv-vae": CVVAEConfig(),
    # The all-3D option (half_3d=False): conv2 of every residual block is 3D as well.
    "cv-vae-3d": CVVAEConfig(half_3d=False),
    # CVVAESD3Model defaults: 16 latent channels, SD3 layout. Latent scaling/shift are the SD3
    # image VAE's (the official model has none; its latents are meant for SD3).
    "cv-vae-sd3": CVVAEConfig(
        layout="sd3", latent_channels=16, norm_eps=1e-6, temporal_attention="none", scaling_factor=1.5305,
        shift_factor=0.0609,
    ),
    # Same weight shapes as cv-vae; per-frame GroupNorm, causal decoder padding and causal temporal
    # attention: chunked inference equals whole-clip inference exactly.
    "cv-vae-stream": CVVAEConfig(norm="group_frame", decoder_time_pad="causal", temporal_attention="causal"),
    # Small configs for tests and CPU demos (official layouts, 32 x [1, 2, 1, 1]).
    "cv-vae-tiny": CVVAEConfig(
        base_channels=32, channel_mult=(1, 2, 1, 1), official_frames=4, official_decode_latents=1, official_tile=40,
    ),
    "cv-vae-tiny-stream": CVVAEConfig(
        base_channels=32, channel_mult=(1, 2, 1, 1), norm="group_frame", decoder_time_pad="causal",
        temporal_attention="causal", official_frames=4, official_decode_latents=1, official_tile=40,
    ),
    "cv-vae-tiny-sd3": CVVAEConfig(
        layout="sd3", base_channels=32, channel_mult=(1, 2, 1, 1), latent_channels=16, norm_eps=1e-6,
        temporal_attention="none", official_frames=4, official_decode_latents=1, official_tile=40,
    ),
}


# --- official tiling ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OfficialTiling:
    """The official windowed tiling: temporal windows of ``1 + encode_frames`` frames every
    ``encode_frames`` (later windows drop their first latent), decode windows of
    ``1 + decode_latents`` latents every ``decode_latents`` (later windows drop their first
    frame), spatial tiles of ``tile`` pixels (``tile / 8`` latents) with ``overlap``; 0 turns a
    dimension's tiling off."""

    encode_frames: int
    decode_latents: int
    tile: int
    overlap: float


def _windows(length: int, stride: int) -> list[tuple[int, int]]:
    """Official temporal windows: ``ceil((length - 1) / stride)`` rounds (at least one) of
    ``[n * stride, (n + 1) * stride + 1)``, cut to ``length``."""
    if not stride:
        return [(0, length)]
    rounds = max(1, math.ceil((length - 1) / stride))
    return [(n * stride, min(length, (n + 1) * stride + 1)) for n in range(rounds)]


def _blend_into(a: Tensor, b: Tensor, extent: int, dim: int) -> None:
    """``b``'s first ``extent`` rows along ``dim`` become ``(1 - y/E) a[-E + y] + (y/E) b[y]``."""
    if extent <= 0:
        return
    weight = torch.arange(extent, dtype=b.dtype, device=b.device) / extent
    shape = [1] * b.ndim
    shape[dim] = extent
    weight = weight.view(shape)
    head = b.narrow(dim, 0, extent)
    head.copy_((1 - weight) * a.narrow(dim, a.shape[dim] - extent, extent) + weight * head)


def _tiled(fn, x: Tensor, tile_in: int, step: int, extent: int, keep: int) -> Tensor:
    """Tiles of ``tile_in`` every ``step`` input pixels (the last one reaching the end), outputs
    blended over ``extent`` rows; every tile but the last keeps ``keep`` rows."""
    h, w = x.shape[-2:]

    def starts(size: int) -> list[int]:
        out = []
        for s in range(0, size, step):
            out.append(s)
            if s + tile_in >= size:
                break
        return out

    rows = [[fn(x[..., i : i + tile_in, j : j + tile_in]) for j in starts(w)] for i in starts(h)]
    out_rows = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend_into(rows[i - 1][j], tile, extent, dim=3)
            if j > 0:
                _blend_into(row[j - 1], tile, extent, dim=4)
        kept = [t if j == len(row) - 1 else t[..., :keep] for j, t in enumerate(row)]
        out_rows.append(torch.cat(kept, dim=4))
    return torch.cat([r if i == len(out_rows) - 1 else r[..., :keep, :] for i, r in enumerate(out_rows)], dim=3)


def _fit(x: Tensor, h: int, w: int) -> Tensor:
    """Crop (or extend by copying the last row/column) to h x w."""
    x = x[..., :h, :w]
    dh, dw = h - x.shape[-2], w - x.shape[-1]
    if dh > 0 or dw > 0:
        x = F.pad(x.flatten(1, 2), (0, dw, 0, dh), mode="replicate").unflatten(1, x.shape[1:3])
    return x


@torch.no_grad()
def official_tiled_encode(model: CVVAE, x: Tensor, tiling: OfficialTiling) -> Tensor:
    """Encode NCTHW video in [-1, 1] as the official ``tiled_encode``: temporal windows of
    ``1 + encode_frames`` frames every ``encode_frames`` (later windows drop their first latent),
    each in spatial tiles of ``tile`` px every ``round(tile * (1 - overlap))`` px, latents blended
    over ``round(tile / 8 * overlap)`` rows, non-last tiles keeping ``tile / 8 - that`` rows.
    Returns raw moments (N, 2z, T', H/8, W/8): if the official stitching gives a different size
    (tile strides that are not a multiple of 8 px), it is cropped or edge-extended to H/8 x W/8."""
    sf = model.space_factor

    def encode(clip: Tensor) -> Tensor:
        return model.encode_chunk(clip, None)[0]

    def spatial(clip: Tensor) -> Tensor:
        if not tiling.tile:
            return encode(clip)
        lat = tiling.tile // sf
        extent = round(lat * tiling.overlap)
        return _tiled(encode, clip, tiling.tile, round(tiling.tile * (1 - tiling.overlap)), extent, lat - extent)

    parts = []
    for n, (a, b) in enumerate(_windows(x.shape[2], tiling.encode_frames)):
        out = spatial(x[:, :, a:b])
        parts.append(out if n == 0 else out[:, :, 1:])
    return _fit(torch.cat(parts, dim=2), x.shape[3] // sf, x.shape[4] // sf)


@torch.no_grad()
def official_tiled_decode(model: CVVAE, z: Tensor, tiling: OfficialTiling) -> Tensor:
    """Decode unscaled latents as the official ``tiled_decode``: windows of ``1 + decode_latents``
    latents every ``decode_latents`` (later windows drop their first frame), spatial tiles of
    ``tile / 8`` latents every ``round(tile / 8 * (1 - overlap))``, outputs blended over
    ``E = round(tile * overlap)`` pixels.

    The official code keeps ``tile - E`` pixels of every non-last tile although tiles start
    ``8 * round(tile / 8 * (1 - overlap))`` pixels apart; when these differ (e.g. tile 256:
    199 kept, 200 apart) its output is one pixel short per seam (272 x 288 -> 271 x 287) and
    shifted after each seam. Here non-last tiles keep their full stride, so the output has the
    input size and every pixel sits at its place: deleting the last kept row/column of each
    non-last tile gives exactly the official output. Returns NCTHW, unclamped."""
    sf = model.space_factor

    def decode(latent: Tensor) -> Tensor:
        return model.decode_chunk(latent, None)[0]

    def spatial(latent: Tensor) -> Tensor:
        if not tiling.tile:
            return decode(latent)
        lat = tiling.tile // sf
        step = round(lat * (1 - tiling.overlap))
        extent = round(tiling.tile * tiling.overlap)
        return _tiled(decode, latent, lat, step, extent, step * sf)

    parts = []
    for n, (a, b) in enumerate(_windows(z.shape[2], tiling.decode_latents)):
        out = spatial(z[:, :, a:b])
        parts.append(out if n == 0 else out[:, :, 1:])
    return torch.cat(parts, dim=2)


def official_seam_pixels(size: int, tile: int, overlap: float, space_factor: int = 8) -> list[int]:
    """Output rows (or columns) of :func:`official_tiled_decode` that the official decode lacks:
    for each seam, the pixels past ``tile - round(tile * overlap)`` of the tile's stride."""
    lat_tile = tile // space_factor
    step = round(lat_tile * (1 - overlap))
    stride_px, kept_official = step * space_factor, tile - round(tile * overlap)
    lat = size // space_factor
    starts = []
    for s in range(0, lat, step):
        starts.append(s)
        if s + lat_tile >= lat:
            break
    missing = []
    for k in range(len(starts) - 1):
        missing.extend(range(k * stride_px + kept_official, (k + 1) * stride_px))
    return missing


# --- official checkpoints ------------------------------------------------------------------------------

# Official CVVAEModel / CVVAESD3Model config.json fields that do not change the weights.
_IGNORED_FIELDS = {
    "_class_name", "_diffusers_version", "_name_or_path", "dropout", "force_upcast", "num_video_frames",
    "reshape_z_dim_to_4", "reshape_x_dim_to_4", "time_n_compress", "spatial_n_compress", "resolution",
}


def config_from_official(cfg: dict[str, Any]) -> CVVAEConfig:
    """Map an official ``CVVAEModel`` or ``CVVAESD3Model`` config.json to a :class:`CVVAEConfig`.

    Missing fields take the official constructor defaults; fields this implementation cannot
    reproduce raise ``ValueError`` naming them. ``en_de_n_frames_a_time``,
    ``tile_spatial_size`` and ``tile_overlap_ratio`` become the ``official_*`` tiling (``None``: 0,
    untiled in that dimension)."""
    name = cfg.get("_class_name", "CVVAEModel")
    problems: list[str] = []

    def check(key: str, default, allowed) -> Any:
        value = cfg.get(key, default)
        if value not in allowed:
            problems.append(f"{key}={value!r} (supported: {', '.join(map(repr, allowed))})")
        return value

    frames = int(cfg.get("en_de_n_frames_a_time", 16) or 0)
    tiling = dict(
        official_frames=frames,
        official_decode_latents=frames // 4,
        official_tile=int(cfg.get("tile_spatial_size", 576) or 0),
        official_overlap=float(cfg.get("tile_overlap_ratio", 0.2222) or 0.0),
    )
    if cfg.get("time_n_compress", 4) not in (4, None) or cfg.get("spatial_n_compress", 8) not in (8, None):
        problems.append("time_n_compress / spatial_n_compress must be 4 / 8")
    if name == "CVVAEModel":
        known = _IGNORED_FIELDS | {
            "double_z", "z_channels", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
            "use_3d_conv", "half_3d", "causal_encoder", "causal_decoder", "encoder_attn_type", "decoder_attn_type",
            "scaling_factor", "en_de_n_frames_a_time", "tile_spatial_size", "tile_overlap_ratio",
        }
        check("double_z", True, [True])
        check("in_channels", 3, [3])
        check("out_ch", 3, [3])
        check("attn_resolutions", [], [[]])
        check("use_3d_conv", True, [True])
        check("causal_encoder", True, [True])
        check("causal_decoder", False, [False])
        check("encoder_attn_type", "vanilla-xformers", ["vanilla-xformers", "vanilla"])
        check("decoder_attn_type", "spatial-temporal-xformer", ["spatial-temporal-xformer"])
        mult = tuple(int(m) for m in cfg.get("ch_mult", [1, 2, 4, 4]))
        config_fields = dict(
            layout="sd21",
            base_channels=int(cfg.get("ch", 128)),
            channel_mult=mult,
            num_res_blocks=int(cfg.get("num_res_blocks", 2)),
            latent_channels=int(cfg.get("z_channels", 4)),
            half_3d=bool(cfg.get("half_3d", True)),
            scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
        )
    elif name == "CVVAESD3Model":
        known = _IGNORED_FIELDS | {
            "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
            "layers_per_block", "norm_num_groups", "act_fn", "double_z", "mid_block_add_attention", "causal_encoder",
            "causal_decoder", "half_3d", "en_de_n_frames_a_time", "tile_spatial_size", "tile_overlap_ratio",
        }
        check("in_channels", 3, [3])
        check("act_fn", "silu", ["silu"])
        check("double_z", True, [True])
        check("mid_block_add_attention", True, [True])
        check("causal_encoder", True, [True])
        check("causal_decoder", False, [False])
        chans = [int(c) for c in cfg.get("block_out_channels", [128, 256, 512, 512])]
        levels = len(chans)
        if cfg.get("down_block_types", ["DownEncoderBlock3D"] * levels) != ["DownEncoderBlock3D"] * levels:
            problems.append("down_block_types must all be DownEncoderBlock3D")
        if cfg.get("up_block_types", ["UpDecoderBlock3D"] * levels) != ["UpDecoderBlock3D"] * levels:
            problems.append("up_block_types must all be UpDecoderBlock3D")
        if any(c % chans[0] for c in chans):
            problems.append(f"block_out_channels={chans} must be multiples of the first entry")
        config_fields = dict(
            layout="sd3",
            base_channels=chans[0],
            channel_mult=tuple(c // chans[0] for c in chans),
            num_res_blocks=int(cfg.get("layers_per_block", 2)),
            latent_channels=int(cfg.get("out_channels", 16)),
            half_3d=bool(cfg.get("half_3d", True)),
            norm_groups=int(cfg.get("norm_num_groups", 32)),
            norm_eps=1e-6,
            temporal_attention="none",
            scaling_factor=1.5305,
            shift_factor=0.0609,
        )
    else:
        raise ValueError(f"unsupported CV-VAE config: _class_name={name!r} (expected CVVAEModel or CVVAESD3Model)")
    unknown = sorted(set(cfg) - known)
    if unknown:
        problems.append(f"unknown fields {', '.join(unknown)}")
    if problems:
        raise ValueError("unsupported CV-VAE config: " + "; ".join(problems))
    levels = len(config_fields["channel_mult"])
    temporal_down = tuple(i % 2 == 0 for i in range(levels - 1))
    return CVVAEConfig(temporal_down=temporal_down, **config_fields, **tiling)


# SD 2.1 layout: our names are the official ones; every pattern is listed so that anything else is
# reported as unexpected.
_SD21_RULES = tuple(
    re.compile(p)
    for p in (
        r"encoder\.conv_in\.(weight|bias)",
        r"(encoder\.down|decoder\.up)\.\d+\.block\.\d+\.(norm1|norm2|conv1|conv2|nin_shortcut)\.(weight|bias)",
        r"encoder\.down\.\d+\.downsample\.conv\.(weight|bias)",
        r"decoder\.up\.\d+\.upsample\.conv\.(weight|bias)",
        r"(encoder|decoder)\.mid\.block_[12]\.(norm1|norm2|conv1|conv2|nin_shortcut)\.(weight|bias)",
        r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)",
        r"decoder\.mid\.attn_1\.(norm_t|q_t|k_t|v_t|proj_out_t)\.(weight|bias)",
        r"(encoder|decoder)\.(norm_out|conv_out|conv_in)\.(weight|bias)",
    )
)


def _sd3_rules(levels: int) -> list[tuple[re.Pattern, str]]:
    res = r"(norm1|conv1|norm2|conv2)"
    rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\." + res + r"\.", r"encoder.down.\1.block.\2.\3."),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.", r"encoder.down.\1.block.\2.nin_shortcut."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
        (r"(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_q\.", r"\1.mid.attn_1.q."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_k\.", r"\1.mid.attn_1.k."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_v\.", r"\1.mid.attn_1.v."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"(encoder|decoder)\.conv_(in|out)\.", r"\1.conv_\2."),
    ]
    for k in range(levels):
        level = levels - 1 - k
        rules.append((rf"decoder\.up_blocks\.{k}\.resnets\.(\d+)\." + res + r"\.", rf"decoder.up.{level}.block.\1.\2."))
        shortcut = rf"decoder\.up_blocks\.{k}\.resnets\.(\d+)\.conv_shortcut\."
        rules.append((shortcut, rf"decoder.up.{level}.block.\1.nin_shortcut."))
        rules.append((rf"decoder\.up_blocks\.{k}\.upsamplers\.0\.conv\.", rf"decoder.up.{level}.upsample.conv."))
    return [(re.compile(p), r) for p, r in rules]


_LEAF = re.compile(r"((norm1|norm2|conv1|conv2)\.)?(weight|bias)")


def map_official_key(key: str, config: CVVAEConfig) -> str | None:
    """Our state-dict name for an official key, or None when it is not a CV-VAE weight."""
    if config.layout == "sd21":
        return key if any(rule.fullmatch(key) for rule in _SD21_RULES) else None
    for pattern, repl in _sd3_rules(len(config.channel_mult)):
        match = pattern.match(key)
        if match and _LEAF.fullmatch(key[match.end() :]):
            return match.expand(repl) + key[match.end() :]
    return None


# Prefixes of training checkpoints that are not part of the autoencoder (loss, discriminator).
DROPPED_PREFIXES = ("loss.", "discriminator.", "disc_model.")


def _strip_wrappers(key: str) -> str:
    """Remove ``module.`` / ``vae.`` / ``first_stage_model.`` / ``model.`` wrapper prefixes."""
    for prefix in ("module.", "vae.", "first_stage_model.", "model."):
        if key.startswith(prefix) and not key.startswith(("encoder.", "decoder.")):
            key = key[len(prefix) :]
    return key


def unwrap_official_state(obj: Any, prefer_ema: bool = True, source: str = "checkpoint") -> dict[str, Tensor]:
    """The autoencoder weights in an official checkpoint (see
    :func:`videovae.statedict.unwrap_training_state`): wrapper prefixes removed and the loss and
    discriminator keys (:data:`DROPPED_PREFIXES`) dropped."""
    return unwrap_training_state(obj, prefer_ema=prefer_ema, source=source, rename=_strip_wrappers,
                                 dropped=DROPPED_PREFIXES)


def convert_official(src: str | os.PathLike, *, prefer_ema: bool = True, config: dict | None = None) -> CVVAE:
    """Load an official CV-VAE checkpoint into a :class:`CVVAE` (fp32, eval mode).

    ``src``: a diffusers-style folder (``config.json`` with the official field names plus
    ``diffusion_pytorch_model.safetensors`` / ``.bin``, fp16 or fp32) or a weights file
    (``.safetensors``, or ``.pt`` / ``.ckpt`` / ``.bin`` read with ``torch.load(weights_only=True)``)
    holding a plain, Lightning (``state_dict``), DeepSpeed (``module``) or EMA state dict. The
    architecture comes from ``config``, else ``config.json`` beside the weights, else the
    ``CVVAEModel`` defaults; a ``CVVAESD3Model`` config selects the SD3 layout and its names.
    Unknown, missing or mis-shaped keys raise :class:`videovae.statedict.CheckpointError` naming them.
    """
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    folder = path if path.is_dir() else path.parent
    weights = find_weights(path) if path.is_dir() else path
    if config is None and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
    cfg = config_from_official(config or {})
    state = unwrap_official_state(read_weights(weights), prefer_ema=prefer_ema, source=str(weights))
    unknown = sorted(k for k in state if map_official_key(k, cfg) is None)
    if unknown:
        shown = ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        raise CheckpointError(f"{weights}: keys that are not CV-VAE ({cfg.layout}) weights: {shown}")
    mapped = {map_official_key(k, cfg): v.float() for k, v in state.items()}
    model = CVVAE(cfg)
    load_state_dict_strict(model, mapped, source=str(weights))
    return model.eval()


# --- initialisation from a 2D image VAE -------------------------------------------------------------------

_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def image_vae_layout(state: dict[str, Tensor]) -> dict[str, Any]:
    """Widths of a diffusers ``AutoencoderKL`` state dict: ``base_channels``, ``channel_mult``,
    ``num_res_blocks``, ``latent_channels``, ``quant_conv`` (whether it has quant convs)."""
    try:
        base = state["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down_blocks."))
        chans = [state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
        blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down_blocks.0.resnets."))
        latent = state["decoder.conv_in.weight"].shape[1]
    except (KeyError, ValueError) as err:
        raise ValueError(f"not a diffusers AutoencoderKL state dict (missing {err})") from None
    if any(c % base for c in chans):
        raise ValueError(f"image VAE widths {chans} are not multiples of {base}")
    return {
        "base_channels": base,
        "channel_mult": tuple(c // base for c in chans),
        "num_res_blocks": blocks,
        "latent_channels": latent,
        "quant_conv": "quant_conv.weight" in state,
    }


def _image_key(key: str, levels: int) -> str | None:
    """Our name for a diffusers AutoencoderKL key (quant convs excluded)."""
    for old, new in _OLD_ATTENTION_NAMES.items():
        key = key.replace(f".attentions.0.{old}.", f".attentions.0.{new}.")
    for pattern, repl in _sd3_rules(levels):
        match = pattern.match(key)
        if match and _LEAF.fullmatch(key[match.end() :]):
            return match.expand(repl) + key[match.end() :]
    return None


def _inflated(model: CVVAE, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``model``'s weights from a 2D AutoencoderKL state dict (quant convs not included): every
    3D kernel gets the 2D kernel in the slot that sees the current frame (the last slot of causal
    convs, the middle one of two-sided ones), zeros elsewhere, so each conv acts per frame; the
    2C-channel temporal upsampler convs get it in both halves (each latent frame becomes two equal
    frames); linear attention projections become 1x1 convs. The decoder's temporal attention, absent
    from the image VAE, gets zero query/key, identity value and a zero output projection (its
    contribution starts at zero and is trainable). Unmapped or missing keys raise ``ValueError``."""
    levels = len(model.config.channel_mult)
    modules = dict(model.named_modules())
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state.items():
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            continue
        name = _image_key(key, levels)
        if name is None or name not in own:
            unmapped.append(key)
            continue
        target = own[name].shape
        value = value.float()
        module = modules[name.rpartition(".")[0]]
        if isinstance(module, TimeConv3d) and name.endswith(".weight"):
            slot = module.kernel[0] - 1 if module.time_pad == "causal" else (module.kernel[0] - 1) // 2
            w = value.new_zeros(target)
            reps = target[0] // value.shape[0]
            w[:, :, slot] = value.repeat(reps, 1, 1, 1) if value.ndim == 4 else value.reshape(value.shape[0], -1, 1, 1)
            out[name] = w
        elif name.endswith(".bias") and target[0] != value.shape[0]:
            out[name] = value.repeat(target[0] // value.shape[0])
        else:
            out[name] = value.reshape(target)
    for name, value in own.items():
        if name in out or ".attn_1." not in name or not name.split(".")[-2].endswith("_t"):
            continue
        part = name.split(".")[-2]
        if part == "norm_t":
            out[name] = torch.ones_like(value) if name.endswith("weight") else torch.zeros_like(value)
        elif part == "v_t" and name.endswith("weight"):
            out[name] = torch.eye(value.shape[0])
        else:
            out[name] = torch.zeros_like(value)
    missing = sorted(set(own) - set(out))
    if unmapped or missing:
        parts = []
        if unmapped:
            parts.append("image-VAE keys without a place: " + ", ".join(sorted(unmapped)[:20]))
        if missing:
            parts.append("model keys not provided: " + ", ".join(missing[:20]))
        raise ValueError("image VAE does not fit the model (" + "; ".join(parts) + ")")
    return out


def inflate_image_vae(state: dict[str, Tensor], config: CVVAEConfig) -> CVVAE:
    """A :class:`CVVAE` of ``config`` initialised from a 2D SD-style ``AutoencoderKL`` state dict
    (diffusers names; the older ``query/key/value/proj_attn`` attention names are accepted).

    Kernels are inflated as :func:`_inflated` describes. CV-VAE has no quant convs: the image VAE's
    ``quant_conv`` is folded into ``encoder.conv_out`` (exact) and ``post_quant_conv`` into
    ``decoder.conv_in`` (exact except that its bias meets the zero padding of the 3x3 conv at the
    latent border). With the SD 2.1 layout a 1-frame video then encodes to the image VAE's latent
    (GroupNorm eps 1e-5 vs 1e-6 aside) and decodes as the image VAE does, except for the decoder's
    mid attention: the official block adds one residual around spatial *and* temporal attention, so
    with the temporal part starting at zero the spatial attention is silent until trained (exact
    for configs with ``temporal_attention='none'``). The SD3 layout pads by replication, the image
    VAE by zeros: its borders differ."""
    model = CVVAE(config)
    weights = _inflated(model, state)
    if "quant_conv.weight" in state:
        wq = state["quant_conv.weight"].float().flatten(1)
        w, b = weights["encoder.conv_out.weight"], weights["encoder.conv_out.bias"]
        weights["encoder.conv_out.weight"] = torch.einsum("ij,jcthw->icthw", wq, w)
        weights["encoder.conv_out.bias"] = wq @ b + state["quant_conv.bias"].float()
    if "post_quant_conv.weight" in state:
        wp = state["post_quant_conv.weight"].float().flatten(1)
        w, b = weights["decoder.conv_in.weight"], weights["decoder.conv_in.bias"]
        weights["decoder.conv_in.weight"] = torch.einsum("ojthw,ji->oithw", w, wp)
        weights["decoder.conv_in.bias"] = b + torch.einsum("ojthw,j->o", w, state["post_quant_conv.bias"].float())
    model.load_state_dict(weights)
    return model.eval()


class ImageVAE(nn.Module):
    """A frozen 2D image VAE (diffusers ``AutoencoderKL`` weights) run frame by frame: the same
    numbers as the image VAE, computed by this module's own layers (no diffusers needed).

    ``encode``: frames (N, 3, H, W) in [-1, 1] -> latent mean (N, z, H/8, W/8), unscaled.
    ``decode``: unscaled latents (N, z, h, w) -> frames (N, 3, 8h, 8w), nominally in [-1, 1]."""

    def __init__(self, state: dict[str, Tensor], norm_groups: int = 32):
        super().__init__()
        layout = image_vae_layout(state)
        levels = len(layout["channel_mult"])
        self.config = CVVAEConfig(
            base_channels=layout["base_channels"], channel_mult=layout["channel_mult"],
            num_res_blocks=layout["num_res_blocks"], latent_channels=layout["latent_channels"],
            temporal_down=(False,) * (levels - 1), norm="group_frame", norm_groups=norm_groups, norm_eps=1e-6,
            temporal_attention="none",
        )
        self.core = CVVAE(self.config)
        self.core.load_state_dict(_inflated(self.core, state))
        z = layout["latent_channels"]
        self.quant_conv = self.post_quant_conv = None
        if layout["quant_conv"]:
            self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
            self.quant_conv.load_state_dict({"weight": state["quant_conv.weight"], "bias": state["quant_conv.bias"]})
        if "post_quant_conv.weight" in state:
            self.post_quant_conv = nn.Conv2d(z, z, 1)
            self.post_quant_conv.load_state_dict(
                {"weight": state["post_quant_conv.weight"], "bias": state["post_quant_conv.bias"]}
            )
        self.eval().requires_grad_(False)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def encode(self, frames: Tensor) -> Tensor:
        moments = self.core.encode_chunk(frames.unsqueeze(2), None)[0][:, :, 0]
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments[:, : self.latent_channels]

    def decode(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.core.decode_chunk(z.unsqueeze(2), None)[0][:, :, 0]


def load_image_vae(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of a local diffusers ``AutoencoderKL``: a ``.safetensors`` file or a folder
    holding ``diffusion_pytorch_model.safetensors`` (nothing is downloaded)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "diffusion_pytorch_model.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such image VAE weights file")
    if p.suffix != ".safetensors":
        raise ValueError(f"{p}: image VAE weights must be a .safetensors file")
    return load_file(str(p))
