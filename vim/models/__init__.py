from .checkpoint import check_state_dict_fits, checkpoint_filter_fn, load_checkpoint, load_official_checkpoint
from .vision_mamba import VisionMamba

__all__ = ["VisionMamba", "check_state_dict_fits", "checkpoint_filter_fn", "load_checkpoint",
           "load_official_checkpoint"]
