"""Small building blocks shared by the neck and the heads: norm layers from a config, conv+norm+act."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn

# 'SyncBN' is what distributed configs ask for; mmengine's Runner reverts it to plain BN when it runs
# without a process group, and nn.SyncBatchNorm itself falls back to batch_norm outside one.
_NORMS = {"BN": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm}


def build_norm2d(norm_cfg: Optional[dict], channels: int) -> nn.Module:
    """A 2-D norm layer from ``dict(type='BN'|'SyncBN'|'GN', ...)``; None gives Identity."""
    if norm_cfg is None:
        return nn.Identity()
    cfg = dict(norm_cfg)
    kind = cfg.pop("type")
    requires_grad = cfg.pop("requires_grad", True)
    if kind == "GN":
        layer = nn.GroupNorm(cfg.pop("num_groups", 32), channels, **cfg)
    elif kind in _NORMS:
        layer = _NORMS[kind](channels, **cfg)
    else:
        raise ValueError(f"unknown norm type {kind!r}; use one of {sorted(_NORMS) + ['GN']} or None")
    for p in layer.parameters():
        p.requires_grad_(requires_grad)
    return layer


class ConvNormAct(nn.Sequential):
    """Conv2d (bias only when there is no norm) + norm + ReLU, the unit UperNet and FCN heads are built from."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 norm_cfg: Optional[dict] = dict(type="BN"), act: bool = True, dilation: int = 1):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                      bias=norm_cfg is None),
            build_norm2d(norm_cfg, out_channels),
            nn.ReLU(inplace=True) if act else nn.Identity(),
        )
