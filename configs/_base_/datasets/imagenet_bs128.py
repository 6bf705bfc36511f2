# ImageNet-1k in the ImageFolder layout: <data_root>/train/<wnid>/*.JPEG and <data_root>/val/<wnid>/*.JPEG.
# Transforms from timm.data.create_transform with the DeiT/Vim recipe; eval resize 256 -> centre crop 224.
# use_prefetcher=True, as timm's train.py: the workers hand over uint8 images, which the model's data preprocessor
# (VimClsDataPreprocessor, configs/_base_/models/vim_classifier.py) normalises on the device, where it also applies
# the recipe's random erasing (p 0.25, per-pixel noise, one region) to training batches.
data_root = 'data/imagenet'
img_size = 224

train_transform = dict(
    input_size=img_size, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', color_jitter=0.3,
    interpolation='bicubic', use_prefetcher=True)
val_transform = dict(input_size=img_size, is_training=False, interpolation='bicubic', crop_pct=224 / 256,
                     use_prefetcher=True)

train_dataloader = dict(
    batch_size=128,  # per GPU; the official runs used 8 GPUs
    num_workers=10,
    pin_memory=True,
    drop_last=True,  # mixup needs even batches
    sampler=dict(type='VimRepeatAugSampler', shuffle=True, num_repeats=3),  # repeats only when distributed
    worker_init_fn=dict(type='seed_worker_from_torch'),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='VimImageFolder', data_root=data_root, split='train', transform=train_transform),
)
val_dataloader = dict(
    batch_size=128,
    num_workers=10,
    pin_memory=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='VimImageFolder', data_root=data_root, split='val', transform=val_transform),
)
test_dataloader = val_dataloader
val_evaluator = dict(type='VimTopKAccuracy', topk=(1, 5))
test_evaluator = val_evaluator
