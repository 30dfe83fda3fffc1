"""OD-VAE (Open-Sora-Plan v1.2 ``CausalVAEModel``): presets, official checkpoints, official tiling,
initialisation from a 2D image VAE and latent widening.

The architecture is expressed exactly by :class:`~videovae.models.causal_vae.CausalVAE`:

* encoder: per-frame 2D ``conv_in``; residual blocks 2D, 2D, 3D, 3D (2D blocks normalise each
  frame, 3D blocks use GroupNorm(32) over (C/G, T, H, W) of the whole clip); downsamplers: a
  per-frame 2D stride-2 conv after level 0, causal 3x3x3 stride-2 convs (time too) after levels 1
  and 2; mid block with per-frame single-head spatial attention;
* decoder: 3D residual blocks (3 per level); a space-only upsampler (nearest, then a per-frame
  3x3 conv) at level 1, spatio-temporal upsamplers at levels 3 and 2: frame 0 upsampled bilinearly
  in space only, frames 1.. trilinearly (``align_corners=False``, half a latent frame look-ahead),
  then a causal 3x3x3 conv: T -> 1 + 2(T - 1);
* causal convs repeat the first frame ``k_t - 1`` times in front; posterior logvar clamped to
  [-30, 20]; latents are scaled by 0.18215 for diffusion.

Video in: NCTHW in [-1, 1] with T = 1 + 4k, H and W multiples of 8; latent (N, 4, 1 + k, H/8, W/8);
decoder output NCTHW, nominally in [-1, 1], not clamped.

Because GroupNorm pools over time, OD-VAE is not causal in its statistics: chunked inference
differs from whole-clip inference, and the official windowed tiling (:class:`OfficialTiling`)
differs from both. ``od-vae-stream`` replaces clip GroupNorm by per-frame GroupNorm and trilinear
time upsampling by causal nearest repetition (spatial nearest, as in SD's decoder), so chunked
equals whole clip exactly and a 2D SD-style VAE inflates into it exactly.

Official checkpoints (diffusers-style folders or raw training checkpoints) load through
:func:`convert_official`; state-dict names are the official ones. Nothing here is copied from the
official code; the behaviour was read from PKU-YuanGroup/Open-Sora-Plan tag v1.2.0.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from videovae.models.causal_vae import CausalVAE, CausalVAEConfig
from videovae.statedict import (
    CheckpointError,
    find_weights,
    load_state_dict_strict,
    read_weights,
    strip_module,
    unwrap_training_state,
)

SCALING_FACTOR = 0.18215


@dataclass(frozen=True)
class ODVAEConfig(CausalVAEConfig):
    """:class:`CausalVAEConfig` plus the official windowed tiling (``--tiling official``): encode
    windows of ``1 + official_frames`` frames every ``official_frames`` (official: 33 / 32),
    decode windows of ``1 + official_decode_latents`` latents every ``official_decode_latents``
    (official: 16 / 15, independent of the encode windows), spatial tiles of ``official_tile``
    pixels (256) with overlap factor ``official_overlap`` (0.125)."""

    official_frames: int = 32
    official_decode_latents: int = 15
    official_tile: int = 256
    official_overlap: float = 0.125


class ODVAE(CausalVAE):
    """A :class:`CausalVAE` of the OD-VAE family; adds the official windowed tiling, whose sizes
    live in the config (:class:`ODVAEConfig`)."""

    family = "od-vae"
    config_class = ODVAEConfig

    def __init__(self, config: ODVAEConfig):
        if not isinstance(config, ODVAEConfig):
            raise TypeError(f"ODVAE needs an ODVAEConfig (see odvae_config), got {type(config).__name__}")
        super().__init__(config)

    def official_tiling_for(
        self,
        frames: int | None = None,
        decode_latents: int | None = None,
        tile: int | None = None,
        overlap: float | None = None,
    ) -> OfficialTiling:
        """The official tiling of this config, each given value overriding one setting: ``frames``
        (encode windows of ``1 + frames`` frames every ``frames``), ``decode_latents`` (decode
        windows of ``1 + decode_latents`` latents, independent of the encode windows), ``tile``
        (pixels; ``tile / 8`` latents), ``overlap`` (``tile_overlap_factor``). 0 = untiled in that
        dimension."""
        cfg = self.config
        frames = cfg.official_frames if frames is None else frames
        decode_latents = cfg.official_decode_latents if decode_latents is None else decode_latents
        tile = cfg.official_tile if tile is None else tile
        overlap = cfg.official_overlap if overlap is None else overlap
        untiled = 1 << 30
        if tile:
            latent = tile // self.space_factor
            if int(tile * (1 - overlap)) != self.space_factor * (latent - int(latent * overlap)):
                raise ValueError(
                    f"official tiling with tile {tile} and overlap {overlap} is inconsistent: the encode "
                    f"stride ({int(tile * (1 - overlap))} px) differs from the kept {latent - int(latent * overlap)} "
                    f"latents per tile; pick a tile whose latent size times the overlap is an integer"
                )
        return OfficialTiling(
            sample_size=tile or untiled,
            latent_size=tile // self.space_factor if tile else untiled,
            overlap=overlap,
            sample_frames=1 + frames if frames else untiled,
            latent_frames=1 + decode_latents if decode_latents else untiled,
        )

    def official_encode(self, x: Tensor, tiling: OfficialTiling | None = None) -> Tensor:
        """x: NCTHW in [-1, 1] -> raw moments (N, 2z, T', h, w), tiled as the official ``encode``
        does with ``use_tiling`` on (see :func:`official_tiled_encode`)."""
        return official_tiled_encode(self, x, tiling or self.official_tiling_for())

    def official_decode(self, z: Tensor, tiling: OfficialTiling | None = None) -> Tensor:
        """z: unscaled latents -> NCTHW, tiled as the official ``decode`` with ``use_tiling`` on."""
        return official_tiled_decode(self, z, tiling or self.official_tiling_for())


# --- presets ------------------------------------------------------------------------------------


def odvae_config(
    temporal_down: tuple[bool, bool, bool] = (False, True, True),
    *,
    stream: bool = False,
    all_3d: bool = False,
    base_channels: int = 128,
    channel_mult: tuple[int, ...] = (1, 2, 4, 4),
    latent_channels: int = 4,
) -> ODVAEConfig:
    """OD-VAE layout with time compressed by the downsamplers of the levels flagged in
    ``temporal_down``. Encoder levels still at the full frame rate use 2D (per-frame) blocks, the
    rest 3D blocks (this rule gives the released 2D, 2D, 3D, 3D for time at levels 1 and 2);
    ``all_3d`` makes every block and ``conv_in`` 3D."""
    kinds = []
    full_rate = True
    for i in range(len(channel_mult)):
        kinds.append("3d" if all_3d or not full_rate else "2d")
        if i < len(temporal_down) and temporal_down[i]:
            full_rate = False
    return ODVAEConfig(
        base_channels=base_channels,
        channel_mult=channel_mult,
        num_res_blocks=2,
        decoder_res_blocks=3,
        temporal_down=temporal_down,
        encoder_block_kinds=tuple(kinds),
        encoder_conv_in="3d" if all_3d else "2d",
        latent_channels=latent_channels,
        norm="group_frame" if stream else "group_clip",
        norm_2d="group_frame",
        norm_groups=32,
        norm_eps=1e-6,
        time_pad="replicate",
        time_upsample="nearest" if stream else "trilinear",
        attention=True,
        use_quant_conv=True,
        spatial_upsample_kernel_t=1,
        scaling_factor=SCALING_FACTOR,
    )


PRESETS: dict[str, ODVAEConfig] = {
    # The released v1.2 model (verified against the official code and its parameter count):
    # time compressed after encoder levels 1 and 2, 4x8x8, z=4, 239,189,991 parameters.
    "od-vae": odvae_config(),
    # Temporal-compression variants. The OD-VAE paper analyses four variants, but which levels
    # compress time in each could not be verified; these presets are defined by the levels whose
    # downsampler halves time (and use 2D blocks while at the full frame rate). Unverified as
    # reproductions of the paper's variants.
    "od-vae-t01": odvae_config((True, True, False)),
    "od-vae-t02": odvae_config((True, False, True)),
    "od-vae-3d": odvae_config((False, True, True), all_3d=True),
    # Same layout and weight shapes as od-vae, per-frame GroupNorm everywhere and causal nearest
    # time (and space) upsampling: chunked == whole clip exactly; inflates exactly from an image VAE.
    "od-vae-stream": odvae_config(stream=True),
}


# --- official config.json -> ODVAEConfig --------------------------------------------------------

_BLOCK_KINDS = {"ResnetBlock2D": "2d", "ResnetBlock3D": "3d"}
_CONV_IN_KINDS = {"Conv2d": "2d", "CausalConv3d": "3d"}
_DOWN_KINDS = {"Downsample": False, "Spatial2xTime2x3DDownsample": True}
_UP_KINDS = {"SpatialUpsample2x": False, "Spatial2xTime2x3DUpsample": True}


def config_from_official(cfg: dict[str, Any]) -> ODVAEConfig:
    """Map the official ``CausalVAEModel`` config (config.json) to an :class:`ODVAEConfig`.

    Missing fields take the released v1.2 values. Fields that do not change the architecture
    (``_class_name``, ``_diffusers_version``, ``dropout``, ``resolution``, legacy training keys, ...)
    are ignored. Layouts this implementation cannot reproduce raise ``ValueError`` naming the field.
    """
    v12 = OFFICIAL_V12_CONFIG
    get = lambda k: cfg.get(k, v12[k])  # noqa: E731
    problems: list[str] = []

    def expect(key: str, allowed) -> None:
        if get(key) not in allowed:
            problems.append(f"{key}={get(key)!r} (supported: {', '.join(map(repr, allowed))})")

    if cfg.get("_class_name", "CausalVAEModel") != "CausalVAEModel":
        raise ValueError(f"unsupported OD-VAE config: _class_name={cfg['_class_name']!r} (expected 'CausalVAEModel')")
    mult = tuple(int(m) for m in get("hidden_size_mult"))
    levels = len(mult)
    for key in ("in_channels", "out_channels"):
        if key in cfg and cfg[key] != 3:
            problems.append(f"{key}={cfg[key]!r} (supported: 3)")
    if get("embed_dim") != get("z_channels"):
        problems.append(f"embed_dim={get('embed_dim')} differs from z_channels={get('z_channels')}")
    if get("attn_resolutions"):
        problems.append(f"attn_resolutions={get('attn_resolutions')!r} (supported: [])")
    expect("double_z", [True])
    expect("q_conv", ["CausalConv3d"])
    expect("encoder_conv_in", list(_CONV_IN_KINDS))
    expect("encoder_conv_out", ["CausalConv3d"])
    expect("decoder_conv_in", ["CausalConv3d"])
    expect("decoder_conv_out", ["CausalConv3d"])
    expect("encoder_attention", ["AttnBlock3DFix"])
    expect("decoder_attention", ["AttnBlock3DFix"])
    expect("encoder_mid_resnet", ["ResnetBlock3D"])
    expect("decoder_mid_resnet", ["ResnetBlock3D"])
    expect("use_quant_layer", [True, False])
    enc_blocks = list(get("encoder_resnet_blocks"))
    dec_blocks = list(get("decoder_resnet_blocks"))
    down = list(get("encoder_spatial_downsample"))
    up = list(get("decoder_spatial_upsample"))
    for key, value in (
        ("encoder_resnet_blocks", enc_blocks),
        ("decoder_resnet_blocks", dec_blocks),
        ("encoder_spatial_downsample", down),
        ("decoder_spatial_upsample", up),
        ("encoder_temporal_downsample", list(get("encoder_temporal_downsample"))),
        ("decoder_temporal_upsample", list(get("decoder_temporal_upsample"))),
    ):
        if len(value) != levels:
            problems.append(f"{key} has {len(value)} entries for {levels} levels")
    if any(b not in _BLOCK_KINDS for b in enc_blocks):
        problems.append(f"encoder_resnet_blocks={enc_blocks!r} (supported: ResnetBlock2D, ResnetBlock3D)")
    if any(b != "ResnetBlock3D" for b in dec_blocks):
        problems.append(f"decoder_resnet_blocks={dec_blocks!r} (supported: ResnetBlock3D only)")
    if any(get(k) and any(get(k)) for k in ("encoder_temporal_downsample", "decoder_temporal_upsample")):
        problems.append("separate temporal down/upsamplers (v1.1 layout) are not supported")
    if down and (down[-1] != "" or any(d not in _DOWN_KINDS for d in down[:-1])):
        problems.append(f"encoder_spatial_downsample={down!r} (supported: {', '.join(_DOWN_KINDS)}, last '')")
    if up and (up[0] != "" or any(u not in _UP_KINDS for u in up[1:])):
        problems.append(f"decoder_spatial_upsample={up!r} (supported: '' first, then {', '.join(_UP_KINDS)})")
    if problems:
        raise ValueError("unsupported OD-VAE config: " + "; ".join(problems))
    temporal_down = tuple(_DOWN_KINDS[d] for d in down[:-1])
    temporal_up = tuple(_UP_KINDS[u] for u in up[1:])
    if temporal_up != temporal_down:
        raise ValueError(
            f"unsupported OD-VAE config: decoder_spatial_upsample={up!r} does not mirror "
            f"encoder_spatial_downsample={down!r}"
        )
    base = replace(
        PRESETS["od-vae"],
        base_channels=int(get("hidden_size")),
        channel_mult=mult,
        num_res_blocks=int(get("num_res_blocks")),
        decoder_res_blocks=int(get("num_res_blocks")) + 1,
        temporal_down=temporal_down,
        encoder_block_kinds=tuple(_BLOCK_KINDS[b] for b in enc_blocks),
        encoder_conv_in=_CONV_IN_KINDS[get("encoder_conv_in")],
        latent_channels=int(get("z_channels")),
        use_quant_conv=bool(get("use_quant_layer")),
    )
    return base


# The released v1.2 ``vae/config.json`` architecture fields.
OFFICIAL_V12_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "z_channels": 4,
    "hidden_size_mult": [1, 2, 4, 4],
    "attn_resolutions": [],
    "double_z": True,
    "embed_dim": 4,
    "num_res_blocks": 2,
    "q_conv": "CausalConv3d",
    "encoder_conv_in": "Conv2d",
    "encoder_conv_out": "CausalConv3d",
    "encoder_attention": "AttnBlock3DFix",
    "encoder_resnet_blocks": ["ResnetBlock2D", "ResnetBlock2D", "ResnetBlock3D", "ResnetBlock3D"],
    "encoder_spatial_downsample": ["Downsample", "Spatial2xTime2x3DDownsample", "Spatial2xTime2x3DDownsample", ""],
    "encoder_temporal_downsample": ["", "", "", ""],
    "encoder_mid_resnet": "ResnetBlock3D",
    "decoder_conv_in": "CausalConv3d",
    "decoder_conv_out": "CausalConv3d",
    "decoder_attention": "AttnBlock3DFix",
    "decoder_resnet_blocks": ["ResnetBlock3D"] * 4,
    "decoder_spatial_upsample": ["", "SpatialUpsample2x", "Spatial2xTime2x3DUpsample", "Spatial2xTime2x3DUpsample"],
    "decoder_temporal_upsample": ["", "", "", ""],
    "decoder_mid_resnet": "ResnetBlock3D",
    "use_quant_layer": True,
}


# --- official checkpoints ------------------------------------------------------------------------

# Top-level prefixes of training checkpoints that are not part of the autoencoder: the loss module
# (LPIPS network, discriminator, learned logvar) and discriminator models. Dropped explicitly.
DROPPED_PREFIXES = ("loss.", "discriminator.", "disc_model.", "dics_model.")

# Official key -> our key. Our module tree mirrors the official one, so every rule is the identity;
# they are listed so that any key outside these patterns is reported as unexpected.
_KEY_RULES: tuple[re.Pattern, ...] = tuple(
    re.compile(p)
    for p in (
        r"encoder\.conv_in\.(conv\.)?(weight|bias)",
        r"encoder\.down\.\d+\.block\.\d+\.(norm1|norm2)\.(weight|bias)",
        r"encoder\.down\.\d+\.block\.\d+\.(conv1|conv2|nin_shortcut)\.(conv\.)?(weight|bias)",
        r"encoder\.down\.\d+\.downsample\.conv\.(conv\.)?(weight|bias)",
        r"(encoder|decoder)\.mid\.block_[12]\.(norm1|norm2)\.(weight|bias)",
        r"(encoder|decoder)\.mid\.block_[12]\.(conv1|conv2|nin_shortcut)\.conv\.(weight|bias)",
        r"(encoder|decoder)\.mid\.attn_1\.norm\.(weight|bias)",
        r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.conv\.(weight|bias)",
        r"(encoder|decoder)\.norm_out\.(weight|bias)",
        r"(encoder|decoder)\.conv_out\.conv\.(weight|bias)",
        r"decoder\.conv_in\.conv\.(weight|bias)",
        r"decoder\.up\.\d+\.block\.\d+\.(norm1|norm2)\.(weight|bias)",
        r"decoder\.up\.\d+\.block\.\d+\.(conv1|conv2|nin_shortcut)\.conv\.(weight|bias)",
        r"decoder\.up\.\d+\.upsample\.conv\.conv\.(weight|bias)",
        r"(quant_conv|post_quant_conv)\.conv\.(weight|bias)",
    )
)


def map_official_key(key: str) -> str | None:
    """Our state-dict name for an official one, or None when the key is not an OD-VAE weight."""
    return key if any(rule.fullmatch(key) for rule in _KEY_RULES) else None


def unwrap_official_state(obj: Any, prefer_ema: bool = True, source: str = "checkpoint") -> dict[str, Tensor]:
    """The autoencoder state dict inside an official checkpoint object (see
    :func:`videovae.statedict.unwrap_training_state`): ``module.`` prefixes (DDP) removed and keys
    under :data:`DROPPED_PREFIXES` dropped."""
    return unwrap_training_state(obj, prefer_ema=prefer_ema, source=source, rename=strip_module,
                                 dropped=DROPPED_PREFIXES)


def convert_official(src: str | os.PathLike, *, prefer_ema: bool = True, config: dict | None = None) -> ODVAE:
    """Load an official OD-VAE checkpoint into an :class:`ODVAE` (fp32, eval mode).

    ``src``: a released diffusers-style folder (``config.json`` plus
    ``diffusion_pytorch_model.safetensors`` / ``.bin``, or ``*.ckpt``) or a weights file
    (``.safetensors``, or ``.pt`` / ``.ckpt`` / ``.bin`` read with ``torch.load(weights_only=True)``).
    Training checkpoints may nest the weights in ``state_dict`` / ``state_dict.gen_model`` /
    ``ema_state_dict`` (EMA preferred unless ``prefer_ema=False``) with ``module.`` prefixes; keys
    starting with ``loss.``, ``discriminator.``, ``disc_model.`` or ``dics_model.`` are dropped.
    The architecture comes from ``config`` (official field names), else ``config.json`` beside the
    weights, else the released v1.2 layout. Any other unexpected key, a missing key or a shape
    mismatch raises :class:`videovae.statedict.CheckpointError` listing them.
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
    unknown = sorted(k for k in state if map_official_key(k) is None)
    if unknown:
        shown = ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        raise CheckpointError(f"{weights}: keys that are not OD-VAE weights: {shown}")
    mapped = {map_official_key(k): v.float() for k, v in state.items()}
    model = ODVAE(cfg)
    load_state_dict_strict(model, mapped, source=str(weights))
    return model.eval()


# --- official tiling -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OfficialTiling:
    """Tile sizes of the official windowed tiling (the attributes of ``CausalVAEModel``).

    sample_size / latent_size: spatial tile in pixels / latents; overlap: ``tile_overlap_factor``;
    sample_frames / latent_frames: temporal window in frames / latents. As in the official code,
    latent sizes are not derived from the sample sizes: set both consistently (e.g. 256/32, 29/8).
    """

    sample_size: int = 256
    latent_size: int = 32
    overlap: float = 0.125
    sample_frames: int = 33
    latent_frames: int = 16


def official_windows(length: int, window: int) -> list[tuple[int, int]]:
    """Temporal windows [start, end) of the official tiling: starts every ``window - 1`` frames,
    neighbours share one frame, the last window is cut to ``length`` or a final one appended."""
    step = window - 1
    if step < 1:
        raise ValueError(f"temporal window {window} must be at least 2")
    starts = list(range(0, length, step))
    if len(starts) == 1:
        return [(0, length)]
    windows = [(starts[i], starts[i + 1] + 1) for i in range(len(starts) - 1)]
    if windows[-1][1] > length:
        windows[-1] = (windows[-1][0], length)
    elif windows[-1][1] < length:
        windows.append((starts[-1], length))
    return windows


def _blend(a: Tensor, b: Tensor, extent: int, dim: int) -> Tensor:
    """Cross-fade the first rows of ``b`` along ``dim`` with the last rows of ``a`` (in place):
    row y takes ``1 - y/E`` of ``a`` and ``y/E`` of ``b``."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for y in range(extent):
        head = b.select(dim, y)
        head.copy_(a.select(dim, a.shape[dim] - extent + y) * (1 - y / extent) + head * (y / extent))
    return b


def _tiled_2d(fn, x: Tensor, tile_in: int, tile_out: int, overlap: float) -> Tensor:
    """The official spatial tiling: tiles of ``tile_in`` every ``int(tile_in * (1 - overlap))``
    input pixels, results blended over ``int(tile_out * overlap)`` output pixels, each tile
    cropped to ``tile_out - extent`` before concatenation."""
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    if stride < 1:
        raise ValueError(f"tile of {tile_in} with overlap {overlap} gives no stride")
    h, w = x.shape[-2:]
    rows = [[fn(x[..., i : i + tile_in, j : j + tile_in]) for j in range(0, w, stride)] for i in range(0, h, stride)]
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, extent, dim=3)
            if j > 0:
                _blend(row[j - 1], tile, extent, dim=4)
            kept.append(tile[..., :keep, :keep])
        out_rows.append(torch.cat(kept, dim=4))
    return torch.cat(out_rows, dim=3)


def _official_windows(fn, x: Tensor, window: int, in_tile: int, out_tile: int, overlap: float) -> Tensor:
    """Run ``fn`` over the official temporal windows of ``x``, each spatially tiled and blended;
    later windows drop their first output frame (their overlap with the previous window)."""
    parts = []
    for index, (a, b) in enumerate(official_windows(x.shape[2], window)):
        out = _tiled_2d(fn, x[:, :, a:b], in_tile, out_tile, overlap)
        parts.append(out if index == 0 else out[:, :, 1:])
    return torch.cat(parts, dim=2)


@torch.no_grad()
def official_tiled_encode(model: CausalVAE, x: Tensor, tiling: OfficialTiling) -> Tensor:
    """Encode NCTHW video in [-1, 1] as the official ``encode`` with ``use_tiling`` on: whole clip
    unless it exceeds the tile (strictly), else temporal windows (later windows drop their first
    latent), each spatially tiled and blended. Returns the raw moments (N, 2z, T', h, w); clamp
    the logvar with ``model.posterior``. Window and tile statistics are independent."""
    t, h, w = x.shape[2:]

    def encode(clip: Tensor) -> Tensor:
        return model.encode_chunk(clip, None)[0]

    if not (w > tiling.sample_size or h > tiling.sample_size or t > tiling.sample_frames):
        return encode(x)
    return _official_windows(encode, x, tiling.sample_frames, tiling.sample_size, tiling.latent_size, tiling.overlap)


@torch.no_grad()
def official_tiled_decode(model: CausalVAE, z: Tensor, tiling: OfficialTiling) -> Tensor:
    """Decode unscaled latents as the official ``decode`` with ``use_tiling`` on (latent windows
    of ``latent_frames``, later windows drop their first output frame; spatial tiles of
    ``latent_size`` blended over ``int(sample_size * overlap)`` pixels). Returns NCTHW, unclamped."""
    t, h, w = z.shape[2:]

    def decode(latent: Tensor) -> Tensor:
        return model.decode_chunk(latent, None)[0]

    if not (w > tiling.latent_size or h > tiling.latent_size or t > tiling.latent_frames):
        return decode(z)
    return _official_windows(decode, z, tiling.latent_frames, tiling.latent_size, tiling.sample_size, tiling.overlap)


# --- initialisation from a 2D image VAE ---------------------------------------------------------------

InflateInit = Literal["tail", "center"]


def _diffusers_rules(levels: int) -> list[tuple[re.Pattern, str]]:
    """(pattern, replacement) pairs mapping diffusers AutoencoderKL names to ours."""
    res = r"(norm1|conv1|norm2|conv2)"
    rules = [
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\." + res + r"\.", r"encoder.down.\1.block.\2.\3."),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.", r"encoder.down.\1.block.\2.nin_shortcut."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
        (r"(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|query)\.", r"\1.mid.attn_1.q."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_k|key)\.", r"\1.mid.attn_1.k."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_v|value)\.", r"\1.mid.attn_1.v."),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(to_out\.0|proj_attn)\.", r"\1.mid.attn_1.proj_out."),
        (r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"(encoder|decoder)\.conv_(in|out)\.", r"\1.conv_\2."),
        (r"(quant_conv|post_quant_conv)\.", r"\1."),
    ]
    for k in range(levels):
        level = levels - 1 - k
        rules.append((rf"decoder\.up_blocks\.{k}\.resnets\.(\d+)\." + res + r"\.", rf"decoder.up.{level}.block.\1.\2."))
        shortcut = rf"decoder\.up_blocks\.{k}\.resnets\.(\d+)\.conv_shortcut\."
        rules.append((shortcut, rf"decoder.up.{level}.block.\1.nin_shortcut."))
        rules.append((rf"decoder\.up_blocks\.{k}\.upsamplers\.0\.conv\.", rf"decoder.up.{level}.upsample.conv."))
    return [(re.compile(p), r) for p, r in rules]


def _map_diffusers_key(key: str, rules, own: dict[str, Tensor]) -> str | None:
    """Our name for a diffusers AutoencoderKL key (with or without our causal ``.conv`` level)."""
    stem, _, leaf = key.rpartition(".")
    stem += "."
    for pattern, repl in rules:
        match = pattern.match(stem)
        if match:
            prefix = match.expand(repl) + stem[match.end() :]
            name = prefix + leaf
            if name in own:
                return name
            nested = prefix + "conv." + leaf
            return nested if nested in own else name
    return None


def inflate_weight(w2d: Tensor, target_shape: torch.Size, init: InflateInit = "tail") -> Tensor:
    """A 2D weight (conv ``[o, i, kh, kw]`` or linear ``[o, i]``) as the 3D weight of
    ``target_shape``: ``tail`` puts it in the last temporal slot (the current frame), ``center``
    in the middle one; other slots are zero. Equal shapes are copied."""
    if tuple(w2d.shape) == tuple(target_shape):
        return w2d.clone()
    if len(target_shape) == 5 and w2d.ndim == 2 and tuple(target_shape[2:]) == (1, 1, 1):
        return w2d.reshape(target_shape).clone()
    if len(target_shape) == 5 and w2d.ndim == 4 and tuple(w2d.shape) == (*target_shape[:2], *target_shape[3:]):
        out = w2d.new_zeros(target_shape)
        slot = target_shape[2] - 1 if init == "tail" else target_shape[2] // 2
        out[:, :, slot] = w2d
        return out
    if len(target_shape) == 4 and w2d.ndim == 2 and tuple(target_shape[2:]) == (1, 1):
        return w2d.reshape(target_shape).clone()
    raise ValueError(f"cannot inflate a weight of shape {tuple(w2d.shape)} to {tuple(target_shape)}")


def inflate_image_vae(state_2d: dict[str, Tensor], config: ODVAEConfig, init: InflateInit = "tail") -> ODVAE:
    """Build an :class:`ODVAE` of ``config`` from a 2D SD-style AutoencoderKL state dict (diffusers
    names ``encoder.down_blocks.{i}.resnets.{j}``, ``mid_block.attentions.0.{to_q,to_k,to_v,to_out.0}``
    or the older ``query/key/value/proj_attn``, ``decoder.up_blocks``, ``quant_conv``, ...).

    Every 3D kernel gets the 2D kernel in one temporal slot (``tail``: the current frame, so each
    causal conv acts per frame; ``center``: the previous frame), zeros elsewhere; linear attention
    projections become 1x1x1 convs. Unmapped or left-over keys raise ``ValueError`` naming them.
    """
    if init not in ("tail", "center"):
        raise ValueError(f"init must be 'tail' or 'center', got {init!r}")
    with torch.device("meta"):  # shapes only, until the mapping is known to be complete
        own = ODVAE(config).state_dict()
    rules = _diffusers_rules(len(config.channel_mult))
    new: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state_2d.items():
        name = _map_diffusers_key(key, rules, own)
        if name is None or name not in own:
            unmapped.append(key)
            continue
        new[name] = inflate_weight(value.float(), own[name].shape, init)
    missing = sorted(set(own) - set(new))
    if unmapped or missing:
        parts = []
        if unmapped:
            parts.append("image-VAE keys without a place: " + ", ".join(sorted(unmapped)[:20]))
        if missing:
            parts.append("model keys not provided: " + ", ".join(missing[:20]))
        raise ValueError("image VAE does not fit the model (" + "; ".join(parts) + ")")
    model = ODVAE(config)
    model.load_state_dict(new)
    return model.eval()


def load_image_vae(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of an SD-style image VAE (``.safetensors``, or a folder holding
    ``diffusion_pytorch_model.safetensors``)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "diffusion_pytorch_model.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such image VAE weights file")
    if p.suffix != ".safetensors":
        raise ValueError(f"{p}: image VAE weights must be a .safetensors file")
    return load_file(str(p))


# --- latent widening -----------------------------------------------------------------------------


def _fill_like(reference: Tensor, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Random values with the mean and standard deviation of ``reference``."""
    ref = reference.float()
    std = ref.std().item() if ref.numel() > 1 else 0.0
    return torch.randn(shape, generator=generator) * std + ref.mean().item()


def _widen(old: Tensor, new_shape: tuple[int, ...], index_maps, generator: torch.Generator) -> Tensor:
    """``old`` copied into a tensor of ``new_shape`` at ``index_maps[d]`` (positions of the old
    entries along each dim, None = same); the rest filled with matching statistics."""
    out = _fill_like(old, new_shape, generator).to(old.dtype)
    index = tuple(
        torch.as_tensor(m).view(*([1] * d), -1, *([1] * (old.ndim - d - 1)))
        if m is not None
        else torch.arange(old.shape[d]).view(*([1] * d), -1, *([1] * (old.ndim - d - 1)))
        for d, m in enumerate(index_maps)
    )
    out[index] = old
    return out


def widen_latent(model: CausalVAE, channels: int, seed: int = 0) -> CausalVAE:
    """A copy of ``model`` with ``channels`` latent channels (more than now).

    Old weights are copied; the new output channels of ``encoder.conv_out`` (mean and logvar
    halves), the new rows/columns of ``quant_conv`` / ``post_quant_conv`` and the new input
    channels of ``decoder.conv_in`` are drawn with the mean and std of the tensor they extend.
    """
    z = model.config.latent_channels
    if channels <= z:
        raise ValueError(f"--widen-latent {channels} must exceed the current {z} latent channels")
    cfg = replace(model.config, latent_channels=channels)
    wide = type(model)(cfg)
    generator = torch.Generator().manual_seed(seed)
    moments_map = list(range(z)) + list(range(channels, channels + z))  # [mean | logvar] halves
    plain_map = list(range(z))
    plans = {
        "encoder.conv_out.conv.weight": (moments_map, None),
        "encoder.conv_out.conv.bias": (moments_map,),
        "quant_conv.conv.weight": (moments_map, moments_map),
        "quant_conv.conv.bias": (moments_map,),
        "post_quant_conv.conv.weight": (plain_map, plain_map),
        "post_quant_conv.conv.bias": (plain_map,),
        "decoder.conv_in.conv.weight": (None, plain_map),
    }
    state = {}
    old_state = model.state_dict()
    for name, target in wide.state_dict().items():
        old = old_state[name]
        if name in plans:
            maps = list(plans[name]) + [None] * (old.ndim - len(plans[name]))
            state[name] = _widen(old, tuple(target.shape), maps, generator)
        else:
            state[name] = old.clone()
    wide.load_state_dict(state)
    return wide.eval()
