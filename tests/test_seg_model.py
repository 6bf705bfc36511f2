"""Segmentation model: shapes through every stage, slide vs whole inference, layer-decay groups, weights."""
from pathlib import Path

import pytest
import torch

import vim.seg  # noqa: F401  (registers the seg classes)
from mmengine.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS

D = 32


def small_segmentor(num_classes=5, depth=4, patch=16, **test_cfg):
    norm = dict(type='SyncBN')
    return MODELS.build(dict(
        type='VimUperNet',
        backbone=dict(type='VimSegBackbone', model_name='vim_tiny', img_size=64, embed_dim=D, depth=depth,
                      patch_size=patch, stride=patch, d_state=4, out_indices=tuple(range(depth))[-4:],
                      drop_path_rate=0.0),
        neck=dict(type='VimMultiScaleNeck', in_channels=D, norm_cfg=norm),
        decode_head=dict(type='VimUPerHead', in_channels=[D] * 4, channels=16, num_classes=num_classes,
                         norm_cfg=norm),
        auxiliary_head=dict(type='VimFCNHead', in_channels=D, channels=8, num_classes=num_classes, norm_cfg=norm),
        test_cfg=test_cfg or dict(mode='whole')))


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return small_segmentor().eval()


@pytest.mark.parametrize('hw', [(512, 512), (96, 160), (100, 75)])
def test_stage_shapes(model, hw):
    h, w = hw
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        if h % 16 == 0 and w % 16 == 0:
            feats = model.backbone(x)
            assert [tuple(f.shape) for f in feats] == [(1, D, h // 16, w // 16)] * 4
            pyramid = model.neck(feats)
            assert [tuple(f.shape) for f in pyramid] == [(1, D, h // s, w // s) for s in (4, 8, 16, 32)]
            assert tuple(model.decode_head(pyramid).shape) == (1, 5, h // 4, w // 4)
            assert tuple(model.auxiliary_head(pyramid).shape) == (1, 5, h // 16, w // 16)
        # sizes that do not tile into patches are padded inside and cropped back
        assert tuple(model(x, mode='tensor').shape) == (1, 5, h, w)


def test_loss_and_backward():
    torch.manual_seed(0)
    m = small_segmentor(num_classes=3).train()
    x = torch.randn(2, 3, 64, 96)
    from mmengine.structures import BaseDataElement
    gt = torch.randint(0, 3, (2, 64, 96), dtype=torch.uint8)
    gt[0, :10] = 255
    samples = [BaseDataElement(gt_sem_seg=g) for g in gt]
    losses = m(x, samples, mode='loss')
    assert set(losses) == {'loss_decode', 'loss_aux'}
    sum(losses.values()).backward()
    assert m.backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0
    # an all-ignored batch contributes zero, not NaN
    samples = [BaseDataElement(gt_sem_seg=torch.full((64, 96), 255, dtype=torch.uint8)) for _ in range(2)]
    assert all(v.item() == 0 for v in m(x, samples, mode='loss').values())


def test_slide_equals_whole_on_one_window(model):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        whole = model.whole_inference(x)
        slide = model.slide_inference(x, crop_size=(64, 64), stride=(43, 43))
    torch.testing.assert_close(slide, whole)


def test_slide_window_averaging():
    """With a per-pixel model every window agrees with the whole image, so any overlap pattern must
    average back to the whole-image logits; a wrong window placement or count would show."""
    m = small_segmentor().eval()
    conv = torch.nn.Conv2d(3, 5, 1)
    m.encode_decode = lambda t: conv(t)  # a plain attribute shadows the method
    x = torch.randn(2, 3, 100, 150)
    with torch.no_grad():
        torch.testing.assert_close(m.slide_inference(x, (64, 64), (43, 43)), conv(x))
        torch.testing.assert_close(m.slide_inference(x[..., :40, :50], (64, 64), (43, 43)), conv(x[..., :40, :50]))


def test_predict_restores_original_size(model):
    from mmengine.structures import BaseDataElement
    model.test_cfg = dict(mode='slide', crop_size=(64, 64), stride=(43, 43))
    x = torch.randn(2, 3, 96, 96)  # padded batch: the first image is 80x96, the second 96x64
    samples = [BaseDataElement(metainfo=dict(img_shape=(80, 96), ori_shape=(40, 48))),
               BaseDataElement(metainfo=dict(img_shape=(96, 64), ori_shape=(200, 130), flip=True))]
    with torch.no_grad():
        out = model.predict(x, samples)
    model.test_cfg = dict(mode='whole')
    assert tuple(out[0].pred_sem_seg.shape) == (40, 48)
    assert tuple(out[1].pred_sem_seg.shape) == (200, 130)
    assert out[0].pred_sem_seg.max() < 5


def test_layer_decay_groups():
    m = small_segmentor(depth=4)
    ctor = OPTIM_WRAPPER_CONSTRUCTORS.build(dict(
        type='VimLayerDecayOptimWrapperConstructor',
        optim_wrapper_cfg=dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1.0, weight_decay=0.05)),
        paramwise_cfg=dict(layer_decay_rate=0.5)))
    optimizer = ctor(m).optimizer
    by_param = {}
    for g in optimizer.param_groups:
        for p in g['params']:
            by_param[id(p)] = (g['lr'], g['weight_decay'])
    names = dict(m.named_parameters())
    lr = lambda n: by_param[id(names[n])][0]  # noqa: E731
    wd = lambda n: by_param[id(names[n])][1]  # noqa: E731
    # official BEiT/Vim ids: stem 0, block i -> i + 1, everything else depth + 1 (scale 1)
    assert lr('backbone.model.patch_embed.proj.weight') == pytest.approx(0.5 ** 5)
    assert lr('backbone.model.pos_embed') == pytest.approx(0.5 ** 5)
    for i in range(4):
        assert lr(f'backbone.model.blocks.{i}.mixer.in_proj.weight') == pytest.approx(0.5 ** (4 - i))
    assert lr('decode_head.conv_seg.weight') == 1.0
    assert lr('neck.branches.0.0.weight') == 1.0
    assert lr('auxiliary_head.conv_seg.weight') == 1.0
    # no weight decay on 1-D parameters, position embedding and A_log / D
    assert wd('decode_head.conv_seg.weight') == 0.05
    assert wd('backbone.model.blocks.0.mixer.in_proj.weight') == 0.05
    assert wd('decode_head.conv_seg.bias') == 0.0
    assert wd('backbone.model.pos_embed') == 0.0
    assert wd('backbone.model.blocks.1.mixer.A_log') == 0.0
    assert len(by_param) == sum(p.requires_grad for p in m.parameters())


def test_pretrained_official_checkpoint(tmp_path):
    oracle = torch.load(Path(__file__).parent / 'data' / 'vim_tiny_depth4_official.pt', weights_only=False)
    path = tmp_path / 'official.pth'
    torch.save({'model': oracle['state_dict']}, path)
    bb = MODELS.build(dict(type='VimSegBackbone', model_name='vim_tiny', depth=4, img_size=512,
                           out_indices=(0, 1, 2, 3), pretrained=str(path)))
    sd = oracle['state_dict']
    assert bb.model.cls_token is None
    assert tuple(bb.model.pos_embed.shape) == (1, 32 * 32, 192)  # 14x14 (+ class token) resized to 32x32
    torch.testing.assert_close(bb.model.patch_embed.proj.weight, sd['patch_embed.proj.weight'])
    torch.testing.assert_close(bb.model.blocks[2].mixer.A_b_log, sd['layers.2.mixer.A_b_log'])
    with pytest.raises(ValueError, match='out_indices'):
        MODELS.build(dict(type='VimSegBackbone', depth=4, out_indices=(5, 11)))
    with pytest.raises(RuntimeError, match=r'missing keys: blocks\.4\.'):
        MODELS.build(dict(type='VimSegBackbone', model_name='vim_tiny', depth=6, out_indices=(0, 5),
                          pretrained=str(path)))


def test_backbone_repeated_out_index():
    bb = MODELS.build(dict(type='VimSegBackbone', depth=3, embed_dim=D, img_size=32, patch_size=8, stride=8,
                           d_state=4, out_indices=(0, 1, 2, -1)))
    feats = bb(torch.randn(1, 3, 32, 48))
    assert [tuple(f.shape) for f in feats] == [(1, D, 4, 6)] * 4
    assert feats[2] is feats[3]


def test_ade20k_configs_build():
    from mmengine.config import Config
    for size, dim in (('tiny', 192), ('small', 384)):
        cfg = Config.fromfile(f'configs/seg/upernet_vim_{size}_ade20k_512.py')
        assert cfg.model.decode_head.in_channels == [dim] * 4 and cfg.model.decode_head.num_classes == 150
        assert cfg.model.backbone.out_indices == (5, 11, 17, 23)
        assert cfg.model.test_cfg == dict(mode='slide', crop_size=(512, 512), stride=(341, 341))
        assert cfg.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.92
        assert cfg.train_cfg.max_iters == 60000 and cfg.train_dataloader.batch_size == 8
    cfg.model.backbone.update(depth=2, out_indices=(0, 1, 1, 1))  # small: a shallow copy builds fast
    model = MODELS.build(cfg.model)
    assert model.backbone.model.embed_dim == 384 and tuple(model.backbone.model.pos_embed.shape) == (1, 1024, 384)
