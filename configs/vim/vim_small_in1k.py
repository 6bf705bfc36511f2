# Vim-Small on ImageNet-1k from scratch, the official recipe (official: 8 GPUs x 64 (lr 1e-3 given), wd 0.05, drop path 0.05; 80.5% top-1).
#   torchrun --nproc-per-node 8 tools/train.py configs/vim/vim_small_in1k.py --launcher pytorch \
#       --cfg-options train_dataloader.dataset.data_root=/data/imagenet val_dataloader.dataset.data_root=/data/imagenet
_base_ = [
    '../_base_/models/vim_classifier.py',
    '../_base_/datasets/imagenet_bs128.py',
    '../_base_/schedules/vim_in1k_300e.py',
    '../_base_/default_runtime.py',
]
model = dict(model_name='vim_small', model_kwargs=dict(drop_path_rate=0.05))
# the official run gave --lr 1e-3 with 8 x 64 = 512 images per step, i.e. 1e-3 per 512 after DeiT's scaling
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.05))
train_dataloader = dict(batch_size=64)
