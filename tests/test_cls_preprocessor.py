"""VimClsDataPreprocessor: uint8 batches from timm's prefetcher transforms normalised (and randomly erased in
training) on the device, as timm's own CPU transforms would have done; float batches untouched."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image
from timm.data import create_transform

from vim.engine import ClsDataPreprocessor
from vim.engine.cli import REPO_ROOT

CONFIG = f"{REPO_ROOT}/configs/vim/vim_tiny_in1k.py"


def _photo(seed=0, size=(300, 260)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_imagenet_eval_pipeline_matches_timm_cpu_normalisation():
    """The ImageNet config's val transform (uint8) + the config's preprocessor give what the same transform without
    the prefetcher (float, normalised on the CPU) gives."""
    cfg = Config.fromfile(CONFIG)
    transform = dict(cfg.val_dataloader.dataset.transform)
    assert transform.pop("use_prefetcher") is True
    images = [_photo(s) for s in range(3)]
    expected = torch.stack([create_transform(**transform)(img) for img in images])
    uint8 = torch.stack([create_transform(**transform, use_prefetcher=True)(img) for img in images])
    assert uint8.dtype == torch.uint8 and uint8.shape == (3, 3, 224, 224)
    pre_cfg = dict(cfg.model.data_preprocessor)
    assert pre_cfg.pop("type") == "VimClsDataPreprocessor"
    pre = ClsDataPreprocessor(**pre_cfg)
    out = pre(dict(inputs=uint8, data_samples=torch.tensor([1, 2, 3])), training=False)
    torch.testing.assert_close(out["inputs"], expected, rtol=0, atol=2e-6)
    assert out["data_samples"].tolist() == [1, 2, 3]


def test_training_batches_are_erased_as_the_recipe_asks():
    """The recipe's erasing (p 0.25, per-pixel noise, one region) moved from the train transform to the
    preprocessor; with p 1 every image of a training batch gets one noise region and evaluation batches none."""
    cfg = Config.fromfile(CONFIG)
    assert cfg.model.data_preprocessor.random_erasing == dict(probability=0.25, mode="pixel", max_count=1)
    train = create_transform(**cfg.train_dataloader.dataset.transform)
    assert "RandomErasing" not in repr(train) and "MaybePILToTensor" in repr(train.transforms[-1])
    assert train(_photo()).dtype == torch.uint8

    pre = ClsDataPreprocessor(random_erasing=dict(probability=1.0, mode="const", max_count=1))
    x = torch.full((4, 3, 32, 32), 200, dtype=torch.uint8)
    clean = pre(dict(inputs=x.clone()), training=False)["inputs"]
    assert (clean != 0).all()
    random.seed(0)
    erased = pre(dict(inputs=x.clone()), training=True)["inputs"]
    zero = erased == 0   # mode 'const' erases to zero
    for i in range(4):
        assert zero[i].any() and torch.equal(erased[i][~zero[i]], clean[i][~zero[i]])
        rows, cols = zero[i, 0].any(1).nonzero(), zero[i, 0].any(0).nonzero()
        # one rectangle, the same on every channel
        assert zero[i, :, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_float_batches_pass_through_and_errors():
    pre = ClsDataPreprocessor(random_erasing=dict(probability=1.0, mode="pixel"))
    x = torch.randn(2, 3, 8, 8)
    out = pre(dict(inputs=x.clone(), data_samples=None), training=True)
    assert torch.equal(out["inputs"], x)   # normalised and erased by their own transform: left alone
    with pytest.raises(ValueError, match="4 channels, but mean / std have 3"):
        pre(dict(inputs=torch.zeros(1, 4, 8, 8, dtype=torch.uint8)))
    with pytest.raises(TypeError, match=r"\(B, C, H, W\) tensor, got Tensor\(3, 8, 8\)"):
        pre(dict(inputs=torch.zeros(3, 8, 8, dtype=torch.uint8)))


def test_prefetcher_transform_refuses_what_timm_would_ignore(tmp_path):
    """With use_prefetcher=True timm drops mean / std / re_* from the transform; the data set says where they go."""
    from vim.data import VimImageFolder

    (tmp_path / "train" / "a").mkdir(parents=True)
    _photo(size=(40, 40)).save(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(ValueError, match=r"\['std', 're_prob'\] would be ignored.*std -> model.data_preprocessor.std, "
                                         r"re_prob -> model.data_preprocessor.random_erasing.probability"):
        VimImageFolder(data_root=str(tmp_path), transform=dict(input_size=32, is_training=True, use_prefetcher=True,
                                                               std=(0.5, 0.5, 0.5), re_prob=0.25))
    ds = VimImageFolder(data_root=str(tmp_path), transform=dict(input_size=32, is_training=True, use_prefetcher=True))
    assert ds[0]["inputs"].dtype == torch.uint8
