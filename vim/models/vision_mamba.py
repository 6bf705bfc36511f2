"""Vision Mamba (Vim): bidirectional state-space backbone with a middle class token.

Zhu et al., "Vision Mamba: Efficient Visual Representation Learning with Bidirectional State Space
Model", ICML 2024. Numerically the official hustvl/Vim "bimamba v2" models (``if_bimamba=False,
bimamba_type='v2', use_middle_cls_token=True, if_devide_out=True``), in timm's model conventions.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function
from timm.models._manipulate import checkpoint

from ..kernels.embed import embed_tokens_fn
from .checkpoint import checkpoint_filter_fn, load_official_checkpoint
from .layers import PatchEmbed, RMSNorm, insert_cls_token, lecun_normal_init_, resample_pos_embed, split_cls_token
from .mixer import VimBlock, residual_add

__all__ = ["VisionMamba", "checkpoint_filter_fn", "load_official_checkpoint"]


class VisionMamba(nn.Module):
    """Vision Mamba backbone and classifier.

    Tokens: strided patch embedding, the class token inserted in the middle of the patch sequence,
    absolute position embedding; ``depth`` pre-norm bidirectional Mamba blocks on a float32 residual
    stream; final RMSNorm; the class token (``global_pool='token'``) feeds the head.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            stride: Optional[int] = None,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 192,
            depth: int = 24,
            d_state: int = 16,
            d_conv: int = 4,
            expand: int = 2,
            dt_rank: Optional[int] = None,
            class_token: bool = True,
            pos_embed: bool = True,
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_eps: float = 1e-5,
            scan_backend: Optional[str] = None,
    ):
        super().__init__()
        if global_pool not in ('', 'avg', 'token'):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if global_pool == 'token' and not class_token:
            raise ValueError("global_pool='token' needs the class token; use global_pool='avg' with class_token=False")
        stride = patch_size if stride is None else stride
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, stride, in_chans, embed_dim,
                                      dynamic_img_pad=dynamic_img_pad)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim)) \
            if pos_embed else None
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            VimBlock(embed_dim, drop_path=dpr[i], norm_eps=norm_eps, d_state=d_state, d_conv=d_conv,
                     expand=expand, dt_rank=dt_rank, scan_backend=scan_backend)
            for i in range(depth)])
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=stride) for i in range(depth)]
        self.norm = RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        """The official initialisation (segm_init_weights + mamba_ssm's _init_weights)."""
        lecun_normal_init_(self.patch_embed.proj)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=.02)
        for block in self.blocks:
            out_proj = block.mixer.out_proj.weight
            nn.init.kaiming_uniform_(out_proj, a=math.sqrt(5))
            with torch.no_grad():
                out_proj /= math.sqrt(depth)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        names = {'pos_embed', 'cls_token'}
        for name, _ in self.named_parameters():
            if name.rsplit('.', 1)[-1] in ('A_log', 'A_b_log', 'D', 'D_b'):
                names.add(name)
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^cls_token|pos_embed|patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('', 'avg', 'token'):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            if global_pool == 'token' and self.cls_token is None:
                raise ValueError("global_pool='token' needs the class token")
            self.global_pool = global_pool
        ref = self.patch_embed.proj.weight
        device, dtype = ref.device, ref.dtype
        self.head = nn.Linear(self.embed_dim, num_classes, device=device, dtype=dtype) \
            if num_classes > 0 else nn.Identity()

    def set_input_size(self, img_size: Union[int, Tuple[int, int]]) -> None:
        """Rebuild for a new fixed input size, resampling the position embedding."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.img_size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        self.patch_embed.grid_size = self.patch_embed.dynamic_feat_size(self.patch_embed.img_size)
        self.patch_embed.num_patches = self.patch_embed.grid_size[0] * self.patch_embed.grid_size[1]
        if self.pos_embed is not None and old_grid != self.patch_embed.grid_size:
            with torch.no_grad():
                new = resample_pos_embed(self.pos_embed.data, self.patch_embed.grid_size, old_grid,
                                         has_cls=self.cls_token is not None)
            self.pos_embed = nn.Parameter(new)

    def _pos_embed(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, H', W', D) patch grid -> (B, tokens, D) with the class token in the middle. ``bias``: the patch
        embedding's bias where it was left out of the grid (``PatchEmbed(x, defer_bias=True)``)."""
        x = embed_tokens(x, self.cls_token, self.pos_embed, self.patch_embed.grid_size, self.dynamic_img_size, bias)
        return self.pos_drop(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the float32 tokens (B, tokens, D) the first block takes."""
        grid, bias = self.patch_embed(x, defer_bias=True)
        return self._pos_embed(grid, bias).float()   # x.float() is x itself in float32

    def _run_blocks(self, x: torch.Tensor, blocks, pending: Optional[torch.Tensor] = None):
        """Chains ``VimBlock.forward_pending``: returns the residual stream and the last block's branch,
        still to be added (each add rides in the next norm, the official fused add+norm)."""
        # The stream and the pending branch live in ``carry`` alone, which each block empties
        # (``VimBlock.forward_carry``): then the tensors a block replaces are freed before its mixer runs,
        # instead of living through it in this frame (1.5 (B, L, 2D) bf16 tensors less at the inference peak).
        carry = [x, pending]
        del x, pending
        for blk in blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                carry = list(checkpoint(blk.forward_pending, *carry))
            else:
                carry = blk.forward_carry(carry)
        return carry[0], carry[1]

    def _final_norm(self, x: torch.Tensor, pending: Optional[torch.Tensor]):
        """(residual stream with the last branch added, final norm of it)."""
        if isinstance(self.norm, RMSNorm):
            return self.norm.forward_add(x, pending)
        x = residual_add(x, pending)
        return x, self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normed tokens (B, tokens, D), the class token at the middle."""
        # no name holds the first stream, so the first block frees it
        x, pending = self._run_blocks(self._embed(x), self.blocks)
        return self._final_norm(x, pending)[1]

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == 'token':
            return x[:, (x.shape[1] - 1) // 2]
        if pool_type == 'avg':
            patches = split_cls_token(x)[0] if self.cls_token is not None else x
            return patches.mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Residual-stream tokens after the chosen blocks (the final norm applied when ``norm``).

        Returns NCHW maps (or NLC tokens) without the class token; with ``return_prefix_tokens`` each
        entry is ``(map, class_token (B, 1, D))``.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError("output_fmt must be 'NCHW' or 'NLC'")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self._embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        pending = None
        for i, blk in enumerate(blocks):
            # x is now the stream after block i - 1 (its branch added by block i's fused norm)
            x, pending = self._run_blocks(x, [blk], pending)
            if i - 1 in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        last = len(blocks) - 1
        if intermediates_only:   # no final norm unless the last block's output is asked for normed
            if last in take_indices:
                x = residual_add(x, pending)
                intermediates.append(self.norm(x) if norm else x)
        else:
            x, x_normed = self._final_norm(x, pending)
            if last in take_indices:
                intermediates.append(x_normed if norm else x)
        prefix = None
        if self.cls_token is not None:
            split = [split_cls_token(y) for y in intermediates]
            intermediates, prefix = [s[0] for s in split], [s[1] for s in split]
        if output_fmt == 'NCHW':
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, y.shape[-1]).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return x_normed, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices


@register_notrace_function
def embed_tokens(x: torch.Tensor, cls_token: Optional[torch.Tensor], pos_embed: Optional[torch.Tensor],
                 grid_size: Tuple[int, int], dynamic_img_size: bool,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flatten the patch grid, insert the middle class token, add the (resampled) position embedding; with
    ``bias`` (the patch embedding's, left out of the grid) also add that, all in one pass, the result float32."""
    B, H, W, D = x.shape
    if pos_embed is not None and (H, W) != tuple(grid_size):
        if not dynamic_img_size:
            raise ValueError(
                f"input gives a {H}x{W} patch grid but the model was built for a {grid_size[0]}x{grid_size[1]} "
                "grid; build it with dynamic_img_size=True, or with img_size matching the input")
        pos_embed = resample_pos_embed(pos_embed, (H, W), grid_size, has_cls=cls_token is not None)
    x = x.reshape(B, H * W, D)
    if bias is not None:
        # PatchEmbed's CUDA GEMM left its bias out: one Triton pass adds it, the class token and the position
        # embedding in float32 (not cat then add), and its backward reads the tokens' gradient once for all four
        return embed_tokens_fn(x, bias, cls_token, pos_embed)
    if cls_token is not None:
        x = insert_cls_token(x, cls_token)
    return x if pos_embed is None else x + pos_embed


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': .875,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2401.09417',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'vim_tiny.in1k': _cfg(hf_hub_id='hustvl/Vim-tiny-midclstok', hf_hub_filename='vim_t_midclstok_76p1acc.pth'),
    'vim_small.in1k': _cfg(hf_hub_id='hustvl/Vim-small-midclstok', hf_hub_filename='vim_s_midclstok_80p5acc.pth'),
    'vim_base.in1k': _cfg(hf_hub_id='hustvl/Vim-base-midclstok', hf_hub_filename='vim_b_midclstok_81p9acc.pth'),
    'vim_tiny_stride8.in1k': _cfg(
        hf_hub_id='hustvl/Vim-tiny-midclstok', hf_hub_filename='vim_t_midclstok_ft_78p3acc.pth'),
    'vim_small_stride8.in1k': _cfg(
        hf_hub_id='hustvl/Vim-small-midclstok', hf_hub_filename='vim_s_midclstok_ft_81p6acc.pth'),
    # no official stride-8 base weights were published
    'vim_base_stride8': _cfg(),
})


def _create_vision_mamba(variant: str, pretrained: bool = False, **kwargs) -> VisionMamba:
    # features_only default: four evenly spaced blocks, (5, 11, 17, 23) at depth 24 as in the
    # official segmentation setup
    depth = kwargs.get('depth', 24)
    out_indices = kwargs.pop('out_indices', tuple(depth * k // 4 - 1 for k in range(1, 5)))
    return build_model_with_cfg(
        VisionMamba, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


@register_model
def vim_tiny(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-T: embed 192, depth 24, patch 16, stride 16 (official 76.1% top-1)."""
    args = dict(patch_size=16, stride=16, embed_dim=192, depth=24)
    return _create_vision_mamba('vim_tiny', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vim_small(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S: embed 384, depth 24, patch 16, stride 16 (official 80.5% top-1)."""
    args = dict(patch_size=16, stride=16, embed_dim=384, depth=24)
    return _create_vision_mamba('vim_small', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vim_base(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B: embed 768, depth 24, patch 16, stride 16 (official 81.9% top-1)."""
    args = dict(patch_size=16, stride=16, embed_dim=768, depth=24)
    return _create_vision_mamba('vim_base', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vim_tiny_stride8(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-T+: patch 16 at stride 8 (27x27 grid at 224; official 78.3% top-1)."""
    args = dict(patch_size=16, stride=8, embed_dim=192, depth=24)
    return _create_vision_mamba('vim_tiny_stride8', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vim_small_stride8(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S+: patch 16 at stride 8 (official 81.6% top-1)."""
    args = dict(patch_size=16, stride=8, embed_dim=384, depth=24)
    return _create_vision_mamba('vim_small_stride8', pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vim_base_stride8(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B at patch 16, stride 8 (no official weights)."""
    args = dict(patch_size=16, stride=8, embed_dim=768, depth=24)
    return _create_vision_mamba('vim_base_stride8', pretrained=pretrained, **dict(args, **kwargs))
