"""One entry point for every RMSNorm backend."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..selective_scan.interface import resolve_backend
from .naive import add_rms_norm_ref, rms_norm_ref

_TRITON_ERROR: Optional[ImportError] = None
try:  # registers the custom ops at import time, before any torch.compile trace reaches them
    from .triton_norm import add_rms_norm_triton, rms_norm_triton
except ImportError as err:  # no triton on this platform: the reference backend still works
    rms_norm_triton = add_rms_norm_triton = None
    _TRITON_ERROR = err


def rms_norm_fn(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                out_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Weight-only RMSNorm over the last dim of x (any leading dims), computed in float32.

    ``out_dtype``: None hands the next layer its compute dtype: the autocast dtype of x's device when
    autocast is on, else weight's dtype. Gradients flow to x (in x's dtype) and weight.
    ``backend``: 'reference' (``F.rms_norm``, any device), 'triton', or None: Triton on CUDA, the
    reference elsewhere.
    """
    out_dtype = _out_dtype(x, weight, out_dtype)
    backend = resolve_backend(backend, x.device, _TRITON_ERROR)
    if backend == "reference":
        return rms_norm_ref(x, weight, eps, out_dtype)
    return rms_norm_triton(x, weight, eps, out_dtype)


def add_rms_norm_fn(x: torch.Tensor, branch: Optional[torch.Tensor], weight: torch.Tensor, eps: float = 1e-5,
                    out_dtype: Optional[torch.dtype] = None,
                    backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual step: ``s = x + branch`` (in float32 for a float32 x, whatever the branch's
    dtype) and ``rms_norm_fn(s)``; returns ``(s, normed s)``. ``branch=None`` skips the add (``s`` is x).

    The Triton backend computes both in one pass (``s`` read back from registers, not memory) and one
    backward pass that also takes ``s``'s gradient from the residual stream. It needs a float32 x and a
    branch that adds to float32 (float32, bf16, fp16); other pairs (a float64 model) take the reference. ``out_dtype`` and ``backend`` as in
    ``rms_norm_fn``.
    """
    if branch is None:
        return x, rms_norm_fn(x, weight, eps, out_dtype, backend)
    out_dtype = _out_dtype(x, weight, out_dtype)
    backend = resolve_backend(backend, x.device, _TRITON_ERROR)
    if backend == "reference" or torch.promote_types(x.dtype, branch.dtype) != torch.float32:
        return add_rms_norm_ref(x, branch, weight, eps, out_dtype)
    return add_rms_norm_triton(x, branch, weight, eps, out_dtype)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    """None -> the autocast dtype of x's device when autocast is on, else weight's dtype."""
    if out_dtype is not None:
        return out_dtype
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
