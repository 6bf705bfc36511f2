"""Optimizer side: timm's weight-decay param groups as an mmengine constructor, a non-finite-loss guard
for any optimizer wrapper, and a linear warmup from an absolute learning rate."""
from __future__ import annotations

import logging
from typing import Dict, Optional, Set

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import AmpOptimWrapper, DefaultOptimWrapperConstructor, LinearLR, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS, PARAM_SCHEDULERS
from timm.optim import param_groups_weight_decay

__all__ = ["TimmParamGroupsConstructor", "NonFiniteGuardMixin", "GuardedOptimWrapper", "GuardedAmpOptimWrapper",
           "LinearWarmupLR", "collect_no_weight_decay"]


def collect_no_weight_decay(model: nn.Module) -> Set[str]:
    """Full parameter names listed by every submodule's ``no_weight_decay()`` (timm convention)."""
    names: Set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn) and not isinstance(module, torch.jit.ScriptModule):
            for n in fn():
                names.add(f"{prefix}.{n}" if prefix else n)
    return names


@OPTIM_WRAPPER_CONSTRUCTORS.register_module(name="TimmParamGroupsConstructor")
class TimmParamGroupsConstructor(DefaultOptimWrapperConstructor):
    """Two param groups as timm's optimizer factory makes them: no weight decay on 1-D parameters
    (norms, biases, ``D``) and on names from ``no_weight_decay()`` (pos_embed, cls_token, A_log, ...).

    ``optim_wrapper=dict(type=..., optimizer=dict(type='AdamW', lr=..., weight_decay=...),
    constructor='TimmParamGroupsConstructor')``.
    """

    def __call__(self, model: nn.Module) -> OptimWrapper:
        if is_model_wrapper(model):
            model = model.module
        optim_wrapper_cfg = self.optim_wrapper_cfg.copy()
        optim_wrapper_cfg.setdefault("type", "OptimWrapper")
        optimizer_cfg = self.optimizer_cfg.copy()
        weight_decay = optimizer_cfg.pop("weight_decay", 0.0)
        groups = param_groups_weight_decay(model, weight_decay=weight_decay,
                                           no_weight_decay_list=collect_no_weight_decay(model))
        optimizer_cfg["params"] = groups
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        return OPTIM_WRAPPERS.build(optim_wrapper_cfg, default_args=dict(optimizer=optimizer))


class NonFiniteGuardMixin:
    """Skips the update of a step whose loss is NaN/inf (with a warning) and stops the run after
    ``max_nonfinite`` such steps in a row. Under DDP all ranks agree (the flag is all-reduced), so they
    skip together and never desynchronise."""

    def __init__(self, *args, max_nonfinite: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_nonfinite = max_nonfinite
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad)
        return bad.item() == 0

    def update_params(self, loss: torch.Tensor, step_kwargs: Optional[Dict] = None,
                      zero_kwargs: Optional[Dict] = None) -> None:
        if self._loss_is_finite(loss):
            self.nonfinite_in_row = 0
            return super().update_params(loss, step_kwargs=step_kwargs, zero_kwargs=zero_kwargs)
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        # Backward still runs (DDP expects every forward to be followed by its gradient reduction);
        # the non-finite gradients are then dropped instead of stepped.
        self.backward(self.scale_loss(loss))
        self.zero_grad(**(zero_kwargs or {}))
        print_log(f"non-finite loss ({loss.detach().float().item()}); skipped this step "
                  f"({self.nonfinite_in_row} in a row, {self.nonfinite_total} in all)",
                  logger="current", level=logging.WARNING)
        if self.nonfinite_in_row >= self.max_nonfinite:
            raise FloatingPointError(
                f"the loss was NaN/inf for {self.nonfinite_in_row} steps in a row, so training stopped. "
                "The last checkpoint in the work dir is intact. Try a lower learning rate, gradient clipping "
                "(optim_wrapper.clip_grad=dict(max_norm=1.0)), --amp off, or check the data.")


@OPTIM_WRAPPERS.register_module(name="GuardedOptimWrapper")
class GuardedOptimWrapper(NonFiniteGuardMixin, OptimWrapper):
    """mmengine ``OptimWrapper`` with the non-finite-loss guard."""


@OPTIM_WRAPPERS.register_module(name="GuardedAmpOptimWrapper")
class GuardedAmpOptimWrapper(NonFiniteGuardMixin, AmpOptimWrapper):
    """mmengine ``AmpOptimWrapper`` (autocast, ``dtype='bfloat16'`` or ``'float16'``) with the guard."""


@PARAM_SCHEDULERS.register_module(name="LinearWarmupLR")
class LinearWarmupLR(LinearLR):
    """``LinearLR`` that starts from the absolute learning rate ``start_lr`` (DeiT's ``warmup_lr``)
    rather than a factor, so it stays right when ``auto_scale_lr`` rescales the base lr."""

    def __init__(self, optimizer, start_lr: float = 1e-6, **kwargs):
        groups = optimizer.param_groups
        base = max(g.get("initial_lr", g["lr"]) for g in groups)
        kwargs.pop("start_factor", None)
        super().__init__(optimizer, start_factor=min(1.0, start_lr / base), **kwargs)
