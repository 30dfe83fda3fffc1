"""Latent files: safetensors holding the latent and everything needed to decode it faithfully.

Tensors: ``latent`` (1, z, T', h, w), raw (unscaled) posterior mean or sample, in ``dtype``.
Metadata (JSON under the ``videovae`` key): format and version, the model family and config,
the weights digest, scaling/shift factors (diffusion-ready latents are ``(latent - shift) * scale``),
fps, original and padded T/H/W, padding mode, dtype, whether the latent was sampled.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from videovae.engine import VideoGeometry
from videovae.fileutil import atomic_path
from videovae.models import family_of
from videovae.models.turbo_vaed import LatentIdentity

LATENT_FORMAT = "videovae-latents"
LATENT_VERSION = 1
METADATA_KEY = "videovae"


class LatentFileError(ValueError):
    """A latent file that cannot be read, or that does not match the model at hand."""


@dataclass
class LatentMeta:
    family: str
    config: dict[str, Any]
    weights_sha256: str
    scaling_factor: float
    shift_factor: float
    fps: float
    geometry: VideoGeometry
    dtype: str
    sampled: bool = False
    kind: str = "continuous"
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["format"] = LATENT_FORMAT
        data["format_version"] = LATENT_VERSION
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: str) -> LatentMeta:
        data = json.loads(text)
        if data.pop("format", None) != LATENT_FORMAT:
            raise LatentFileError(f"{path}: not a videovae latent file")
        version = data.pop("format_version", 0)
        if version > LATENT_VERSION:
            raise LatentFileError(f"{path}: latent format version {version} is newer than this videovae")
        data["geometry"] = VideoGeometry(**data["geometry"])
        return cls(**data)


def save_latents(path: str | os.PathLike, latent: torch.Tensor, meta: LatentMeta) -> None:
    """Write atomically (temp file + rename)."""
    if latent.ndim != 5 or latent.shape[0] != 1:
        raise ValueError(f"expected a latent of shape (1, z, T, h, w), got {tuple(latent.shape)}")
    tensor = latent.detach().to(getattr(torch, meta.dtype)).cpu().contiguous()
    with atomic_path(path) as tmp:
        save_file({"latent": tensor}, str(tmp), metadata={METADATA_KEY: meta.to_json()})


def load_latents(path: str | os.PathLike) -> tuple[torch.Tensor, LatentMeta]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise LatentFileError(f"{path}: no such latent file")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            if raw is None or "latent" not in f.keys():
                raise LatentFileError(f"{path}: not a videovae latent file (no '{METADATA_KEY}' metadata or latent)")
            latent = f.get_tensor("latent")
    except (SafetensorError, OSError) as err:
        raise LatentFileError(f"{path}: not a safetensors file ({err})") from None
    meta = LatentMeta.from_json(raw, path)
    return latent, meta


def latent_identity(model, digest: str) -> LatentIdentity:
    """The (family, config, weights digest) that ``model`` records in the latent files it writes
    and requires of those it decodes: its own (``digest`` is its weights digest), or, for a model
    that encodes with another checkpoint's encoder (a turbo pair), that checkpoint's."""
    own = getattr(model, "latent_identity", None)
    return own() if own is not None else LatentIdentity(model.family, model.config.to_dict(), digest)


def _with_defaults(config: dict[str, Any], config_class) -> dict[str, Any]:
    """A stored config completed with the defaults of fields added since it was written."""
    try:
        return config_class.from_dict(config).to_dict()
    except (TypeError, ValueError):
        return config  # not this family's config: the comparison below names the difference


def check_model_matches(
    meta, model, digest: str, path: str, *, what: str = "latents", error: type[ValueError] = LatentFileError
) -> None:
    """A clear error when the latents were made by another architecture or other weights.

    ``meta`` is any record with ``family``, ``config`` and ``weights_sha256`` (a :class:`LatentMeta`,
    or a :class:`videovae.tokens.TokenMeta`); it is compared with :func:`latent_identity` of the
    model. ``what`` names the file's contents in the message and ``error`` is the exception class
    raised, so token files share this check."""
    expected = latent_identity(model, digest)
    config_class = model.config_class if expected.family == model.family else family_of(expected.family).config_class
    stored, wanted = _with_defaults(meta.config, config_class), _with_defaults(expected.config, config_class)
    if meta.family != expected.family or stored != wanted:
        diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise error(
            f"{path}: {what} come from a different model ({meta.family}; the decoder expects {expected.family}; "
            f"differing config: {', '.join(diff) or '-'})"
        )
    digest = expected.weights_sha256
    if meta.weights_sha256 != digest:
        raise error(
            f"{path}: {what} were encoded with other weights "
            f"(file {meta.weights_sha256[:12]}, model {digest[:12]}): decode with the same checkpoint"
        )
