"""Shared code for the downstream tools (``tools/extract_features.py``, ``tools/predict.py``).

Image discovery with error collection, model + checkpoint building for any timm model (``vim_*``
included), timm-data-config preprocessing, batched loading that survives unreadable files, and
feature output files. Nothing here imports mmengine: the tools must run where only torch + timm exist.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils._pytree import tree_map

# Same list as torchvision's ImageFolder, so an ImageFolder tree is read the way training reads it.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's tensors do not fit the model that was built."""


# ----------------------------------------------------------------------------------------------
# command-line helpers


def parse_kwargs(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``['depth=2', 'embed_dim=64', 'class_token=False']`` -> dict with Python-literal values."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"model kwarg {item!r} is not of the form name=value (e.g. depth=2)")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a bare word such as global_pool=avg stays a string
    return out


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 autocast on GPU (the speed the backbone is built for) and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype, cache_enabled: bool = True):
    """Mixed precision for reduced dtypes; float32 runs without autocast. ``cache_enabled=False`` while
    capturing a CUDA graph (cached weight casts would be graph-pool tensors reused outside it)."""
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32,
                          cache_enabled=cache_enabled)


# torch.compile modes the tools take (``--compile [MODE]``): reduce-overhead, the default, replays CUDA graphs, which
# takes the host's kernel launches out of each batch (an eager vim_tiny forward waits for its host below batch ~500,
# docs/benchmarks.md); the others are torch.compile's own.
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune", "max-autotune-no-cudagraphs")


COMPILE_WITHOUT_GPU = ("--compile without a GPU: the CPU's reference scan walks the tokens in a Python loop, which "
                       "torch.compile traces token by token (slow to compile, and there is no launch overhead to save)")


def check_compile_mode(mode: str, hint: str = "") -> None:
    """A clear error for an unknown ``--compile MODE`` (``hint`` appended to it)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile {mode}: expected one of {', '.join(COMPILE_MODES)}{hint}")


def compile_kwargs(mode: str, hint: str = "") -> Dict[str, str]:
    """``torch.compile``'s arguments for ``--compile MODE``."""
    check_compile_mode(mode, hint)
    return {} if mode == "default" else {"mode": mode}


class CompiledBatches:
    """``fn(x)`` through ``torch.compile`` at one batch size, for the inference tools' ``--compile``.

    A shorter batch (the last one, or one whose unreadable files were left out) is padded to ``batch_size`` with
    copies of its last image and its outputs are cut back, so the whole run uses one compiled graph: each new batch
    size would compile (and, with CUDA graphs, capture) once more. Rows are computed independently, so padding changes
    no output. Outputs (tensors, or dicts / tuples / lists of them) are copies, as the next replay of a CUDA graph
    overwrites the graph's own output memory. ``options``: further ``torch.compile`` arguments (tests pass
    ``backend="eager"`` with ``mode="default"``)."""

    def __init__(self, fn, batch_size: int, mode: str = "reduce-overhead", **options):
        kwargs = compile_kwargs(mode)
        if batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        self.batch_size = batch_size
        self.fn = torch.compile(fn, **kwargs, **options)

    def __call__(self, x: torch.Tensor):
        n = x.shape[0]
        if not 0 < n <= self.batch_size:
            raise ValueError(f"a batch of {n} images; CompiledBatches takes 1 to {self.batch_size}")
        if n < self.batch_size:
            x = torch.cat([x, x[-1:].expand(self.batch_size - n, *x.shape[1:])])
        # a new step for CUDA-graph trees: the previous replay's outputs, copied below, may now be overwritten
        torch.compiler.cudagraph_mark_step_begin()
        out = self.fn(x)
        return tree_map(lambda t: t[:n].clone() if torch.is_tensor(t) else t, out)


def warn_compile_without_gpu(device: torch.device) -> None:
    if device.type != "cuda":
        print(f"warning: {COMPILE_WITHOUT_GPU}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# image discovery


@dataclass
class ImageList:
    """Images to process. ``names`` are what gets written next to the features: the path relative
    to the folder given on the command line (``class/img.jpg`` for an ImageFolder tree), or the
    path as given for single files. ``errors`` holds ``(path, reason)`` for inputs that failed."""

    paths: List[Path] = field(default_factory=list)
    names: List[str] = field(default_factory=list)
    errors: List[Tuple[str, str]] = field(default_factory=list)


def find_images(inputs: Iterable[str], extensions: Sequence[str] = IMG_EXTENSIONS) -> ImageList:
    """Files are taken as given (whatever the extension); folders are searched recursively, in
    sorted order, for files with an image extension. Missing paths and empty folders are errors."""
    found = ImageList()
    exts = tuple(e.lower() for e in extensions)
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found.paths.append(path)
            found.names.append(str(item))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in exts)
            if not files:
                found.errors.append((str(item), f"folder holds no images ({', '.join(exts)})"))
            for p in files:
                found.paths.append(p)
                found.names.append(p.relative_to(path).as_posix())
        else:
            found.errors.append((str(item), "no such file or folder"))
    return found


# ----------------------------------------------------------------------------------------------
# model and checkpoint


def _is_vim_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("vim.")


def read_checkpoint(path: str, model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict from ours, an official Vim ``.pth`` or any timm-readable checkpoint file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if _is_vim_model(model):
        import vim

        return vim.load_official_checkpoint(path)
    from timm.models import load_state_dict

    return load_state_dict(path, use_ema=True, device="cpu")


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load ``path`` into ``model`` strictly, through the model family's ``checkpoint_filter_fn``
    (official key names, position-embedding resize to the model's grid). A head whose size does
    not match is dropped when the model was built without one (``num_classes=0``); anything else
    that does not fit raises :class:`CheckpointMismatchError` naming the keys."""
    state_dict = read_checkpoint(path, model)
    if _is_vim_model(model):
        import vim

        filter_fn = vim.checkpoint_filter_fn
    else:
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    try:
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, model)
    except Exception as e:  # a filter that cannot map the keys is a mismatch too
        raise CheckpointMismatchError(
            f"checkpoint {path!r} cannot be converted for {type(model).__name__}: {e}") from e

    own = model.state_dict()
    if getattr(model, "num_classes", None) == 0:
        # a features-only model: the classifier in the file is not needed
        state_dict = {k: v for k, v in state_dict.items() if k in own or not k.startswith(_head_prefixes(model))}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        def short(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
        lines = [f"checkpoint {path!r} does not fit the model {type(model).__name__}"
                 f" ({getattr(model, 'default_cfg', {}).get('architecture', '')}):"]
        if missing:
            lines.append(f"  missing keys: {short(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {short(unexpected)}")
        if wrong_shape:
            lines.append(f"  wrong shapes: {short(wrong_shape)}")
        lines.append("  Build the model the checkpoint was trained as (--model, --model-kwargs such as "
                     "depth=..., --num-classes; --num-classes 0 drops the classifier).")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def _head_prefixes(model: nn.Module) -> Tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier", "head")
    names = classifier if isinstance(classifier, (tuple, list)) else (classifier,)
    return tuple(f"{n}." for n in names)


def build_model(
        name: str,
        checkpoint: Optional[str] = None,
        num_classes: Optional[int] = None,
        img_size: Optional[int] = None,
        dynamic_img_size: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """A timm model (``vim_*`` registered by ``import vim``) in eval mode, on the CPU.

    ``img_size`` builds the model at that resolution (position embedding of that grid; a
    checkpoint trained at another size is interpolated on load). ``dynamic_img_size`` builds it for
    inputs of any size (``dynamic_img_size`` and ``dynamic_img_pad``). Models without an
    ``img_size`` argument (CNNs) take any size anyway and are built without it."""
    import timm

    import vim  # noqa: F401  (registers the vim_* models)

    if not timm.is_model(name):
        import difflib

        close = timm.list_models(f"*{name}*")[:5] \
            or difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.7)
        hint = f" Similar names: {', '.join(close)}." if close else " See timm.list_models()."
        raise ValueError(f"unknown model {name!r}.{hint}")
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if dynamic_img_size:
        # any input size: position embedding resampled per input, borders padded to whole patches
        kwargs.setdefault("dynamic_img_size", True)
        kwargs.setdefault("dynamic_img_pad", True)
    if img_size is not None:
        kwargs["img_size"] = img_size
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        if "img_size" in str(e) and img_size is not None and "img_size" not in (model_kwargs or {}):
            kwargs.pop("img_size")
            model = timm.create_model(name, pretrained=False, **kwargs)
        elif "dynamic_img_size" in str(e):
            raise ValueError(f"model {name!r} does not take dynamic_img_size; --keep-size needs a model "
                             "that accepts any input size (vim_*, timm ViTs)") from e
        else:
            raise
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# preprocessing and loading


def data_config(model: nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                interpolation: Optional[str] = None, mean=None, std=None) -> Dict[str, Any]:
    """timm's eval data config for ``model`` with command-line overrides, as training resolves it."""
    from timm.data import resolve_data_config

    args = {"img_size": img_size, "crop_pct": crop_pct, "interpolation": interpolation,
            "mean": tuple(mean) if mean else None, "std": tuple(std) if std else None}
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is None and built is not None and not getattr(model, "dynamic_img_size", False):
        # pretrained_cfg keeps the registered size (224) when the model was built at another one
        # (img_size=... model kwarg); a fixed-size model must be fed its own size
        proj = getattr(model.patch_embed, "proj", None)
        in_chans = getattr(proj, "in_channels", None) or model.pretrained_cfg.get("input_size", (3,))[0]
        args["input_size"] = (in_chans, *tuple(built))
    return resolve_data_config({k: v for k, v in args.items() if v is not None}, model=model)


def eval_transform(config: Dict[str, Any], keep_size: bool = False, normalize: bool = True):
    """timm's eval transform for ``config``; ``keep_size`` skips resize and crop, for models built with
    ``dynamic_img_size=True``. ``normalize=False`` stops at uint8 CHW tensors (timm's ``use_prefetcher=True``), which
    :func:`normalize` finishes on the device: the loader's workers then skip the float conversion and normalisation
    and hand over a quarter of the bytes, as the training configs' loaders do."""
    from timm.data import create_transform
    from torchvision import transforms

    if keep_size:
        if not normalize:
            return transforms.PILToTensor()
        return transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize(mean=torch.tensor(config["mean"]), std=torch.tensor(config["std"])),
        ])
    return create_transform(**config, is_training=False, use_prefetcher=not normalize)


def normalize(images: torch.Tensor, config: Dict[str, Any]) -> torch.Tensor:
    """uint8 images from ``eval_transform(..., normalize=False)`` as float32, normalised with ``config``'s mean and
    std, on their own device."""
    mean, std = _scaled_mean_std(tuple(config["mean"]), tuple(config["std"]), images.device)
    return images.to(torch.float32, copy=True).sub_(mean).div_(std)   # a float input is left as it was


@functools.lru_cache(maxsize=8)
def _scaled_mean_std(mean: Tuple[float, ...], std: Tuple[float, ...], device: torch.device):
    # made once per device: a tensor from a Python list on a GPU is a synchronising copy
    return tuple(torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).mul(255).to(device) for v in (mean, std))


class ImageFiles(torch.utils.data.Dataset):
    """Reads and transforms one image per index. A file that cannot be read yields an error record
    instead of raising, so one bad file does not stop a run (or a worker)."""

    def __init__(self, paths: Sequence[Path], transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            with Image.open(self.paths[index]) as img:
                img = img.convert("RGB")
            return index, self.transform(img), None
        except Exception as e:  # PIL raises many types for bad files; all mean "skip and report"
            return index, None, f"{type(e).__name__}: {e}"


def _collate(items):
    good = [(i, x) for i, x, err in items if err is None]
    bad = [(i, err) for i, x, err in items if err is not None]
    if good:
        idx = torch.tensor([i for i, _ in good])
        shapes = {tuple(x.shape) for _, x in good}
        images = torch.stack([x for _, x in good]) if len(shapes) == 1 else [x for _, x in good]
    else:
        idx, images = torch.zeros(0, dtype=torch.long), None
    return idx, images, bad


def iterate_batches(paths: Sequence[Path], transform, batch_size: int, workers: int = 0,
                    pin_memory: bool = False) -> Iterator[Tuple[torch.Tensor, Any, List[Tuple[int, str]]]]:
    """Yields ``(indices, images, errors)``; ``images`` is a (B, C, H, W) tensor, or a list of
    tensors when the batch mixes sizes (``--keep-size``), or None when every file failed."""
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, transform), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, pin_memory=pin_memory)
    yield from loader


def progress(iterable, total: int, desc: str, enabled: bool = True):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar, same results
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=not enabled or None, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# features


def resolve_layers(model: nn.Module, layers: Sequence[int]) -> List[int]:
    """Absolute, sorted block indices (negative counts from the end), checked against the depth."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no .blocks; --layers needs a ViT-style model "
                         "(vim_*, timm ViT/DeiT); use features_only=True in code for CNNs")
    depth = len(blocks)
    out = set()
    for i in layers:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"--layers {i} is out of range for a model with {depth} blocks "
                             f"(valid: 0..{depth - 1} or -{depth}..-1)")
        out.add(j)
    return sorted(out)


@torch.no_grad()
def extract(model: nn.Module, x: torch.Tensor, layers: Optional[Sequence[int]] = None,
            pooled: bool = True, norm: bool = False) -> "OrderedDict[str, torch.Tensor]":
    """Features of one batch: ``pre_logits`` (B, D) = ``forward_head(forward_features(x),
    pre_logits=True)`` and/or ``layer{i}`` (B, D, H', W') maps after block ``i`` (``layers`` must
    be absolute and sorted: see :func:`resolve_layers`)."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    if layers:
        # one pass for both: without intermediates_only the final normed tokens (what
        # forward_features returns) come back too
        result = model.forward_intermediates(x, indices=list(layers), norm=norm, output_fmt="NCHW",
                                             intermediates_only=not pooled)
        final, maps = result if pooled else (None, result)
        for i, m in zip(layers, maps):
            out[f"layer{i}"] = m
    else:
        final = model.forward_features(x)
    if pooled:
        out["pre_logits"] = model.forward_head(final, pre_logits=True)
    return out


def output_paths(out: str) -> List[Path]:
    """Every file a feature run writes for ``--out``: ``.npy`` gets a ``.names.txt`` next to it."""
    p = Path(out)
    return [p, p.with_name(p.name + ".names.txt")] if p.suffix == ".npy" else [p]


def check_output(out: str, overwrite: bool) -> None:
    p = Path(out)
    if p.suffix not in (".safetensors", ".npy", ".npz"):
        raise ValueError(f"--out {out!r}: use a .safetensors, .npz or .npy file name")
    existing = [str(q) for q in output_paths(out) if q.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"output {', '.join(existing)} exists; pass --overwrite to replace it "
                              "or choose another --out")
    if not p.parent.exists():
        raise FileNotFoundError(f"--out {out!r}: folder {str(p.parent)!r} does not exist")


def save_features(out: str, features: Dict[str, torch.Tensor], names: Sequence[str],
                  metadata: Optional[Dict[str, Any]] = None) -> List[Path]:
    """Write features with the image names alongside.

    ``.safetensors``: one tensor per key, names (JSON list) and ``metadata`` in the header.
    ``.npz``: one array per key plus ``names``. ``.npy``: a single array (one key only) and the
    names in ``OUT.names.txt``, one per line. Row ``k`` of every tensor belongs to ``names[k]``."""
    p = Path(out)
    meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta["names"] = json.dumps(list(names))
        save_file({k: v.contiguous() for k, v in features.items()}, str(p), metadata=meta)
    elif p.suffix == ".npz":
        arrays = {k: v.float().numpy() for k, v in features.items()}
        np.savez(p, names=np.array(list(names)), **arrays)
    elif p.suffix == ".npy":
        if len(features) != 1:
            raise ValueError(f".npy holds one array but {len(features)} were asked for "
                             f"({', '.join(features)}); use .safetensors or .npz")
        np.save(p, next(iter(features.values())).float().numpy())
        output_paths(out)[1].write_text("".join(f"{n}\n" for n in names))
    else:
        raise ValueError(f"--out {out!r}: use a .safetensors, .npz or .npy file name")
    return [q for q in output_paths(out)]


def load_features(path: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Read what :func:`save_features` wrote: ``(tensors by key, image names)``."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            names = json.loads(f.metadata()["names"])
            return {k: f.get_tensor(k) for k in f.keys()}, names
    if p.suffix == ".npz":
        with np.load(p) as z:
            return {k: torch.from_numpy(z[k]) for k in z.files if k != "names"}, [str(n) for n in z["names"]]
    if p.suffix == ".npy":
        names = output_paths(path)[1].read_text().splitlines()
        return {p.stem: torch.from_numpy(np.load(p))}, names
    raise ValueError(f"{path!r}: not a .safetensors, .npz or .npy feature file")


def report_errors(errors: Sequence[Tuple[str, str]], stream=None) -> None:
    stream = stream or sys.stderr
    if errors:
        print(f"{len(errors)} input(s) could not be processed:", file=stream)
        for path, reason in errors:
            print(f"  {path}: {reason}", file=stream)
