"""Turbo-VAED: a lightweight, streaming, decoder-only model distilled from a teacher video VAE.

After Zou et al., "Turbo-VAED: Fast and Stable Transfer of Video-VAEs to Mobile Devices" (2025):
the teacher's decoder is replaced by one built for cheap inference, while the teacher's encoder
(and therefore its latent space) is kept. The design choices, all from the paper:

* no attention and no GroupNorm: per-position RMSNorm only, so streaming in time and halo tiling
  in space are both exact, in one pass;
* 3D depthwise-separable convolutions (a depthwise ``k x k x k`` causal conv, then a pointwise
  1x1x1 conv) where the teacher has dense 3x3x3 convs: most of the parameters go away;
* decoupled 3D pixel-shuffle upsampling: a (depthwise-separable) conv to ``C * st * s * s``
  channels, ``st`` moved into time, then a per-frame 2D pixel shuffle; the first ``st - 1`` frames
  of the clip are dropped so latent frame 0 maps to exactly one frame (causal, like the teachers).

Layout: latents (N, latent_channels, 1 + k, h, w) -> video NCTHW (N, 3, 1 + k * time_factor,
h * space_factor, w * space_factor), values nominally in [-1, 1] (not clamped).

State-dict names: ``decoder.conv_in``, ``decoder.levels.{i}.block.{j}.{norm1,dw1,pw1,norm2,dw2,pw2}``,
``decoder.levels.{i}.upsample.{dw,pw}``, ``decoder.norm_out``, ``decoder.conv_out``. Levels run in
index order, from latent resolution up.

The model only decodes: ``encode`` raises. Latents come from the teacher named in :data:`TEACHERS`.
:class:`TurboPair` (family ``turbo-pair``) pairs a teacher's encoder with a distilled turbo decoder:
it encodes exactly as the teacher does, writes and accepts the teacher's latent files, and decodes
them with the turbo decoder (what ``videovae distill`` exports).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from videovae.kernels import _graph_capture
from videovae.layers import (
    CausalCache,
    CausalConv3d,
    Norm,
    _FirstChunkAware,
    assign_cache_keys,
    batch_to_frames,
    frames_to_batch,
)


class DecoderOnlyError(TypeError):
    """A decoder-only model was asked to encode (a TypeError: the model does not support the call)."""


@dataclass(frozen=True)
class TurboVAEDConfig:
    """Architecture of a :class:`TurboVAED`. Stored in every checkpoint.

    ``channels[i]`` / ``blocks[i]``: width and residual-block count of level i, in execution order
    (level 0 runs at latent resolution). Between level i and level i + 1 sits an upsampler by
    ``time_up[i]`` in time and ``space_up[i]`` in H and W (``len(channels) - 1`` entries each).
    ``patch_size``: pixels unfolded from channels after ``conv_out`` (p x p patches per frame), so
    the last level runs at H / p x W / p.
    """

    latent_channels: int = 4
    out_channels: int = 3
    channels: tuple[int, ...] = (256, 256, 128, 64)
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    time_up: tuple[int, ...] = (2, 2, 1)
    space_up: tuple[int, ...] = (2, 2, 2)
    # Depthwise kernel (time and space) of the residual blocks.
    kernel_size: int = 5
    # Depthwise kernel of the upsamplers' conv, before the pointwise expansion.
    upsample_kernel_size: int = 3
    patch_size: int = 1
    norm_eps: float = 1e-12
    # Latent scaling of the teacher's latent space (diffusion-ready ``(z - shift) * scale``).
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    def __post_init__(self) -> None:
        levels = len(self.channels)
        problems = []
        if levels < 1:
            problems.append("channels needs at least one level")
        if len(self.blocks) != levels:
            problems.append(f"blocks needs {levels} entries, got {len(self.blocks)}")
        for name in ("time_up", "space_up"):
            if len(getattr(self, name)) != max(levels - 1, 0):
                problems.append(f"{name} needs {levels - 1} entries, got {len(getattr(self, name))}")
            if any(f < 1 for f in getattr(self, name)):
                problems.append(f"{name} factors must be >= 1")
        if any(c < 1 for c in self.channels) or any(b < 0 for b in self.blocks):
            problems.append("channels must be positive and blocks non-negative")
        for name in ("kernel_size", "upsample_kernel_size"):
            k = getattr(self, name)
            if k < 1 or k % 2 == 0:
                problems.append(f"{name} must be a positive odd number, got {k}")
        if self.latent_channels < 1 or self.out_channels < 1:
            problems.append("latent_channels and out_channels must be positive")
        if self.patch_size < 1:
            problems.append(f"patch_size must be >= 1, got {self.patch_size}")
        if problems:
            raise ValueError("invalid TurboVAEDConfig: " + "; ".join(problems))

    @property
    def time_factor(self) -> int:
        return math.prod(self.time_up)

    @property
    def space_factor(self) -> int:
        return self.patch_size * math.prod(self.space_up)

    @property
    def exactly_streamable(self) -> bool:
        """Chunked (cache-carrying) decoding equals whole-clip decoding: every layer is causal
        and per-frame exact (RMSNorm, causal convs, causal pixel shuffle)."""
        return True

    @property
    def halo_tiling_exact(self) -> bool:
        """Spatial halo tiling equals untiled decoding: no statistics over space (RMSNorm is
        per position) and no attention."""
        return True

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TurboVAEDConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TurboVAEDConfig fields: {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class SeparableBlock(nn.Module):
    """Residual block of two depthwise-separable causal convs:
    ``x + pw2(dw2(silu(norm2(pw1(dw1(silu(norm1(x))))))))``, all norms RMSNorm per position."""

    def __init__(self, channels: int, kernel_size: int, eps: float):
        super().__init__()
        self.norm1 = Norm("rms", channels, eps=eps)
        self.dw1 = CausalConv3d(channels, channels, kernel_size, time_pad="zeros", groups=channels)
        self.pw1 = CausalConv3d(channels, channels, 1)
        self.norm2 = Norm("rms", channels, eps=eps)
        self.dw2 = CausalConv3d(channels, channels, kernel_size, time_pad="zeros", groups=channels)
        self.pw2 = CausalConv3d(channels, channels, 1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        h, cache = self.dw1(self.norm1(x, silu=True), cache)
        h, cache = self.pw1(h, cache)
        h, cache = self.dw2(self.norm2(h, silu=True), cache)
        h, cache = self.pw2(h, cache)
        return x + h, cache


class DecoupledPixelShuffleUpsample(_FirstChunkAware):
    """(N, Cin, T, H, W) -> (N, Cout, 1 + st (T - 1), s H, s W) at clip start, else (N, Cout, st T, sH, sW).

    A depthwise causal conv and a pointwise conv expand to ``Cout * st * s * s`` channels; ``st`` is
    moved into time, then each frame is 2D pixel-shuffled (see :func:`shuffle_3d`). At clip start the
    first ``st - 1`` output frames are dropped so latent frame 0 yields one frame, as in the teachers.
    """

    def __init__(self, cin: int, cout: int, time_factor: int, space_factor: int, kernel_size: int):
        super().__init__()
        self.time_factor = time_factor
        self.space_factor = space_factor
        self.dw = CausalConv3d(cin, cin, kernel_size, time_pad="zeros", groups=cin)
        self.pw = CausalConv3d(cin, cout * time_factor * space_factor**2, 1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> tuple[Tensor, CausalCache | None]:
        starts_clip = self._starts_clip(x, cache)
        y, cache = self.dw(x, cache)
        y, cache = self.pw(y, cache)
        y = shuffle_3d(y, self.time_factor, self.space_factor)
        if starts_clip and self.time_factor > 1:
            y = y[:, :, self.time_factor - 1 :]
        return y, cache


def shuffle_3d(y: Tensor, st: int, s: int) -> Tensor:
    """(N, C st s s, T, H, W) -> (N, C, T st, H s, W s).

    Channel ``((c s + i) s + j) st + k`` goes to frame ``t st + k``, pixel ``(h s + i, w s + j)``. Eager
    PyTorch does it as one permutation whose result is channels-last in memory (one copy, and the
    next convolutions run several times faster on CPUs in that layout). Exported graphs get the
    decoupled form, a reshape moving ``st`` into time and then a per-frame 2D pixel shuffle
    (``DepthToSpace``), so that every op stays a mobile-friendly 4-D one (:func:`shuffle_3d_decoupled`,
    the same values)."""
    if _graph_capture():
        return shuffle_3d_decoupled(y, st, s)
    n, channels, t, h, w = y.shape
    c = channels // (st * s * s)
    v = y.permute(0, 2, 3, 4, 1).reshape(n, t, h, w, c, s, s, st)
    v = v.permute(0, 1, 7, 2, 5, 3, 6, 4).reshape(n, t * st, h * s, w * s, c)
    return v.permute(0, 4, 1, 2, 3)


def shuffle_3d_decoupled(y: Tensor, st: int, s: int) -> Tensor:
    """:func:`shuffle_3d` as a time reshape then a per-frame ``F.pixel_shuffle`` (4-D ops)."""
    if st > 1:
        y = rearrange(y, "n (c st) t h w -> n c (t st) h w", st=st)
    if s > 1:
        y = batch_to_frames(F.pixel_shuffle(frames_to_batch(y), s), y.shape[0])
    return y


class _Level(nn.Module):
    """One resolution level: residual blocks then an optional upsampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.upsample: DecoupledPixelShuffleUpsample | None = None


class TurboDecoder(nn.Module):
    """(N, z, 1 + k, h, w) -> (N, 3, 1 + k t, h s, w s), nominally in [-1, 1]."""

    def __init__(self, cfg: TurboVAEDConfig):
        super().__init__()
        chans = cfg.channels
        # Dense conv_in: the latent has few channels, so a full 3x3x3 conv is cheap here.
        self.conv_in = CausalConv3d(cfg.latent_channels, chans[0], 3, time_pad="zeros")
        self.levels = nn.ModuleList()
        for i, c in enumerate(chans):
            level = _Level()
            for _ in range(cfg.blocks[i]):
                level.block.append(SeparableBlock(c, cfg.kernel_size, cfg.norm_eps))
            if i < len(chans) - 1:
                level.upsample = DecoupledPixelShuffleUpsample(
                    c, chans[i + 1], cfg.time_up[i], cfg.space_up[i], cfg.upsample_kernel_size
                )
            self.levels.append(level)
        self.norm_out = Norm("rms", chans[-1], eps=cfg.norm_eps)
        self.patch_size = cfg.patch_size
        # Dense conv_out at the narrowest width: cheap, and a depthwise conv cannot mix into RGB.
        self.conv_out = CausalConv3d(chans[-1], cfg.out_channels * cfg.patch_size**2, 3, time_pad="zeros")

    def stem(
        self, z: Tensor, cache: CausalCache | None = None, features: list[Tensor] | None = None
    ) -> tuple[Tensor, CausalCache | None]:
        """Latent-resolution part: conv_in and level 0's blocks -> (N, channels[0], T', h, w).
        ``features``: a list that receives level 0's output (for distillation)."""
        if not _graph_capture():  # exporters have no memory formats; runtimes pick their own layout
            # channels-last: the depthwise and pointwise convs run several times faster in it on CPUs
            z = z.contiguous(memory_format=torch.channels_last_3d)
        h, cache = self.conv_in(z, cache)
        for block in self.levels[0].block:
            h, cache = block(h, cache)
        if features is not None:
            features.append(h)
        return h, cache

    def body(
        self, h: Tensor, cache: CausalCache | None = None, features: list[Tensor] | None = None
    ) -> tuple[Tensor, CausalCache | None]:
        """Level 0's upsampler, the higher levels, norm_out, conv_out -> (N, 3, T, H, W).
        ``features``: a list that receives each higher level's output after its blocks."""
        for i, level in enumerate(self.levels):
            if i > 0:
                for block in level.block:
                    h, cache = block(h, cache)
                if features is not None:
                    features.append(h)
            if level.upsample is not None:
                h, cache = level.upsample(h, cache)
        y, cache = self.conv_out(self.norm_out(h, silu=True), cache)
        if self.patch_size > 1:
            y = rearrange(y, "n (c p q) t h w -> n c t (h p) (w q)", p=self.patch_size, q=self.patch_size)
        return y.contiguous(), cache


class TurboVAED(nn.Module):
    """Decoder-only Turbo-VAED. ``decode`` runs whole clips; ``decode_chunk`` carries an explicit
    :class:`CausalCache` for streaming; ``decode_video`` runs the chunked + tiled engine
    (:mod:`videovae.engine`). ``encode*`` raise :class:`DecoderOnlyError`."""

    family = "turbo-vaed"
    config_class = TurboVAEDConfig

    def __init__(self, config: TurboVAEDConfig):
        super().__init__()
        self.config = config
        self.decoder = TurboDecoder(config)
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

    def check_latents(self, z: Tensor) -> None:
        """Raise a clear error unless ``z`` is float (N, latent_channels, T' >= 1, h, w)."""
        if z.ndim != 5 or z.shape[1] != self.latent_channels or z.shape[2] < 1:
            raise ValueError(f"expected latents (N, {self.latent_channels}, T, h, w), got {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"expected float latents, got dtype {z.dtype}")

    # --- encode: not here ------------------------------------------------------------------------
    def _no_encoder(self, *args, **kwargs):
        raise DecoderOnlyError(
            "turbo-vaed is a decoder-only model: encode with its teacher VAE "
            "(see videovae.models.turbo_vaed.TEACHERS) and decode the teacher's latents here"
        )

    encode = encode_chunk = encode_body = encode_head = encode_video = _no_encoder

    # --- whole clip ----------------------------------------------------------------------------
    def decode(self, z: Tensor) -> Tensor:
        """z: unscaled latents (N, latent_channels, 1 + k, h, w) -> NCTHW (N, 3, 1 + k t, h s, w s),
        nominally in [-1, 1] (not clamped)."""
        self.check_latents(z)
        return self.decode_chunk(z, None)[0]

    def forward(self, z: Tensor) -> Tensor:
        """Same as :meth:`decode` (the training/distillation pass)."""
        return self.decode(z)

    def decode_with_features(self, z: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Whole-clip decode that also returns every level's output after its residual blocks
        (before its upsampler): level i is (N, channels[i], T_i, h_i, w_i). For distillation."""
        self.check_latents(z)
        features: list[Tensor] = []
        h, _ = self.decoder.stem(z, None, features)
        y, _ = self.decoder.body(h, None, features)
        return y, features

    # --- chunks ---------------------------------------------------------------------------------
    def decode_chunk(self, z: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """One time chunk of latents -> frames; the cache carries state to the next chunk. The
        first chunk (fresh cache or None) of 1 + k latents gives 1 + k t frames, later chunks of
        k latents give k t frames."""
        self.check_latents(z)
        h, cache = self.decode_stem(z, cache)
        return self.decode_body(h, cache)

    def decode_stem(self, z: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """The latent-resolution part of decoding: run untiled by the engine."""
        return self.decoder.stem(z, cache)

    def decode_body(self, h: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        """The upsampling part of decoding (what the engine tiles)."""
        return self.decoder.body(h, cache)

    # --- latent scaling ---------------------------------------------------------------------------
    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw latents -> diffusion-ready ``(z - shift) * scale`` (the teacher's factors)."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        return z / self.config.scaling_factor + self.config.shift_factor

    # --- engine -----------------------------------------------------------------------------------
    def decode_video(self, z: Tensor, geometry=None, **engine_options) -> Tensor:
        """Chunked/tiled decode of latents (1, z, T', h, w) to (1, 3, T, H, W) float32 in [-1, 1]
        (not clamped), cropped back to ``geometry`` when given."""
        from videovae.engine import decode_tensor

        return decode_tensor(self, z, geometry, **engine_options)

    def decoder_receptive_radius(self) -> float:
        """Spatial receptive radius of the decoder body (the tiled part) in latent pixels: a
        ``k``-wide conv reaches ``k // 2`` pixels at its own resolution."""
        cfg = self.config
        scale = 1.0  # feature pixels per latent pixel at the current level
        radius = 0.0
        for i in range(len(cfg.channels)):
            if i > 0:
                radius += cfg.blocks[i] * 2 * (cfg.kernel_size // 2) / scale
            if i < len(cfg.channels) - 1:
                radius += (cfg.upsample_kernel_size // 2) / scale
                scale *= cfg.space_up[i]
        return radius + 1.0 / scale  # conv_out

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            raise ValueError("turbo-vaed does not implement gradient checkpointing (it is small)")

    def num_parameters(self) -> dict[str, int]:
        dec = sum(p.numel() for p in self.decoder.parameters())
        return {"encoder": 0, "decoder": dec, "total": dec}


# Turbo preset -> the teacher preset whose latents it decodes (and whose decoder it replaces).
TEACHERS: dict[str, str] = {
    "turbo-tiny": "tiny",
    "turbo-vv-s16": "vv-s16",
    "turbo-od-vae": "od-vae",
    "turbo-cv-vae": "cv-vae",
    "turbo-onevae": "wan2.1",
}


def teacher_parameter_ratio(preset: str) -> float:
    """Decoder parameters of turbo ``preset`` over those of its teacher's decoder (counted on the
    meta device: no memory, no weights)."""
    from videovae.models import from_preset  # the registry imports this module

    if preset not in TEACHERS:
        raise ValueError(f"{preset!r} is not a turbo preset; known: {', '.join(sorted(TEACHERS))}")
    with torch.device("meta"):
        student = from_preset(preset).num_parameters()["decoder"]
        teacher = from_preset(TEACHERS[preset]).num_parameters()["decoder"]
    return student / teacher


PRESETS: dict[str, TurboVAEDConfig] = {
    # For tests and CPU demos: the `tiny` causal-vae's latent geometry (4x8x8, z=4), time upsampled
    # at the two lowest resolutions as in the teacher. The last 2x in space is a 2x2 unpatchify of
    # conv_out, so no level runs at full resolution: about 3x faster on a CPU than four levels with
    # the same widths (17 frames at 256x256, eager).
    "turbo-tiny": TurboVAEDConfig(
        latent_channels=4, channels=(32, 32, 24), blocks=(1, 1, 1), time_up=(2, 2), space_up=(2, 2), patch_size=2
    ),
    # The shipped vv-s16 (4x8x8, z=16; decoder 72 / 48 / 24 wide, 2x2 patches): the same geometry
    # with separable blocks.
    "turbo-vv-s16": TurboVAEDConfig(
        latent_channels=16, channels=(96, 64, 32), blocks=(2, 2, 1), time_up=(2, 2), space_up=(2, 2), patch_size=2
    ),
    # The large presets follow turbo-tiny's layout: three levels (latent, 2x, 4x) and a 2x2 unpatchify
    # after conv_out, so no level runs at full resolution. 17x256x256 on a 2-core CPU (fp32, eager,
    # whole clip): 4.8 s for turbo-od-vae against 186 s for od-vae's decoder; a fourth, full-resolution
    # level of 128 channels alone would cost more than all three levels here.
    # OD-VAE (4x8x8, z=4; decoder 128 x [4, 4, 2, 1] wide, 3 blocks per level).
    "turbo-od-vae": TurboVAEDConfig(
        latent_channels=4, channels=(512, 256, 96), blocks=(3, 3, 2), time_up=(2, 2), space_up=(2, 2), patch_size=2,
        scaling_factor=0.18215,
    ),
    # CV-VAE (4x8x8, z=4; SD-VAE-shaped decoder, time upsampled after its first and last up levels).
    "turbo-cv-vae": TurboVAEDConfig(
        latent_channels=4, channels=(512, 256, 96), blocks=(3, 3, 2), time_up=(2, 2), space_up=(2, 2), patch_size=2,
        scaling_factor=0.18215,
    ),
    # Wan 2.1 / OneVAE continuous path (4x8x8, z=16; decoder 96 x [4, 4, 2, 1] wide). Latent
    # scaling is per channel in the teacher (its latents_mean / latents_std): use the teacher's.
    "turbo-onevae": TurboVAEDConfig(
        latent_channels=16, channels=(384, 192, 96), blocks=(3, 3, 2), time_up=(2, 2), space_up=(2, 2), patch_size=2
    ),
}


# --- a teacher's encoder + a turbo decoder ---------------------------------------------------------

# Teacher family -> its decode-side submodules, dropped from a pair (the turbo decoder replaces
# them; it decodes the raw latents the teacher's encoder writes). OneVAE's token head goes too: a
# pair encodes and decodes continuous latents only.
DECODE_SIDE: dict[str, tuple[str, ...]] = {
    "causal-vae": ("decoder", "post_quant_conv"),
    "od-vae": ("decoder", "post_quant_conv"),
    "cv-vae": ("decoder",),
    "onevae": ("decoder", "conv2", "post_quant_conv", "quant_conv", "quantizer"),
}


@dataclass(frozen=True)
class LatentIdentity:
    """Who wrote a latent file: the family, config and weights digest recorded in it and checked
    before decoding."""

    family: str
    config: dict[str, Any]
    weights_sha256: str


@dataclass(frozen=True)
class TurboPairConfig:
    """A :class:`TurboPair`: the teacher (family, config, and the digest of the teacher checkpoint
    whose encoder the pair holds) and the turbo decoder's config. Stored in every checkpoint."""

    teacher_family: str
    teacher: dict[str, Any] = field(hash=False)
    teacher_weights_sha256: str
    decoder: TurboVAEDConfig

    def __post_init__(self) -> None:
        if self.teacher_family not in DECODE_SIDE:
            raise ValueError(f"turbo-pair: teacher family {self.teacher_family!r} cannot be paired; "
                             f"known: {', '.join(sorted(DECODE_SIDE))}")

    @property
    def teacher_config(self):
        from videovae.models import family_of  # the registry imports this module

        return family_of(self.teacher_family).config_class.from_dict(self.teacher)

    # The pair encodes like its teacher; its decoder streams and tiles exactly in any case.
    @property
    def exactly_streamable(self) -> bool:
        return self.teacher_config.exactly_streamable

    @property
    def halo_tiling_exact(self) -> bool:
        return self.teacher_config.halo_tiling_exact

    @property
    def scaling_factor(self):
        return self.teacher_config.scaling_factor

    @property
    def shift_factor(self):
        return self.teacher_config.shift_factor

    def to_dict(self) -> dict[str, Any]:
        return {"teacher_family": self.teacher_family, "teacher": self.teacher,
                "teacher_weights_sha256": self.teacher_weights_sha256, "decoder": self.decoder.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TurboPairConfig:
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - known), sorted(known - set(data))
        if unknown or missing:
            raise ValueError(f"TurboPairConfig: unknown fields {unknown or '-'}, missing fields {missing or '-'}")
        return cls(data["teacher_family"], dict(data["teacher"]), data["teacher_weights_sha256"],
                   TurboVAEDConfig.from_dict(data["decoder"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class TurboPair(nn.Module):
    """The teacher's encoder (``teacher``: the teacher model without its decode side) and a turbo
    decoder (``student``). Encoding is the teacher's, bit for bit, so latent files of the teacher
    and of the pair are interchangeable: both record the teacher as their source
    (:meth:`latent_identity`), and the pair decodes only latents of that teacher checkpoint.

    Layout: video NCTHW in [-1, 1] <-> latents (N, z, 1 + k, h, w), the teacher's geometry."""

    family = "turbo-pair"
    config_class = TurboPairConfig

    def __init__(self, config: TurboPairConfig):
        super().__init__()
        from videovae.models import build_model  # the registry imports this module

        self.config = config
        teacher = build_model(config.teacher_family, config.teacher)
        for name in DECODE_SIDE[config.teacher_family]:
            setattr(teacher, name, None)
        self.teacher = teacher
        self.student = TurboVAED(config.decoder)
        mine = (self.student.latent_channels, self.student.time_factor, self.student.space_factor)
        theirs = (teacher.latent_channels, teacher.time_factor, teacher.space_factor)
        if mine != theirs:
            raise ValueError(f"turbo-pair: the decoder's (latent channels, time factor, space factor) {mine} "
                             f"differ from the teacher's {theirs}")

    @classmethod
    def from_models(cls, teacher: nn.Module, student: TurboVAED, teacher_digest: str) -> TurboPair:
        """Pair a teacher model (weights digest ``teacher_digest``) with a turbo decoder; weights are
        copied (the arguments are left untouched)."""
        pair = cls(TurboPairConfig(teacher.family, teacher.config.to_dict(), teacher_digest, student.config))
        own = pair.teacher.state_dict()
        pair.teacher.load_state_dict({k: v for k, v in teacher.state_dict().items() if k in own})
        pair.student.load_state_dict(student.state_dict())
        return pair.to(next(student.parameters()).device)

    # --- geometry ------------------------------------------------------------------------------
    @property
    def time_factor(self) -> int:
        return self.student.time_factor

    @property
    def space_factor(self) -> int:
        return self.student.space_factor

    @property
    def latent_channels(self) -> int:
        return self.student.latent_channels

    def latent_identity(self) -> LatentIdentity:
        """The teacher checkpoint: recorded in the latent files the pair writes, required of those
        it decodes."""
        cfg = self.config
        return LatentIdentity(cfg.teacher_family, cfg.teacher, cfg.teacher_weights_sha256)

    # --- the teacher's encoder ---------------------------------------------------------------------
    def encode(self, x: Tensor):
        """x: NCTHW in [-1, 1] -> the teacher's posterior over latents."""
        return self.teacher.encode(x)

    def posterior(self, moments: Tensor):
        return self.teacher.posterior(moments)

    def encode_chunk(self, x: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        return self.teacher.encode_chunk(x, cache)

    def encode_body(self, x: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        return self.teacher.encode_body(x, cache)

    def encode_head(self, h: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        return self.teacher.encode_head(h, cache)

    def encoder_receptive_radius(self) -> float:
        return self.teacher.encoder_receptive_radius()

    def scale_latents(self, z: Tensor) -> Tensor:
        return self.teacher.scale_latents(z)

    def unscale_latents(self, z: Tensor) -> Tensor:
        return self.teacher.unscale_latents(z)

    # --- the turbo decoder -------------------------------------------------------------------------
    def check_latents(self, z: Tensor) -> None:
        self.student.check_latents(z)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled teacher latents (N, z, 1 + k, h, w) -> NCTHW, nominally in [-1, 1]."""
        return self.student.decode(z)

    def decode_chunk(self, z: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        return self.student.decode_chunk(z, cache)

    def decode_stem(self, z: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        return self.student.decode_stem(z, cache)

    def decode_body(self, h: Tensor, cache: CausalCache | None) -> tuple[Tensor, CausalCache | None]:
        return self.student.decode_body(h, cache)

    def decoder_receptive_radius(self) -> float:
        return self.student.decoder_receptive_radius()

    def forward(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None):
        """Encode with the teacher, decode with the turbo decoder: (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    # --- engine ------------------------------------------------------------------------------------
    def encode_video(self, video: Tensor, **engine_options):
        from videovae.engine import encode_tensor

        return encode_tensor(self, video, **engine_options)

    def decode_video(self, z: Tensor, geometry=None, **engine_options) -> Tensor:
        from videovae.engine import decode_tensor

        return decode_tensor(self, z, geometry, **engine_options)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        if enabled:
            raise ValueError("turbo-pair is not trained as a whole (distil its decoder with `videovae distill`)")

    def num_parameters(self) -> dict[str, int]:
        enc = sum(p.numel() for p in self.teacher.parameters())
        dec = sum(p.numel() for p in self.student.parameters())
        return {"encoder": enc, "decoder": dec, "total": enc + dec}
