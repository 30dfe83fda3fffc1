"""GroupNorm (+ SiLU) over NCTHW video tensors: reference in ``reference.py``, Triton in ``triton.py``."""

from .reference import group_norm_silu_ref

__all__ = ["group_norm_silu_ref"]
