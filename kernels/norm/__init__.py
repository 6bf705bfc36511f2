from .naive import add_rms_norm_ref, residual_add, rms_norm_ref
from .interface import add_rms_norm_fn, rms_norm_fn

__all__ = ["add_rms_norm_fn", "add_rms_norm_ref", "residual_add", "rms_norm_fn", "rms_norm_ref"]
