# ADE20K (SceneParsing) in its standard layout:
#   <data_root>/images/{training,validation}/*.jpg, <data_root>/annotations/{training,validation}/*.png
data_root = 'data/ade/ADEChallengeData2016'

train_pipeline = [
    dict(type='SegLoadImage'),
    dict(type='SegLoadAnnotations'),  # label 0 -> 255 (ignored), 1..150 -> 0..149 (the data set's setting)
    dict(type='SegRandomResize', scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='SegRandomCrop', crop_size=(512, 512), cat_max_ratio=0.75),
    dict(type='SegRandomFlip', prob=0.5),
    dict(type='SegPhotoMetricDistortion'),
    dict(type='SegPackInputs'),
]
test_pipeline = [
    dict(type='SegLoadImage'),
    dict(type='SegResize', scale=(2048, 512), keep_ratio=True),
    dict(type='SegLoadAnnotations'),  # after the resize: metrics are computed at the original resolution
    dict(type='SegPackInputs'),
]
train_dataloader = dict(
    batch_size=8, num_workers=4, persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='ADE20KSegDataset', data_root=data_root, split='training', pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=4, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='pseudo_collate'),
    dataset=dict(type='ADE20KSegDataset', data_root=data_root, split='validation', pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='SegIoUMetric')
test_evaluator = val_evaluator
