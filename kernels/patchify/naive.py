"""Readable reference of the patch rows a stride == kernel conv reads (and of the Triton copy)."""
from __future__ import annotations

import torch


def patch_rows_ref(x: torch.Tensor, ph: int, pw: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, C, H, W) -> (B, H / ph, W / pw, C, ph, pw) in ``dtype``: row (b, i, j) holds patch (i, j) of image b,
    channel-major as a conv weight (D, C, ph, pw) flattens, so the conv is one GEMM over these rows. H and W must be
    multiples of the patch. Differentiable (a permuting copy)."""
    B, C, H, W = x.shape
    rows = torch.empty((B, H // ph, W // pw, C, ph, pw), dtype=dtype, device=x.device)
    rows.copy_(x.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5))
    return rows
