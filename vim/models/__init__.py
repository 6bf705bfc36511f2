from .vision_mamba import VisionMamba, checkpoint_filter_fn, load_official_checkpoint

__all__ = ["VisionMamba", "checkpoint_filter_fn", "load_official_checkpoint"]
