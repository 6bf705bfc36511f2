"""Checkpoint files for mmengine runs: atomic writes, safe loads under torch >= 2.6, robust resume lookup.

Importing this module (``import vim.engine`` does) replaces two pieces of mmengine 0.10 globally:

* the local file backend's ``put``: a checkpoint is written to a temporary file in the same folder,
  flushed and fsync'ed, then renamed over the target, so a run killed while saving leaves the previous
  checkpoint intact and never a truncated one;
* the local-path checkpoint loader: mmengine calls ``torch.load(path)``, which since torch 2.6 defaults to
  ``weights_only=True`` and rejects mmengine's own checkpoints (they pickle ``HistoryBuffer`` and numpy
  arrays in the message hub). We load with ``weights_only=True`` and allow exactly those types.
"""
from __future__ import annotations

import argparse
import glob
import os
import os.path as osp
import pickle
import re
import tempfile
from collections import OrderedDict
from typing import List, Optional

import numpy as np
import torch
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.registry import HOOKS
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = ["WeightsOnlyCheckpointHook", "atomic_write_bytes", "safe_torch_load", "find_resume_checkpoint", "CHECKPOINT_SAFE_GLOBALS"]


def _numpy_globals() -> List:
    out = [np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    out += [_reconstruct, scalar]
    # numpy >= 1.25 pickles dtypes as instances of per-type classes (np.dtypes.Float64DType, ...).
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


# What mmengine's own checkpoints pickle besides tensors and plain containers.
# argparse.Namespace: the `args` of official hustvl/Vim training checkpoints.
CHECKPOINT_SAFE_GLOBALS = [HistoryBuffer, argparse.Namespace, *_numpy_globals()]


def atomic_write_bytes(data: bytes, filepath: str) -> None:
    """Write ``data`` to ``filepath`` via a temporary sibling file and an atomic rename."""
    folder = osp.dirname(osp.abspath(filepath))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + osp.basename(filepath) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filepath)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def _atomic_put(self, obj: bytes, filepath) -> None:
    atomic_write_bytes(obj, str(filepath))


def safe_torch_load(filename: str, map_location=None):
    """``torch.load(weights_only=True)`` that accepts mmengine's checkpoints, with a clear error otherwise."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f"checkpoint not found: {filename}")
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(
            f"{filename} pickles Python objects that are not allowed to load safely ({e}). If you trust the "
            "file, re-save its tensors only (torch.save(torch.load(f, weights_only=False)['state_dict'], out)) "
            "and load that.") from e
    except RuntimeError as e:
        if "PytorchStreamReader" in str(e) or "zip archive" in str(e):
            raise RuntimeError(f"{filename} is not a readable checkpoint (truncated or corrupt?): {e}") from e
        raise


LocalBackend.put = _atomic_put
CheckpointLoader.register_scheme(prefixes="", force=True)(safe_torch_load)


_CKPT_RE = re.compile(r"(epoch|iter)_(\d+)\.pth$")


def find_resume_checkpoint(work_dir: str) -> Optional[str]:
    """The checkpoint to resume from in ``work_dir``: the one named in ``last_checkpoint`` if that file
    exists, else the ``epoch_N.pth`` / ``iter_N.pth`` with the largest N. None when there is none."""
    pointer = osp.join(work_dir, "last_checkpoint")
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        for cand in (named, osp.join(work_dir, osp.basename(named))):
            if cand and osp.isfile(cand):
                return cand
    found = []
    for path in glob.glob(osp.join(work_dir, "*.pth")):
        m = _CKPT_RE.search(osp.basename(path))
        if m:
            found.append((int(m.group(2)), path))
    return max(found)[1] if found else None


def _plain(value):
    """numpy scalars/arrays -> Python numbers / tensors, recursively (weights_only-loadable types)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        return type(value)((k, _plain(v)) for k, v in value.items()) if not isinstance(value, OrderedDict) \
            else OrderedDict((k, _plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


_HB_TAG = "__vim_history_buffer__"


@HOOKS.register_module(name="WeightsOnlyCheckpointHook")
class WeightsOnlyCheckpointHook(Hook):
    """Stores the message hub in checkpoints as tensors and plain types, so our checkpoints load with
    ``torch.load(weights_only=True)`` and nothing allow-listed (mmengine pickles ``HistoryBuffer``s with
    bound methods, which need ``getattr``); turns them back into ``HistoryBuffer``s on load."""

    priority = "VERY_LOW"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        hub = checkpoint.get("message_hub")
        if not isinstance(hub, dict):
            return
        scalars = hub.get("log_scalars", {})
        for k, buf in list(scalars.items()):
            if isinstance(buf, HistoryBuffer):
                log, count = buf.data
                scalars[k] = {_HB_TAG: True, "log": torch.as_tensor(np.asarray(log, dtype=np.float64)),
                              "count": torch.as_tensor(np.asarray(count, dtype=np.float64)),
                              "max_length": int(buf.max_length)}
        for key in ("runtime_info", "resumed_keys"):
            if key in hub:
                hub[key] = _plain(hub[key])
        if "meta" in checkpoint:
            checkpoint["meta"] = _plain(checkpoint["meta"])

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        scalars = checkpoint.get("message_hub", {}).get("log_scalars", {})
        for k, v in list(scalars.items()):
            if isinstance(v, dict) and v.get(_HB_TAG):
                # .cpu(): mmengine's resume maps the checkpoint's tensors to the GPU
                scalars[k] = HistoryBuffer(v["log"].cpu().tolist(), v["count"].cpu().tolist(), v["max_length"])
