#!/usr/bin/env python
"""Extract features with any timm model (vim_* included) from folders, ImageFolder trees or files.

    python tools/extract_features.py vim_small --checkpoint vim_s_midclstok_80p5acc.pth \
        --input data/images --out feats.safetensors
    python tools/extract_features.py vim_tiny --checkpoint vim_t.pth --input img.jpg \
        --layers 5 11 17 23 --img-size 1248 --out maps.safetensors
    python tools/extract_features.py vim_tiny --checkpoint vim_t.pth --input data/images --out f.safetensors \
        --batch-size 256 --compile      # CUDA graphs: the GPU no longer waits for the host's launches

Writes ``pre_logits`` (N, D) (the pooled embedding: ``forward_head(forward_features(x),
pre_logits=True)``) or, with ``--layers``, ``layer{i}`` maps (N, D, H/patch, W/patch) after block i,
as float32, with the image names alongside (see ``vim.inference.save_features``; read back with
``vim.inference.load_features``). Exit status: 0 all done, 1 some inputs could not be read (the
rest were written), 2 bad arguments / nothing to do.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from vim import inference as inf  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="registered timm model (vim_tiny, vim_small_stride8, deit_small_patch16_224, ...)")
    p.add_argument("--input", "-i", nargs="+", required=True,
                   help="image files and/or folders (searched recursively; ImageFolder trees keep class/file names)")
    p.add_argument("--out", "-o", required=True, help="output .safetensors, .npz or .npy (one array) file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--checkpoint", "-c", default=None, help="our or the official .pth checkpoint (or any timm one)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the checkpoint's head (default: the model's); 0 builds without a head")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="NAME=VALUE",
                   help="extra timm.create_model arguments, e.g. depth=4 global_pool=avg")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="write NCHW maps after these blocks (e.g. 5 11 17 23; negative from the end) "
                        "instead of the pooled embedding")
    p.add_argument("--pooled", action="store_true", help="with --layers: also write the pooled embedding")
    p.add_argument("--norm", action="store_true", help="apply the final norm to --layers maps")
    p.add_argument("--img-size", type=int, default=None,
                   help="build the model and preprocess at this resolution (position embedding interpolated)")
    p.add_argument("--crop-pct", type=float, default=None, help="eval centre-crop fraction (timm data config)")
    p.add_argument("--interpolation", default=None, help="resize interpolation (timm data config)")
    p.add_argument("--keep-size", action="store_true",
                   help="no resize/crop: each image at its own size (model built with dynamic_img_size=True)")
    p.add_argument("--batch-size", "-b", type=int, default=32)
    p.add_argument("--workers", "-j", type=int, default=4, help="data loading processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *inf.DTYPES],
                   help="compute dtype (autocast); auto = bfloat16 on GPU, float32 on CPU; outputs are float32")
    p.add_argument("--compile", nargs="?", const="reduce-overhead", default=None, metavar="MODE",
                   help="torch.compile the forward; MODE: reduce-overhead (the default: CUDA graphs, which take the "
                        "host's kernel launches out of each batch), default, max-autotune, "
                        "max-autotune-no-cudagraphs. Batches are padded to --batch-size: one compiled graph")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _append(store, batch_feats):
    for k, v in batch_feats.items():
        store.setdefault(k, []).extend(v.float().cpu().unbind(0))


def _finalise(store):
    """Stack per-image tensors; with --keep-size and mixed sizes spatial maps cannot be stacked and
    are written one tensor per image as ``layer{i}.{row}``."""
    out = OrderedDict()
    for k, rows in store.items():
        if len({tuple(r.shape) for r in rows}) == 1:
            out[k] = torch.stack(rows)
        else:
            for n, r in enumerate(rows):
                out[f"{k}.{n}"] = r.contiguous()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        inf.check_output(args.out, args.overwrite)
        if args.keep_size and args.img_size:
            raise ValueError("--keep-size feeds each image at its own size; drop --img-size (or --keep-size)")
        if args.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        if args.compile is not None:
            inf.check_compile_mode(args.compile)
            if args.keep_size:
                raise ValueError("--compile with --keep-size would compile once per image size; drop one of them")
        device = inf.resolve_device(args.device)
        dtype = inf.resolve_dtype(args.dtype, device)
        model = inf.build_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                                img_size=None if args.keep_size else args.img_size,
                                dynamic_img_size=args.keep_size, model_kwargs=inf.parse_kwargs(args.model_kwargs))
        layers = inf.resolve_layers(model, args.layers) if args.layers else None
        n_outputs = (len(layers) if layers else 0) + (1 if args.pooled or not layers else 0)
        if args.out.endswith(".npy") and n_outputs > 1:
            raise ValueError(f"--out {args.out!r}: .npy holds one array but {n_outputs} outputs were asked "
                             "for; use .safetensors or .npz")
    except (ValueError, FileExistsError, FileNotFoundError, inf.CheckpointMismatchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if not args.checkpoint:
        print(f"warning: no --checkpoint: {args.model} has random weights", file=sys.stderr)
    config = inf.data_config(model, img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation)
    transform = inf.eval_transform(config, keep_size=args.keep_size, normalize=False)   # uint8: see normalize
    found = inf.find_images(args.input)
    errors = list(found.errors)
    if not found.paths:
        inf.report_errors(errors)
        print("error: no images to process", file=sys.stderr)
        return 2
    model.to(device)

    pooled = args.pooled or not layers
    forward = functools.partial(inf.extract, model, layers=layers, pooled=pooled, norm=args.norm)
    if args.compile is not None:
        inf.warn_compile_without_gpu(device)
        forward = inf.CompiledBatches(forward, args.batch_size, args.compile)
    store, done = OrderedDict(), []
    t0 = time.perf_counter()
    batches = inf.iterate_batches(found.paths, transform, args.batch_size, args.workers,
                                  pin_memory=device.type == "cuda")
    n_batches = (len(found.paths) + args.batch_size - 1) // args.batch_size
    with inf.autocast(device, dtype):
        for idx, images, bad in inf.progress(batches, n_batches, args.model, enabled=not args.no_progress):
            errors.extend((str(found.paths[i]), reason) for i, reason in bad)
            if images is None:
                continue
            # a list means mixed sizes (--keep-size): one forward per image
            groups = [images] if torch.is_tensor(images) else [x[None] for x in images]
            for x in groups:
                _append(store, forward(inf.normalize(x.to(device, non_blocking=True), config)))
            done.extend(idx.tolist())
    elapsed = time.perf_counter() - t0

    if not done:
        inf.report_errors(errors)
        print("error: no image could be read; nothing written", file=sys.stderr)
        return 1
    features = _finalise(store)
    names = [found.names[i] for i in done]
    meta = {"model": args.model, "checkpoint": args.checkpoint or "", "data_config": {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}, "keep_size": args.keep_size,
        "layers": layers or [], "norm": args.norm}
    try:
        written = inf.save_features(args.out, features, names, meta)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(features.items())[:4])
    print(f"{len(names)} images in {elapsed:.1f}s -> {', '.join(map(str, written))} ({shapes})", file=sys.stderr)
    inf.report_errors(errors)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
