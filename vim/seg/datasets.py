"""Segmentation data sets in the ADE20K folder layout, and a generated shapes data set in the same layout.

Layout (``data_root``)::

    images/{training,validation}/NAME.jpg        (RGB)
    annotations/{training,validation}/NAME.png   (one uint8 class index per pixel)

Each data info holds ``img_path``, ``seg_map_path`` and ``reduce_zero_label``; the pipeline loads them.
"""
from __future__ import annotations

import colorsys
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from mmengine.dataset import BaseDataset
from mmengine.registry import DATASETS
from PIL import Image

ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake',
    'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray',
    'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator',
    'glass', 'clock', 'flag')


def make_palette(num_classes: int) -> List[tuple]:
    """Distinct, deterministic RGB colours: hues spread by the golden ratio, alternating lightness."""
    out = []
    for i in range(num_classes):
        h = (i * 0.618033988749895) % 1.0
        l_, s = (0.45, 0.85) if i % 2 == 0 else (0.6, 0.7)
        r, g, b = colorsys.hls_to_rgb(h, l_, s)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


@DATASETS.register_module(name="SegFolderDataset")
class SegFolderDataset(BaseDataset):
    """Images and label PNGs matched by file stem under ``images/<split>`` and ``annotations/<split>``.

    ``metainfo`` must give ``classes`` (and may give ``palette``); ``reduce_zero_label`` marks label 0 as
    "ignore" (ADE20K's "other"). Images without a label map raise, unless ``test_mode`` with
    ``require_labels=False`` (prediction only).
    """

    def __init__(self, data_root: str, split: str = "training", img_suffix: str = ".jpg",
                 seg_map_suffix: str = ".png", reduce_zero_label: bool = False, require_labels: bool = True,
                 **kwargs):
        self.split = split
        self.img_suffix = img_suffix
        self.seg_map_suffix = seg_map_suffix
        self.reduce_zero_label = reduce_zero_label
        self.require_labels = require_labels
        kwargs.setdefault("data_prefix", dict(img_path=f"images/{split}", seg_map_path=f"annotations/{split}"))
        super().__init__(data_root=data_root, **kwargs)
        classes = self.metainfo.get("classes")
        if not classes:
            raise ValueError(f"{type(self).__name__} needs metainfo=dict(classes=[...])")
        if "palette" not in self.metainfo:
            self._metainfo["palette"] = make_palette(len(classes))

    def load_data_list(self) -> List[dict]:
        img_dir = Path(self.data_prefix["img_path"])
        seg_dir = Path(self.data_prefix["seg_map_path"])
        if not img_dir.is_dir():
            raise FileNotFoundError(
                f"no image folder {img_dir}: expected {self.data_root}/images/{self.split}/*{self.img_suffix} "
                f"and {self.data_root}/annotations/{self.split}/*{self.seg_map_suffix} (the ADEChallengeData2016 "
                "layout); point data_root at the folder holding images/ and annotations/")
        images = sorted(p for p in img_dir.iterdir() if p.name.endswith(self.img_suffix))
        if not images:
            raise FileNotFoundError(f"{img_dir} holds no *{self.img_suffix} images")
        data_list = []
        missing = []
        for img in images:
            seg = seg_dir / (img.name[: -len(self.img_suffix)] + self.seg_map_suffix)
            if not seg.is_file():
                missing.append(seg)
                if self.require_labels:
                    continue
            data_list.append(dict(img_path=str(img), seg_map_path=str(seg) if seg.is_file() else None,
                                  reduce_zero_label=self.reduce_zero_label))
        if missing and self.require_labels:
            raise FileNotFoundError(f"{len(missing)} of {len(images)} images in {img_dir} have no label map, "
                                    f"e.g. {missing[0]}")
        return data_list


@DATASETS.register_module(name="ADE20KSegDataset")
class ADE20KSegDataset(SegFolderDataset):
    """ADE20K (SceneParsing, ``ADEChallengeData2016``): 150 classes; label 0 ("other") is ignored and
    labels 1..150 become 0..149."""

    METAINFO = dict(classes=ADE20K_CLASSES, palette=make_palette(len(ADE20K_CLASSES)))

    def __init__(self, data_root: str, split: str = "training", reduce_zero_label: bool = True, **kwargs):
        super().__init__(data_root=data_root, split=split, img_suffix=".jpg", seg_map_suffix=".png",
                         reduce_zero_label=reduce_zero_label, **kwargs)


# ---------------------------------------------------------------------------- generated shapes
SHAPES_SEG_KINDS = ("circle", "square", "triangle")


def write_shapes_segfolder(cache_dir: Optional[str] = None, kinds: Sequence[str] = SHAPES_SEG_KINDS,
                           img_size: int = 64, num_train: int = 1000, num_val: int = 100, seed: int = 0,
                           num_shapes: Sequence[int] = (1, 3), scale: Sequence[float] = (0.15, 0.32),
                           clutter: bool = True) -> Path:
    """Write (once) and return a shapes segmentation data set in the ADE20K layout under the cache dir
    (``$VIM_CACHE`` or ``~/.cache/vim``). Labels: 0 = background, k + 1 = ``kinds[k]``. The folder name
    encodes every parameter; it is generated in a temporary sibling and renamed into place, so concurrent
    processes never see a partial set."""
    from vim.data.shapes import cache_root, draw_shapes

    spec = dict(kinds=list(kinds), img_size=int(img_size), num_train=int(num_train), num_val=int(num_val),
                seed=int(seed), num_shapes=list(num_shapes), scale=list(scale), clutter=bool(clutter), version=1)
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    base = cache_root(cache_dir)
    root = base / f"shapes_seg_{img_size}px_{len(kinds)}k_{digest}"
    if (root / "spec.json").is_file():
        return root
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=base))
    try:
        for split, count, split_seed in (("training", num_train, 0), ("validation", num_val, 1)):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "annotations" / split).mkdir(parents=True)
            rng = np.random.default_rng([seed, split_seed])
            for i in range(count):
                img, mask = draw_shapes(rng, img_size, kinds, num_shapes=tuple(num_shapes), scale=tuple(scale),
                                        clutter=clutter)
                img.save(tmp / "images" / split / f"{i:05d}.png")
                Image.fromarray(mask, "L").save(tmp / "annotations" / split / f"{i:05d}.png")
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "spec.json").is_file():  # another process published the identical set first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


@DATASETS.register_module(name="ShapesSegDataset")
class ShapesSegDataset(SegFolderDataset):
    """Generated shapes with per-pixel labels (background + one class per shape kind), no download.
    ``generator`` holds the arguments of ``write_shapes_segfolder``; the set is written on first use."""

    def __init__(self, split: str = "training", generator: Optional[dict] = None, **kwargs):
        generator = dict(generator or {})
        kinds = tuple(generator.get("kinds", SHAPES_SEG_KINDS))
        root = write_shapes_segfolder(**generator)
        kwargs.setdefault("metainfo", dict(classes=("background",) + kinds))
        super().__init__(data_root=str(root), split=split, img_suffix=".png", seg_map_suffix=".png",
                         reduce_zero_label=False, **kwargs)


def dataset_classes(dataset_cfg: dict) -> tuple:
    """Class names a data-set config stands for, without reading the data (for inference tools)."""
    cfg = dict(dataset_cfg)
    meta = cfg.get("metainfo") or {}
    if meta.get("classes"):
        return tuple(meta["classes"])
    cls = DATASETS.get(cfg.get("type"))
    if cls is ShapesSegDataset or (isinstance(cls, type) and issubclass(cls, ShapesSegDataset)):
        return ("background",) + tuple((cfg.get("generator") or {}).get("kinds", SHAPES_SEG_KINDS))
    classes = getattr(cls, "METAINFO", {}).get("classes")
    if not classes:
        raise ValueError(f"cannot tell the classes of data set {cfg.get('type')!r}; give it metainfo=dict(classes=...)")
    return tuple(classes)
