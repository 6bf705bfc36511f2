"""UperNet segmentor (backbone -> neck -> decode head [+ auxiliary head]) as an mmengine BaseModel,
with whole-image and sliding-window inference."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from mmengine.model import BaseDataPreprocessor, BaseModel
from mmengine.registry import MODELS
from mmengine.structures import BaseDataElement

from .heads import resize


def _pad_to(x: torch.Tensor, size: Tuple[int, int], value: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    return F.pad(x, (0, size[1] - w, 0, size[0] - h), value=value)


@MODELS.register_module(name="VimSegDataPreprocessor")
class SegDataPreprocessor(BaseDataPreprocessor):
    """Moves a batch to the device, normalises uint8 RGB images and pads them into one tensor.

    Training batches are padded to ``size`` (the crop size; images smaller than a crop keep the padding
    as ignored label ``seg_pad_val``) or to the largest image; evaluation batches are padded to the largest
    image rounded up to ``size_divisor``, and their labels are left untouched (metrics compare at the
    original resolution).
    """

    def __init__(self, mean: Sequence[float] = (123.675, 116.28, 103.53),
                 std: Sequence[float] = (58.395, 57.12, 57.375), size: Optional[Sequence[int]] = None,
                 size_divisor: Optional[int] = None, pad_val: float = 0.0, seg_pad_val: int = 255):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.size = tuple(size) if size is not None else None
        self.size_divisor = size_divisor
        self.pad_val = pad_val
        self.seg_pad_val = seg_pad_val

    def _target_size(self, shapes: List[Tuple[int, int]], training: bool) -> Tuple[int, int]:
        h = max(s[0] for s in shapes)
        w = max(s[1] for s in shapes)
        if training and self.size is not None:
            h, w = max(h, self.size[0]), max(w, self.size[1])
        if self.size_divisor:
            d = self.size_divisor
            h, w = math.ceil(h / d) * d, math.ceil(w / d) * d
        return h, w

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        inputs = data["inputs"]
        samples = data.get("data_samples")
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
            inputs = list(inputs)
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise TypeError("inputs must be a non-empty list of (3, H, W) images or a (B, 3, H, W) tensor")
        images = [(img.float() - self.mean) / self.std for img in inputs]
        target = self._target_size([img.shape[-2:] for img in images], training)
        batch = torch.stack([_pad_to(img, target, self.pad_val) for img in images])
        if samples is not None:
            for img, sample in zip(inputs, samples):
                sample.set_metainfo(dict(pad_shape=target))
                if "img_shape" not in sample.metainfo:
                    sample.set_metainfo(dict(img_shape=tuple(img.shape[-2:])))
                if training and "gt_sem_seg" in sample:
                    sample.gt_sem_seg = _pad_to(sample.gt_sem_seg, target, self.seg_pad_val)
        return dict(inputs=batch, data_samples=samples)


@MODELS.register_module(name="VimUperNet")
class UperNetSegmentor(BaseModel):
    """``forward(inputs, data_samples, mode)`` with mode 'loss' (dict of losses), 'predict' (data samples
    carrying ``pred_sem_seg`` (H, W) at each image's original size) or 'tensor' (logits at input size).

    ``test_cfg``: ``dict(mode='whole')`` or ``dict(mode='slide', crop_size=(512, 512), stride=(341, 341))``.
    """

    def __init__(self, backbone: dict, decode_head: dict, neck: Optional[dict] = None,
                 auxiliary_head: Optional[dict] = None, data_preprocessor: Optional[dict] = None,
                 test_cfg: Optional[dict] = None, init_cfg: Optional[dict] = None):
        if data_preprocessor is None:
            data_preprocessor = dict(type="VimSegDataPreprocessor")
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        self.backbone = MODELS.build(backbone)
        self.neck = MODELS.build(neck) if neck is not None else None
        self.decode_head = MODELS.build(decode_head)
        self.auxiliary_head = MODELS.build(auxiliary_head) if auxiliary_head is not None else None
        self.num_classes = self.decode_head.num_classes
        self.test_cfg = dict(test_cfg or dict(mode="whole"))
        if self.test_cfg.get("mode", "whole") not in ("whole", "slide"):
            raise ValueError(f"test_cfg mode must be 'whole' or 'slide', got {self.test_cfg['mode']!r}")

    # ---------------------------------------------------------------- features and logits
    def extract_feat(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = self.backbone(x)
        return self.neck(feats) if self.neck is not None else list(feats)

    def encode_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, H, W) at the size of x. Inputs that do not tile into patches are padded at the
        bottom/right (with 0, the mean colour after normalisation) and the logits cropped back."""
        h, w = x.shape[-2:]
        padded = self.backbone.padded_size((h, w)) if hasattr(self.backbone, "padded_size") else (h, w)
        logits = self.decode_head(self.extract_feat(_pad_to(x, padded, 0.0)))
        return resize(logits, padded)[..., :h, :w]

    def whole_inference(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_decode(x)

    def slide_inference(self, x: torch.Tensor, crop_size: Sequence[int] = (512, 512),
                        stride: Sequence[int] = (341, 341)) -> torch.Tensor:
        """Average the logits of overlapping ``crop_size`` windows placed every ``stride`` pixels (the last
        window of each row/column flush with the border), as mmseg's slide mode."""
        h_crop, w_crop = crop_size
        h_stride, w_stride = stride
        b, _, h_img, w_img = x.shape
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        logits = x.new_zeros(b, self.num_classes, h_img, w_img)
        counts = x.new_zeros(1, 1, h_img, w_img)
        for hi in range(h_grids):
            for wi in range(w_grids):
                y1 = max(min(hi * h_stride, h_img - h_crop), 0)
                x1 = max(min(wi * w_stride, w_img - w_crop), 0)
                y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
                logits[:, :, y1:y2, x1:x2] += self.encode_decode(x[:, :, y1:y2, x1:x2])
                counts[:, :, y1:y2, x1:x2] += 1
        return logits / counts

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.test_cfg
        if cfg.get("mode", "whole") == "slide":
            return self.slide_inference(x, cfg.get("crop_size", (512, 512)), cfg.get("stride", (341, 341)))
        return self.whole_inference(x)

    # ---------------------------------------------------------------- optimiser grouping
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm-style layer grouping (for ``param_groups_layer_decay``): the backbone's stem and blocks
        under their prefix; everything else (neck, heads, the unused final norm) in one top group."""
        inner = self.backbone.model.group_matcher(coarse)
        prefix = lambda p: r"^backbone\.model\.(?:" + p.lstrip("^") + ")"  # noqa: E731
        blocks = inner["blocks"]
        if isinstance(blocks, str):
            blocks = [(blocks, None)]
        # timm gives the final norm its own group (99999); the official BEiT/Vim constructor puts it
        # with the decoder at the top layer, which is what leaving it unmatched does.
        return dict(stem=prefix(inner["stem"]), blocks=[(prefix(p), s) for p, s in blocks if s is None])

    # ---------------------------------------------------------------- BaseModel interface
    def forward(self, inputs: torch.Tensor, data_samples: Optional[List[BaseDataElement]] = None,
                mode: str = "tensor") -> Union[Dict[str, torch.Tensor], List[BaseDataElement], torch.Tensor]:
        if mode == "loss":
            return self.loss(inputs, data_samples)
        if mode == "predict":
            return self.predict(inputs, data_samples)
        if mode == "tensor":
            return self.encode_decode(inputs)
        raise ValueError(f"unknown mode {mode!r}; use 'loss', 'predict' or 'tensor'")

    def loss(self, inputs: torch.Tensor, data_samples: List[BaseDataElement]) -> Dict[str, torch.Tensor]:
        if not data_samples or "gt_sem_seg" not in data_samples[0]:
            raise ValueError("mode='loss' needs data_samples with gt_sem_seg label maps")
        gt = torch.stack([s.gt_sem_seg for s in data_samples]).long()
        if gt.dim() == 4:
            gt = gt.squeeze(1)
        feats = self.extract_feat(inputs)
        losses = self.decode_head.loss(self.decode_head(feats), gt)
        if self.auxiliary_head is not None:
            losses.update(self.auxiliary_head.loss(self.auxiliary_head(feats), gt))
        return losses

    def predict(self, inputs: torch.Tensor,
                data_samples: Optional[List[BaseDataElement]] = None) -> List[BaseDataElement]:
        logits = self.inference(inputs)
        if data_samples is None:
            data_samples = [BaseDataElement(metainfo=dict(img_shape=tuple(inputs.shape[-2:])))
                            for _ in range(inputs.shape[0])]
        for logit, sample in zip(logits, data_samples):
            h, w = sample.metainfo.get("img_shape", inputs.shape[-2:])[:2]
            logit = logit[:, :h, :w]  # drop the batch padding
            if sample.metainfo.get("flip", False):
                logit = logit.flip(-1)
            ori = sample.metainfo.get("ori_shape", (h, w))[:2]
            logit = resize(logit[None], tuple(ori))[0]
            sample.pred_sem_seg = logit.argmax(dim=0)
        return data_samples
