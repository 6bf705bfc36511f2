"""One entry point for every RMSNorm backend."""
from __future__ import annotations

from typing import Optional

import torch

from ..selective_scan.interface import resolve_backend
from .naive import rms_norm_ref

_TRITON_ERROR: Optional[ImportError] = None
try:  # registers the custom ops at import time, before any torch.compile trace reaches them
    from .triton_norm import rms_norm_triton
except ImportError as err:  # no triton on this platform: the reference backend still works
    rms_norm_triton = None
    _TRITON_ERROR = err


def rms_norm_fn(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                out_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Weight-only RMSNorm over the last dim of x (any leading dims), computed in float32.

    ``out_dtype``: None hands the next layer its compute dtype: the autocast dtype of x's device when
    autocast is on, else weight's dtype. Gradients flow to x (in x's dtype) and weight.
    ``backend``: 'reference' (``F.rms_norm``, any device), 'triton', or None: Triton on CUDA, the
    reference elsewhere.
    """
    if out_dtype is None:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    backend = resolve_backend(backend, x.device, _TRITON_ERROR)
    if backend == "reference":
        return rms_norm_ref(x, weight, eps, out_dtype)
    return rms_norm_triton(x, weight, eps, out_dtype)
