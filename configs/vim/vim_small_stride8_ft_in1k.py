# Vim-Small+ : finetune the stride-16 Vim-Small at patch stride 8 (27x27 tokens at 224) for 30 epochs, as the
# official "+" models (official 81.6% top-1). The stride-16 checkpoint (ours or the official
# vim_s_midclstok_80p5acc.pth) is loaded through vim.checkpoint_filter_fn, which resamples the position embedding
# from 14x14 to 27x27 around the middle class token:
#   torchrun --nproc-per-node 8 tools/train.py configs/vim/vim_small_stride8_ft_in1k.py --launcher pytorch \
#       --cfg-options model.init_checkpoint=/path/to/vim_s_midclstok_80p5acc.pth
_base_ = ['./vim_small_in1k.py']

model = dict(
    model_name='vim_small_stride8',
    model_kwargs=dict(drop_path_rate=0.0),
    init_checkpoint='checkpoints/vim_s_midclstok_80p5acc.pth',
    init_use_ema=False,
)
# official finetune: lr 5e-6 per 512 images, warmup from 1e-5, min lr 1e-5, weight decay 1e-8
optim_wrapper = dict(optimizer=dict(lr=5e-6, weight_decay=1e-8))
warmup_epochs = 5
finetune_epochs = 30
param_scheduler = [
    dict(type='LinearWarmupLR', start_lr=1e-5, by_epoch=True, begin=0, end=warmup_epochs,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=warmup_epochs, end=finetune_epochs,
         T_max=finetune_epochs - warmup_epochs, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=finetune_epochs, val_interval=1)
