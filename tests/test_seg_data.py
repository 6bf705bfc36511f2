"""Segmentation data: ADE20K-layout loader and pipelines, transforms, the IoU metric, overlays."""
import numpy as np
import pytest
import torch
from PIL import Image

import vim.seg  # noqa: F401
from mmengine.registry import DATASETS, TRANSFORMS
from vim.seg.metric import SegIoUMetric, confusion_matrix


# ---------------------------------------------------------------------------- metric
def test_metric_against_hand_computed_confusion():
    # 3 classes; 255 ignored. Pixels (gt -> pred):
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, gt, 3)
    expected = torch.tensor([[1, 1, 0],   # gt 0: one right, one predicted as 1
                             [1, 2, 0],   # gt 1: two right, one predicted as 0
                             [1, 0, 1]])  # gt 2: one right, one predicted as 0
    assert torch.equal(cm, expected)

    metric = SegIoUMetric(num_classes=3, per_class=False)
    metric.dataset_meta = dict(classes=('a', 'b', 'c'))
    # two images: the one above and one where class 2 never appears and everything is right
    metric.process({}, [dict(pred_sem_seg=pred, gt_sem_seg=gt),
                        dict(pred_sem_seg=torch.zeros(2, 2), gt_sem_seg=torch.zeros(2, 2, dtype=torch.long))])
    res = metric.evaluate(2)
    # totals: cm + 4 more correct class-0 pixels -> [[5,1,0],[1,2,0],[1,0,1]]
    iou = [5 / (6 + 7 - 5), 2 / (3 + 3 - 2), 1 / (2 + 1 - 1)]
    acc = [5 / 6, 2 / 3, 1 / 2]
    assert res['mIoU'] == pytest.approx(100 * np.mean(iou), abs=0.01)
    assert res['mAcc'] == pytest.approx(100 * np.mean(acc), abs=0.01)
    assert res['aAcc'] == pytest.approx(100 * 8 / 11, abs=0.01)


def test_metric_skips_absent_classes():
    metric = SegIoUMetric(num_classes=4, per_class=False)
    gt = torch.tensor([[0, 1], [1, 0]])
    metric.process({}, [dict(pred_sem_seg=gt.clone(), gt_sem_seg=gt)])
    assert metric.evaluate(1) == dict(aAcc=100.0, mIoU=100.0, mAcc=100.0)  # classes 2, 3 are absent


# ---------------------------------------------------------------------------- ADE20K layout
def _write_ade(root, split, n, size=(48, 64), seed=0):
    rng = np.random.default_rng(seed)
    (root / 'images' / split).mkdir(parents=True)
    (root / 'annotations' / split).mkdir(parents=True)
    for i in range(n):
        h, w = size
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / 'images' / split / f'ADE_{split}_{i:08d}.jpg')
        label = np.zeros((h, w), np.uint8)
        label[:, w // 2:] = 1
        label[h // 2:, :] = 150
        Image.fromarray(label).save(root / 'annotations' / split / f'ADE_{split}_{i:08d}.png')


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('ade') / 'ADEChallengeData2016'
    _write_ade(root, 'training', 3)
    _write_ade(root, 'validation', 2, size=(40, 30))
    return root


def test_ade20k_train_pipeline(ade_root):
    np.random.seed(0)
    ds = DATASETS.build(dict(type='ADE20KSegDataset', data_root=str(ade_root), split='training', pipeline=[
        dict(type='SegLoadImage'), dict(type='SegLoadAnnotations'),
        dict(type='SegRandomResize', scale=(128, 32), ratio_range=(0.5, 2.0), keep_ratio=True),
        dict(type='SegRandomCrop', crop_size=(32, 32), cat_max_ratio=0.75),
        dict(type='SegRandomFlip', prob=0.5), dict(type='SegPhotoMetricDistortion'), dict(type='SegPackInputs')]))
    assert len(ds) == 3 and len(ds.metainfo['classes']) == 150 and len(ds.metainfo['palette']) == 150
    for i in range(3):
        item = ds[i]
        img, gt = item['inputs'], item['data_samples'].gt_sem_seg
        assert img.dtype == torch.uint8 and img.shape[0] == 3
        assert img.shape[-2:] == gt.shape and max(gt.shape) <= 32
        # label 0 -> ignored, 1 -> 0, 150 -> 149
        assert set(gt.unique().tolist()) <= {0, 149, 255}


def test_ade20k_test_pipeline_keeps_original_labels(ade_root):
    ds = DATASETS.build(dict(type='ADE20KSegDataset', data_root=str(ade_root), split='validation', pipeline=[
        dict(type='SegLoadImage'), dict(type='SegResize', scale=(2048, 512), keep_ratio=True),
        dict(type='SegLoadAnnotations'), dict(type='SegPackInputs')]))
    item = ds[0]
    meta = item['data_samples'].metainfo
    assert meta['ori_shape'] == (40, 30) and meta['img_shape'] == (683, 512)  # short side to 512
    assert tuple(item['inputs'].shape) == (3, 683, 512)
    assert tuple(item['data_samples'].gt_sem_seg.shape) == (40, 30)


def test_ade20k_missing_folder_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match='images/training'):
        DATASETS.build(dict(type='ADE20KSegDataset', data_root=str(tmp_path), split='training'))


def test_random_crop_cat_max_ratio():
    np.random.seed(1)
    seg = torch.zeros(64, 64, dtype=torch.uint8)
    seg[:, 56:] = 1  # class 1 only in the last 8 columns
    crop = TRANSFORMS.build(dict(type='SegRandomCrop', crop_size=(16, 16), cat_max_ratio=0.75))
    for _ in range(5):
        out = crop(dict(img=torch.zeros(3, 64, 64, dtype=torch.uint8), gt_seg_map=seg.clone()))
        assert out['img'].shape[-2:] == out['gt_seg_map'].shape == (16, 16)
        assert out['img_shape'] == (16, 16)


def test_data_preprocessor_pads_training_batch():
    from mmengine.registry import MODELS
    from mmengine.structures import BaseDataElement
    pre = MODELS.build(dict(type='VimSegDataPreprocessor', size=(32, 32)))
    samples = [BaseDataElement(gt_sem_seg=torch.zeros(20, 32, dtype=torch.uint8)),
               BaseDataElement(gt_sem_seg=torch.ones(32, 24, dtype=torch.uint8))]
    out = pre(dict(inputs=[torch.full((3, 20, 32), 124, dtype=torch.uint8), torch.zeros(3, 32, 24, dtype=torch.uint8)],
                   data_samples=samples), training=True)
    assert tuple(out['inputs'].shape) == (2, 3, 32, 32)
    assert out['data_samples'][0].gt_sem_seg[20:].eq(255).all()
    assert out['data_samples'][1].gt_sem_seg[:, 24:].eq(255).all()
    assert out['inputs'][0, :, 20:].abs().max() == 0  # padding is 0 after normalisation


# ---------------------------------------------------------------------------- visualiser
def test_overlay_png(tmp_path):
    from mmengine.structures import BaseDataElement
    from vim.seg.visualizer import SegVisualizer, overlay_mask
    img = np.full((8, 10, 3), 100, np.uint8)
    mask = torch.zeros(8, 10, dtype=torch.long)
    mask[:, 5:] = 1
    mask[0, 0] = 255
    over = overlay_mask(img, mask, palette=[(255, 0, 0), (0, 0, 255)], alpha=0.5)
    assert tuple(over[0, 0]) == (100, 100, 100)                    # ignored pixel keeps the image
    assert tuple(over[1, 0]) == (178, 50, 50) and tuple(over[1, 9]) == (50, 50, 178)
    vis = SegVisualizer(name='test_seg_vis_overlay', palette=[(255, 0, 0), (0, 0, 255)])
    out = tmp_path / 'o.png'
    vis.add_datasample('x', img, BaseDataElement(gt_sem_seg=mask, pred_sem_seg=mask), out_file=str(out))
    assert Image.open(out).size == (20, 8)  # ground truth | prediction side by side


def test_ade20k_config_trains_and_slide_evaluates(ade_root, tmp_path):
    """The ADE20K config end to end through mmengine's Runner (2 iterations, shrunk sizes): training
    pipeline, padding to the crop, layer-decay optimizer, sliding-window evaluation, metric."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    cfg = Config.fromfile('configs/seg/upernet_vim_tiny_ade20k_512.py')
    crop = (64, 64)
    train_pipeline = [dict(type='SegLoadImage'), dict(type='SegLoadAnnotations'),
                      dict(type='SegRandomResize', scale=(256, 64), ratio_range=(0.5, 2.0), keep_ratio=True),
                      dict(type='SegRandomCrop', crop_size=crop, cat_max_ratio=0.75),
                      dict(type='SegRandomFlip', prob=0.5), dict(type='SegPhotoMetricDistortion'),
                      dict(type='SegPackInputs')]
    test_pipeline = [dict(type='SegLoadImage'), dict(type='SegResize', scale=(256, 96), keep_ratio=True),
                     dict(type='SegLoadAnnotations'), dict(type='SegPackInputs')]
    loader = dict(num_workers=0, persistent_workers=False)
    cfg.merge_from_dict({
        'work_dir': str(tmp_path), 'model.backbone.depth': 2, 'model.backbone.out_indices': (0, 1, 1, 1),
        'model.backbone.img_size': 64, 'model.data_preprocessor.size': crop,
        'model.test_cfg': dict(mode='slide', crop_size=crop, stride=(43, 43)),
        'train_dataloader': dict(batch_size=2, **loader),
        'train_dataloader.dataset': dict(data_root=str(ade_root), pipeline=train_pipeline),
        'val_dataloader': dict(**loader), 'test_dataloader': dict(**loader),
        'val_dataloader.dataset': dict(data_root=str(ade_root), pipeline=test_pipeline),
        'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2,
        'param_scheduler': [dict(type='PolyLR', power=1.0, by_epoch=False, begin=0, end=2)],
        'default_hooks.checkpoint': dict(type='CheckpointHook', by_epoch=False, interval=2),
        'default_hooks.logger.interval': 1,
    })
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = {k: runner.message_hub.get_scalar(f'val/{k}').current() for k in ('mIoU', 'mAcc', 'aAcc')}
    assert all(0 <= v <= 100 for v in metrics.values()), metrics
    groups = runner.optim_wrapper.optimizer.param_groups
    assert {round(g['initial_lr'] / g['lr_scale'], 12) for g in groups} == {1e-4}  # one base lr, scaled per layer
    assert min(g['lr_scale'] for g in groups) == pytest.approx(0.92 ** 3)  # depth 2: stem 0, blocks 1-2, top 3
