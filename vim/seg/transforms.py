"""Joint image + label-map transforms for segmentation pipelines (mmengine dict-in, dict-out style).

A result dict carries ``img`` (uint8 tensor (3, H, W), RGB) and, once loaded, ``gt_seg_map`` (uint8 tensor
(H, W)); every geometric transform applies to both (bilinear for the image, nearest for the labels).
Randomness comes from numpy's global generator, which mmengine seeds per data-loader worker.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from mmengine.registry import TRANSFORMS
from mmengine.structures import BaseDataElement
from PIL import Image
from torchvision.transforms import InterpolationMode


def _read_image(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _read_label(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{path}: label maps must be single-channel PNGs (class index per pixel), "
                             f"got mode {im.mode}")
        arr = np.asarray(im)
    if arr.max(initial=0) > 255:
        raise ValueError(f"{path}: label values above 255 do not fit the uint8 label maps used here")
    return torch.from_numpy(arr.astype(np.uint8))


@TRANSFORMS.register_module(name="SegLoadImage")
class LoadImage:
    """Reads ``img_path`` into ``img``; records ``ori_shape`` and ``img_shape``."""

    def __call__(self, results: dict) -> dict:
        img = _read_image(results["img_path"])
        results["img"] = img
        results["ori_shape"] = results["img_shape"] = tuple(img.shape[-2:])
        return results


@TRANSFORMS.register_module(name="SegLoadAnnotations")
class LoadAnnotations:
    """Reads ``seg_map_path`` into ``gt_seg_map``. ``reduce_zero_label`` (default: the data set's setting)
    maps label 0 ("other", as in ADE20K) to ``ignore_index`` and shifts the others down by one."""

    def __init__(self, reduce_zero_label: Optional[bool] = None, ignore_index: int = 255):
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index

    def __call__(self, results: dict) -> dict:
        seg = _read_label(results["seg_map_path"])
        reduce = self.reduce_zero_label
        if reduce is None:
            reduce = results.get("reduce_zero_label", False)
        if reduce:
            seg = seg.long()
            seg = torch.where(seg == 0, self.ignore_index, seg - 1)
            seg = torch.where(seg == self.ignore_index - 1, self.ignore_index, seg).to(torch.uint8)
        results["gt_seg_map"] = seg
        return results


def _rescale_size(h: int, w: int, scale: Tuple[float, float]) -> Tuple[int, int]:
    """mmcv's keep-ratio rule: the largest size with long side <= max(scale) and short side <= min(scale)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _resize_results(results: dict, size: Tuple[int, int]) -> dict:
    if tuple(results["img"].shape[-2:]) != tuple(size):
        results["img"] = TF.resize(results["img"], list(size), InterpolationMode.BILINEAR, antialias=False)
        if "gt_seg_map" in results:
            results["gt_seg_map"] = TF.resize(results["gt_seg_map"][None], list(size),
                                              InterpolationMode.NEAREST_EXACT)[0]
    results["img_shape"] = tuple(size)
    return results


@TRANSFORMS.register_module(name="SegResize")
class Resize:
    """Resize to ``scale`` (h, w order does not matter with ``keep_ratio``: the long side goes to at most
    max(scale), the short side to at most min(scale)); without ``keep_ratio`` ``scale`` is (w, h) as mmseg."""

    def __init__(self, scale: Sequence[int] = (2048, 512), keep_ratio: bool = True):
        self.scale = tuple(scale)
        self.keep_ratio = keep_ratio

    def __call__(self, results: dict) -> dict:
        h, w = results["img"].shape[-2:]
        size = _rescale_size(h, w, self.scale) if self.keep_ratio else (self.scale[1], self.scale[0])
        return _resize_results(results, size)


@TRANSFORMS.register_module(name="SegRandomResize")
class RandomResize(Resize):
    """Resize to ``scale`` times a ratio drawn uniformly from ``ratio_range`` (mmseg's RandomResize)."""

    def __init__(self, scale: Sequence[int] = (2048, 512), ratio_range: Tuple[float, float] = (0.5, 2.0),
                 keep_ratio: bool = True):
        super().__init__(scale, keep_ratio)
        self.ratio_range = tuple(ratio_range)

    def __call__(self, results: dict) -> dict:
        ratio = np.random.uniform(*self.ratio_range)
        scale = tuple(int(s * ratio) for s in self.scale)
        h, w = results["img"].shape[-2:]
        size = _rescale_size(h, w, scale) if self.keep_ratio else (scale[1], scale[0])
        return _resize_results(results, size)


@TRANSFORMS.register_module(name="SegRandomCrop")
class RandomCrop:
    """Random ``crop_size`` (h, w) crop (smaller images are kept whole). With ``cat_max_ratio`` < 1 up to
    10 crops are tried until no single class covers more than that share of the labelled pixels."""

    def __init__(self, crop_size: Sequence[int] = (512, 512), cat_max_ratio: float = 1.0,
                 ignore_index: int = 255):
        self.crop_size = tuple(crop_size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _bbox(self, h: int, w: int) -> Tuple[int, int, int, int]:
        ch, cw = self.crop_size
        y = np.random.randint(0, max(h - ch, 0) + 1)
        x = np.random.randint(0, max(w - cw, 0) + 1)
        return y, min(y + ch, h), x, min(x + cw, w)

    def __call__(self, results: dict) -> dict:
        h, w = results["img"].shape[-2:]
        box = self._bbox(h, w)
        seg = results.get("gt_seg_map")
        if self.cat_max_ratio < 1.0 and seg is not None:
            for _ in range(10):
                crop = seg[box[0]:box[1], box[2]:box[3]]
                counts = torch.bincount(crop.reshape(-1).long(), minlength=256)
                counts[self.ignore_index] = 0
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._bbox(h, w)
        y1, y2, x1, x2 = box
        results["img"] = results["img"][:, y1:y2, x1:x2]
        if seg is not None:
            results["gt_seg_map"] = seg[y1:y2, x1:x2]
        results["img_shape"] = (y2 - y1, x2 - x1)
        return results


@TRANSFORMS.register_module(name="SegRandomFlip")
class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        self.prob = prob

    def __call__(self, results: dict) -> dict:
        flip = bool(np.random.rand() < self.prob)
        if flip:
            results["img"] = results["img"].flip(-1)
            if "gt_seg_map" in results:
                results["gt_seg_map"] = results["gt_seg_map"].flip(-1)
        results["flip"] = flip
        return results


@TRANSFORMS.register_module(name="SegPhotoMetricDistortion")
class PhotoMetricDistortion:
    """mmseg's photometric distortion, each step with probability 1/2: brightness shift (+-32), contrast
    (x0.5-1.5, before or after the colour steps), saturation (x0.5-1.5), hue shift (+-18 of 180).
    Saturation blends with the grey image (torchvision) where mmseg scales the HSV S channel: the same
    range of effect, not bit-identical."""

    def __init__(self, brightness_delta: int = 32, contrast_range: Tuple[float, float] = (0.5, 1.5),
                 saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def __call__(self, results: dict) -> dict:
        img = results["img"].float()
        rand = np.random
        if rand.randint(2):
            img = (img + rand.uniform(-self.brightness_delta, self.brightness_delta)).clamp(0, 255)
        contrast_first = rand.randint(2) == 1
        if contrast_first and rand.randint(2):
            img = (img * rand.uniform(*self.contrast_range)).clamp(0, 255)
        if rand.randint(2):
            img = TF.adjust_saturation(img / 255, rand.uniform(*self.saturation_range)) * 255
        if rand.randint(2):
            img = TF.adjust_hue(img / 255, rand.randint(-self.hue_delta, self.hue_delta + 1) / 180) * 255
        if not contrast_first and rand.randint(2):
            img = (img * rand.uniform(*self.contrast_range)).clamp(0, 255)
        results["img"] = img.round().clamp(0, 255).to(torch.uint8)
        return results


_META_KEYS = ("img_path", "seg_map_path", "ori_shape", "img_shape", "flip", "reduce_zero_label")


@TRANSFORMS.register_module(name="SegPackInputs")
class PackInputs:
    """-> ``dict(inputs=uint8 (3, H, W), data_samples=BaseDataElement(gt_sem_seg=(H, W), metainfo=...))``."""

    def __init__(self, meta_keys: Sequence[str] = _META_KEYS):
        self.meta_keys = tuple(meta_keys)

    def __call__(self, results: dict) -> dict:
        sample = BaseDataElement(metainfo={k: results[k] for k in self.meta_keys if k in results})
        if "gt_seg_map" in results:
            sample.gt_sem_seg = results["gt_seg_map"]
        return dict(inputs=results["img"].contiguous(), data_samples=sample)
