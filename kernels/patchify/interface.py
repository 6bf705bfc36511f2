"""One entry point for the patch rows of a stride == kernel conv (the model's CUDA stem)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..selective_scan.interface import resolve_backend
from .naive import patch_rows_ref

_TRITON_ERROR: Optional[ImportError] = None
try:  # registers the custom op at import time, before any torch.compile trace reaches it
    from .triton_patchify import patch_rows_triton
except ImportError as err:  # no triton on this platform: the reference backend still works
    patch_rows_triton = None
    _TRITON_ERROR = err


def patch_rows(x: torch.Tensor, patch: Tuple[int, int], dtype: Optional[torch.dtype] = None,
               backend: Optional[str] = None) -> torch.Tensor:
    """(B, C, H, W) -> (B, H / ph, W / pw, C, ph, pw) patch rows in ``dtype`` (default x's), H and W multiples of
    the patch (see ``naive.patch_rows_ref``). ``backend``: 'reference', 'triton', or None: Triton on CUDA, the
    reference elsewhere. The Triton copy has no backward, so an image that needs a gradient takes the reference."""
    if x.dim() != 4 or x.shape[2] % patch[0] or x.shape[3] % patch[1]:
        raise ValueError(f"patch_rows: expected (B, C, H, W) with H, W multiples of the patch {tuple(patch)}, got "
                         f"{tuple(x.shape)}")
    dtype = x.dtype if dtype is None else dtype
    backend = resolve_backend(backend, x.device, _TRITON_ERROR)
    if backend == "reference" or (x.requires_grad and torch.is_grad_enabled()):
        return patch_rows_ref(x, patch[0], patch[1], dtype)
    return patch_rows_triton(x, patch[0], patch[1], dtype)
