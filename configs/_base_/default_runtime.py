# Runtime shared by the classification configs: mmengine Runner defaults, logging to console, a log
# file and TensorBoard in the work dir, per-epoch checkpoints, exact-resume RNG bookkeeping.
custom_imports = dict(imports=['vim.engine'], allow_failed_imports=False)
default_scope = None

default_hooks = dict(
    runtime_info=dict(type='RuntimeInfoHook'),
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3, save_last=True),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
# RNGStateHook, LastMetricsHook and WeightsOnlyCheckpointHook are added by tools/train.py when a config's
# custom_hooks lack them; the schedules add the EMAHook.

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),  # tools/train.py switches to gloo when no GPU is present
)
vis_backends = [dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')]
visualizer = dict(type='Visualizer', vis_backends=vis_backends)
log_processor = dict(type='LogProcessor', window_size=20, by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
