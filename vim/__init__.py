"""Vision Mamba (Vim) backbones for timm. ``import vim`` registers the ``vim_*`` models."""
from .models import (  # noqa: F401  (importing registers the models with timm)
    VisionMamba, check_state_dict_fits, checkpoint_filter_fn, load_checkpoint, load_official_checkpoint,
)

__version__ = "0.1.0"
