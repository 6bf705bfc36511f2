"""The shapes segmentation demo on a shortened schedule (real training, real mIoU), then tools/segment.py
on its checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    from mmengine.config import Config
    from mmengine.runner import Runner

    work = tmp_path_factory.mktemp('shapes_seg')
    os.environ['VIM_CACHE'] = str(work / 'cache')  # generated data stays inside the test's folder
    cfg = Config.fromfile(str(REPO / 'configs/demo/shapes_seg.py'))
    iters = 100
    # shortened: one shape kind (background vs circle), fewer images and iterations
    shapes = dict(cfg.shapes, kinds=('circle',), num_train=400, num_val=40)
    cfg.merge_from_dict({
        'work_dir': str(work / 'run'),
        'train_dataloader.dataset.generator': shapes, 'val_dataloader.dataset.generator': shapes,
        'test_dataloader.dataset.generator': shapes,
        'model.decode_head.num_classes': 2, 'model.auxiliary_head.num_classes': 2,
        'train_cfg.max_iters': iters, 'train_cfg.val_interval': iters,
        'default_hooks.checkpoint.interval': iters, 'default_hooks.logger.interval': 20,
        'param_scheduler': [dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=20),
                            dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=20, end=iters)],
    })
    cfg.dump(str(work / 'cfg.py'))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops; threads only add contention on a shared CI machine
    try:
        runner = Runner.from_cfg(cfg)
        runner.train()  # validates once, at the last iteration
        metrics = {k: runner.message_hub.get_scalar(f'val/{k}').current() for k in ('mIoU', 'mAcc', 'aAcc')}
    finally:
        torch.set_num_threads(threads)
        os.environ.pop('VIM_CACHE', None)
    return work, metrics


def test_demo_learns(trained):
    _, metrics = trained
    # predicting background everywhere scores ~40 mIoU here; learning the shapes must clear 60
    assert metrics['mIoU'] > 60, metrics
    assert metrics['aAcc'] > 85, metrics


def test_segment_tool_writes_masks(trained):
    work, _ = trained
    images = sorted((work / 'cache').glob('shapes_seg_*/images/validation/*.png'))[:2]
    out = work / 'seg_out'
    proc = subprocess.run(
        [sys.executable, str(REPO / 'tools/segment.py'), *map(str, images), '--config', str(work / 'cfg.py'),
         '--checkpoint', str(work / 'run' / 'iter_100.pth'), '--out', str(out), '--device', 'cpu'],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image
    import numpy as np
    for img in images:
        mask = np.asarray(Image.open(out / f'{img.stem}_mask.png'))
        overlay = Image.open(out / f'{img.stem}_overlay.png')
        assert mask.shape == (48, 48) and mask.max() <= 1
        assert overlay.size == (48, 48) and overlay.mode == 'RGB'
    assert 'background' in proc.stdout
