"""Models whose trained weights ship inside the package (``videovae/weights/``).

``videovae.load()`` with no path, ``videovae.load("vv-s16")`` and the CLI without ``--weights`` use
them. A latent file written by a shipped model records its name (``extra.shipped_model``), so
``videovae decode`` without ``--weights`` picks the same model. Each shipped file is an ordinary
videovae checkpoint (fp16 safetensors with its config and weights digest); its model card is
``videovae/weights/MODEL_CARD.md``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().with_name("weights")
# shipped model name (also its preset name) -> file in WEIGHTS_DIR. A turbo preset ships as a
# turbo-pair: the shipped teacher's encoder and the distilled turbo decoder.
SHIPPED: dict[str, str] = {"vv-s16": "vv-s16.safetensors", "turbo-vv-s16": "turbo-vv-s16.safetensors"}
DEFAULT_MODEL = "vv-s16"


class ShippedModelError(ValueError):
    """A shipped model that is unknown or whose weights file is missing from the installation."""


def shipped_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of the shipped weights of ``name``; a clear error when unknown or not installed."""
    if name not in SHIPPED:
        raise ShippedModelError(f"{name!r} is not a shipped model; shipped: {', '.join(sorted(SHIPPED))}")
    path = WEIGHTS_DIR / SHIPPED[name]
    if not path.is_file():
        raise ShippedModelError(f"the shipped weights of {name} are missing from this installation ({path})")
    return path


def resolve_weights(value: str | os.PathLike | None) -> tuple[str, str | None]:
    """``None`` -> the default shipped model; a shipped name that is not an existing file -> that
    model; anything else is a path. Returns (path, shipped name or None)."""
    if value is None:
        return str(shipped_path(DEFAULT_MODEL)), DEFAULT_MODEL
    text = os.fspath(value)
    if text in SHIPPED and not os.path.exists(text):
        return str(shipped_path(text)), text
    return text, None


@functools.cache
def _shipped_digests() -> dict[str, str]:
    from videovae.checkpoint import read_metadata

    digests = {}
    for name, file in SHIPPED.items():
        path = WEIGHTS_DIR / file
        if path.is_file():
            digests[read_metadata(path)["weights_sha256"]] = name
    return digests


def shipped_name_of(digest: str) -> str | None:
    """The shipped model whose weights have this digest, if any."""
    return _shipped_digests().get(digest)


__all__ = ["DEFAULT_MODEL", "SHIPPED", "ShippedModelError", "resolve_weights", "shipped_name_of", "shipped_path"]
