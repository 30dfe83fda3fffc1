"""A configurable causal 3D VAE (encoder / diagonal Gaussian / decoder).

Layout follows the SD/OD-VAE family so official state-dict names map one to one:
``encoder.conv_in``, ``encoder.down.{i}.block.{j}``, ``encoder.down.{i}.downsample``,
``encoder.mid.{block_1,attn_1,block_2}``, ``encoder.norm_out``, ``encoder.conv_out``, ``quant_conv``,
``post_quant_conv``, ``decoder.conv_in``, ``decoder.mid``, ``decoder.up.{i}.block.{j}``,
``decoder.up.{i}.upsample``, ``decoder.norm_out``, ``decoder.conv_out``. Decoder levels are indexed
like the encoder's: ``decoder.up.{L-1}`` runs first.

Input video: NCTHW, values in [-1, 1], T = 1 + k * time_factor, H and W multiples of
space_factor. Latent: (N, latent_channels, 1 + k, H / space_factor, W / space_factor).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from videovae.layers import (
    NORM_KINDS,
    TIME_PADS,
    TIME_UPSAMPLES,
    CausalCache,
    CausalConv3d,
    Conv2dPerFrame,
    LayerOptions,
    MidBlock,
    Norm,
    PixelShuffleUpsample,
    ResBlock,
    SpatialDownsample,
    SpatialUpsample,
    SpatioTemporalDownsample,
    SpatioTemporalUpsample,
    apply_conv,
    assign_cache_keys,
)


@dataclass(frozen=True)
class CausalVAEConfig:
    """Architecture of a :class:`CausalVAE`. Stored in every checkpoint and latent file.

    ``channel_mult`` gives one level per entry; every level but the last halves H and W, and
    ``temporal_down[i]`` says whether level i also halves time (``len(channel_mult) - 1`` entries).
    """

    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    decoder_res_blocks: int = 3
    temporal_down: tuple[bool, ...] = (False, True, True)
    encoder_block_kinds: tuple[str, ...] = ("3d", "3d", "3d", "3d")
    encoder_conv_in: str = "3d"
    latent_channels: int = 4
    norm: str = "group_frame"
    norm_2d: str | None = None
    norm_groups: int = 32
    norm_eps: float = 1e-6
    time_pad: str = "replicate"
    time_upsample: str = "pixel_shuffle"
    attention: bool = True
    use_quant_conv: bool = True
    # Time kernel of the conv after a space-only upsampler (OD-VAE: 1, a per-frame 3x3 conv).
    spatial_upsample_kernel_t: int = 3
    # Pixels folded into channels per frame before conv_in and unfolded after conv_out (p x p patches):
    # the full-resolution level then runs at H/p x W/p, which is most of the compute saved.
    patch_size: int = 1
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    logvar_min: float = -30.0
    logvar_max: float = 20.0

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        problems = []
        if len(self.temporal_down) != levels - 1:
            problems.append(f"temporal_down needs {levels - 1} entries, got {len(self.temporal_down)}")
        if len(self.encoder_block_kinds) != levels:
            problems.append(f"encoder_block_kinds needs {levels} entries, got {len(self.encoder_block_kinds)}")
        if any(k not in ("2d", "3d") for k in (*self.encoder_block_kinds, self.encoder_conv_in)):
            problems.append("block kinds must be '2d' or '3d'")
        if self.norm not in NORM_KINDS or (self.norm_2d is not None and self.norm_2d not in NORM_KINDS):
            problems.append(f"norm must be one of {NORM_KINDS}")
        if self.time_pad not in TIME_PADS:
            problems.append(f"time_pad must be one of {TIME_PADS}")
        if self.time_upsample not in TIME_UPSAMPLES:
            problems.append(f"time_upsample must be one of {TIME_UPSAMPLES}")
        if self.spatial_upsample_kernel_t not in (1, 3):
            problems.append("spatial_upsample_kernel_t must be 1 or 3")
        if self.patch_size < 1:
            problems.append(f"patch_size must be >= 1, got {self.patch_size}")
        if problems:
            raise ValueError("invalid CausalVAEConfig: " + "; ".join(problems))

    @property
    def time_factor(self) -> int:
        return 2 ** sum(bool(t) for t in self.temporal_down)

    @property
    def space_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)

    @property
    def exactly_streamable(self) -> bool:
        """Chunked (cache-carrying) inference equals whole-clip inference."""
        norms = {self.norm, self.norm_2d or self.norm}
        return "group_clip" not in norms and self.time_upsample != "trilinear"

    @property
    def halo_tiling_exact(self) -> bool:
        """Spatial halo tiling equals untiled inference: no per-tile statistics in the tiled parts
        (attention runs untiled at latent resolution, so it does not matter)."""
        return {self.norm, self.norm_2d or self.norm} == {"rms"}

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CausalVAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CausalVAEConfig fields: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _layer_options(cfg: CausalVAEConfig) -> LayerOptions:
    return LayerOptions(
        norm=cfg.norm, groups=cfg.norm_groups, eps=cfg.norm_eps, time_pad=cfg.time_pad, norm_2d=cfg.norm_2d
    )


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents (N, C, T, h, w)."""

    def __init__(self, moments: Tensor, logvar_min: float = -30.0, logvar_max: float = 20.0):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(logvar_min, logvar_max)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> Tensor:
        """KL to N(0, I), summed over C, T, h, w: shape (N,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3, 4))


class _Stage(nn.Module):
    """One resolution level: residual blocks then an optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.downsample: nn.Module | None = None
        self.upsample: nn.Module | None = None


def _run_block(block, x: Tensor, cache: CausalCache | None, use_checkpoint: bool) -> Tensor:
    """One block. Callers loop over blocks themselves and rebind their only reference to the input,
    so that a stage's input is freed after its first block instead of living through the stage."""
    if use_checkpoint:
        return checkpoint(lambda t: block(t, None)[0], x, use_reentrant=False)
    return block(x, cache)[0]


class Encoder(nn.Module):
    """(N, 3, T, H, W) in [-1, 1] -> (N, 2 * z, 1 + (T-1)/t_down, H/s, W/s) moments."""

    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        opts = _layer_options(cfg)
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        self.patch_size = cfg.patch_size
        cin = cfg.in_channels * cfg.patch_size**2
        if cfg.encoder_conv_in == "2d":
            self.conv_in = Conv2dPerFrame(cin, chans[0], 3, padding=1)
        else:
            self.conv_in = CausalConv3d(cin, chans[0], 3, time_pad=cfg.time_pad)
        self.down = nn.ModuleList()
        cin = chans[0]
        for i, cout in enumerate(chans):
            stage = _Stage()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResBlock(cin, cout, cfg.encoder_block_kinds[i], opts))
                cin = cout
            if i < len(chans) - 1:
                if cfg.temporal_down[i]:
                    stage.downsample = SpatioTemporalDownsample(cout, cfg.time_pad)
                else:
                    stage.downsample = SpatialDownsample(cout)
            self.down.append(stage)
        self.mid = MidBlock(cin, opts, cfg.attention)
        self.norm_out = Norm(cfg.norm, cin, cfg.norm_groups, cfg.norm_eps)
        self.conv_out = CausalConv3d(cin, 2 * cfg.latent_channels, 3, time_pad=cfg.time_pad)
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        h, cache = self.body(x, cache)
        return self.head(h, cache)

    def body(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        """Full-resolution part: conv_in and the down levels -> (N, C_max, t', h, w) features."""
        ckpt = self.gradient_checkpointing and self.training and cache is None
        if self.patch_size > 1:
            x = rearrange(x, "n c t (h p) (w q) -> n (c p q) t h w", p=self.patch_size, q=self.patch_size)
        h = apply_conv(self.conv_in, x, cache)
        for stage in self.down:
            for block in stage.block:
                h = _run_block(block, h, cache, ckpt)
            if stage.downsample is not None:
                h, cache = stage.downsample(h, cache)
        return h, cache

    def head(self, h: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        """Latent-resolution part: mid block (attention), norm_out, conv_out -> moments."""
        ckpt = self.gradient_checkpointing and self.training and cache is None
        h = _run_block(self.mid, h, cache, ckpt)
        return self.conv_out.forward_normed(self.norm_out, h, cache)


class Decoder(nn.Module):
    """(N, z, 1 + k, h, w) -> (N, 3, 1 + k * t_down, h * s, w * s), values nominally in [-1, 1]."""

    def __init__(self, cfg: CausalVAEConfig):
        super().__init__()
        opts = _layer_options(cfg)
        chans = [cfg.base_channels * m for m in cfg.channel_mult]
        cin = chans[-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, cin, 3, time_pad=cfg.time_pad)
        self.mid = MidBlock(cin, opts, cfg.attention)
        stages: list[_Stage] = [_Stage() for _ in chans]
        for i in reversed(range(len(chans))):
            stage = stages[i]
            for _ in range(cfg.decoder_res_blocks):
                stage.block.append(ResBlock(cin, chans[i], "3d", opts))
                cin = chans[i]
            if i > 0:
                stage.upsample = self._make_upsample(cfg, cin, cfg.temporal_down[i - 1])
        self.up = nn.ModuleList(stages)
        self.norm_out = Norm(cfg.norm, cin, cfg.norm_groups, cfg.norm_eps)
        self.patch_size = cfg.patch_size
        self.conv_out = CausalConv3d(cin, cfg.in_channels * cfg.patch_size**2, 3, time_pad=cfg.time_pad)
        self.gradient_checkpointing = False
        # Position in run order (levels L-1 .. 0) of the first level after the last temporal
        # upsampler (level i > 0 upsamples time when temporal_down[i - 1]); from there on an exactly
        # streamable decoder may run frame by frame. None for models that are not exactly streamable.
        levels = len(chans)
        temporal = [i for i in range(1, levels) if cfg.temporal_down[i - 1]]
        self.frame_local_from = (levels - min(temporal) if temporal else 0) if cfg.exactly_streamable else None

    @staticmethod
    def _make_upsample(cfg: CausalVAEConfig, channels: int, temporal: bool) -> nn.Module:
        if cfg.time_upsample == "pixel_shuffle":
            return PixelShuffleUpsample(channels, (2 if temporal else 1, 2, 2), cfg.time_pad)
        if temporal:
            return SpatioTemporalUpsample(channels, cfg.time_pad, cfg.time_upsample)
        return SpatialUpsample(channels, cfg.time_pad, cfg.spatial_upsample_kernel_t)

    def forward(self, z: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        h, cache = self.stem(z, cache)
        return self.body(h, cache)

    def stem(self, z: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        """Latent-resolution part: conv_in and the mid block (attention) -> (N, C_max, T', h, w)."""
        ckpt = self.gradient_checkpointing and self.training and cache is None
        h, cache = self.conv_in(z, cache)
        return _run_block(self.mid, h, cache, ckpt), cache

    def body(self, h: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        """Up levels, norm_out, conv_out -> (N, 3, T, H, W).

        While streaming an exactly streamable model, the levels after the last temporal upsampler
        run one frame at a time through the same cache: they map frames to frames causally, so the
        output is the same, and the full-resolution activations of only one frame are alive."""
        ckpt = self.gradient_checkpointing and self.training and cache is None
        stages = list(reversed(self.up))
        split = len(stages)
        if cache is not None and cache.norm_sync is None and self.frame_local_from is not None:
            split = self.frame_local_from
        # one layer per call, the running activation rebound each time: a level's input is freed
        # after its first block, not held through the level
        for layer, is_block in self._layers(stages[:split]):
            h = _run_block(layer, h, cache, ckpt) if is_block else layer(h, cache)[0]
        if split == len(stages):
            return self._out(h, cache)
        frames = []
        for t in range(h.shape[2]):
            f = h[:, :, t : t + 1]
            for layer, is_block in self._layers(stages[split:]):
                f = _run_block(layer, f, cache, ckpt) if is_block else layer(f, cache)[0]
            frames.append(self._out(f, cache)[0])
            del f
        return torch.cat(frames, dim=2), cache

    @staticmethod
    def _layers(stages: list[_Stage]) -> Iterator[tuple[nn.Module, bool]]:
        """(layer, is a residual block) in run order: each level's blocks, then its upsampler."""
        for stage in stages:
            for block in stage.block:
                yield block, True
            if stage.upsample is not None:
                yield stage.upsample, False

    def _out(self, h: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        y, cache = self.conv_out.forward_normed(self.norm_out, h, cache)
        return self.unpatchify(y), cache

    def unpatchify(self, y: Tensor) -> Tensor:
        """conv_out's output (N, 3 p p, T, H/p, W/p) -> (N, 3, T, H, W)."""
        if self.patch_size == 1:
            return y
        return rearrange(y, "n (c p q) t h w -> n c t (h p) (w q)", p=self.patch_size, q=self.patch_size)

    def last_layer_weight(self) -> Tensor:
        """The weight the adaptive GAN weight takes gradient norms against."""
        return self.conv_out.conv.weight


class CausalVAE(nn.Module):
    """Causal 3D VAE. ``encode`` / ``decode`` run whole clips; ``encode_chunk`` / ``decode_chunk``
    carry an explicit :class:`CausalCache` for streaming; ``encode_video`` / ``decode_video`` run
    the chunked + tiled engine (:mod:`videovae.engine`)."""

    family = "causal-vae"
    config_class = CausalVAEConfig

    def __init__(self, config: CausalVAEConfig):
        super().__init__()
        self.config = config
        z = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.use_quant_conv:
            self.quant_conv = CausalConv3d(2 * z, 2 * z, 1)
            self.post_quant_conv = CausalConv3d(z, z, 1)
        else:
            self.quant_conv = None
            self.post_quant_conv = None
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
        """Raise a clear error unless ``x`` is (N, 3, 1 + k * t_down, H, W) with H, W multiples of s."""
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

    # --- whole clip ----------------------------------------------------------------------------
    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x: NCTHW in [-1, 1] -> posterior over latents."""
        self.check_input(x)
        moments, _ = self.encode_chunk(x, None)
        return self.posterior(moments)

    def decode(self, z: Tensor) -> Tensor:
        """z: (N, latent_channels, T', h, w) unscaled latents -> NCTHW, values nominally in [-1, 1]."""
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

    # --- chunks ---------------------------------------------------------------------------------
    def encode_chunk(self, x: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """One time chunk of video -> moments (N, 2z, t', h, w); the cache carries state forward."""
        h, cache = self.encode_body(x, cache)
        return self.encode_head(h, cache)

    def encode_body(self, x: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """The full-resolution, convolution-only part of encoding (what the engine tiles)."""
        return self.encoder.body(x, cache)

    def encode_head(self, h: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """The latent-resolution part of encoding (mid block with attention): run untiled."""
        h, cache = self.encoder.head(h, cache)
        if self.quant_conv is not None:
            h, cache = self.quant_conv(h, cache)
        return h, cache

    def decode_chunk(self, z: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        h, cache = self.decode_stem(z, cache)
        return self.decode_body(h, cache)

    def decode_stem(self, z: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """The latent-resolution part of decoding (mid block with attention): run untiled."""
        if self.post_quant_conv is not None:
            z, cache = self.post_quant_conv(z, cache)
        return self.decoder.stem(z, cache)

    def decode_body(self, h: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """The upsampling, convolution-only part of decoding (what the engine tiles)."""
        return self.decoder.body(h, cache)

    # --- latent scaling ---------------------------------------------------------------------------
    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw latents -> diffusion-ready ``(z - shift) * scale``."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        return z / self.config.scaling_factor + self.config.shift_factor

    # --- engine -----------------------------------------------------------------------------------
    def encode_video(self, video: Tensor, **engine_options):
        """Chunked/tiled encode of a (1, 3, T, H, W) clip in [-1, 1] of any T, H, W (padded, and the
        padding recorded). Returns :class:`videovae.engine.EncodeResult` (``.mean``, ``.logvar``,
        ``.sample(generator)``, ``.geometry``). Options: :class:`videovae.engine.EngineOptions`."""
        from videovae.engine import encode_tensor

        return encode_tensor(self, video, **engine_options)

    def decode_video(self, z: Tensor, geometry=None, **engine_options) -> Tensor:
        """Chunked/tiled decode of latents (1, z, T', h, w) to (1, 3, T, H, W) float32 in [-1, 1]
        (not clamped), cropped back to ``geometry`` (from ``encode_video``) when given."""
        from videovae.engine import decode_tensor

        return decode_tensor(self, z, geometry, **engine_options)

    # --- geometry for the engine ---------------------------------------------------------------
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
        def count(m: nn.Module | None) -> int:
            return 0 if m is None else sum(p.numel() for p in m.parameters())

        enc = count(self.encoder) + count(self.quant_conv)
        dec = count(self.decoder) + count(self.post_quant_conv)
        return {"encoder": enc, "decoder": dec, "total": enc + dec}


def _encoder_radius(cfg: CausalVAEConfig) -> float:
    """Reach of the encoder body (conv_in and down levels) in latent pixels: every 3x3 conv adds
    one pixel at its own resolution, a stride-2 conv two input pixels."""
    levels = len(cfg.channel_mult)
    scale = float(cfg.space_factor // cfg.patch_size)  # patches per latent pixel at the current level
    radius = 1.0 / scale  # conv_in
    for i in range(levels):
        radius += 2 * cfg.num_res_blocks / scale
        if i < levels - 1:
            radius += 2.0 / scale
            scale /= 2
    return radius


def _decoder_radius(cfg: CausalVAEConfig) -> float:
    """Reach of the decoder body (up levels, conv_out) in latent pixels."""
    levels = len(cfg.channel_mult)
    scale = 1.0  # output pixels per latent pixel at the current level
    radius = 0.0
    for i in reversed(range(levels)):
        radius += 2 * cfg.decoder_res_blocks / scale
        if i > 0:
            # pixel shuffle convolves before upsampling; interpolate-then-conv after it
            radius += 1.0 / scale if cfg.time_upsample == "pixel_shuffle" else 0.5 / scale
            scale *= 2
    return radius + 1.0 / scale  # conv_out


PRESETS: dict[str, CausalVAEConfig] = {
    # ~0.6 M parameters, 4x8x8, per-frame GroupNorm, per-frame attention, nearest time upsampling:
    # exactly streamable in time. For tests and CPU demos.
    "tiny": CausalVAEConfig(
        base_channels=16,
        channel_mult=(1, 1, 2, 2),
        num_res_blocks=1,
        decoder_res_blocks=1,
        norm_groups=8,
        time_upsample="nearest",
    ),
    # ~0.6 M parameters, RMSNorm, zero time padding, no attention, channel-to-space upsampling:
    # streaming and halo tiling are both exact.
    "tiny-rms": CausalVAEConfig(
        base_channels=12,
        channel_mult=(1, 1, 2, 2),
        num_res_blocks=1,
        decoder_res_blocks=1,
        norm="rms",
        time_pad="zeros",
        time_upsample="pixel_shuffle",
        attention=False,
    ),
    # Full size (SD/OD-VAE widths: 128 x [1, 2, 4, 4]), 4x8x8, z=4, per-frame GroupNorm and
    # nearest time upsampling: exactly streamable.
    "base": CausalVAEConfig(time_upsample="nearest"),
    # The shipped model (weights in the package, see videovae/weights/): 4x8x8, z=16, ~4.7 M
    # parameters. 2x2 patches folded into channels, RMSNorm, zero time padding, no attention and
    # channel-to-space upsampling: chunked == whole clip and tiled == untiled, both exactly.
    "vv-s16": CausalVAEConfig(
        base_channels=24,
        channel_mult=(1, 2, 3),
        num_res_blocks=2,
        decoder_res_blocks=2,
        temporal_down=(True, True),
        encoder_block_kinds=("3d", "3d", "3d"),
        latent_channels=16,
        norm="rms",
        time_pad="zeros",
        time_upsample="pixel_shuffle",
        attention=False,
        patch_size=2,
    ),
}
