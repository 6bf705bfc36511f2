"""Colour-mask overlays of label maps and predictions, as arrays or PNG files."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from mmengine.registry import VISUALIZERS
from mmengine.visualization import Visualizer
from PIL import Image

from .datasets import make_palette


def colorize_mask(mask, palette: Optional[Sequence[Sequence[int]]] = None, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours; ``ignore_index`` pixels are black."""
    mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask).astype(np.int64)
    n = int(mask[mask != ignore_index].max(initial=0)) + 1
    palette = np.asarray(palette if palette is not None and len(palette) >= n else make_palette(max(n, 1)),
                         dtype=np.uint8)
    out = palette[np.clip(mask, 0, len(palette) - 1)]
    out[mask == ignore_index] = 0
    return out


def overlay_mask(image, mask, palette=None, alpha: float = 0.5, ignore_index: int = 255) -> np.ndarray:
    """Blend the colour mask over an (H, W, 3) uint8 image (ignored pixels keep the image)."""
    image = np.asarray(image, dtype=np.uint8)
    if image.shape[:2] != tuple(np.shape(mask)[-2:]):
        raise ValueError(f"image {image.shape[:2]} and mask {tuple(np.shape(mask)[-2:])} differ in size")
    colours = colorize_mask(mask, palette, ignore_index).astype(np.float32)
    keep = (np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask) == ignore_index)[..., None]
    blended = image.astype(np.float32) * (1 - alpha) + colours * alpha
    return np.where(keep, image, blended).round().clip(0, 255).astype(np.uint8)


@VISUALIZERS.register_module(name="SegVisualizer")
class SegVisualizer(Visualizer):
    """mmengine Visualizer that draws ground truth and/or prediction overlays side by side.

    ``add_datasample(name, image, data_sample, out_file=...)`` writes a PNG when ``out_file`` is given,
    otherwise sends the picture to the configured vis backends."""

    def __init__(self, name: str = "seg_visualizer", alpha: float = 0.5, palette=None, ignore_index: int = 255,
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.alpha = alpha
        self.palette = palette
        self.ignore_index = ignore_index

    def _palette(self):
        if self.palette is not None:
            return self.palette
        return (self.dataset_meta or {}).get("palette")

    def add_datasample(self, name: str, image: np.ndarray, data_sample=None, draw_gt: bool = True,
                       draw_pred: bool = True, show: bool = False, wait_time: float = 0,
                       out_file: Optional[str] = None, step: int = 0) -> np.ndarray:
        panels = []
        get = (lambda k: data_sample.get(k)) if isinstance(data_sample, dict) else \
            (lambda k: getattr(data_sample, k, None))
        for flag, key in ((draw_gt, "gt_sem_seg"), (draw_pred, "pred_sem_seg")):
            mask = get(key) if data_sample is not None else None
            if flag and mask is not None:
                mask = torch.as_tensor(mask).squeeze()
                panels.append(overlay_mask(image, mask, self._palette(), self.alpha, self.ignore_index))
        drawn = np.concatenate(panels, axis=1) if panels else np.asarray(image, dtype=np.uint8)
        if show:
            self.show(drawn, win_name=name, wait_time=wait_time)
        if out_file is not None:
            os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
            Image.fromarray(drawn).save(out_file)
        else:
            self.add_image(name, drawn, step)
        return drawn
