"""One entry point for the Vim stem's token embedding (patches + bias, middle class token, position embedding)."""
from __future__ import annotations

from typing import Optional

import torch

from ..selective_scan.interface import resolve_backend
from .naive import embed_tokens_ref

_TRITON_ERROR: Optional[ImportError] = None
try:  # registers the custom ops at import time, before any torch.compile trace reaches them
    from .triton_embed import embed_tokens_triton
except ImportError as err:  # no triton on this platform: the reference backend still works
    embed_tokens_triton = None
    _TRITON_ERROR = err

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def embed_tokens_fn(patches: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    cls_token: Optional[torch.Tensor] = None, pos_embed: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """(B, M, D) patches -> float32 (B, M + 1, D) tokens: ``patches + bias`` with ``cls_token`` inserted at
    position M // 2, plus ``pos_embed`` (see ``naive.embed_tokens_ref``). bias (D,), cls_token (1, 1, D), pos_embed
    (1, M + 1, D), or (1, M, D) without a class token; each may be None. patches may be any strided view (a reshape
    of the GEMM's (B, H, W, D) grid). Gradients flow to every input that needs one, each in its own dtype.

    ``backend``: 'reference' (pure PyTorch, any device), 'triton', or None: Triton on CUDA, the reference elsewhere.
    The Triton ops take float32, bf16 and fp16 inputs; others (a float64 check) take the reference, which then
    computes in float64.
    """
    _check(patches, bias, cls_token, pos_embed)
    backend = resolve_backend(backend, patches.device, _TRITON_ERROR)
    if backend == "reference" or any(t is not None and t.dtype not in _KERNEL_DTYPES
                                      for t in (patches, bias, cls_token, pos_embed)):
        return embed_tokens_ref(patches, bias, cls_token, pos_embed)
    return embed_tokens_triton(patches, bias, cls_token, pos_embed)


def _check(patches, bias, cls_token, pos_embed) -> None:
    if patches.dim() != 3:
        raise ValueError(f"embed_tokens_fn: expected patches (B, M, D), got {tuple(patches.shape)}")
    B, M, D = patches.shape
    T = M + (cls_token is not None)
    for name, t, shape in (("bias", bias, (D,)), ("cls_token", cls_token, (1, 1, D)),
                           ("pos_embed", pos_embed, (1, T, D))):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"embed_tokens_fn: {name} must be {shape} for patches {tuple(patches.shape)}"
                             f"{'' if cls_token is not None else ' (no class token)'}, got {tuple(t.shape)}")
        if t.device != patches.device:
            raise ValueError(f"embed_tokens_fn: {name} is on {t.device}, patches on {patches.device}")
