#!/usr/bin/env python
"""Top-k classes for images with any timm classifier (vim_* included).

    python tools/predict.py vim_tiny --checkpoint vim_t_midclstok_76p1acc.pth cat.jpg dog.png --topk 5
    python tools/predict.py vim_small --checkpoint vim_s.pth photos/ --json > predictions.json
    python tools/predict.py vim_tiny --checkpoint vim_t.pth photos/ --batch-size 256 --compile   # CUDA graphs

One line per image: ``file: name (prob) | name (prob) | ...``; ``--json`` prints one JSON document instead.
ImageNet class names come from timm's ImageNet info (offline) for 1k/21k heads, or from
``--class-map`` (one name per line). Exit status: 0 all done, 1 some images could not be read
(the rest were classified), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from vim import inference as inf  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="registered timm model name (vim_tiny, vim_small, deit_small_patch16_224, ...)")
    p.add_argument("images", nargs="*", help="image files and/or folders (searched recursively)")
    p.add_argument("--checkpoint", "-c", default=None, help="our or the official .pth checkpoint (or any timm one)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the checkpoint's head (default: the model's)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="NAME=VALUE",
                   help="extra timm.create_model arguments, e.g. depth=4")
    p.add_argument("--topk", "-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    p.add_argument("--class-map", default=None, help="text file with one class name per line (non-ImageNet heads)")
    p.add_argument("--img-size", type=int, default=None, help="build the model and preprocess at this resolution")
    p.add_argument("--crop-pct", type=float, default=None,
                   help="eval centre-crop fraction (timm data config; 1.0 = resize to --img-size, no crop)")
    p.add_argument("--interpolation", default=None, help="resize interpolation (timm data config)")
    p.add_argument("--batch-size", "-b", type=int, default=16)
    p.add_argument("--workers", "-j", type=int, default=0, help="data loading processes")
    p.add_argument("--compile", nargs="?", const="reduce-overhead", default=None, metavar="MODE",
                   help="torch.compile the model; MODE: reduce-overhead (the default: CUDA graphs, which take the "
                        "host's kernel launches out of each batch), default, max-autotune, "
                        "max-autotune-no-cudagraphs. Batches are padded to --batch-size: one compiled graph")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *inf.DTYPES],
                   help="compute dtype (autocast); auto = bfloat16 on GPU, float32 on CPU")
    args = p.parse_intermixed_args(argv)  # images may come before, between or after the options
    # `--model-kwargs depth=4 cat.jpg` hands cat.jpg to --model-kwargs: take back what has no '='
    args.images += [a for a in args.model_kwargs if "=" not in a]
    args.model_kwargs = [a for a in args.model_kwargs if "=" in a]
    # `--compile cat.jpg`: the bare flag, then an image
    if args.compile is not None and args.compile not in inf.COMPILE_MODES and _looks_like_a_path(args.compile):
        args.images.append(args.compile)
        args.compile = "reduce-overhead"
    if not args.images:
        p.error("no images given")
    return args


def _looks_like_a_path(value: str) -> bool:
    return Path(value).exists() or bool(Path(value).suffix) or "/" in value


def class_names(model, class_map=None):
    """``index -> (label, name)``: from ``class_map``, timm's ImageNet info, or the bare index."""
    n = model.num_classes
    if class_map:
        lines = [ln.strip() for ln in Path(class_map).read_text().splitlines() if ln.strip()]
        if len(lines) != n:
            raise ValueError(f"--class-map {class_map!r} has {len(lines)} names but the model has {n} classes")
        return lambda i: (str(i), lines[i])
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset is None:
        return lambda i: (str(i), str(i))
    info = ImageNetInfo(subset)
    return lambda i: (info.index_to_label_name(i), info.index_to_description(i))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = inf.resolve_device(args.device)
        dtype = inf.resolve_dtype(args.dtype, device)
        model = inf.build_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                                img_size=args.img_size, model_kwargs=inf.parse_kwargs(args.model_kwargs))
        if not model.num_classes:
            raise ValueError(f"{args.model} was built without a classifier (num_classes=0); predict needs one")
        if not 1 <= args.topk:
            raise ValueError("--topk must be at least 1")
        if args.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if args.compile is not None:
            inf.check_compile_mode(args.compile)
        names_of = class_names(model, args.class_map)
    except (ValueError, FileNotFoundError, inf.CheckpointMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.checkpoint:
        print(f"warning: no --checkpoint: {args.model} has random weights", file=sys.stderr)
    k = min(args.topk, model.num_classes)
    config = inf.data_config(model, img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation)
    transform = inf.eval_transform(config, normalize=False)   # uint8, normalised on the device
    found = inf.find_images(args.images)
    errors = list(found.errors)
    model.to(device)
    forward = model
    if args.compile is not None:
        inf.warn_compile_without_gpu(device)
        forward = inf.CompiledBatches(model, args.batch_size, args.compile)

    results = []
    batches = inf.iterate_batches(found.paths, transform, args.batch_size, args.workers)
    with torch.no_grad(), inf.autocast(device, dtype):
        for idx, images, bad in batches:
            errors.extend((str(found.paths[i]), reason) for i, reason in bad)
            if images is None:
                continue
            probs = forward(inf.normalize(images.to(device), config)).float().softmax(-1).cpu()
            top_p, top_i = probs.topk(k, dim=-1)
            for row, i in enumerate(idx.tolist()):
                topk = []
                for p, c in zip(top_p[row].tolist(), top_i[row].tolist()):
                    label, name = names_of(c)
                    topk.append({"index": c, "label": label, "name": name, "prob": p})
                results.append({"file": str(found.paths[i]), "topk": topk})
                if not args.json:
                    print(f"{found.paths[i]}: " + " | ".join(f"{t['name']} ({t['prob']:.3f})" for t in topk),
                          flush=True)
    if args.json:
        json.dump({"model": args.model, "checkpoint": args.checkpoint, "results": results,
                   "errors": [{"file": f, "error": e} for f, e in errors]}, sys.stdout, indent=1)
        print()
    inf.report_errors(errors)
    if not results and not errors:
        print("error: no images given", file=sys.stderr)
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
