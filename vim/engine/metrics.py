"""Classification accuracy for mmengine evaluators."""
from __future__ import annotations

from typing import Dict, List, Sequence

from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS

__all__ = ["TopKAccuracy"]


@METRICS.register_module(name="VimTopKAccuracy")
class TopKAccuracy(BaseMetric):
    """Top-k accuracy in percent, reported as ``top-1``, ``top-5`` (one entry per ``topk``)."""

    default_prefix = None

    def __init__(self, topk: Sequence[int] = (1, 5), collect_device: str = "cpu", prefix=None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.topk = tuple(topk)

    def process(self, data_batch, data_samples: Sequence[Dict]) -> None:
        # one result per sample: the distributed collector trims the sampler's padding by count
        for s in data_samples:
            label = int(s["label"])
            ranks = s["topk"].tolist()
            self.results.append(tuple(int(label in ranks[:k]) for k in self.topk))

    def compute_metrics(self, results: List) -> Dict[str, float]:
        n = max(len(results), 1)
        return {f"top-{k}": 100.0 * sum(r[i] for r in results) / n for i, k in enumerate(self.topk)}
