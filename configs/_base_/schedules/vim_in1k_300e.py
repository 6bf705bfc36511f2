# The official Vim (DeiT) ImageNet schedule: AdamW, lr 5e-4 per 512 images (scaled to the real total
# batch by auto_scale_lr), linear warmup from 1e-6 for 5 epochs, cosine to 1e-5 at epoch 300, then
# 10 cooldown epochs at 1e-5. No weight decay on 1-D params, pos_embed, cls_token, A_log, D (timm groups).
# The schedule steps every iteration (DeiT steps per epoch; the curves are the same up to 1/epoch).
warmup_epochs = 5
cosine_epochs = 300
cooldown_epochs = 10

optim_wrapper = dict(
    type='GuardedOptimWrapper',  # tools/train.py --amp switches it to GuardedAmpOptimWrapper
    optimizer=dict(type='AdamW', lr=5e-4, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8),
    constructor='TimmParamGroupsConstructor',
    # gradient clipping (off in the official recipe): clip_grad=dict(max_norm=5.0)
)
auto_scale_lr = dict(base_batch_size=512, enable=True)
param_scheduler = [
    dict(type='LinearWarmupLR', start_lr=1e-6, by_epoch=True, begin=0, end=warmup_epochs,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=warmup_epochs, end=cosine_epochs,
         T_max=cosine_epochs - warmup_epochs, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=cosine_epochs + cooldown_epochs, val_interval=1)
val_cfg = dict(type='EMAValLoop')
test_cfg = dict(type='TestLoop')

# EMA of the weights (DeiT's ModelEma decay 0.99996 per step), evaluated alongside the model as ema/top-1.
custom_hooks = [
    dict(type='RNGStateHook'),
    dict(type='LastMetricsHook'),
    dict(type='WeightsOnlyCheckpointHook'),
    dict(type='EMAHook', ema_type='ExponentialMovingAverage', momentum=1 - 0.99996, update_buffers=False,
         priority=49),
]
