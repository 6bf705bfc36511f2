"""Classification batches finished on the device, as timm's own training loader (``PrefetchLoader``) does."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from mmengine.model import BaseDataPreprocessor
from mmengine.registry import MODELS
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing

from ..inference import normalize

__all__ = ["ClsDataPreprocessor"]


@MODELS.register_module(name="VimClsDataPreprocessor")
class ClsDataPreprocessor(BaseDataPreprocessor):
    """Moves a batch to the device and, for uint8 images, normalises them there and applies timm's random erasing to
    training batches there.

    The ImageNet configs build their transforms with ``use_prefetcher=True``, so the loader's workers hand over uint8
    images and skip the float conversion, the normalisation and the erasing, and collate, pin and copy a quarter of
    the bytes (docs/training.md, "Data loading"). Compiled training waits for those workers (docs/benchmarks.md,
    "Session 40").

    Float images come from transforms that normalise (and erase) themselves, and pass through unchanged.

    Args:
        mean, std: per channel, in 0-1 units as timm's data configs give them.
        random_erasing: ``timm.data.random_erasing.RandomErasing`` arguments (``probability``, ``mode``,
            ``max_count``, ...) for training batches; None: no erasing.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 random_erasing: Optional[Dict] = None):
        super().__init__()
        self.norm = dict(mean=tuple(mean), std=tuple(std))
        self.random_erasing = dict(random_erasing) if random_erasing else None
        self._erasing = None   # built on the first training batch, on that batch's device

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        inputs = data["inputs"]
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
            raise TypeError(f"inputs must be a (B, C, H, W) tensor, got {type(inputs).__name__}"
                            f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else ''}")
        if inputs.dtype == torch.uint8:
            if inputs.shape[1] != len(self.norm["mean"]):
                raise ValueError(f"images with {inputs.shape[1]} channels, but mean / std have "
                                 f"{len(self.norm['mean'])}: set the data preprocessor's mean and std per channel")
            inputs = normalize(inputs, self.norm)
            if training and self.random_erasing is not None:
                if self._erasing is None or self._erasing.device != inputs.device:
                    self._erasing = RandomErasing(**self.random_erasing, device=inputs.device)
                inputs = self._erasing(inputs)
        return dict(inputs=inputs, data_samples=data.get("data_samples"))
