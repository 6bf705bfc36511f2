"""timm's RandAugment / AutoAugment posterize under Pillow versions that refuse to keep zero bits.

timm maps the strongest posterize levels to ``bits_to_keep = 0``: ``PosterizeIncreasing`` at magnitude 10, which
the recipe's ``rand-m9-mstd0.5-inc1`` draws whenever its noisy magnitude reaches 10 (1 image in ~630), and
``Posterize`` below magnitude 2.5 (AutoAugment's policies). Older Pillows return a black image for 0 bits; Pillow
13.0 (what pip installs today) raises ``ValueError: bits must be between or equal to 1 and 8``, which stops training
in a data-loader worker.
``install()`` makes those posterize ops return the black image again and leaves every other call to timm and Pillow.
"""
from __future__ import annotations

from PIL import Image, ImageOps

__all__ = ["install", "pillow_refuses_zero_bits"]

_OPS = ("Posterize", "PosterizeIncreasing")   # PosterizeOriginal keeps 4 to 8 bits


def pillow_refuses_zero_bits() -> bool:
    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        return True
    return False


def _zero_bits_as_black(posterize):
    def wrapped(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return img.point([0] * 256 * len(img.getbands()))   # what Pillow < 13 gave: every bit dropped
        return posterize(img, bits_to_keep, **kwargs)
    wrapped.__wrapped__ = posterize
    return wrapped


def install() -> bool:
    """Patch timm's posterize ops (its ``NAME_TO_OP``, read when transforms are built) if this Pillow needs it;
    returns whether it did. Idempotent."""
    if not pillow_refuses_zero_bits():
        return False
    from timm.data import auto_augment

    for name in _OPS:
        op = auto_augment.NAME_TO_OP.get(name)
        if op is not None and not hasattr(op, "__wrapped__"):
            auto_augment.NAME_TO_OP[name] = _zero_bits_as_black(op)
    return True
