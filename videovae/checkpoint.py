"""videovae checkpoints: safetensors weights with the family and config in the metadata.

Loading rebuilds the architecture from the stored config (never from the file name), loads
strictly, and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from videovae.fileutil import atomic_path
from videovae.models import build_model, family_of
from videovae.statedict import CheckpointError, load_state_dict_strict

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "load_state_dict_strict",
    "model_digest",
    "read_metadata",
    "save_checkpoint",
    "weights_digest",
]

CHECKPOINT_FORMAT = "videovae-checkpoint"
CHECKPOINT_VERSION = 1
METADATA_KEY = "videovae"


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict (order independent)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """The digest stored when the model was loaded or saved, else computed now."""
    return getattr(model, "_videovae_digest", None) or weights_digest(model.state_dict())


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, *, dtype: torch.dtype | None = None, extra: dict | None = None
) -> str:
    """Write ``model`` (optionally cast to ``dtype``) atomically; returns the weights digest."""
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    digest = weights_digest(state)
    meta: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "family": model.family,
        "config": model.config.to_dict(),
        "weights_sha256": digest,
    }
    if extra:
        meta["extra"] = extra
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return digest


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The videovae metadata of a checkpoint; a clear error for anything else."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such weights file")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a safetensors file ({err})") from None
    if raw is None:
        raise CheckpointError(
            f"{path}: not a videovae checkpoint (no '{METADATA_KEY}' metadata); "
            "official weights must be converted first with `videovae convert`"
        )
    meta = json.loads(raw)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: metadata format is {meta.get('format')!r}, not {CHECKPOINT_FORMAT!r}")
    if meta.get("format_version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {meta['format_version']} is newer than this videovae")
    return meta


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Rebuild the model from the stored config and load the weights strictly (eval mode)."""
    meta = read_metadata(path)
    family_of(meta["family"])
    model = build_model(meta["family"], meta["config"])
    state: dict[str, torch.Tensor] = {}
    with safe_open(os.fspath(path), framework="pt") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
    load_state_dict_strict(model, state, source=os.fspath(path))
    model._videovae_digest = meta.get("weights_sha256") or weights_digest(state)
    model.eval()
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
