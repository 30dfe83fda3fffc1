"""[-1, 1] float NCTHW video to uint8 NTHWC frames: reference in ``reference.py``, Triton in ``triton.py``."""

from .reference import to_uint8_frames_ref

__all__ = ["to_uint8_frames_ref"]
