# Semantic-segmentation demo on generated shapes (no download): background, circles and crosses on
# 48x48 gradient backgrounds. The same segmentor, backbone, neck and heads as the ADE20K configs, shrunk
# to a 3-block Vim (embed 64, patch 8: a 6x6 token grid) so that it trains on two CPU cores in minutes.
#   python tools/train.py configs/demo/shapes_seg.py        -> prints mIoU: ... at the end
custom_imports = dict(imports=['vim.engine', 'vim.seg'], allow_failed_imports=False)
default_scope = None

img_size = 48
max_iters = 600
kinds = ('circle', 'cross')
num_classes = 1 + len(kinds)  # background + one class per shape kind
embed_dim = 64
# written once to $VIM_CACHE (default ~/.cache/vim) on first use
shapes = dict(img_size=img_size, num_train=2000, num_val=200, kinds=kinds, num_shapes=(1, 2),
              scale=(0.2, 0.38), clutter=False)

norm_cfg = dict(type='SyncBN')
model = dict(
    type='VimUperNet',
    data_preprocessor=dict(type='VimSegDataPreprocessor', size=(img_size, img_size)),
    # out_indices: the last block feeds both coarse levels of a 3-block model
    backbone=dict(type='VimSegBackbone', model_name='vim_tiny', img_size=img_size, embed_dim=embed_dim, depth=3,
                  patch_size=8, stride=8, d_state=4, out_indices=(0, 1, 2, 2), drop_path_rate=0.0),
    neck=dict(type='VimMultiScaleNeck', in_channels=embed_dim, scales=(4, 2, 1, 0.5), norm_cfg=norm_cfg),
    decode_head=dict(type='VimUPerHead', in_channels=[embed_dim] * 4, channels=64, num_classes=num_classes,
                     pool_scales=(1, 2, 3, 6), dropout=0.1, norm_cfg=norm_cfg, loss_weight=1.0),
    auxiliary_head=dict(type='VimFCNHead', in_channels=embed_dim, channels=32, num_classes=num_classes,
                        in_index=2, norm_cfg=norm_cfg, loss_weight=0.4),
    test_cfg=dict(mode='whole'),
)

train_pipeline = [
    dict(type='SegLoadImage'),
    dict(type='SegLoadAnnotations'),
    dict(type='SegRandomFlip', prob=0.5),
    dict(type='SegPackInputs'),
]
test_pipeline = [
    dict(type='SegLoadImage'),
    dict(type='SegLoadAnnotations'),
    dict(type='SegPackInputs'),
]
# One loader worker: tools/train.py then gives torch the one remaining core of a 2-core machine (more
# threads than free cores stall on intra-op barriers).
train_dataloader = dict(
    batch_size=8, num_workers=1, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='ShapesSegDataset', split='training', generator=shapes, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8, num_workers=1, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='ShapesSegDataset', split='validation', generator=shapes, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='SegIoUMetric')
test_evaluator = val_evaluator

# From scratch, so no layer-wise decay (rate 1.0); the constructor is the one the ADE20K configs use.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, betas=(0.9, 0.999), weight_decay=0.01),
    constructor='VimLayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=1.0),
    clip_grad=dict(max_norm=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=50, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
log_processor = dict(by_epoch=False)
# checkpoints that load with torch.load(weights_only=True) (vim.engine)
custom_hooks = [dict(type='WeightsOnlyCheckpointHook')]
visualizer = dict(type='SegVisualizer', vis_backends=[dict(type='LocalVisBackend')])
randomness = dict(seed=0)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='nccl'))
log_level = 'INFO'
load_from = None
resume = False
work_dir = './work_dirs/shapes_seg'
