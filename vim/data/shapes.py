"""Deterministic synthetic images of coloured geometric shapes, for demos and tests that need no download.

``draw_shapes`` is the primitive: an RGB image plus a per-pixel label mask (0 = background, ``k + 1`` =
visible pixels of a shape of kind ``kinds[k]``), the same for the same generator state on every machine.
``write_shapes_imagefolder`` builds a classification data set on top of it (one dominant shape per
image, classes = shape kinds) in the ImageNet ``train/<class>/*.png`` / ``val/<class>/*.png`` layout,
written once under the cache dir and published with an atomic rename so concurrent processes don't race.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPE_KINDS", "DEFAULT_CLASS_KINDS", "draw_shapes", "shape_polygon", "cache_root",
           "write_shapes_imagefolder"]

SHAPE_KINDS = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond")
# Kinds that stay distinguishable under arbitrary rotation at low resolution (a rotated square is a
# diamond; a small hexagon is nearly a circle), used for the classification demo.
DEFAULT_CLASS_KINDS = ("circle", "square", "triangle", "star", "cross", "ring")

# Drawing happens at this multiple of the output size and is downsampled, which anti-aliases the image.
_SUPERSAMPLE = 4


def _regular_polygon(n: int, radius: float, rotation: float, inner: Optional[float] = None) -> np.ndarray:
    """Vertices (n or 2n, 2) of a regular polygon (or a star with ``inner`` radius) around the origin."""
    if inner is None:
        t = rotation + 2 * math.pi * np.arange(n) / n
        return np.stack([np.cos(t), np.sin(t)], 1) * radius
    t = rotation + math.pi * np.arange(2 * n) / n
    r = np.where(np.arange(2 * n) % 2 == 0, radius, radius * inner)
    return np.stack([np.cos(t) * r, np.sin(t) * r], 1)


def shape_polygon(kind: str, radius: float, rotation: float) -> List[np.ndarray]:
    """Outline polygons of a shape centred at the origin; the first is filled, later ones are holes."""
    if kind == "circle":
        return [_regular_polygon(64, radius, 0.0)]
    if kind == "ring":
        return [_regular_polygon(64, radius, 0.0), _regular_polygon(64, radius * 0.55, 0.0)]
    if kind == "square":
        return [_regular_polygon(4, radius, rotation + math.pi / 4)]
    if kind == "diamond":
        pts = _regular_polygon(4, radius, rotation)
        return [pts * np.array([1.0, 0.6])]
    if kind == "triangle":
        return [_regular_polygon(3, radius, rotation - math.pi / 2)]
    if kind == "hexagon":
        return [_regular_polygon(6, radius, rotation)]
    if kind == "star":
        return [_regular_polygon(5, radius, rotation - math.pi / 2, inner=0.45)]
    if kind == "cross":
        a, b = radius, radius * 0.33
        pts = np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                        [-a, b], [-a, -b], [-b, -b]])
        c, s = math.cos(rotation), math.sin(rotation)
        return [pts @ np.array([[c, s], [-s, c]])]
    raise ValueError(f"unknown shape kind {kind!r}; choose from {SHAPE_KINDS}")


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3)


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _contrasting_colour(rng: np.random.Generator, against: Sequence[np.ndarray], min_diff: float) -> np.ndarray:
    """A random colour whose luma differs from each of ``against`` by ``min_diff``, so a shape never
    vanishes into its background (the label would then be unlearnable noise)."""
    best, best_diff = None, -1.0
    for _ in range(32):
        c = _random_colour(rng)
        diff = min(abs(_luma(c) - _luma(a)) for a in against)
        if diff >= min_diff:
            return c
        if diff > best_diff:
            best, best_diff = c, diff
    return best


def _dark_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3) * rng.uniform(0.15, 0.45)


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
    """A light colour of random hue: one channel near full, the others anywhere above a floor."""
    c = rng.uniform(110, 256, size=3)
    c[rng.integers(3)] = rng.uniform(220, 256)
    return c.astype(np.int64)


def _background(rng: np.random.Generator, size: int, clutter: bool, dark: bool = False
                ) -> Tuple[Image.Image, np.ndarray]:
    """A two-colour linear gradient, optionally with random thin lines and specks (unlabelled clutter)."""
    pick = _dark_colour if dark else _random_colour
    c0, c1 = pick(rng).astype(np.float32), pick(rng).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) * 0.7 + 0.5
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    mean = (c0 + c1) / 2
    if clutter:
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 5))):
            p = rng.uniform(0, size, size=4)
            draw.line([tuple(p[:2]), tuple(p[2:])], fill=tuple(int(v) for v in pick(rng)),
                      width=int(rng.integers(1, max(2, size // 64) + 1)))
        for _ in range(int(rng.integers(0, 6))):
            x, y = rng.uniform(0, size, size=2)
            r = rng.uniform(0.01, 0.03) * size
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in pick(rng)))
    return img, mean


def draw_shapes(
        rng: np.random.Generator,
        size: int,
        kinds: Sequence[str] = SHAPE_KINDS,
        num_shapes: Tuple[int, int] | int = (1, 4),
        scale: Tuple[float, float] = (0.12, 0.3),
        dominant: Optional[int] = None,
        dominant_scale: Tuple[float, float] = (0.28, 0.45),
        clutter: bool = True,
        noise: float = 6.0,
        bright_shapes: bool = False,
) -> Tuple[Image.Image, np.ndarray]:
    """Draw random shapes on a cluttered gradient background.

    Args:
        rng: the only source of randomness; the same state gives the same image and mask.
        size: output height and width in pixels.
        kinds: the shape vocabulary (names from ``SHAPE_KINDS``); the mask labels a pixel of a shape of
            kind ``kinds[k]`` with ``k + 1``.
        num_shapes: how many shapes (an int, or an inclusive ``(low, high)`` range) besides the dominant one.
        scale: radius range of those shapes, as a fraction of ``size``.
        dominant: when given, an index into ``kinds``: a large shape of that kind is drawn last, on top
            (so it is fully visible), with a radius in ``dominant_scale``.
        clutter: add unlabelled random lines and specks to the background.
        noise: standard deviation of additive per-pixel Gaussian noise (0 = none); not in the mask.
        bright_shapes: light shapes of random hue on a dark background and dark clutter (an easier,
            fixed contrast polarity); otherwise any colours, with a minimum luma contrast.

    Returns:
        ``(image, mask)``: a PIL RGB image and a ``(size, size)`` uint8 array (0 = background). Later
        shapes occlude earlier ones in both.
    """
    kinds = list(kinds)
    if not kinds:
        raise ValueError("kinds must name at least one shape kind")
    if len(kinds) > 254:
        raise ValueError("at most 254 shape kinds fit a uint8 mask")
    for k in kinds:
        if k not in SHAPE_KINDS:
            raise ValueError(f"unknown shape kind {k!r}; choose from {SHAPE_KINDS}")
    if dominant is not None and not 0 <= dominant < len(kinds):
        raise ValueError(f"dominant={dominant} is not an index into kinds ({len(kinds)} kinds)")
    n = int(num_shapes) if np.isscalar(num_shapes) else int(rng.integers(num_shapes[0], num_shapes[1] + 1))

    big = size * _SUPERSAMPLE
    bg, bg_mean = _background(rng, big, clutter, dark=bright_shapes)
    mask = Image.new("L", (big, big), 0)
    draw, mdraw = ImageDraw.Draw(bg), ImageDraw.Draw(mask)

    plan = [(int(rng.integers(len(kinds))), scale) for _ in range(n)]
    if dominant is not None:
        plan.append((dominant, dominant_scale))
    for k, (lo, hi) in plan:
        radius = rng.uniform(lo, hi) * big
        margin = radius * 0.9
        cx, cy = rng.uniform(margin, big - margin, size=2) if big > 2 * margin else (big / 2, big / 2)
        rotation = rng.uniform(0, 2 * math.pi)
        colour = tuple(int(v) for v in (_bright_colour(rng) if bright_shapes
                                        else _contrasting_colour(rng, [bg_mean], 70.0)))
        polys = shape_polygon(kinds[k], radius, rotation)
        for j, poly in enumerate(polys):
            pts = [tuple(p) for p in (poly + np.array([cx, cy]))]
            if j == 0:
                draw.polygon(pts, fill=colour)
                mdraw.polygon(pts, fill=k + 1)
            else:
                # A hole: filled with the background's mean colour and labelled background.
                draw.polygon(pts, fill=tuple(int(v) for v in bg_mean))
                mdraw.polygon(pts, fill=0)

    img = bg.resize((size, size), Image.LANCZOS)
    mask = np.asarray(mask.resize((size, size), Image.NEAREST), dtype=np.uint8).copy()
    if noise > 0:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, size=(size, size, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return img, mask


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """Where generated data sets live: ``cache_dir``, else ``$VIM_CACHE``, else ``~/.cache/vim``."""
    root = cache_dir or os.environ.get("VIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vim")
    return Path(root)


def _spec_name(spec: Dict) -> str:
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return f"shapes_cls_{spec['img_size']}px_{len(spec['kinds'])}c_{digest}"


def write_shapes_imagefolder(
        cache_dir: Optional[str] = None,
        kinds: Sequence[str] = DEFAULT_CLASS_KINDS,
        img_size: int = 32,
        train_per_class: int = 500,
        val_per_class: int = 100,
        seed: int = 0,
        distractors: Tuple[int, int] = (0, 2),
        distractor_scale: Tuple[float, float] = (0.08, 0.2),
        dominant_scale: Tuple[float, float] = (0.28, 0.45),
        bright_shapes: bool = False,
) -> Path:
    """Write (once) and return the root of a shapes classification data set in ImageFolder layout.

    ``<root>/train/<kind>/<index>.png`` and ``<root>/val/<kind>/<index>.png``. Each image holds one
    dominant shape of its class (drawn on top, radius ``dominant_scale`` of the image size) and
    ``distractors`` (an inclusive count range) smaller shapes of random kinds (radius
    ``distractor_scale``), on a cluttered background, with random colours, positions and rotations.
    The folder name encodes every generation parameter, so a changed spec makes a new data set; an
    existing complete data set is reused. Generation goes to a temporary sibling folder which is then
    renamed into place, so concurrent writers (data-loader workers, DDP ranks) never see a partial set.
    """
    spec = dict(kinds=list(kinds), img_size=int(img_size), train_per_class=int(train_per_class),
                val_per_class=int(val_per_class), seed=int(seed), distractors=list(distractors),
                distractor_scale=list(distractor_scale), dominant_scale=list(dominant_scale), version=1)
    if bright_shapes:  # only in the spec when set, so existing data sets keep their names
        spec["bright_shapes"] = True
    base = cache_root(cache_dir)
    root = base / _spec_name(spec)
    if (root / "spec.json").is_file():
        return root
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=base))
    try:
        for split, per_class, split_seed in (("train", train_per_class, 0), ("val", val_per_class, 1)):
            for k, kind in enumerate(kinds):
                folder = tmp / split / kind
                folder.mkdir(parents=True)
                # One generator per (split, class): images don't depend on how many other classes exist.
                rng = np.random.default_rng([seed, split_seed, k])
                for i in range(per_class):
                    img, _ = draw_shapes(rng, img_size, kinds, num_shapes=tuple(distractors),
                                        scale=tuple(distractor_scale), dominant=k,
                                        dominant_scale=tuple(dominant_scale), bright_shapes=bright_shapes)
                    img.save(folder / f"{i:05d}.png")
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1))
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process published the same data set first; theirs is identical.
            if not (root / "spec.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
