"""Feathered tile blending into a decode canvas: reference in ``reference.py``, Triton in ``triton.py``."""

from .reference import blend_tile_ref_, normalize_canvas_ref

__all__ = ["blend_tile_ref_", "normalize_canvas_ref"]
