"""Semantic segmentation with Vim backbones: UperNet on timm Vim features, ADE20K and generated-shapes data,
mIoU metric, overlays. Importing this package registers everything in mmengine's root registries."""
from .backbone import VimSegBackbone
from .datasets import ADE20K_CLASSES, ADE20KSegDataset, SegFolderDataset, ShapesSegDataset, write_shapes_segfolder
from .heads import FCNHead, UPerHead
from .metric import SegIoUMetric, confusion_matrix, metrics_from_confusion
from .neck import MultiScaleNeck
from .optim import LayerDecayOptimWrapperConstructor
from .segmentor import SegDataPreprocessor, UperNetSegmentor
from .transforms import (LoadAnnotations, LoadImage, PackInputs, PhotoMetricDistortion, RandomCrop, RandomFlip,
                         RandomResize, Resize)
from .visualizer import SegVisualizer, colorize_mask, overlay_mask

__all__ = [
    "VimSegBackbone", "MultiScaleNeck", "UPerHead", "FCNHead", "UperNetSegmentor", "SegDataPreprocessor",
    "ADE20KSegDataset", "SegFolderDataset", "ShapesSegDataset", "write_shapes_segfolder", "ADE20K_CLASSES",
    "LoadImage", "LoadAnnotations", "Resize", "RandomResize", "RandomCrop", "RandomFlip", "PhotoMetricDistortion",
    "PackInputs", "SegIoUMetric", "confusion_matrix", "metrics_from_confusion", "LayerDecayOptimWrapperConstructor",
    "SegVisualizer", "colorize_mask", "overlay_mask",
]
