# A timm Vim classifier in the mmengine wrapper, with the recipe's mixup/cutmix and label smoothing.
model = dict(
    type='VimImageClassifier',
    model_name='vim_tiny',
    model_kwargs=dict(num_classes=1000, img_size=224, drop_path_rate=0.0),
    mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch'),
    label_smoothing=0.1,
    data_preprocessor=dict(type='BaseDataPreprocessor'),
)
