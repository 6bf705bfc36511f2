"""ImageNet-layout image folders (``<root>/<split>/<class>/<image>``) with timm transforms, for mmengine."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from mmengine.dist import barrier, get_dist_info
from mmengine.logging import print_log
from mmengine.registry import DATASETS
from PIL import Image
from timm.data import create_transform
from torch.utils.data import Dataset

from .shapes import write_shapes_imagefolder

__all__ = ["VimImageFolder", "scan_image_folder", "IMG_EXTENSIONS"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def scan_image_folder(root: str, classes: Optional[Union[Sequence[str], Dict[str, int]]] = None
                      ) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(path, class index) pairs of ``root/<class>/**/<image>`` in sorted order, and the class names.

    ``classes``: the folders to read, in label order (default: all, sorted), or a ``{folder: label}``
    dict (e.g. a subset of ImageNet's classes evaluated by a 1000-way model).
    Raises a clear error for a missing or empty folder and for a class folder with no images.
    """
    label_of = dict(classes) if isinstance(classes, dict) else None
    if label_of is not None:
        classes = list(label_of)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"data folder not found: {root}. Point the config's data_root at an ImageNet-style folder "
            f"holding <split>/<class>/<images> (e.g. --cfg-options train_dataloader.dataset.data_root=/data/imagenet)")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        classes = found
        if not classes:
            raise ValueError(f"{root} holds no class folders; expected {root}/<class>/<image files>")
    else:
        missing = [c for c in classes if c not in found]
        if missing:
            raise ValueError(f"{root} lacks the class folders {missing[:10]} named by the config's classes")
    samples: List[Tuple[str, int]] = []
    empty = []
    for idx, cls in enumerate(classes):
        if label_of is not None:
            idx = int(label_of[cls])
        cls_dir = os.path.join(root, cls)
        files = []
        for dirpath, _, names in os.walk(cls_dir, followlinks=True):
            files.extend(os.path.join(dirpath, n) for n in names if n.lower().endswith(IMG_EXTENSIONS))
        if not files:
            empty.append(cls_dir)
        samples.extend((f, idx) for f in sorted(files))
    if empty:
        raise ValueError(f"{len(empty)} class folder(s) hold no images ({', '.join(IMG_EXTENSIONS)}): "
                         f"{empty[:5]}{' ...' if len(empty) > 5 else ''}. Remove them or add their images.")
    return samples, list(classes)


# what timm's create_transform leaves out with use_prefetcher=True: the data preprocessor does these on the device
_PREFETCHER_SKIPS = {"mean": "mean", "std": "std", "re_prob": "random_erasing.probability",
                     "re_mode": "random_erasing.mode", "re_count": "random_erasing.max_count"}


def _check_prefetcher_transform(cfg: Dict) -> None:
    """timm ignores normalisation and random-erasing arguments when it builds a transform with ``use_prefetcher=True``;
    refuse them rather than train without them."""
    if not cfg.get("use_prefetcher"):
        return
    ignored = [k for k in _PREFETCHER_SKIPS if k in cfg]
    if ignored:
        where = ", ".join(f"{k} -> model.data_preprocessor.{_PREFETCHER_SKIPS[k]}" for k in ignored)
        raise ValueError(f"transform {ignored} would be ignored: with use_prefetcher=True the images stay uint8 and "
                         f"VimClsDataPreprocessor normalises and erases them on the device. Set them there ({where}), "
                         "or drop use_prefetcher to do it all in the workers.")


@DATASETS.register_module(name="VimImageFolder")
class VimImageFolder(Dataset):
    """Images of ``<data_root>/<split>/<class>/`` with a timm transform; items are
    ``dict(inputs=CHW tensor, data_samples=class index)``: float and normalised, or uint8 with the transform's
    ``use_prefetcher=True`` (the ImageNet configs; ``VimClsDataPreprocessor`` normalises on the device).

    Args:
        data_root: the data set root (holding ``train/`` and ``val/``). With ``shapes`` instead, the
            synthetic shapes data set is written once to the cache and used as the root.
        split: sub-folder to read (``train``, ``val``).
        transform: keyword arguments of ``timm.data.create_transform`` (input_size, is_training,
            auto_augment, color_jitter, interpolation, re_prob, mean, std, crop_pct, ...).
        shapes: keyword arguments of ``vim.data.write_shapes_imagefolder`` (kinds, img_size,
            train_per_class, val_per_class, seed, cache_dir).
        max_bad_images: give up when more than this many images could not be read.
    """

    _warned = 0

    def __init__(self, data_root: Optional[str] = None, split: str = "train", transform: Optional[Dict] = None,
                 shapes: Optional[Dict] = None, classes: Optional[Union[Sequence[str], Dict[str, int]]] = None,
                 max_bad_images: int = 1000):
        if (data_root is None) == (shapes is None):
            raise ValueError("give exactly one of data_root (a folder) or shapes (generate the demo data set)")
        if shapes is not None:
            data_root = str(self._shapes_root(dict(shapes)))
        self.data_root = str(data_root)
        self.split = split
        self.folder = os.path.join(self.data_root, split) if split else self.data_root
        self.samples, self.classes = scan_image_folder(self.folder, classes)
        self.transform_cfg = dict(transform or {})
        _check_prefetcher_transform(self.transform_cfg)
        self.transform = create_transform(**self.transform_cfg) if transform is not None else None
        self.max_bad_images = max_bad_images
        self.bad_images = 0

    @staticmethod
    def _shapes_root(shapes: Dict) -> Path:
        # One writer per node; the others wait, then find the published folder.
        _, world = get_dist_info()
        if world > 1 and int(os.environ.get("LOCAL_RANK", 0)) != 0:
            barrier()
            return write_shapes_imagefolder(**shapes)
        root = write_shapes_imagefolder(**shapes)
        if world > 1:
            barrier()
        return root

    @property
    def metainfo(self) -> Dict[str, Any]:
        return dict(classes=tuple(self.classes))

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> Image.Image:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")

    def __getitem__(self, index: int) -> Dict[str, Any]:
        # An unreadable image is replaced by the next readable one, so the run continues.
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self._load(path)
                break
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self.bad_images += 1
                VimImageFolder._warned += 1
                if VimImageFolder._warned <= 10 or VimImageFolder._warned % 100 == 0:
                    print_log(f"skipping unreadable image {path} ({type(e).__name__}: {e}); "
                              f"{VimImageFolder._warned} skipped so far in this process", logger="current",
                              level=30)
                if self.bad_images > self.max_bad_images:
                    raise RuntimeError(f"more than {self.max_bad_images} unreadable images under {self.folder}; "
                                       "is the data set corrupt or still being copied?") from e
        else:
            raise RuntimeError(f"no readable image under {self.folder}")
        x = self.transform(img) if self.transform is not None else img
        return dict(inputs=x, data_samples=target)
