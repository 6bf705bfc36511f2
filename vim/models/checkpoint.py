"""Reading official hustvl/Vim checkpoints (and ours) and converting them to this implementation."""
from __future__ import annotations

import argparse
import os
import pickle
import re
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn as nn

from .layers import resample_pos_embed

# What an official training checkpoint pickles besides tensors (its `args`).
_SAFE_GLOBALS = [argparse.Namespace]

# Official name -> ours. Everything else (mixer internals, patch_embed, head) keeps its name.
_KEY_RENAMES = ((re.compile(r"^layers\.(\d+)\."), r"blocks.\1."), (re.compile(r"^norm_f\."), "norm."))
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "ema.", "ema_model.")
_STATE_DICT_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema", "module")


def load_official_checkpoint(path: str, use_ema: bool = False, map_location="cpu") -> Dict[str, torch.Tensor]:
    """Read a checkpoint file (official ``{'model': sd, 'args': ...}``, a bare state dict, or ours) safely.

    Loads with ``weights_only=True`` and allows only the plain containers such files hold.
    Returns the state dict (the EMA weights when ``use_ema`` and present).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(
            f"{path} holds Python objects beyond tensors and argparse.Namespace, so it was not loaded "
            f"with weights_only=True ({e}). Re-save just its state dict "
            "(torch.save(ckpt['model'], out)) from a trusted environment and load that.") from e
    return extract_state_dict(ckpt, use_ema=use_ema)


def extract_state_dict(ckpt: Any, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint object, with wrapper prefixes (DDP, compile, ...) removed."""
    if not isinstance(ckpt, dict):
        raise TypeError(f"expected a checkpoint dict, got {type(ckpt).__name__}")
    keys = _STATE_DICT_KEYS
    if use_ema:
        keys = ("model_ema", "state_dict_ema", "ema_state_dict") + keys
    for key in keys:
        if key in ckpt and isinstance(ckpt[key], dict):
            ckpt = ckpt[key]
            break
    sd = {k: v for k, v in ckpt.items() if torch.is_tensor(v)}
    if not sd:
        raise ValueError(f"no tensors found in the checkpoint (top-level keys: {sorted(ckpt)[:10]})")
    return _strip_wrapper_prefixes(sd)


def _strip_wrapper_prefixes(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module,
                         interpolation: str = "bicubic", antialias: bool = True) -> Dict[str, torch.Tensor]:
    """Convert an official hustvl/Vim state dict (or one of ours) to ``model``'s names and shapes.

    Renames ``layers.i`` -> ``blocks.i`` and ``norm_f`` -> ``norm``, resamples the position embedding
    to the model's patch grid (keeping the middle class-token row, or dropping it for a model built
    with ``class_token=False``), and drops the class token when the model has none.
    """
    state_dict = extract_state_dict(state_dict) if any(k in state_dict for k in _STATE_DICT_KEYS) \
        else _strip_wrapper_prefixes({k: v for k, v in state_dict.items() if torch.is_tensor(v)})
    has_cls = getattr(model, "cls_token", None) is not None
    ckpt_has_cls = "cls_token" in state_dict
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in _KEY_RENAMES:
            k = pattern.sub(repl, k)
        if k == "cls_token" and not has_cls:
            continue
        if k == "pos_embed" and getattr(model, "pos_embed", None) is not None:
            v = _fit_pos_embed(v, ckpt_has_cls, model, interpolation, antialias)
        out[k] = v
    return out


def _fit_pos_embed(pos_embed: torch.Tensor, ckpt_has_cls: bool, model: nn.Module, interpolation: str,
                   antialias: bool) -> torch.Tensor:
    if pos_embed.shape == model.pos_embed.shape:
        return pos_embed
    return resample_pos_embed(pos_embed, new_size=model.patch_embed.grid_size, has_cls=ckpt_has_cls,
                              keep_cls=model.cls_token is not None, interpolation=interpolation,
                              antialias=antialias)


def check_state_dict_fits(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                          ignore: Iterable[str] = ()) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    ignore = set(ignore)
    missing = sorted(k for k in own if k not in state_dict and k not in ignore)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in state_dict if k in own and state_dict[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not fit {type(model).__name__}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                lines.append(f"  {title} keys: {shown}")
        lines.append("  (is it for another architecture or size? pick the matching vim_* model, depth and embed_dim)")
        raise RuntimeError("\n".join(lines))


def load_checkpoint(model: nn.Module, path: str, use_ema: bool = False, strict: bool = True,
                    ignore_classifier_mismatch: bool = True) -> Optional[Dict[str, Any]]:
    """Load an official or own checkpoint file into ``model`` with a clear error when it does not fit.

    A classifier of another size (e.g. 1000 ImageNet classes into a 10-class model) is left at its
    initial values when ``ignore_classifier_mismatch``.
    """
    sd = checkpoint_filter_fn(load_official_checkpoint(path, use_ema=use_ema), model)
    own = model.state_dict()
    ignore = set()
    if ignore_classifier_mismatch:
        for k in ("head.weight", "head.bias"):
            if k in sd and (k not in own or sd[k].shape != own[k].shape):
                del sd[k]
            if k in own and k not in sd:
                ignore.add(k)
    if strict:
        check_state_dict_fits(model, sd, ignore=ignore)
    result = model.load_state_dict(sd, strict=False)
    return {"missing_keys": result.missing_keys, "unexpected_keys": result.unexpected_keys}
