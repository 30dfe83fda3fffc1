"""Causal temporal padding / cache concat + spatial zero padding before a causal 3D conv:
reference in ``reference.py``, Triton in ``triton.py``."""

from .reference import causal_pad3d_ref

__all__ = ["causal_pad3d_ref"]
