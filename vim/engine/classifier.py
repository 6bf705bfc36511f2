"""mmengine model wrapping a timm classifier (vim_* or any timm model), with mixup and the recipe's losses."""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import timm
import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

__all__ = ["VimImageClassifier"]


@MODELS.register_module(name="VimImageClassifier")
class VimImageClassifier(BaseModel):
    """Image classifier for mmengine's Runner around ``timm.create_model``.

    Args:
        model_name: registered timm name (``vim_tiny``, ``vim_small_stride8``, ...).
        model_kwargs: further ``timm.create_model`` arguments (num_classes, img_size, depth,
            drop_path_rate, ...).
        init_checkpoint: weights to start from (ours or an official hustvl/Vim ``.pth``), converted with
            ``vim.checkpoint_filter_fn`` (position embedding resampled to this model's grid, e.g. a
            stride-16 checkpoint into a stride-8 model); a classifier of another size is left initialised.
        init_use_ema: take the EMA weights from ``init_checkpoint`` when it has them.
        mixup: ``timm.data.Mixup`` arguments (mixup_alpha, cutmix_alpha, prob, switch_prob, mode,
            label_smoothing); None = no mixup.
        label_smoothing: used without mixup (with mixup, the smoothing goes into the soft targets).
        compile_cfg: ``torch.compile`` arguments for the timm model (``tools/train.py --compile``), e.g.
            ``dict(mode='reduce-overhead')``; None: eager. The eager model is bound by the host below large batches
            (vim_tiny's training step at batch 128 on an H200: 184 ms eager, 29 ms compiled with CUDA graphs;
            docs/benchmarks.md, session 37). The timm model's weights and checkpoint keys are unchanged; a copy of
            this module (mmengine's EMA model) compiles its own.
    """

    def __init__(self, model_name: str, model_kwargs: Optional[Dict] = None, init_checkpoint: Optional[str] = None,
                 init_use_ema: bool = False, mixup: Optional[Dict] = None, label_smoothing: float = 0.0,
                 compile_cfg: Optional[Dict] = None, data_preprocessor: Optional[Dict] = None,
                 init_cfg: Optional[Dict] = None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        import vim  # noqa: F401  (registers the vim_* timm models)

        self.model = timm.create_model(model_name, pretrained=False, **(model_kwargs or {}))
        self.num_classes = self.model.num_classes
        if init_checkpoint:
            self.load_checkpoint_file(init_checkpoint, use_ema=init_use_ema, ignore_classifier_mismatch=True)
        self.compile_cfg = dict(compile_cfg) if compile_cfg is not None else None
        # the compiled model, built on first use; a plain attribute (not a submodule), so state dicts keep the
        # timm model's keys (no ``_orig_mod.``); copies drop it (``__getstate__``)
        self._compiled = None
        self.mixup = None
        if mixup:
            mixup = dict(mixup)
            mixup.setdefault("label_smoothing", label_smoothing)
            self.mixup = Mixup(num_classes=self.num_classes, **mixup)
            self.train_loss = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.train_loss = nn.CrossEntropyLoss()

    def load_checkpoint_file(self, path: str, use_ema: bool = False, ignore_classifier_mismatch: bool = False) -> None:
        """Load ours (an mmengine run's ``epoch_N.pth``, a bare state dict) or an official checkpoint.

        Raises a clear error naming missing / unexpected / mis-shaped keys for another architecture.
        """
        import os

        from vim.models.checkpoint import check_state_dict_fits, checkpoint_filter_fn, extract_state_dict

        from .checkpoint_io import safe_torch_load

        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"checkpoint not found: {path}. Download it (e.g. the official hustvl/Vim .pth from the Hugging "
                "Face hub) or point the config at it: --cfg-options model.init_checkpoint=/path/to/file.pth")
        # safe_torch_load also reads mmengine's run checkpoints (message hub objects) and official ones.
        sd = checkpoint_filter_fn(extract_state_dict(safe_torch_load(path, "cpu"), use_ema=use_ema), self.model)
        own = self.model.state_dict()
        ignore = set()
        if ignore_classifier_mismatch:
            for k in ("head.weight", "head.bias"):
                if k in own and (k not in sd or sd[k].shape != own[k].shape):
                    sd.pop(k, None)
                    ignore.add(k)
        try:
            check_state_dict_fits(self.model, sd, ignore=ignore)
        except RuntimeError as e:
            raise RuntimeError(f"{path}: {e}") from None
        self.model.load_state_dict(sd, strict=False)
        print_log(f"loaded weights from {path}", logger="current")

    def backbone(self) -> nn.Module:
        """The timm model as this module runs it: compiled with ``compile_cfg`` (built on first use), else eager."""
        if self.compile_cfg is None:
            return self.model
        if self._compiled is None:   # set past nn.Module's __setattr__, which would register it as a submodule
            object.__setattr__(self, "_compiled", torch.compile(self.model, **self.compile_cfg))
        # a new step for CUDA-graph trees (mode='reduce-overhead'): the previous step's graph outputs may be
        # overwritten, which is what lets them replay into the same memory; a no-op without CUDA graphs
        torch.compiler.cudagraph_mark_step_begin()
        return self._compiled

    def __getstate__(self):
        """Copies (mmengine's EMA model is a deep copy) and pickles leave the compiled model behind: it runs the
        original's weights. A copy compiles its own on first use."""
        state = self.__dict__.copy()
        state["_compiled"] = None
        return state

    def forward(self, inputs: torch.Tensor, data_samples: Optional[torch.Tensor] = None,
                mode: str = "tensor") -> Union[Dict[str, torch.Tensor], List[Dict], torch.Tensor]:
        if mode == "loss":
            if data_samples is None:
                raise ValueError("mode='loss' needs the labels (data_samples)")
            targets = data_samples.long()
            if self.mixup is not None:
                if inputs.shape[0] % 2:
                    raise ValueError("mixup needs an even batch size; set drop_last=True in train_dataloader")
                inputs, targets = self.mixup(inputs, targets)
            logits = self.backbone()(inputs)
            return dict(loss=self.train_loss(logits.float(), targets))
        logits = self.backbone()(inputs)
        if mode == "tensor":
            return logits
        if mode == "predict":
            logits = logits.float()
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices.cpu()
            labels = data_samples.long().cpu() if data_samples is not None else [None] * len(topk)
            return [dict(topk=t, label=y) for t, y in zip(topk, labels)]
        raise ValueError(f"unknown mode {mode!r}; expected 'loss', 'predict' or 'tensor'")
