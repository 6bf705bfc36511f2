"""What tools/train.py and tools/test.py share: config loading with checked overrides, AMP switching,
the distributed backend, and the final metrics line. Nothing here is task-specific."""
from __future__ import annotations

import difflib
import os
import os.path as osp
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from mmengine.config import Config, DictAction

from ..inference import COMPILE_MODES, COMPILE_WITHOUT_GPU, compile_kwargs  # noqa: F401  (cli.COMPILE_MODES, as before)

__all__ = ["ConfigKeyError", "load_config", "apply_amp", "apply_compile", "apply_launcher", "close_distributed",
           "run_then_close_distributed", "format_metrics", "DictAction", "set_cpu_threads", "REPO_ROOT", "DEMO_CONFIG"]

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEMO_CONFIG = osp.join(REPO_ROOT, "configs", "demo", "shapes_cls.py")

_GUARDED = {"OptimWrapper": "GuardedOptimWrapper", "AmpOptimWrapper": "GuardedAmpOptimWrapper"}
_TO_AMP = {"OptimWrapper": "GuardedAmpOptimWrapper", "GuardedOptimWrapper": "GuardedAmpOptimWrapper",
           "AmpOptimWrapper": "GuardedAmpOptimWrapper", "GuardedAmpOptimWrapper": "GuardedAmpOptimWrapper"}
_TO_FP32 = {"OptimWrapper": "GuardedOptimWrapper", "GuardedOptimWrapper": "GuardedOptimWrapper",
            "AmpOptimWrapper": "GuardedOptimWrapper", "GuardedAmpOptimWrapper": "GuardedOptimWrapper"}
# Dicts whose contents are keyword arguments with defaults: a key may be added to them.
_OPEN_DICT_HINTS = ("kwargs", "transform", "shapes", "clip_grad", "mixup", "strategy")


class ConfigKeyError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def _check_override(cfg: Config, dotted: str) -> None:
    node: Any = cfg._cfg_dict
    parts = dotted.split(".")
    for i, key in enumerate(parts):
        where = ".".join(parts[:i]) or "the config"
        if isinstance(node, (list, tuple)):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigKeyError(f"--cfg-options {dotted}: {where} is a list of {len(node)}; "
                                     f"'{key}' is not an index into it")
            node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise ConfigKeyError(f"--cfg-options {dotted}: {where} is a {type(node).__name__}, not a dict")
        if key not in node:
            last = i == len(parts) - 1
            parent = parts[i - 1] if i else ""
            if last and ("type" in node or any(h in parent for h in _OPEN_DICT_HINTS)):
                return  # a constructor argument that was left at its default
            close = difflib.get_close_matches(key, [str(k) for k in node.keys()], n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else \
                f" Its keys: {', '.join(sorted(str(k) for k in node.keys())[:20])}"
            raise ConfigKeyError(f"--cfg-options {dotted}: the config has no key '{key}' in {where}.{hint}")
        node = node[key]


def load_config(path: str, options: Optional[Dict[str, Any]] = None) -> Config:
    """Read a python config and apply ``--cfg-options``, refusing keys that do not exist (typos)."""
    if not osp.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    cfg = Config.fromfile(path)
    if options:
        for key in options:
            _check_override(cfg, key)
        cfg.merge_from_dict(options)
    return cfg


def apply_amp(cfg: Config, amp: str) -> str:
    """Set the optimizer wrapper for ``amp`` in {auto, bf16, fp16, off}; every wrapper gets the
    non-finite-loss guard. Returns the mode used. auto = bf16 on a GPU, fp32 on the CPU."""
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_available() else "off"
    if amp != "off" and not torch.cuda.is_available():
        raise ValueError(f"--amp {amp} needs a GPU; on the CPU use --amp off (fp32)")
    ow = cfg.get("optim_wrapper")
    if ow is None:
        return amp
    t = ow.get("type", "OptimWrapper")
    if amp == "off":
        ow["type"] = _TO_FP32.get(t, t)
        ow.pop("dtype", None)
    else:
        if t not in _TO_AMP:
            raise ValueError(f"--amp {amp}: don't know how to add autocast to optim_wrapper type {t!r}")
        ow["type"] = _TO_AMP[t]
        ow["dtype"] = "bfloat16" if amp == "bf16" else "float16"
    return amp


def apply_compile(cfg: Config, mode: str) -> None:
    """Have the classifier run its timm model through ``torch.compile`` in ``mode`` (``VimImageClassifier``'s
    ``compile_cfg``). reduce-overhead replays CUDA graphs, which takes the host out of the step: the eager model waits
    for the host below large batches (docs/benchmarks.md, session 37)."""
    hint = " (a config goes before --compile: CONFIG --compile [MODE])" if mode.endswith(".py") else ""
    kwargs = compile_kwargs(mode, hint)
    model = cfg.get("model") or {}
    if model.get("type") != "VimImageClassifier":
        raise ValueError(f"--compile applies to VimImageClassifier configs; this config's model is "
                         f"{model.get('type')!r} (set torch.compile options in its own config instead)")
    model["compile_cfg"] = kwargs
    if not torch.cuda.is_available():
        warnings.warn(COMPILE_WITHOUT_GPU, stacklevel=2)


def apply_launcher(cfg: Config, launcher: str) -> None:
    """Set the launcher; without GPUs use gloo and start the process group here, because mmengine's
    ``init_dist`` calls ``torch.cuda.set_device`` (the Runner skips it when a group exists)."""
    cfg.launcher = launcher
    if launcher != "none" and not torch.cuda.is_available():
        cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "gloo"
        if launcher == "pytorch" and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="gloo")
        # CPU DDP takes no device ids (mmengine passes the local rank as one by default)
        wrapper = cfg.get("model_wrapper_cfg") or dict(
            type="MMDistributedDataParallel", broadcast_buffers=False,
            find_unused_parameters=cfg.get("find_unused_parameters", False))
        wrapper["device_ids"] = None
        cfg.model_wrapper_cfg = wrapper


def close_distributed(synchronize: bool = True) -> None:
    """Leave the process group before the interpreter exits. Left to interpreter finalization, gloo's
    worker threads can outlive it and abort the process (SIGABRT, "terminate called without an active
    exception") after training has finished. ``synchronize`` waits for the other ranks first, so none
    closes its connections while another still reads from them; pass False on an error path, where
    the others may never arrive."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()


def run_then_close_distributed(run: Callable[[], int]) -> int:
    """A tool's main: ``run()``'s exit code, the process group closed after it (synchronized when it succeeded)."""
    rc = 1
    try:
        rc = run()
        return rc
    finally:
        close_distributed(synchronize=rc == 0)


def set_cpu_threads(cfg: Config) -> Optional[int]:
    """On the CPU, without OMP_NUM_THREADS set, give torch the cores the data workers leave free: with
    more threads than free cores the intra-op barriers stall and steps get many times slower."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return None
    workers = int(cfg.get("train_dataloader", {}).get("num_workers", 0) or 0)
    n = max(1, (os.cpu_count() or 1) - workers)
    torch.set_num_threads(n)
    return n


def unpin_without_gpu(cfg: Config) -> None:
    """Pinned host memory only speeds up copies to a GPU; without one, torch's DataLoader warns about it. The ImageNet
    configs pin (for GPU training), so on a CPU-only machine their loaders are switched off it."""
    if torch.cuda.is_available():
        return
    for key in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg.get(key)
        if loader and loader.get("pin_memory"):
            loader["pin_memory"] = False


def format_metrics(metrics: Dict[str, Any]) -> str:
    """``top-1: 76.12  top-5: 93.01``: every metric, two decimals for numbers."""
    parts = []
    for k, v in metrics.items():
        try:
            parts.append(f"{k}: {float(v):.2f}")
        except (TypeError, ValueError):
            parts.append(f"{k}: {v}")
    return "  ".join(parts)


def ensure_hooks(cfg: Config, types: Sequence[str]) -> None:
    hooks: List = list(cfg.get("custom_hooks", []) or [])
    have = {h.get("type") for h in hooks if isinstance(h, dict)}
    for t in types:
        if t not in have:
            hooks.append(dict(type=t))
    cfg.custom_hooks = hooks
