# The built-in demo: a small Vim classifying generated coloured shapes (circle, square, triangle, star,
# cross, ring) at 32x32 px. The data set is drawn once (deterministic, no download) into
# ~/.cache/vim (or $VIM_CACHE, or shapes.cache_dir below) as train/<class>/*.png and val/<class>/*.png
# and read by the same VimImageFolder + timm transforms as ImageNet.
#   python tools/train.py                      # this config; prints "top-1: ..  top-5: .." at the end
_base_ = ['../_base_/default_runtime.py']

img_size = 32
kinds = ('circle', 'square', 'triangle', 'star', 'cross', 'ring')
# light shapes of random hue on dark cluttered gradients (fixed contrast polarity: with arbitrary colours a
# patch-embedding model needs far more steps than a CPU demo has), 0-1 small distractor shapes per image
shapes = dict(kinds=kinds, img_size=img_size, train_per_class=500, val_per_class=100, seed=0, distractors=(0, 1),
              distractor_scale=(0.05, 0.12), bright_shapes=True, cache_dir=None)
max_epochs = 15
batch_size = 64

model = dict(
    type='VimImageClassifier',
    model_name='vim_tiny',
    # 2 blocks, embed 64, d_state 4, 8x8 patches: 16 tokens + the middle class token; on a CPU the scan's
    # cost grows with embed x d_state, and a wider embedding learns the shapes faster than a larger state.
    # Average pooling of the patch tokens learns faster than the class token at this size.
    model_kwargs=dict(num_classes=len(kinds), img_size=img_size, patch_size=8, stride=8, embed_dim=64,
                      depth=2, d_state=4, global_pool='avg', drop_path_rate=0.0),
    mixup=None,
    label_smoothing=0.1,
    data_preprocessor=dict(type='BaseDataPreprocessor'),
)

norm = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=1,
    drop_last=True,
    # no repeated augmentation, so a DDP run sees the same data per epoch as one process with the same total batch
    sampler=dict(type='VimRepeatAugSampler', shuffle=True, num_repeats=1),
    worker_init_fn=dict(type='seed_worker_from_torch'),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='VimImageFolder', shapes=shapes, split='train',
                 transform=dict(input_size=img_size, is_training=True, scale=(0.7, 1.0), ratio=(0.9, 1.1),
                                hflip=0.5, vflip=0.5, color_jitter=0.2, interpolation='bicubic', **norm)),
)
val_dataloader = dict(
    batch_size=200,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='VimImageFolder', shapes=shapes, split='val',
                 transform=dict(input_size=img_size, is_training=False, crop_pct=1.0, interpolation='bicubic',
                                **norm)),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='VimTopKAccuracy', topk=(1, 5))
test_evaluator = val_evaluator

optim_wrapper = dict(
    type='GuardedOptimWrapper',
    optimizer=dict(type='AdamW', lr=3e-3, weight_decay=0.05),
    constructor='TimmParamGroupsConstructor',
    clip_grad=dict(max_norm=5.0),
)
param_scheduler = [
    dict(type='LinearWarmupLR', start_lr=1e-5, by_epoch=True, begin=0, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=1, end=max_epochs, T_max=max_epochs - 1,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=5)
val_cfg = dict(type='EMAValLoop')
test_cfg = dict(type='TestLoop')

custom_hooks = [
    dict(type='RNGStateHook'),
    dict(type='LastMetricsHook'),
    dict(type='WeightsOnlyCheckpointHook'),
    # a short run needs a short EMA horizon (~100 steps), not the ImageNet recipe's 0.99996
    dict(type='EMAHook', ema_type='ExponentialMovingAverage', momentum=0.01, update_buffers=False, priority=49),
]
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=1, max_keep_ckpts=2))
