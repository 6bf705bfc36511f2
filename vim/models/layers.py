"""Building blocks of the Vim stem: strided patch embedding, float32 RMSNorm, middle-class-token helpers."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, to_2tuple
from timm.models._features_fx import register_notrace_function, register_notrace_module

from ..kernels.norm import add_rms_norm_fn, rms_norm_fn
from ..kernels.patchify import patch_rows

# FX leaves: both branch on dtypes and the autocast state (RMSNorm.forward_add is a method, traced into)
register_notrace_function(add_rms_norm_fn)


@register_notrace_module  # its input checks branch on the image size
class PatchEmbed(nn.Module):
    """Conv patch embedding whose stride may differ from the patch size (the stride-8 "+" models).

    The grid is ``(size - patch) // stride + 1`` per side, as in the official Vim.
    """

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=192,
                 dynamic_img_pad: bool = False):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride)
        self.in_chans = in_chans
        self.dynamic_img_pad = dynamic_img_pad
        self.grid_size = self.dynamic_feat_size(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.stride)

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        if self.dynamic_img_pad:
            return tuple(max(0, math.ceil((s - p) / st)) + 1
                         for s, p, st in zip(img_size, self.patch_size, self.stride))
        return tuple((s - p) // st + 1 for s, p, st in zip(img_size, self.patch_size, self.stride))

    def forward(self, x: torch.Tensor, defer_bias: bool = False):
        """(B, C, H, W) -> (B, H', W', D).

        ``defer_bias=True`` returns ``(grid, bias)`` instead: on the patch-row GEMM route (CUDA, patch == stride) the
        grid without the conv's bias and the bias, for the token embedding to add in float32 with the class token and
        position embedding in one pass (``vim.kernels.embed_tokens_fn``); elsewhere the biased grid and None. A
        keyword of the call, not a method, so that FX still sees this module as one leaf."""
        x = _check_and_pad_input(x, self.in_chans, self.patch_size, self.stride, self.dynamic_img_pad)
        if _patch_gemm(x, self.patch_size, self.stride):
            # cuDNN's heuristics pick a generic implicit-GEMM conv for this 3-channel stem (0.84 ms of a 18.5 ms
            # vim_tiny inference step at bs 256 on an H200); patches as rows of one GEMM cost one copy of the image
            if defer_bias:
                return patchify_linear(x, self.proj.weight, None), self.proj.bias
            return patchify_linear(x, self.proj.weight, self.proj.bias)
        grid = self.proj(x).permute(0, 2, 3, 1)
        return (grid, None) if defer_bias else grid


def _patch_gemm(x: torch.Tensor, patch: Tuple[int, int], stride: Tuple[int, int]) -> bool:
    """Whether PatchEmbed runs as one GEMM over patch rows (and can defer its bias): on CUDA, stride == patch. A
    function of its own so that tests can take that route on the CPU."""
    return x.is_cuda and patch == stride


def patchify_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A conv whose stride equals its kernel, (B, C, H, W) -> (B, H/ph, W/pw, D), as a GEMM over patch rows.

    The patch rows are one copy that also casts to the autocast dtype (``vim.kernels.patch_rows``: one Triton pass on
    CUDA, torch's permuting copy elsewhere or where the image needs a gradient)."""
    D, _, ph, pw = weight.shape
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return F.linear(patch_rows(x, (ph, pw), dtype).flatten(3), weight.reshape(D, -1), bias)


def _check_and_pad_input(x: torch.Tensor, in_chans: int, patch: Tuple[int, int], stride: Tuple[int, int],
                         pad: bool) -> torch.Tensor:
    if x.dim() != 4:
        fix = "; add the batch dimension with x.unsqueeze(0)" if x.dim() == 3 else ""
        raise ValueError(f"expected a batch of images (B, {in_chans}, H, W), got a {x.dim()}-D tensor "
                         f"{tuple(x.shape)}{fix}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected images of shape (B, {in_chans}, H, W), got {tuple(x.shape)}; "
            f"build the model with in_chans={x.shape[1]} to accept these")
    H, W = x.shape[-2:]
    rem = [0 if s < p else (s - p) % st for s, p, st in zip((H, W), patch, stride)]
    if H < patch[0] or W < patch[1] or any(rem):
        if not pad or H < 1 or W < 1:
            raise ValueError(
                f"input size {H}x{W} does not tile into {patch[0]}x{patch[1]} patches at stride "
                f"{stride[0]}x{stride[1]}: (size - patch) must be a non-negative multiple of the stride. "
                "Resize the input, or build the model with dynamic_img_pad=True to pad it")
        pad_h = (stride[0] - rem[0]) % stride[0] if H >= patch[0] else patch[0] - H
        pad_w = (stride[1] - rem[1]) % stride[1] if W >= patch[1] else patch[1] - W
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


@register_notrace_module  # picks its output dtype from the autocast state
class RMSNorm(nn.Module):
    """Weight-only RMSNorm computed in float32 (the official fused add+norm does the same).

    On CUDA one fused Triton kernel reads the float32 input once and writes the output directly in the
    compute dtype; elsewhere it is ``F.rms_norm`` (``vim.kernels.rms_norm_fn`` picks).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # like the official fused norm, hands the next layer its compute dtype (autocast's, else the weight's)
        return rms_norm_fn(x, self.weight, self.eps)

    def forward_add(self, x: torch.Tensor, branch: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(x + branch, norm(x + branch))``, the add in float32; one fused pass on CUDA. ``branch=None``:
        ``(x, norm(x))``."""
        return add_rms_norm_fn(x, branch, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def cls_index(num_patches: int) -> int:
    """Position of the middle class token in a sequence of ``num_patches`` patches plus the token."""
    return num_patches // 2


@register_notrace_function
def insert_cls_token(x: torch.Tensor, cls_token: torch.Tensor) -> torch.Tensor:
    """(B, M, D) patches -> (B, M + 1, D) with the class token at position M // 2."""
    mid = x.shape[1] // 2
    return torch.cat([x[:, :mid], cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x[:, mid:]], dim=1)


@register_notrace_function
def split_cls_token(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, M + 1, D) -> patches (B, M, D), class token (B, 1, D)."""
    mid = (x.shape[1] - 1) // 2
    return torch.cat([x[:, :mid], x[:, mid + 1:]], dim=1), x[:, mid:mid + 1]


def resample_pos_embed(
        pos_embed: torch.Tensor,
        new_size: Tuple[int, int],
        old_size: Optional[Tuple[int, int]] = None,
        has_cls: bool = True,
        keep_cls: Optional[bool] = None,
        interpolation: str = 'bicubic',
        antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, M [+1], D) position embedding with a middle class token to a new patch grid.

    The class token's row (at M // 2) is taken out, the grid resampled, and the row put back in the
    middle of the new grid (dropped when ``keep_cls`` is False).
    """
    keep_cls = has_cls if keep_cls is None else keep_cls
    if has_cls:
        grid, cls_row = split_cls_token(pos_embed)
    else:
        grid, cls_row = pos_embed, None
    if old_size is None:
        side = math.isqrt(grid.shape[1])
        if side * side != grid.shape[1]:
            raise ValueError(f"cannot infer the patch grid of a position embedding with {grid.shape[1]} "
                             "patches; pass old_size")
        old_size = (side, side)
    if tuple(old_size) != tuple(new_size):
        grid = resample_abs_pos_embed(grid, new_size=list(new_size), old_size=list(old_size),
                                      num_prefix_tokens=0, interpolation=interpolation,
                                      antialias=antialias, verbose=False)
    if keep_cls:
        if cls_row is None:
            raise ValueError("the position embedding has no class-token row to keep")
        return insert_cls_token(grid, cls_row)
    return grid


def lecun_normal_init_(module: Union[nn.Conv2d, nn.Linear]) -> None:
    from timm.layers import lecun_normal_
    lecun_normal_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
