"""Data sets for training and evaluation: ImageNet-style folders and the synthetic shapes data set."""
from . import augment_compat
from .imagefolder import IMG_EXTENSIONS, VimImageFolder, scan_image_folder
from .samplers import RepeatAugOrDefaultSampler
from .shapes import (DEFAULT_CLASS_KINDS, SHAPE_KINDS, cache_root, draw_shapes, shape_polygon,
                     write_shapes_imagefolder)

# timm's strongest posterize levels keep 0 bits, which Pillow 13 refuses: the recipe's RandAugment would stop training
augment_compat.install()

__all__ = ["IMG_EXTENSIONS", "VimImageFolder", "scan_image_folder", "RepeatAugOrDefaultSampler",
           "DEFAULT_CLASS_KINDS", "SHAPE_KINDS", "cache_root", "draw_shapes", "shape_polygon",
           "write_shapes_imagefolder"]
