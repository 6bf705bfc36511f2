"""Data sets for training and evaluation: ImageNet-style folders and the synthetic shapes data set."""
from .imagefolder import IMG_EXTENSIONS, VimImageFolder, scan_image_folder
from .samplers import RepeatAugOrDefaultSampler
from .shapes import (DEFAULT_CLASS_KINDS, SHAPE_KINDS, cache_root, draw_shapes, shape_polygon,
                     write_shapes_imagefolder)

__all__ = ["IMG_EXTENSIONS", "VimImageFolder", "scan_image_folder", "RepeatAugOrDefaultSampler",
           "DEFAULT_CLASS_KINDS", "SHAPE_KINDS", "cache_root", "draw_shapes", "shape_polygon",
           "write_shapes_imagefolder"]
