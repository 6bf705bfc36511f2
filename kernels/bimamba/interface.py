"""The Vim v2 mixer core behind one call; the model uses this on every device."""
from __future__ import annotations

from typing import Optional

import torch

from ..selective_scan.interface import resolve_backend
from .naive import DirectionParams, bimamba_v2_ref

_TRITON_ERROR: Optional[ImportError] = None
try:  # registers the custom ops at import time, before any torch.compile trace reaches them
    from .triton_bimamba import bimamba_v2_triton
except ImportError as err:  # no triton on this platform: the reference backend still works
    bimamba_v2_triton = None
    _TRITON_ERROR = err


def bimamba_v2_fn(x: torch.Tensor, z: torch.Tensor, fwd: DirectionParams, bwd: DirectionParams,
                  backend: Optional[str] = None) -> torch.Tensor:
    """x, z: (B, L, E) token-major. Returns ``(y_fwd + y_bwd) / 2`` (B, L, E), each direction gated
    by silu(z). backend: 'reference', 'triton', or None (Triton on CUDA, reference elsewhere)."""
    backend = resolve_backend(backend, x.device, _TRITON_ERROR)
    if backend == "reference":
        return bimamba_v2_ref(x, z, fwd, bwd)
    return bimamba_v2_triton(x, z, fwd, bwd)


def bimamba_v2_packed_fn(xz: torch.Tensor, fwd: DirectionParams, bwd: DirectionParams,
                         backend: Optional[str] = None, overwrite_input: bool = False) -> torch.Tensor:
    """``bimamba_v2_fn(x, z, ...)`` with x and z the two halves of one (B, L, 2E) tensor, in_proj's output as the
    mixer has it. The same output; on the Triton backend the backward writes the input's gradient as one
    (B, L, 2E) tensor, saving the pass that concatenates dx and dz for ``xz.chunk``'s backward.

    ``overwrite_input``: the caller gives up ``xz`` (the mixer's own in_proj output). On the Triton backend, where no
    gradient is needed, the output is then written over x's half and returned as a (B, L, E) view of ``xz`` with
    row stride 2E: one (B, L, E) tensor less at inference's peak. Elsewhere it changes nothing."""
    if xz.dim() != 3 or xz.shape[-1] % 2:
        raise ValueError(f"xz must be (B, L, 2E), x and z side by side; got {tuple(xz.shape)}")
    backend = resolve_backend(backend, xz.device, _TRITON_ERROR)
    if backend == "reference":
        return bimamba_v2_ref(*xz.chunk(2, dim=-1), fwd, bwd)
    return bimamba_v2_triton(xz, None, fwd, bwd, overwrite_x=overwrite_input)
