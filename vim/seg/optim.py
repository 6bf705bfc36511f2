"""Layer-wise learning-rate decay for the segmentor (BEiT / official Vim recipe) through timm's helper."""
from __future__ import annotations

import copy
from typing import Optional

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS
from timm.optim import param_groups_layer_decay

from vim.engine.optim import collect_no_weight_decay


@OPTIM_WRAPPER_CONSTRUCTORS.register_module(name="VimLayerDecayOptimWrapperConstructor")
class LayerDecayOptimWrapperConstructor:
    """Parameter groups from ``timm.optim.param_groups_layer_decay`` on a model with ``group_matcher``
    (the segmentor's puts the backbone stem at layer 0, block i at i + 1 and everything else, neck and
    heads, at the top layer depth + 1, as the official constructor does), each group's lr set to
    ``lr * layer_decay_rate ** (top - layer)``. No weight decay on 1-D parameters and on the model's
    ``no_weight_decay()`` names (of every submodule).

    Config: ``optim_wrapper=dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
    constructor='VimLayerDecayOptimWrapperConstructor', paramwise_cfg=dict(layer_decay_rate=0.92))``.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        if "optimizer" not in optim_wrapper_cfg:
            raise ValueError("optim_wrapper needs an 'optimizer' entry, e.g. dict(type='AdamW', lr=1e-4)")
        self.optim_wrapper_cfg = copy.deepcopy(dict(optim_wrapper_cfg))
        paramwise_cfg = dict(paramwise_cfg or {})
        self.layer_decay_rate = float(paramwise_cfg.pop("layer_decay_rate", 1.0))
        self.extra_no_decay = tuple(paramwise_cfg.pop("no_weight_decay", ()))
        if paramwise_cfg:
            raise ValueError(f"unknown paramwise_cfg keys {sorted(paramwise_cfg)}; "
                             "supported: layer_decay_rate, no_weight_decay")

    def __call__(self, model: nn.Module) -> OptimWrapper:
        if is_model_wrapper(model):
            model = model.module
        cfg = copy.deepcopy(self.optim_wrapper_cfg)
        cfg.setdefault("type", "OptimWrapper")
        optimizer_cfg = cfg.pop("optimizer")
        lr = optimizer_cfg["lr"]
        no_decay = set(self.extra_no_decay) | collect_no_weight_decay(model)
        groups = param_groups_layer_decay(model, weight_decay=optimizer_cfg.get("weight_decay", 0.0),
                                          no_weight_decay_list=sorted(no_decay),
                                          layer_decay=self.layer_decay_rate)
        for g in groups:
            g["lr"] = lr * g["lr_scale"]
        scales = sorted({round(g["lr_scale"], 6) for g in groups})
        print_log(f"layer-wise lr decay {self.layer_decay_rate}: {len(groups)} parameter groups, "
                  f"lr scales {scales[0]:.4g}..{scales[-1]:.4g}", logger="current")
        optimizer_cfg["params"] = groups
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        return OPTIM_WRAPPERS.build(cfg, default_args=dict(optimizer=optimizer))
