# A timm Vim classifier in the mmengine wrapper, with the recipe's mixup/cutmix and label smoothing.
model = dict(
    type='VimImageClassifier',
    model_name='vim_tiny',
    model_kwargs=dict(num_classes=1000, img_size=224, drop_path_rate=0.0),
    mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch'),
    label_smoothing=0.1,
    # uint8 images (the ImageNet data config's use_prefetcher=True transforms) normalised on the device, and the
    # recipe's random erasing applied there to training batches; float images pass through
    data_preprocessor=dict(type='VimClsDataPreprocessor', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                           random_erasing=dict(probability=0.25, mode='pixel', max_count=1)),
)
