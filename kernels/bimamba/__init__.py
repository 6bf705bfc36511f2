from .naive import DirectionParams, bimamba_v2_ref
from .interface import bimamba_v2_fn, bimamba_v2_packed_fn

__all__ = ["DirectionParams", "bimamba_v2_fn", "bimamba_v2_packed_fn", "bimamba_v2_ref"]
