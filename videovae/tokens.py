"""Token files: safetensors holding the discrete tokens of a clip and everything needed to decode them.

The token counterpart of :mod:`videovae.latents` (same container, same ``videovae`` metadata key,
same model check).

Tensors, stored in :func:`videovae.quantizers.smallest_index_dtype` of the codebook size (uint8,
uint16, int32 or int64; widen with ``.long()`` before arithmetic, torch has almost none for uint16):

- ``tokens`` ``(1, groups, T', h, w)``: FSQ indices in ``[0, prod(levels))``, one per group and
  latent position; ``T' = 1 + (padded_frames - 1) / time_factor``, ``h = padded_height / space_factor``,
  ``w = padded_width / space_factor``. For first-frame-strengthened models (``first_frame`` true)
  ``tokens`` holds latents 1.. only, ``(1, groups, T' - 1, h, w)``, and
- ``first_tokens`` ``(1, groups, 1, 2h, 2w)`` the first frame's tokens at twice the spatial resolution.

Metadata (JSON under the ``videovae`` key): format ``videovae-tokens`` and version, the model family,
config and weights digest, the FSQ levels, groups and bound, the first-frame flag, the model's time
and space factors, fps, the :class:`~videovae.engine.VideoGeometry` (original and padded size), the
source file name and its size in bytes when known.
"""

from __future__ import annotations

import json
import lzma
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from videovae.engine import VideoGeometry
from videovae.fileutil import atomic_path
from videovae.latents import METADATA_KEY
from videovae.latents import check_model_matches as _check_model_matches
from videovae.quantizers import FSQ, smallest_index_dtype

TOKEN_FORMAT = "videovae-tokens"
TOKEN_VERSION = 1
TENSOR_NAMES = ("tokens", "first_tokens")
_ZSTD_LEVEL = 19
_LZMA_PRESET = 9


class TokenFileError(ValueError):
    """A token file that cannot be read, is inconsistent, or does not match the model at hand."""


@dataclass
class TokenMeta:
    family: str
    config: dict[str, Any]
    weights_sha256: str
    levels: tuple[int, ...]
    groups: int
    bound: str
    first_frame: bool
    time_factor: int
    space_factor: int
    fps: float
    geometry: VideoGeometry
    source: str = ""
    source_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.levels = tuple(self.levels)

    def quantizer(self) -> FSQ:
        """The FSQ these tokens index (raises ValueError if levels, groups or bound are invalid)."""
        return FSQ(self.levels, groups=self.groups, bound=self.bound)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def index_dtype(self) -> torch.dtype:
        return smallest_index_dtype(self.codebook_size)

    def to_json(self) -> str:
        data = asdict(self)
        data["format"] = TOKEN_FORMAT
        data["format_version"] = TOKEN_VERSION
        # derived, recorded for readers without this module (e.g. "uint16")
        data["index_dtype"] = str(self.index_dtype).removeprefix("torch.")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: str) -> TokenMeta:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise TokenFileError(f"{path}: token metadata is not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.pop("format", None) != TOKEN_FORMAT:
            raise TokenFileError(f"{path}: not a videovae token file (format is not '{TOKEN_FORMAT}')")
        version = data.pop("format_version", 0)
        if not isinstance(version, int) or version > TOKEN_VERSION:
            raise TokenFileError(f"{path}: token format version {version} is newer than this videovae")
        index_dtype = data.pop("index_dtype", None)
        try:
            data["geometry"] = VideoGeometry(**data["geometry"])
            meta = cls(**data)
        except (KeyError, TypeError) as err:
            raise TokenFileError(f"{path}: token metadata is incomplete or malformed ({err})") from None
        _check_meta(meta, path)
        if index_dtype != str(meta.index_dtype).removeprefix("torch."):
            raise TokenFileError(
                f"{path}: metadata index_dtype {index_dtype!r} does not match codebook size {meta.codebook_size} "
                f"({meta.index_dtype})"
            )
        return meta


def _check_meta(meta: TokenMeta, path: str) -> None:
    try:
        meta.quantizer()
    except ValueError as err:
        raise TokenFileError(f"{path}: invalid FSQ settings in the metadata ({err})") from None
    for name in ("time_factor", "space_factor"):
        value = getattr(meta, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TokenFileError(f"{path}: {name} must be a positive integer, got {value!r}")


def _expected_shapes(meta: TokenMeta, path: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes implied by the metadata (geometry, factors, groups, first-frame flag)."""
    g = meta.geometry
    tf, sf = meta.time_factor, meta.space_factor
    if (g.padded_frames - 1) % tf or g.padded_height % sf or g.padded_width % sf:
        raise TokenFileError(
            f"{path}: padded size {g.padded_frames}x{g.padded_height}x{g.padded_width} (frames x H x W) does "
            f"not fit time factor {tf} and space factor {sf}"
        )
    h, w = g.padded_height // sf, g.padded_width // sf
    latents = 1 + (g.padded_frames - 1) // tf
    # first-frame-strengthened models tokenise frame 0 only at 2x resolution (first_tokens)
    shapes = {"tokens": (1, meta.groups, latents - 1 if meta.first_frame else latents, h, w)}
    if meta.first_frame:
        shapes["first_tokens"] = (1, meta.groups, 1, 2 * h, 2 * w)
    return shapes


def _check_tensors(tensors: Mapping[str, Tensor], meta: TokenMeta, path: str, *, stored: bool) -> None:
    """Names, shapes, dtypes (exact when ``stored``, else any integer) and index range."""
    expected = _expected_shapes(meta, path)
    if set(tensors) != set(expected):
        raise TokenFileError(
            f"{path}: expected tensors {sorted(expected)} (first_frame={meta.first_frame}), got {sorted(tensors)}"
        )
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise TokenFileError(f"{path}: '{name}' has shape {tuple(t.shape)}, the metadata implies {shape}")
        if stored and t.dtype != meta.index_dtype:
            raise TokenFileError(
                f"{path}: '{name}' is {t.dtype}, expected {meta.index_dtype} for codebook size {meta.codebook_size}"
            )
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TokenFileError(f"{path}: '{name}' must hold integer indices, got {t.dtype}")
        wide = t.to(torch.int64)  # uint16 has no min/max in torch
        if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) >= meta.codebook_size):
            raise TokenFileError(
                f"{path}: '{name}' holds indices in [{int(wide.min())}, {int(wide.max())}], outside "
                f"[0, {meta.codebook_size}) for levels {meta.levels}"
            )


def save_tokens(path: str | os.PathLike, tokens: Tensor | Mapping[str, Tensor], meta: TokenMeta) -> None:
    """Write ``tokens`` (the ``tokens`` tensor alone, or a mapping with ``tokens`` and, for
    first-frame models, ``first_tokens``) with ``meta``, in the smallest index dtype; atomically
    (temp file + rename). Raises :class:`TokenFileError` before writing anything if the tensors
    do not fit the metadata."""
    name = os.fspath(path)
    tensors = {"tokens": tokens} if isinstance(tokens, Tensor) else dict(tokens)
    _check_meta(meta, name)
    _check_tensors(tensors, meta, name, stored=False)
    narrow = {k: t.detach().to(torch.int64).to(meta.index_dtype).cpu().contiguous() for k, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(narrow, str(tmp), metadata={METADATA_KEY: meta.to_json()})


def load_tokens(path: str | os.PathLike) -> tuple[dict[str, Tensor], TokenMeta]:
    """Read and validate a token file: ``({"tokens": ..., ["first_tokens": ...]}, meta)``, tensors
    in the stored (smallest) index dtype. Any problem raises :class:`TokenFileError` naming the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenFileError(f"{path}: no such token file")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            if raw is None:
                raise TokenFileError(f"{path}: not a videovae token file (no '{METADATA_KEY}' metadata)")
            meta = TokenMeta.from_json(raw, path)
            unknown = sorted(set(f.keys()) - set(TENSOR_NAMES))
            if unknown:
                raise TokenFileError(f"{path}: unexpected tensors {unknown} in a token file")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise TokenFileError(f"{path}: not a safetensors file ({err})") from None
    _check_tensors(tensors, meta, path, stored=True)
    return tensors, meta


def check_model_matches(meta: TokenMeta, model, digest: str, path: str) -> None:
    """A clear :class:`TokenFileError` when the tokens were made by another architecture or other
    weights (the latent-file check), or, for a model exposing an FSQ ``quantizer``, other FSQ settings."""
    _check_model_matches(meta, model, digest, path, what="tokens", error=TokenFileError)
    quantizer = getattr(model, "quantizer", None)
    if isinstance(quantizer, FSQ):
        ours = (quantizer.levels, quantizer.groups, quantizer.bound)
        theirs = (meta.levels, meta.groups, meta.bound)
        if ours != theirs:
            raise TokenFileError(
                f"{path}: tokens use FSQ levels/groups/bound {theirs}, the model quantises with {ours}"
            )


# --- statistics ----------------------------------------------------------------------------------


def _compress(data: bytes) -> tuple[bytes, str]:
    """zstd when the ``zstandard`` package is installed, else lzma from the standard library."""
    try:
        import zstandard
    except ImportError:
        return lzma.compress(data, preset=_LZMA_PRESET), f"lzma-{_LZMA_PRESET}"
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(data), f"zstd-{_ZSTD_LEVEL}"


def token_stats(tensors: Mapping[str, Tensor], meta: TokenMeta, source_bytes: int | None = None) -> dict[str, Any]:
    """Rate figures of a clip's tokens, per pixel of the original (unpadded) video.

    Keys: ``tokens`` (count, all tensors), ``tokens_per_second`` (count / (frames / fps)),
    ``bits_per_token`` (log2 codebook size), ``raw_bpp`` (tokens x bits_per_token / (frames H W)),
    ``compressed_bytes`` and ``compressed_bpp`` (the index bytes in the stored dtype, compressed by
    ``compressor``: ``zstd-19`` or ``lzma-9``), ``source_bpp`` (``source_bytes`` x 8 / (frames H W),
    ``source_bytes`` defaulting to the metadata's; None when unknown)."""
    _check_tensors(tensors, meta, "tokens", stored=False)
    g = meta.geometry
    pixels = g.frames * g.height * g.width
    if pixels <= 0 or meta.fps <= 0:
        raise ValueError(f"token stats need a positive frame count, size and fps, got {g} at {meta.fps} fps")
    count = sum(t.numel() for t in tensors.values())
    bits_per_token = math.log2(meta.codebook_size)
    data = b"".join(
        tensors[name].to(torch.int64).to(meta.index_dtype).cpu().contiguous().numpy().tobytes()
        for name in TENSOR_NAMES if name in tensors
    )
    compressed, compressor = _compress(data)
    source_bytes = meta.source_bytes if source_bytes is None else source_bytes
    return {
        "tokens": count,
        "tokens_per_second": count * meta.fps / g.frames,
        "bits_per_token": bits_per_token,
        "raw_bpp": count * bits_per_token / pixels,
        "compressor": compressor,
        "compressed_bytes": len(compressed),
        "compressed_bpp": len(compressed) * 8 / pixels,
        "source_bpp": None if source_bytes is None else source_bytes * 8 / pixels,
    }
