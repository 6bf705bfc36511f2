# The official Vim ADE20K schedule: AdamW lr 1e-4, wd 0.05, layer-wise lr decay 0.92, 1500 linear warmup
# iterations then poly (power 1) decay to 0, 60k iterations of 8 images per GPU on 4 GPUs.
max_iters = 60000
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='VimLayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=0.92))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=6000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
auto_scale_lr = dict(enable=False, base_batch_size=32)  # 4 GPUs x 8 images

default_scope = None
custom_imports = dict(imports=['vim.engine', 'vim.seg'], allow_failed_imports=False)
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=6000, max_keep_ckpts=2,
                    save_best='mIoU', rule='greater'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
log_processor = dict(by_epoch=False)
# checkpoints that load with torch.load(weights_only=True) (vim.engine)
custom_hooks = [dict(type='WeightsOnlyCheckpointHook')]
env_cfg = dict(cudnn_benchmark=True, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='nccl'))
visualizer = dict(type='SegVisualizer', vis_backends=[dict(type='LocalVisBackend')])
randomness = dict(seed=0)
log_level = 'INFO'
load_from = None
resume = False
