"""Readable reference of the Vim stem's token embedding (and of the Triton kernels)."""
from __future__ import annotations

from typing import Optional

import torch


def embed_tokens_ref(patches: torch.Tensor, bias: Optional[torch.Tensor], cls_token: Optional[torch.Tensor],
                     pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, M, D) patches -> (B, M + 1, D) tokens ``[patches[:, :mid] + bias, cls, patches[:, mid:] + bias] + pos``,
    mid = M // 2 (the middle class token of ``vim.models.layers.insert_cls_token``); (B, M, D) without a class
    token. bias (D,), cls_token (1, 1, D), pos_embed (1, tokens, D); each may be None. Computed and returned in
    float32 (float64 where an input is float64). Differentiable."""
    dtype = torch.float32
    for t in (patches, bias, cls_token, pos_embed):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    x = patches.to(dtype)
    if bias is not None:
        x = x + bias.to(dtype)
    if cls_token is not None:
        mid = x.shape[1] // 2
        x = torch.cat([x[:, :mid], cls_token.to(dtype).expand(x.shape[0], -1, -1), x[:, mid:]], dim=1)
    if pos_embed is not None:
        x = x + pos_embed.to(dtype)
    return x
