"""Training and evaluation on mmengine: importing this registers the model wrapper and its data preprocessor, data
sets, metric, hooks, loops, optimizer pieces, and installs atomic / torch>=2.6-safe checkpoint IO."""
from .. import data as _data  # noqa: F401  (registers VimImageFolder, VimRepeatAugSampler)
from .checkpoint_io import CHECKPOINT_SAFE_GLOBALS, WeightsOnlyCheckpointHook, atomic_write_bytes, find_resume_checkpoint, safe_torch_load
from .classifier import VimImageClassifier
from .data_preprocessor import ClsDataPreprocessor
from .hooks import LastMetricsHook, RNGStateHook, get_rng_state, seed_worker_from_torch, set_rng_state
from .loops import EMAValLoop
from .metrics import TopKAccuracy
from .optim import (GuardedAmpOptimWrapper, GuardedOptimWrapper, LinearWarmupLR, NonFiniteGuardMixin,
                    TimmParamGroupsConstructor, collect_no_weight_decay)

__all__ = ["CHECKPOINT_SAFE_GLOBALS", "WeightsOnlyCheckpointHook", "atomic_write_bytes", "find_resume_checkpoint",
           "safe_torch_load", "VimImageClassifier", "ClsDataPreprocessor", "LastMetricsHook", "RNGStateHook",
           "get_rng_state", "set_rng_state", "seed_worker_from_torch", "EMAValLoop", "TopKAccuracy",
           "GuardedAmpOptimWrapper", "GuardedOptimWrapper", "LinearWarmupLR", "NonFiniteGuardMixin",
           "TimmParamGroupsConstructor", "collect_no_weight_decay"]
