# Vim-Base on ImageNet-1k from scratch, the official recipe (wd / drop path are DeiT-B's (not in the reference facts); official 81.9% top-1).
#   torchrun --nproc-per-node 8 tools/train.py configs/vim/vim_base_in1k.py --launcher pytorch \
#       --cfg-options train_dataloader.dataset.data_root=/data/imagenet val_dataloader.dataset.data_root=/data/imagenet
_base_ = [
    '../_base_/models/vim_classifier.py',
    '../_base_/datasets/imagenet_bs128.py',
    '../_base_/schedules/vim_in1k_300e.py',
    '../_base_/default_runtime.py',
]
model = dict(model_name='vim_base', model_kwargs=dict(drop_path_rate=0.1))
optim_wrapper = dict(optimizer=dict(weight_decay=0.05))
