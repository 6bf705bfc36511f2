"""Vision Mamba (Vim) backbones for timm. ``import vim`` registers the ``vim_*`` models."""
from .models import VisionMamba, checkpoint_filter_fn, load_official_checkpoint  # noqa: F401  (registers models)

__version__ = "0.1.0"
