#!/usr/bin/env python
"""Segment images with a trained segmentation checkpoint; write label masks and colour overlays.

    python tools/segment.py photo1.jpg photo2.jpg --config configs/seg/upernet_vim_tiny_ade20k_512.py \
        --checkpoint work_dirs/upernet_vim_tiny_ade20k_512/iter_60000.pth --out seg_out/

For each image NAME: ``NAME_mask.png`` (one uint8 class index per pixel, classes as in the config's data
set, e.g. 0..149 for ADE20K) and ``NAME_overlay.png`` (the prediction blended over the image).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from vim.engine import cli  # noqa: E402  (config loading with checked overrides; safe checkpoint loads)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--config", required=True, help="segmentation config (.py)")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by tools/train.py")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mode", choices=("whole", "slide"), default=None,
                   help="inference mode (default: the config's model.test_cfg)")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the colour mask in the overlay")
    p.add_argument("--cfg-options", nargs="+", action=cli.DictAction, metavar="KEY=VALUE",
                   help="override config entries, e.g. model.test_cfg.stride=\"(256,256)\"")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmengine.registry import MODELS, TRANSFORMS
    from mmengine.runner import load_checkpoint
    from mmengine.utils import import_modules_from_strings

    import vim.seg  # noqa: F401  (registers the seg classes)
    from vim.seg.datasets import dataset_classes, make_palette
    from vim.seg.visualizer import overlay_mask

    missing = [p for p in args.images + [args.config, args.checkpoint] if not os.path.isfile(p)]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        cfg = cli.load_config(args.config, args.cfg_options)
    except (FileNotFoundError, cli.ConfigKeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.get("custom_imports"):
        import_modules_from_strings(**cfg.custom_imports)
    if args.mode is not None:
        cfg.model.test_cfg = dict(cfg.model.get("test_cfg") or {}, mode=args.mode)
    cfg.model.backbone.pretrained = None  # the checkpoint holds every weight

    model = MODELS.build(cfg.model)
    load_checkpoint(model, args.checkpoint, map_location="cpu", logger="current")
    model.to(args.device).eval()

    dataset_cfg = cfg.test_dataloader.dataset
    classes = dataset_classes(dataset_cfg)
    palette = make_palette(len(classes))
    # the test pipeline without label loading: images only
    pipeline = [TRANSFORMS.build(t) for t in dataset_cfg.pipeline if t["type"] != "SegLoadAnnotations"]

    os.makedirs(args.out, exist_ok=True)
    for path in args.images:
        results = dict(img_path=path)
        for t in pipeline:
            results = t(results)
        data = model.data_preprocessor(dict(inputs=[results["inputs"]], data_samples=[results["data_samples"]]),
                                       False)
        with torch.no_grad():
            pred = model(**data, mode="predict")[0].pred_sem_seg.cpu().numpy().astype(np.uint8)
        stem = os.path.splitext(os.path.basename(path))[0]
        Image.fromarray(pred, "L").save(os.path.join(args.out, f"{stem}_mask.png"))
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        Image.fromarray(overlay_mask(image, pred, palette, args.alpha)).save(
            os.path.join(args.out, f"{stem}_overlay.png"))
        counts = np.bincount(pred.reshape(-1), minlength=len(classes))
        top = np.argsort(counts)[::-1][:3]
        share = ", ".join(f"{classes[k]} {100 * counts[k] / pred.size:.1f}%" for k in top if counts[k])
        print(f"{path}: {pred.shape[1]}x{pred.shape[0]} -> {stem}_mask.png, {stem}_overlay.png ({share})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
