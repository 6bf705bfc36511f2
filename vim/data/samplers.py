"""Samplers built by mmengine's Runner (registered in ``DATA_SAMPLERS``)."""
from __future__ import annotations

from typing import Iterator, Optional

from mmengine.dataset import DefaultSampler
from mmengine.dist import get_dist_info
from mmengine.registry import DATA_SAMPLERS
from timm.data.distributed_sampler import RepeatAugSampler

__all__ = ["RepeatAugOrDefaultSampler"]


@DATA_SAMPLERS.register_module(name="VimRepeatAugSampler")
class RepeatAugOrDefaultSampler:
    """DeiT's repeated augmentation (timm ``RepeatAugSampler``: each image ``num_repeats`` times per
    epoch, spread over the ranks, epoch length kept) when distributed; mmengine's ``DefaultSampler``
    on a single process, as in the official recipe (``--repeated-aug`` only acts with DDP)."""

    def __init__(self, dataset, shuffle: bool = True, num_repeats: int = 3, seed: Optional[int] = None):
        rank, world = get_dist_info()
        if world > 1 and num_repeats > 1:
            # timm rounds an epoch down to a multiple of 256 images, and before 1.0.31 did so also below 256:
            # an empty epoch. Smaller sets keep all their images, as newer timm does.
            self.sampler = RepeatAugSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle,
                                            num_repeats=num_repeats, selected_round=256 if len(dataset) >= 256 else 0)
        else:
            self.sampler = DefaultSampler(dataset, shuffle=shuffle, seed=seed)

    def __iter__(self) -> Iterator[int]:
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
