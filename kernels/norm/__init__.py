from .naive import rms_norm_ref
from .interface import rms_norm_fn

__all__ = ["rms_norm_fn", "rms_norm_ref"]
