"""Semantic-segmentation metric: one confusion matrix accumulated over the data set, then aAcc / mIoU / mAcc."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import print_log
from mmengine.registry import METRICS


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; pixels labelled ``ignore_index``
    (or outside [0, K)) are skipped."""
    pred = torch.as_tensor(pred).reshape(-1).long()
    gt = torch.as_tensor(gt).reshape(-1).long().to(pred.device)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and label differ in size: {pred.numel()} vs {gt.numel()} pixels")
    keep = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    idx = gt[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes).cpu()


def metrics_from_confusion(cm: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-class IoU and accuracy (NaN for classes absent from both labels and predictions, resp. from
    labels), plus the overall pixel accuracy, as fractions."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    gt_area = cm.sum(axis=1)
    pred_area = cm.sum(axis=0)
    union = gt_area + pred_area - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt_area > 0, tp / gt_area, np.nan)
        a_acc = tp.sum() / cm.sum() if cm.sum() > 0 else np.nan
    return dict(IoU=iou, Acc=acc, aAcc=a_acc)


@METRICS.register_module(name="SegIoUMetric")
class SegIoUMetric(BaseMetric):
    """mIoU / mAcc / aAcc in percent (mmseg's definitions: classes that never occur in the labels nor
    the predictions are left out of the means). Reads ``pred_sem_seg`` and ``gt_sem_seg`` (H, W) of each
    predicted data sample; ``num_classes`` defaults to the dataset's ``classes`` metainfo."""

    default_prefix: Optional[str] = None

    def __init__(self, num_classes: Optional[int] = None, ignore_index: int = 255, per_class: bool = True,
                 collect_device: str = "cpu", prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self._num_classes = num_classes
        self.ignore_index = ignore_index
        self.per_class = per_class

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            classes = (self.dataset_meta or {}).get("classes")
            if not classes:
                raise ValueError("SegIoUMetric needs num_classes=... or a dataset with 'classes' metainfo")
            self._num_classes = len(classes)
        return self._num_classes

    @staticmethod
    def _field(sample, name):
        value = sample[name] if isinstance(sample, dict) else getattr(sample, name)
        if isinstance(value, dict) and "data" in value:  # PixelData serialised by to_dict()
            value = value["data"]
        return torch.as_tensor(value).squeeze()

    def process(self, data_batch, data_samples: Sequence) -> None:
        for sample in data_samples:
            pred = self._field(sample, "pred_sem_seg")
            gt = self._field(sample, "gt_sem_seg")
            self.results.append(confusion_matrix(pred, gt, self.num_classes, self.ignore_index))

    def compute_metrics(self, results: list) -> Dict[str, float]:
        cm = torch.stack(results).sum(0).numpy() if results else np.zeros((self.num_classes,) * 2)
        m = metrics_from_confusion(cm)
        if self.per_class:
            names = (self.dataset_meta or {}).get("classes") or [str(i) for i in range(len(m["IoU"]))]
            rows = [f"{n:>20s} {100 * i:6.2f} {100 * a:6.2f}" for n, i, a in zip(names, m["IoU"], m["Acc"])]
            print_log("per-class results:\n" + f"{'class':>20s} {'IoU':>6s} {'Acc':>6s}\n" + "\n".join(rows),
                      logger="current")
        pct = lambda v: round(float(100 * v), 2) if np.isfinite(v) else float("nan")  # noqa: E731
        with np.errstate(invalid="ignore"):
            return dict(aAcc=pct(m["aAcc"]), mIoU=pct(np.nanmean(m["IoU"]) if np.isfinite(m["IoU"]).any() else np.nan),
                        mAcc=pct(np.nanmean(m["Acc"]) if np.isfinite(m["Acc"]).any() else np.nan))
