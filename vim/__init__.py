"""Vision Mamba (Vim) backbones for timm. ``import vim`` registers the ``vim_*`` models."""
import os as _os

# In a source checkout the kernels live in the top-level folder kernels/ (installed as vim.kernels);
# let `import vim.kernels` find them there too when vim is imported from the checkout itself.
_checkout_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) \
        and _os.path.isfile(_os.path.join(_checkout_root, "kernels", "__init__.py")):
    __path__.append(_checkout_root)  # type: ignore[name-defined]  # noqa: F821

from .models import (  # noqa: E402,F401  (importing registers the models with timm)
    VisionMamba, check_state_dict_fits, checkpoint_filter_fn, load_checkpoint, load_official_checkpoint,
)

__version__ = "0.1.0"
