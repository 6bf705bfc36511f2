"""Turn the single-stride maps of a plain (non-hierarchical) backbone into a feature pyramid."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.registry import MODELS

from .layers import build_norm2d


def _rescale_branch(channels: int, scale: float, norm_cfg: Optional[dict]) -> nn.Module:
    # The BEiT/ViTDet recipe the official Vim segmentation uses: 2x2 deconvolutions to go up, 2x2 max
    # pooling to go down, BN + GELU between the two deconvolutions of the x4 branch.
    if scale == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(channels, channels, 2, stride=2),
            build_norm2d(norm_cfg, channels),
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, 2, stride=2),
        )
    if scale == 2:
        return nn.ConvTranspose2d(channels, channels, 2, stride=2)
    if scale == 1:
        return nn.Identity()
    if scale == 0.5:
        return nn.MaxPool2d(2, stride=2)
    raise ValueError(f"unsupported neck scale {scale}; use 4, 2, 1 or 0.5")


@MODELS.register_module(name="VimMultiScaleNeck")
class MultiScaleNeck(nn.Module):
    """Four same-stride maps (B, C, H, W) -> maps rescaled by ``scales`` (default 4, 2, 1, 1/2: strides
    4, 8, 16, 32 for a stride-16 backbone). Channels are kept, so the decode head takes ``[C] * 4``."""

    def __init__(self, in_channels: int, scales: Sequence[float] = (4, 2, 1, 0.5),
                 norm_cfg: Optional[dict] = dict(type="SyncBN")):
        super().__init__()
        self.in_channels = in_channels
        self.scales = tuple(scales)
        self.branches = nn.ModuleList(_rescale_branch(in_channels, s, norm_cfg) for s in self.scales)

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(feats) != len(self.branches):
            raise ValueError(f"neck expects {len(self.branches)} feature maps (one per scale {self.scales}), "
                             f"got {len(feats)}; match the backbone's out_indices to the neck's scales")
        return [branch(f) for branch, f in zip(self.branches, feats)]
