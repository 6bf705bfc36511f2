"""Readable reference of the weight-only RMSNorm of the Vim blocks (and of the fused Triton kernels)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                 out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x / sqrt(mean(x ** 2, -1) + eps) * weight`` over the last dim, in ``out_dtype`` (default: weight's).

    Computed in float32 whatever the input dtypes, as the official fused add+norm does (float64 when x is
    float64, which makes this the tests' oracle).
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    y = F.rms_norm(x.to(compute), (x.shape[-1],), weight.to(compute), eps)
    return y.to(weight.dtype if out_dtype is None else out_dtype)


def residual_add(x: torch.Tensor, branch: Optional[torch.Tensor]) -> torch.Tensor:
    """``x + branch.float()`` without the cast's extra pass where promotion already gives float32; x itself
    when there is no branch.

    float32 + bf16 promotes inside the add kernel and is exactly the same sum; other pairs (bf16 + bf16,
    a float64 model's branch) keep the cast.
    """
    if branch is None:
        return x
    if torch.promote_types(x.dtype, branch.dtype) != torch.float32:
        branch = branch.float()
    return x + branch


def add_rms_norm_ref(x: torch.Tensor, branch: Optional[torch.Tensor], weight: torch.Tensor, eps: float = 1e-5,
                     out_dtype: Optional[torch.dtype] = None):
    """``(s, rms_norm_ref(s))`` with ``s = residual_add(x, branch)`` (``s = x`` without a branch): the
    pre-norm block's residual add and the next norm, as the official fused add+norm computes them."""
    s = residual_add(x, branch)
    return s, rms_norm_ref(s, weight, eps, out_dtype)
