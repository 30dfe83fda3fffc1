"""Channel RMSNorm (+ SiLU) per position: reference in ``reference.py``, Triton in ``triton.py``."""

from .reference import rms_norm_silu_ref

__all__ = ["rms_norm_silu_ref"]
