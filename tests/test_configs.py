"""The ImageNet configs build without data: model, optimizer param groups, schedule, transforms."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

import vim.engine  # noqa: F401  (registers everything)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
ORACLE = REPO / "tests" / "data" / "vim_tiny_depth4_official.pt"

RECIPES = {  # size: (model name, weight decay, drop path)
    "tiny": ("vim_tiny", 0.1, 0.0),
    "small": ("vim_small", 0.05, 0.05),
    "base": ("vim_base", 0.05, 0.1),
}


def _build_model(cfg, **model_kwargs):
    from mmengine.registry import MODELS
    model_cfg = cfg.model.copy()
    model_cfg["model_kwargs"] = dict(model_cfg["model_kwargs"], **model_kwargs)
    return MODELS.build(model_cfg)


@pytest.mark.parametrize("size", list(RECIPES))
def test_imagenet_config_builds(size):
    cfg = Config.fromfile(CONFIGS / "vim" / f"vim_{size}_in1k.py")
    name, wd, dp = RECIPES[size]
    assert cfg.model.model_name == name and cfg.model.model_kwargs.drop_path_rate == dp
    assert cfg.optim_wrapper.optimizer.weight_decay == wd
    assert cfg.train_cfg.max_epochs == 310 and cfg.auto_scale_lr == dict(base_batch_size=512, enable=True)
    assert cfg.default_scope is None and cfg.custom_imports.imports == ["vim.engine"]
    ema = [h for h in cfg.custom_hooks if h.type == "EMAHook"][0]
    assert math.isclose(1 - ema.momentum, 0.99996)
    assert cfg.model.mixup == dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch")
    assert cfg.model.label_smoothing == 0.1

    # a 2-block version of the model (the full depth only costs time) with the recipe's param groups
    model = _build_model(cfg, depth=2)
    assert model.model.embed_dim == {"tiny": 192, "small": 384, "base": 768}[size]
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
    ow_cfg = cfg.optim_wrapper.copy()
    ctor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(type=ow_cfg.pop("constructor"), optim_wrapper_cfg=ow_cfg))
    ow = ctor(model)
    assert type(ow).__name__ == "GuardedOptimWrapper" and isinstance(ow.optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in ow.optimizer.param_groups}
    assert set(decay) == {0.0, wd}
    for n in ("model.pos_embed", "model.cls_token", "model.blocks.0.mixer.A_log", "model.blocks.0.mixer.A_b_log",
              "model.blocks.0.mixer.D", "model.blocks.0.mixer.D_b", "model.norm.weight", "model.head.bias",
              "model.blocks.1.mixer.dt_proj.bias"):
        assert n in decay[0.0], n
    for n in ("model.blocks.0.mixer.in_proj.weight", "model.blocks.0.mixer.x_proj.weight", "model.head.weight",
              "model.patch_embed.proj.weight", "model.blocks.1.mixer.out_proj.weight"):
        assert n in decay[wd], n


def _lr_curve(cfg, lr, epochs):
    """Per-epoch learning rates of the config's schedule (unconverted, so no data loader is needed)."""
    from mmengine.registry import PARAM_SCHEDULERS
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheds = []
    for s in cfg.param_scheduler:
        s = dict(s)
        s.pop("convert_to_iter_based", None)
        scheds.append(PARAM_SCHEDULERS.build(s, default_args=dict(optimizer=opt)))
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        for s in scheds:
            s.step()
    return out


def test_schedule_values_at_key_epochs():
    cfg = Config.fromfile(CONFIGS / "vim" / "vim_tiny_in1k.py")
    peak = cfg.optim_wrapper.optimizer.lr * 1024 / 512  # 8 GPUs x 128 images, scaled as auto_scale_lr does
    assert math.isclose(peak, 1e-3)
    lr = _lr_curve(cfg, peak, 310)
    assert math.isclose(lr[0], 1e-6, rel_tol=1e-6)  # warmup starts at 1e-6
    assert math.isclose(lr[5], peak, rel_tol=1e-6)  # warmup ends at the peak
    assert lr[1] < lr[2] < lr[3] < lr[4] == pytest.approx(peak)  # mmengine: the peak is reached at end - 1
    mid = 5 + (300 - 5) / 2
    assert math.isclose((lr[math.floor(mid)] + lr[math.ceil(mid)]) / 2, (peak + 1e-5) / 2, rel_tol=1e-2)
    assert lr[299] == pytest.approx(1e-5, rel=1e-2) and lr[300] == lr[299]  # cosine ends at epoch 300
    assert lr[309] == lr[299]  # 10 cooldown epochs at the minimum


def test_transforms_follow_the_recipe():
    from timm.data import create_transform
    cfg = Config.fromfile(CONFIGS / "vim" / "vim_small_in1k.py")
    train = create_transform(**cfg.train_dataloader.dataset.transform)
    text = repr(train)
    assert "RandomResizedCropAndInterpolation(size=(224, 224)" in text and "bicubic" in text
    assert "RandAugment" in text and "m=9" in text.replace(" ", "").replace("magnitude=9", "m=9") or \
        "rand-m9-mstd0.5-inc1" in str(cfg.train_dataloader.dataset.transform)
    # uint8 out; normalisation and the recipe's random erasing run on the device (tests/test_cls_preprocessor.py)
    assert "MaybePILToTensor" in text and "Normalize" not in text and "RandomErasing" not in text
    assert cfg.model.data_preprocessor.type == "VimClsDataPreprocessor"
    assert cfg.model.data_preprocessor.random_erasing == dict(probability=0.25, mode="pixel", max_count=1)
    val = create_transform(**cfg.val_dataloader.dataset.transform)
    resize, crop = val.transforms[0], val.transforms[1]
    assert resize.size == 256 and "BICUBIC" in str(resize.interpolation).upper()
    assert tuple(crop.size) == (224, 224)
    assert cfg.train_dataloader.sampler.type == "VimRepeatAugSampler"
    assert cfg.train_dataloader.sampler.num_repeats == 3 and cfg.train_dataloader.drop_last


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_stride8_finetune_config(size, tmp_path):
    cfg = Config.fromfile(CONFIGS / "vim" / f"vim_{size}_stride8_ft_in1k.py")
    assert cfg.model.model_name == f"vim_{size}_stride8" and cfg.train_cfg.max_epochs == 30
    assert cfg.optim_wrapper.optimizer.lr == 5e-6 and cfg.optim_wrapper.optimizer.weight_decay == 1e-8
    lr = _lr_curve(cfg, 5e-6 * 1024 / 512, 30)
    assert all(v == pytest.approx(1e-5) for v in lr)  # warmup 1e-5 = lr = min lr: constant
    if size != "tiny":
        return
    # a stride-16 official checkpoint goes in with its position embedding resampled 14x14 -> 27x27
    oracle = torch.load(ORACLE, weights_only=False)
    ckpt = tmp_path / "stride16.pth"
    torch.save({"model": oracle["state_dict"]}, ckpt)
    cfg.model.init_checkpoint = str(ckpt)
    model = _build_model(cfg, depth=4)
    assert model.model.pos_embed.shape == (1, 27 * 27 + 1, 192)
    torch.testing.assert_close(model.model.blocks[3].mixer.A_b_log, oracle["state_dict"]["layers.3.mixer.A_b_log"])
    torch.testing.assert_close(model.model.head.weight, oracle["state_dict"]["head.weight"])


def test_missing_init_checkpoint_is_a_clear_error():
    cfg = Config.fromfile(CONFIGS / "vim" / "vim_tiny_stride8_ft_in1k.py")
    with pytest.raises(FileNotFoundError, match="model.init_checkpoint"):
        _build_model(cfg, depth=1)


def test_demo_config_is_the_default():
    from vim.engine.cli import DEMO_CONFIG
    cfg = Config.fromfile(DEMO_CONFIG)
    assert Path(DEMO_CONFIG) == CONFIGS / "demo" / "shapes_cls.py"
    assert cfg.model.model_name == "vim_tiny" and cfg.train_dataloader.dataset.shapes is not None


def test_loaders_unpinned_without_a_gpu(monkeypatch):
    """The ImageNet configs pin host memory for GPU training; on a machine without a GPU the tools switch it off
    (torch's DataLoader would warn on every loader), and with one they leave it as configured."""
    from vim.engine import cli

    cfg = Config.fromfile(CONFIGS / "vim" / "vim_tiny_in1k.py")
    assert cfg.train_dataloader.pin_memory and cfg.val_dataloader.pin_memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cli.unpin_without_gpu(cfg)
    assert cfg.train_dataloader.pin_memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cli.unpin_without_gpu(cfg)
    assert not cfg.train_dataloader.pin_memory and not cfg.val_dataloader.pin_memory
    assert not cfg.test_dataloader.pin_memory
