from .naive import selective_scan_ref
from .interface import selective_scan_fn

__all__ = ["selective_scan_fn", "selective_scan_ref"]
