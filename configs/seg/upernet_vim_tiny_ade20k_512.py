# Vim-T + UperNet on ADE20K, 512x512 crops, 60k iterations on 4 GPUs x 8 images (official: 41.0 mIoU).
# ImageNet weights: --cfg-options model.backbone.pretrained=/path/vim_t_midclstok_76p1acc.pth
_base_ = ['./_base_/upernet_vim.py', './_base_/ade20k.py', './_base_/schedule_60k.py']
embed_dim = 192
model = dict(
    backbone=dict(model_name='vim_tiny', drop_path_rate=0.1),
    neck=dict(in_channels=embed_dim),
    decode_head=dict(in_channels=[embed_dim] * 4, channels=embed_dim),
    auxiliary_head=dict(in_channels=embed_dim))
work_dir = './work_dirs/upernet_vim_tiny_ade20k_512'
