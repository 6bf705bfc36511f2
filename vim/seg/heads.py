"""Decode heads: UperNet (pyramid pooling + FPN) and the auxiliary FCN head, each with its own loss."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import MODELS

from .layers import ConvNormAct


def resize(x: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False if mode == "bilinear" else None)


class _SegHead(nn.Module):
    """Shared part: dropout + 1x1 classifier, and a pixel-wise cross-entropy loss at label resolution."""

    def __init__(self, channels: int, num_classes: int, dropout: float, loss_weight: float,
                 ignore_index: int, loss_name: str):
        super().__init__()
        self.num_classes = num_classes
        self.loss_weight = loss_weight
        self.ignore_index = ignore_index
        self.loss_name = loss_name
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))

    def loss(self, logits: torch.Tensor, gt: torch.Tensor) -> dict:
        """logits (B, K, h, w) at feature resolution; gt (B, H, W) long with ``ignore_index`` holes."""
        logits = resize(logits, gt.shape[-2:])
        loss = F.cross_entropy(logits, gt, ignore_index=self.ignore_index)
        if not (gt != self.ignore_index).any():
            loss = logits.sum() * 0  # every pixel ignored: keep the graph, contribute nothing (not NaN)
        return {self.loss_name: loss * self.loss_weight}


@MODELS.register_module(name="VimUPerHead")
class UPerHead(_SegHead):
    """UperNet decode head (Xiao et al. 2018) as in mmseg's UPerHead: a pyramid pooling module on the
    coarsest map, a top-down FPN over all maps, fused at the finest resolution."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, loss_weight: float = 1.0,
                 ignore_index: int = 255, norm_cfg: Optional[dict] = dict(type="SyncBN"),
                 loss_name: str = "loss_decode"):
        super().__init__(channels, num_classes, dropout, loss_weight, ignore_index, loss_name)
        in_channels = list(in_channels)
        self.in_channels = in_channels
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_channels[-1], channels, 1, norm_cfg))
            for s in self.pool_scales)
        self.ppm_bottleneck = ConvNormAct(in_channels[-1] + len(self.pool_scales) * channels, channels, 3, norm_cfg)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1, norm_cfg) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, norm_cfg) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3, norm_cfg)

    def _ppm(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x] + [resize(branch(x), x.shape[-2:]) for branch in self.ppm]
        return self.ppm_bottleneck(torch.cat(outs, dim=1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"UPerHead built for {len(self.in_channels)} maps, got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)] + [self._ppm(feats[-1])]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize(o, size) for o in outs], dim=1))
        return self.classify(fused)


@MODELS.register_module(name="VimFCNHead")
class FCNHead(_SegHead):
    """Auxiliary head: ``num_convs`` 3x3 conv-norm-ReLU on one pyramid level (``in_index``), then classify."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, in_index: int = 2,
                 num_convs: int = 1, concat_input: bool = False, dropout: float = 0.1, loss_weight: float = 0.4,
                 ignore_index: int = 255, norm_cfg: Optional[dict] = dict(type="SyncBN"),
                 loss_name: str = "loss_aux"):
        super().__init__(channels, num_classes, dropout, loss_weight, ignore_index, loss_name)
        self.in_index = in_index
        convs = [ConvNormAct(in_channels if i == 0 else channels, channels, 3, norm_cfg) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.concat = ConvNormAct(in_channels + channels, channels, 3, norm_cfg) if concat_input else None
        if num_convs == 0 and in_channels != channels:
            raise ValueError("FCNHead with num_convs=0 needs in_channels == channels")

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[self.in_index]
        out = self.convs(x)
        if self.concat is not None:
            out = self.concat(torch.cat([x, out], dim=1))
        return self.classify(out)
