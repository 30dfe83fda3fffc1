"""State-dict helpers shared by the model families and their converters.

This module sits below :mod:`videovae.models` (it imports no model), so converters in the family
modules and :mod:`videovae.checkpoint` both use it without an import cycle: strict loading with
an error that names every problem key, reading weights files safely, and finding the weights
file of a released folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(ValueError):
    """A weights file that videovae cannot load (named in the message)."""


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict that names every missing, unexpected or mis-shaped key in its error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        if shapes:
            parts.append(
                "shape mismatch: "
                + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes[:20])
            )
        raise CheckpointError(f"{source}: weights do not fit the model ({'; '.join(parts)})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def strip_module(key: str) -> str:
    """Remove DDP/DeepSpeed ``module.`` levels from a state-dict key."""
    while key.startswith("module."):
        key = key[len("module.") :]
    return key.replace(".module.", ".")


def unwrap_training_state(obj: Any, *, prefer_ema: bool, source: str, rename: Callable[[str], str],
                          dropped: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The autoencoder weights inside an official checkpoint object.

    Accepts a plain state dict, ``{"state_dict": ...}`` (Lightning), ``{"state_dict": {"gen_model":
    ...}}``, ``{"module": ...}`` (DeepSpeed) and ``{"ema_state_dict": ...}`` (used first when non-empty
    and ``prefer_ema``). Each key goes through the family's ``rename``; keys starting with one of
    ``dropped`` (loss, discriminator) are left out; any entry that is not a tensor is an error.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a state dict, got {type(obj).__name__}")
    if prefer_ema and isinstance(obj.get("ema_state_dict"), dict) and obj["ema_state_dict"]:
        state = obj["ema_state_dict"]
    elif isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
        if isinstance(state.get("gen_model"), dict):
            state = state["gen_model"]
    elif isinstance(obj.get("module"), dict):
        state = obj["module"]
    else:
        state = obj
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        key = rename(key)
        if not key.startswith(dropped):
            out[key] = value
    return out


def read_weights(path: Path) -> Any:
    """The object in a weights file: safetensors, or ``torch.load(weights_only=True)`` (never
    unpickles arbitrary objects)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in WEIGHT_SUFFIXES:
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"{path}: unknown weights format (expected one of {', '.join(WEIGHT_SUFFIXES)})")


def find_weights(folder: Path) -> Path:
    """The weights file of a released folder: ``diffusion_pytorch_model.safetensors`` / ``.bin``,
    else the only weights file, else the last ``*.ckpt`` by name."""
    folder = Path(folder)
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    ckpts = [p for p in files if p.suffix == ".ckpt"]
    if ckpts:
        return ckpts[-1]
    if len(files) == 1:
        return files[0]
    if not files:
        raise FileNotFoundError(f"{folder}: no weights file ({', '.join(WEIGHT_SUFFIXES)})")
    raise ValueError(f"{folder}: several weights files, pass one: {', '.join(p.name for p in files)}")
