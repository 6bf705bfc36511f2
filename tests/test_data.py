"""Shapes generator, the cached ImageFolder writer, and VimImageFolder's errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vim.data import SHAPE_KINDS, VimImageFolder, draw_shapes, scan_image_folder, write_shapes_imagefolder


def test_draw_shapes_is_deterministic_and_labelled():
    a_img, a_mask = draw_shapes(np.random.default_rng(7), 48, SHAPE_KINDS, num_shapes=(2, 4))
    b_img, b_mask = draw_shapes(np.random.default_rng(7), 48, SHAPE_KINDS, num_shapes=(2, 4))
    assert a_img.mode == "RGB" and a_img.size == (48, 48)
    assert a_mask.dtype == np.uint8 and a_mask.shape == (48, 48)
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img)) and np.array_equal(a_mask, b_mask)
    assert a_mask.max() <= len(SHAPE_KINDS) and (a_mask == 0).any() and (a_mask > 0).any()


def test_dominant_shape_owns_its_label():
    kinds = ["circle", "square", "triangle"]
    for k in range(3):
        _, mask = draw_shapes(np.random.default_rng(k), 32, kinds, num_shapes=0, dominant=k)
        assert set(np.unique(mask)) == {0, k + 1}
        assert (mask == k + 1).mean() > 0.1  # the dominant shape is large
    with pytest.raises(ValueError, match="unknown shape kind"):
        draw_shapes(np.random.default_rng(0), 32, ["blob"])


def test_writer_makes_imagefolder_once(tmp_path):
    kw = dict(cache_dir=str(tmp_path), kinds=("circle", "star"), img_size=16, train_per_class=3, val_per_class=2)
    root = write_shapes_imagefolder(**kw)
    assert root.parent == tmp_path and (root / "spec.json").is_file()
    assert sorted(p.name for p in (root / "train").iterdir()) == ["circle", "star"]
    assert len(list((root / "val" / "star").glob("*.png"))) == 2
    first = (root / "train" / "circle" / "00000.png").read_bytes()
    mtime = (root / "spec.json").stat().st_mtime_ns
    assert write_shapes_imagefolder(**kw) == root and (root / "spec.json").stat().st_mtime_ns == mtime  # reused
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp folders left behind
    other = write_shapes_imagefolder(**dict(kw, cache_dir=str(tmp_path / "again")))
    assert (other / "train" / "circle" / "00000.png").read_bytes() == first  # deterministic


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VIM_CACHE", str(tmp_path / "envcache"))
    root = write_shapes_imagefolder(kinds=("ring",), img_size=8, train_per_class=1, val_per_class=1)
    assert root.parent == tmp_path / "envcache"


def _folder(tmp_path, counts):
    for cls, n in counts.items():
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "train" / cls / f"{i}.JPEG")
    return tmp_path


def test_imagefolder_reads_labels_and_transforms(tmp_path):
    root = _folder(tmp_path, {"n01": 2, "n02": 3})
    ds = VimImageFolder(data_root=str(root), split="train",
                        transform=dict(input_size=8, is_training=False, crop_pct=1.0))
    assert len(ds) == 5 and ds.metainfo == {"classes": ("n01", "n02")}
    item = ds[4]
    assert item["data_samples"] == 1 and item["inputs"].shape == (3, 8, 8) and item["inputs"].dtype == torch.float32
    sub = VimImageFolder(data_root=str(root), split="train", classes={"n02": 7})
    assert len(sub) == 3 and {t for _, t in sub.samples} == {7}


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        VimImageFolder(data_root=str(tmp_path / "missing"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders"):
        VimImageFolder(data_root=str(tmp_path / "empty"))
    root = _folder(tmp_path / "one", {"a": 1})
    (root / "train" / "b").mkdir()
    with pytest.raises(ValueError, match="hold no images.*train/b"):
        scan_image_folder(str(root / "train"))


def test_unreadable_image_is_skipped_and_counted(tmp_path, caplog):
    root = _folder(tmp_path, {"a": 2})
    (root / "train" / "a" / "0.JPEG").write_bytes(b"not an image")
    ds = VimImageFolder(data_root=str(root), transform=dict(input_size=8, is_training=False, crop_pct=1.0))
    item = ds[0]  # replaced by the next readable image
    assert item["inputs"].shape == (3, 8, 8) and ds.bad_images == 1
    ds.max_bad_images = 1
    with pytest.raises(RuntimeError, match="unreadable images"):
        ds[0]


def test_posterize_to_zero_bits_gives_black_under_any_pillow():
    """timm's strongest posterize levels keep 0 bits; Pillow 13 refuses that, which stopped the recipe's
    RandAugment (rand-m9-mstd0.5-inc1 draws it for 1 image in ~630). After ``import vim.data`` they give the black
    image older Pillows gave, and other levels are timm's and Pillow's own."""
    from timm.data import auto_augment

    from vim.data import augment_compat

    augment_compat.install()   # again: idempotent
    img = Image.fromarray(np.random.default_rng(0).integers(1, 256, (8, 8, 3), dtype=np.uint8))
    for name, magnitude in (("PosterizeIncreasing", 10.0), ("Posterize", 0.0)):
        out = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude)(img)
        assert out.mode == "RGB" and not np.asarray(out).any(), name
    from PIL import ImageOps

    out = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5.0)(img)   # 2 bits kept
    assert np.array_equal(np.asarray(out), np.asarray(ImageOps.posterize(img, 2)))


@pytest.mark.parametrize("n, per_rank", [(144, 72), (300, 128)])
def test_repeat_aug_sampler_keeps_small_sets_whole(monkeypatch, n, per_rank):
    """Distributed, timm's repeated augmentation rounds an epoch down to 256 images; below 256 (a small fine-tuning
    set, the DDP test's) older timm made that an empty epoch, which mmengine reports only as `epoch_length` 0."""
    from vim.data import samplers
    monkeypatch.setattr(samplers, "get_dist_info", lambda: (1, 2))
    sampler = samplers.RepeatAugOrDefaultSampler(list(range(n)), num_repeats=3)
    assert len(sampler) == per_rank and len(list(sampler)) == per_rank
