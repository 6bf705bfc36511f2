"""Runner hooks: exact RNG streams across resume, and the last evaluation's metrics for the tools."""
from __future__ import annotations

import random
from typing import Dict, Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import FUNCTIONS, HOOKS

__all__ = ["RNGStateHook", "LastMetricsHook", "get_rng_state", "set_rng_state", "seed_worker_from_torch"]


def get_rng_state() -> Dict:
    """Python, numpy, torch (and CUDA) RNG states, as tensors and plain types (safe to load with
    ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=random.getstate(), numpy=(kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                   int(has_gauss), float(cached)),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    """Restores what ``get_rng_state`` returned, wherever its tensors were loaded: mmengine's resume maps a
    checkpoint's tensors to the GPU, and the generators take their states as CPU byte tensors."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@HOOKS.register_module(name="RNGStateHook")
class RNGStateHook(Hook):
    """Makes a resumed run draw the same random numbers as an uninterrupted one.

    Saves every process's global RNG states (augmentation in the main process, mixup, drop path,
    data-loader worker seeds) in the checkpoint and restores them on resume; validation runs with
    its RNG use undone, so how often one validates does not change training.
    """

    priority = "VERY_HIGH"

    def __init__(self):
        self._states: Optional[list] = None
        self._saved_for_val: Optional[Dict] = None

    def _gather(self, runner) -> None:
        # Only rank 0 writes checkpoints (and runs before_save_checkpoint), so every rank's state is
        # gathered just before the CheckpointHook (lowest priority) saves.
        from mmengine.dist import all_gather_object
        self._states = all_gather_object(get_rng_state())

    def _checkpoint_hook(self, runner):
        from mmengine.hooks import CheckpointHook
        return next((h for h in runner.hooks if isinstance(h, CheckpointHook)), None)

    def after_train_epoch(self, runner) -> None:
        hook = self._checkpoint_hook(runner)
        if hook is not None and hook.by_epoch:
            self._gather(runner)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        hook = self._checkpoint_hook(runner)
        if hook is not None and not hook.by_epoch and (
                self.every_n_train_iters(runner, hook.interval) or self.is_last_train_iter(runner)):
            self._gather(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.dist import get_world_size
        states = self._states if self._states is not None and len(self._states) == get_world_size() \
            else [get_rng_state()] if get_world_size() == 1 else None
        if states is not None:
            checkpoint["rng_states"] = states  # one entry per rank

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.dist import get_rank, get_world_size
        states = checkpoint.get("rng_states")
        if not runner._resume or not states:
            return
        if len(states) != get_world_size():
            runner.logger.warning(f"checkpoint holds RNG states of {len(states)} processes but this run has "
                                  f"{get_world_size()}; random streams will differ from the original run")
            return
        set_rng_state(states[get_rank()])

    def before_val_epoch(self, runner) -> None:
        self._saved_for_val = get_rng_state()

    def after_val_epoch(self, runner, metrics=None) -> None:
        if self._saved_for_val is not None:
            set_rng_state(self._saved_for_val)
            self._saved_for_val = None


@HOOKS.register_module(name="LastMetricsHook")
class LastMetricsHook(Hook):
    """Keeps the metrics of the last validation in ``runner.message_hub`` (info key ``last_val_metrics``)."""

    priority = "LOWEST"

    def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
        if metrics:
            runner.message_hub.update_info("last_val_metrics", dict(metrics))


@FUNCTIONS.register_module(name="seed_worker_from_torch")
def seed_worker_from_torch(worker_id: int) -> None:
    """Data-loader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed, which torch
    derives from the main process's RNG at each epoch's iterator. Augmentations then differ per epoch and
    reproduce after a resume (mmengine's default reseeds every epoch's workers identically)."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)
