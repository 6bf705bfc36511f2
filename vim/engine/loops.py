"""Validation loop that reports the model and its EMA side by side."""
from __future__ import annotations

from typing import Dict

from mmengine.hooks import EMAHook
from mmengine.registry import LOOPS
from mmengine.runner import ValLoop

__all__ = ["EMAValLoop"]


@LOOPS.register_module(name="EMAValLoop")
class EMAValLoop(ValLoop):
    """``ValLoop`` that, when an ``EMAHook`` is active, evaluates both weight sets in one validation:
    the trained weights under the evaluator's names (``top-1``) and the EMA under ``ema/<name>``.

    mmengine's ``EMAHook`` alone swaps the EMA in for validation, so only the EMA would be seen.
    Without an ``EMAHook`` this is the plain ``ValLoop``.
    """

    def _evaluate_once(self) -> Dict[str, float]:
        self.val_loss.clear()
        for idx, data_batch in enumerate(self.dataloader):
            self.run_iter(idx, data_batch)
        return self.evaluator.evaluate(len(self.dataloader.dataset))

    def run(self) -> dict:
        self.runner.call_hook("before_val")
        self.runner.call_hook("before_val_epoch")  # EMAHook swaps the EMA weights in here
        self.runner.model.eval()
        ema_hook = next((h for h in self.runner.hooks if isinstance(h, EMAHook)), None)
        metrics = self._evaluate_once()
        if ema_hook is not None:
            ema_metrics = {f"ema/{k}": v for k, v in metrics.items()}
            ema_hook._swap_ema_parameters()
            try:
                metrics = self._evaluate_once()
            finally:
                ema_hook._swap_ema_parameters()
            metrics.update(ema_metrics)
        self.runner.call_hook("after_val_epoch", metrics=metrics)  # ... and back out here
        self.runner.call_hook("after_val")
        return metrics
