from .naive import patch_rows_ref
from .interface import patch_rows

__all__ = ["patch_rows", "patch_rows_ref"]
