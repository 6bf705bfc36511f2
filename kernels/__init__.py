"""Selective-scan, RMSNorm, patch-row and token-embedding kernels for Vision Mamba, shipped as ``vim.kernels``.

Each op has a readable pure-PyTorch reference (``naive.py``), fused Triton kernels, and one
interface that picks the backend (Triton on CUDA, the reference elsewhere).
"""
from .bimamba import DirectionParams, bimamba_v2_fn, bimamba_v2_packed_fn, bimamba_v2_ref
from .embed import embed_tokens_fn, embed_tokens_ref
from .norm import add_rms_norm_fn, add_rms_norm_ref, rms_norm_fn, rms_norm_ref
from .patchify import patch_rows, patch_rows_ref
from .selective_scan import selective_scan_fn, selective_scan_ref

__all__ = [
    "DirectionParams", "add_rms_norm_fn", "add_rms_norm_ref", "bimamba_v2_fn", "bimamba_v2_packed_fn", "bimamba_v2_ref",
    "embed_tokens_fn", "embed_tokens_ref", "patch_rows", "patch_rows_ref", "rms_norm_fn", "rms_norm_ref",
    "selective_scan_fn", "selective_scan_ref",
]
