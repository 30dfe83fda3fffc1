"""videovae: causal 3D video VAEs.

Tensors are NCTHW with values in [-1, 1]; clips have 1 + k * time_factor frames (an image is a
1-frame video). ``videovae.load(path)`` returns a model whose ``encode`` / ``decode`` work on
tensors and whose ``encode_video`` / ``decode_video`` stream through the chunked, tiled engine.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path=None, device="cpu", dtype=None):
    """Load a videovae checkpoint (safetensors with its config in the metadata).

    ``path=None`` loads the shipped default model (``vv-s16``, weights inside the package); a shipped
    model's name (see ``videovae models``) loads that model.
    """
    from videovae.checkpoint import load_checkpoint
    from videovae.shipped import resolve_weights

    return load_checkpoint(resolve_weights(path)[0], device=device, dtype=dtype)


def from_preset(name: str):
    """A freshly initialised model of a preset (see ``videovae models``)."""
    from videovae.models import from_preset as _from_preset

    return _from_preset(name)


__all__ = ["__version__", "from_preset", "load"]
