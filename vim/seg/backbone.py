"""The registered timm Vim as a segmentation backbone: no class token, maps after chosen blocks."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.registry import MODELS


@MODELS.register_module(name="VimSegBackbone")
class VimSegBackbone(nn.Module):
    """``timm.create_model(model_name, class_token=False, dynamic_img_size=True, ...)`` returning the
    (B, D, H/stride, W/stride) maps after blocks ``out_indices``.

    ``img_size`` only sets the size of the stored position embedding (the official runs use 512); any
    input size works, the embedding is interpolated. ``pretrained``: path to ours or an official ``.pth``
    (classification weights); the position embedding is resized to ``img_size`` and the class token and
    classifier are dropped. Other keyword arguments (depth, embed_dim, patch_size, stride,
    drop_path_rate, ...) go to ``timm.create_model``.
    """

    def __init__(self, model_name: str = "vim_tiny", out_indices: Sequence[int] = (5, 11, 17, 23),
                 img_size: int = 512, pretrained: Optional[str] = None, drop_path_rate: float = 0.1,
                 **model_kwargs):
        super().__init__()
        import vim  # noqa: F401  (registers the vim_* timm models)

        self.model = timm.create_model(
            model_name, pretrained=False, num_classes=0, global_pool="", class_token=False,
            dynamic_img_size=True, img_size=img_size, drop_path_rate=drop_path_rate, **model_kwargs)
        depth = len(self.model.blocks)
        bad = [i for i in out_indices if not -depth <= int(i) < depth]
        if bad:
            raise ValueError(f"out_indices {bad} out of range for a {depth}-block {model_name}; "
                             f"pick block indices in [0, {depth - 1}]")
        # A block may feed several outputs (shallow demo models); timm's call takes each index once.
        self.out_indices = tuple(int(i) % depth for i in out_indices)
        self._taken = sorted(set(self.out_indices))
        self.embed_dim = self.model.embed_dim
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        self.stride = int(self.model.patch_embed.stride[0])
        if pretrained:
            self.load_pretrained(pretrained)

    def padded_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """The smallest size >= ``size`` that tiles exactly into patches at the backbone's stride."""
        p, st = self.patch_size, self.stride
        return tuple(p if s <= p else p + math.ceil((s - p) / st) * st for s in size)

    def load_pretrained(self, path: str) -> None:
        """Classification weights in: classifier and class token dropped, position embedding resized;
        anything else that does not fit is an error listing the keys."""
        import vim

        vim.load_checkpoint(self.model, path)
        print_log(f"loaded backbone weights from {path}", logger="current")

    def init_weights(self) -> None:
        # The Runner calls init_weights on children after construction; the timm model is already
        # initialised (or pretrained) and must not be re-initialised here.
        pass

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.model.forward_intermediates(x, indices=self._taken, norm=False, output_fmt="NCHW",
                                                 intermediates_only=True)
        by_block = dict(zip(self._taken, feats))
        return [by_block[i] for i in self.out_indices]
