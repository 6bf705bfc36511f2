# UperNet on a Vim backbone, the official Vim ADE20K setup: no class token, maps after blocks
# 5/11/17/23 turned into strides 4/8/16/32 by deconvolution / pooling, UperNet + auxiliary FCN head.
norm_cfg = dict(type='SyncBN')  # mmengine's Runner reverts SyncBN to BN when not distributed
crop_size = (512, 512)
num_classes = 150
embed_dim = 192
model = dict(
    type='VimUperNet',
    data_preprocessor=dict(type='VimSegDataPreprocessor', mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], size=crop_size, pad_val=0, seg_pad_val=255),
    backbone=dict(type='VimSegBackbone', model_name='vim_tiny', img_size=512, out_indices=(5, 11, 17, 23),
                  drop_path_rate=0.1, pretrained=None),
    neck=dict(type='VimMultiScaleNeck', in_channels=embed_dim, scales=(4, 2, 1, 0.5), norm_cfg=norm_cfg),
    decode_head=dict(type='VimUPerHead', in_channels=[embed_dim] * 4, channels=embed_dim,
                     num_classes=num_classes, pool_scales=(1, 2, 3, 6), dropout=0.1, norm_cfg=norm_cfg,
                     loss_weight=1.0, ignore_index=255),
    auxiliary_head=dict(type='VimFCNHead', in_channels=embed_dim, channels=256, num_classes=num_classes,
                        in_index=2, num_convs=1, dropout=0.1, norm_cfg=norm_cfg, loss_weight=0.4,
                        ignore_index=255),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)),
)
