"""The Vim stem's token embedding in one Triton pass each way, as the torch custom ops ``vim_kernels::embed_tokens_fwd``
/ ``embed_tokens_bwd``.

Eager PyTorch builds the tokens from the patch GEMM's bf16 output in two passes (``torch.cat`` to put the class token
in the middle, then the float32 position-embedding add), with the GEMM's bias in cuBLAS's epilogue. Its backward is
worse: the add's gradient cast to bf16, a batch sum for the position embedding, the cat's slices that the GEMM's
backward makes contiguous, and the bias gradient as a column sum over all B * M patch rows. Here the GEMM runs without
its bias and the forward reads the patches once, adds the bias, the class token and the position embedding in float32
and writes the float32 tokens once. The backward reads the token gradient once: it writes the patches' gradient (the
class row left out) in their dtype, and sums over the batch in registers; the position embedding's gradient is that
sum, the class token's its middle row and the bias's the sum of its other rows, taken by torch from a (tokens, D)
buffer (or a few, one per batch split, where the batch is long and the programs would be too few) without atomics,
so the result is deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..eager import EagerOp
from ..host_math import cdiv, next_pow2, sm_count
from ..inductor_fallbacks import register_fake
from ..launch import cached_launch
from ..selective_scan.triton_scan import _empty   # NaN-filled when tests set triton_scan.POISON_OUTPUTS

# Vim's widths (192, 384, 768) are multiples of 64: no masked columns at the model's shapes
BLOCK_D = 64
# forward tile (tokens x channels) of one image; the grid also runs over the batch, so programs are plenty
FWD_BLOCK_T = 16
# backward tile (images x tokens x channels): several images a loop step put more loads in flight per program, so
# fewer programs (each split of the batch costs a (tokens, D) float32 sum buffer) keep the memory busy
BWD_BLOCK_B = 4
BWD_BLOCK_T = 8
# backward programs to aim for per SM; below that the batch is split and each split sums its share into its own buffer
BWD_PROGRAMS_PER_SM = 4


@cached_launch
@triton.jit
def _embed_fwd_kernel(x_ptr, bias_ptr, cls_ptr, pos_ptr, out_ptr, T, D, n_t_blocks, sx_b, sx_m, sx_d,
                      HAS_BIAS: tl.constexpr, HAS_CLS: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """out[b, t] = (x[b, row(t)] + bias) + pos[t], or cls + pos[t] at the middle token; float32."""
    pid = tl.program_id(0)
    b = (pid // n_t_blocks).to(tl.int64)
    t = (pid % n_t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    mask = (t < T)[:, None] & d_ok[None, :]
    if HAS_CLS:
        mid = (T - 1) // 2
        is_patch = t != mid
        row = tl.where(t > mid, t - 1, t)
    else:
        is_patch = t >= 0
        row = t
    v = tl.load(x_ptr + b * sx_b + row.to(tl.int64)[:, None] * sx_m + d.to(tl.int64)[None, :] * sx_d,
                mask=mask & is_patch[:, None], other=0.0).to(tl.float32)
    # the reference's order of float32 adds ((x + bias) + pos), so the fp32 results agree bit for bit
    if HAS_BIAS:
        v += tl.load(bias_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_CLS:
        c = tl.load(cls_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        v = tl.where(is_patch[:, None], v, c[None, :])
    if HAS_POS:
        v += tl.load(pos_ptr + t[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (b * T + t[:, None]) * D + d[None, :], v, mask=mask)


@cached_launch
@triton.jit
def _embed_bwd_kernel(dout_ptr, dx_ptr, dsum_ptr, B, T, D, per_split, so_b, so_t, so_d, HAS_CLS: tl.constexpr,
                      WRITE_DX: tl.constexpr, SUM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """dx[b, row(t)] = dout[b, t] for every patch token (dx's dtype); dsum[split, t] = sum over the split's images of
    dout[b, t] (float32)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    td_ok = (t < T)[:, None] & (d < D)[None, :]
    if HAS_CLS:
        M = T - 1
        mid = M // 2
        dx_ok = td_ok & (t != mid)[:, None]
        row = tl.where(t > mid, t - 1, t)
    else:
        M = T
        dx_ok = td_ok
        row = t
    src = t.to(tl.int64)[:, None] * so_t + d.to(tl.int64)[None, :] * so_d
    dst = row[:, None] * D + d[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    b_lo = split * per_split
    b_hi = tl.minimum(B, b_lo + per_split)
    for b0 in range(b_lo, b_hi, BLOCK_B):
        b = (b0 + tl.arange(0, BLOCK_B))
        b_ok = (b < b_hi)[:, None, None]
        b = b.to(tl.int64)[:, None, None]
        g = tl.load(dout_ptr + b * so_b + src[None, :, :], mask=b_ok & td_ok[None, :, :], other=0.0).to(tl.float32)
        if SUM:
            acc += tl.sum(g, axis=0)
        if WRITE_DX:
            tl.store(dx_ptr + b * M * D + dst[None, :, :], g.to(dx_ptr.dtype.element_ty),
                     mask=b_ok & dx_ok[None, :, :])
    if SUM:
        tl.store(dsum_ptr + (split * T + t[:, None]) * D + d[None, :], acc, mask=td_ok)


def _tokens(patches: torch.Tensor, has_cls: bool) -> int:
    return patches.shape[1] + int(has_cls)


def _forward(patches: torch.Tensor, bias: Optional[torch.Tensor], cls_token: Optional[torch.Tensor],
             pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    B, M, D = patches.shape
    T = _tokens(patches, cls_token is not None)
    out = _empty((B, T, D), torch.float32, patches.device)
    if out.numel():
        n_t, block_d = cdiv(T, FWD_BLOCK_T), min(BLOCK_D, next_pow2(D))
        # the small operands contiguous (a no-op for the model's parameters), so the kernel indexes them densely
        bias, cls_token, pos_embed = (t.contiguous() if t is not None else out for t in (bias, cls_token, pos_embed))
        _embed_fwd_kernel[(B * n_t, cdiv(D, block_d))](
            patches, bias, cls_token, pos_embed, out, T, D, n_t, *patches.stride(),
            HAS_BIAS=bias is not out, HAS_CLS=cls_token is not out, HAS_POS=pos_embed is not out,
            BLOCK_T=FWD_BLOCK_T, BLOCK_D=block_d, num_warps=4)
    return out


def _bwd_plan(B: int, n_tiles: int, device: torch.device):
    """(images per loop step, images per split, splits) for the backward."""
    if device.type == "cuda":
        block_b, target = BWD_BLOCK_B, sm_count(device) * BWD_PROGRAMS_PER_SM
    else:   # the interpreter: two-image steps and two splits' worth of programs, so small tests cover both paths
        block_b, target = 2, 2 * n_tiles
    splits = max(1, target // max(n_tiles, 1))
    per_split = cdiv(max(cdiv(B, splits), 1), block_b) * block_b
    return block_b, per_split, max(1, cdiv(B, per_split))


def _backward(dout: torch.Tensor, has_cls: bool, patches_dtype: torch.dtype, patches_grad: bool, sums: bool):
    """(d patches (B, M, D) in ``patches_dtype`` or an empty tensor where not ``patches_grad``, the batch sum of dout
    (T, D) float32 or an empty tensor where not ``sums``)."""
    B, T, D = dout.shape
    dev = dout.device
    if patches_grad:
        dx = _empty((B, T - int(has_cls), D), patches_dtype, dev)
    else:
        dx = dout.new_empty((0,), dtype=patches_dtype)
    block_d = min(BLOCK_D, next_pow2(D))
    n_t, n_d = cdiv(T, BWD_BLOCK_T), cdiv(D, block_d)
    block_b, per_split, splits = _bwd_plan(B, n_t * n_d, dev)
    if not sums:
        dsum = partial = dout.new_empty((0,), dtype=torch.float32)
    else:
        partial = _empty((splits, T, D) if splits > 1 else (T, D), torch.float32, dev)
    if T * D:
        _embed_bwd_kernel[(n_t, n_d, splits)](
            dout, dx, partial, B, T, D, per_split, *dout.stride(), HAS_CLS=has_cls, WRITE_DX=patches_grad, SUM=sums,
            BLOCK_B=block_b, BLOCK_T=BWD_BLOCK_T, BLOCK_D=block_d, num_warps=4)
    if sums:
        dsum = partial.sum(0) if splits > 1 else partial
    return dx, dsum


_lib = torch.library.Library("vim_kernels", "FRAGMENT")
_lib.define("embed_tokens_fwd(Tensor patches, Tensor? bias, Tensor? cls_token, Tensor? pos_embed) -> Tensor")
_lib.define("embed_tokens_bwd(Tensor dout, bool has_cls, ScalarType patches_dtype, bool patches_grad, bool sums) "
            "-> (Tensor, Tensor)")
for _key in ("CPU", "CUDA"):
    _lib.impl("embed_tokens_fwd", _forward, _key)
    _lib.impl("embed_tokens_bwd", _backward, _key)


@register_fake("vim_kernels::embed_tokens_fwd")
def _forward_fake(patches, bias, cls_token, pos_embed):
    B, _, D = patches.shape
    return patches.new_empty((B, _tokens(patches, cls_token is not None), D), dtype=torch.float32)


@register_fake("vim_kernels::embed_tokens_bwd")
def _backward_fake(dout, has_cls, patches_dtype, patches_grad, sums):
    B, T, D = dout.shape
    dx = dout.new_empty((B, T - int(has_cls), D) if patches_grad else (0,), dtype=patches_dtype)
    return dx, dout.new_empty((T, D) if sums else (0,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    # no tensors to save: every gradient is a copy or a sum of dout's
    ctx.dtypes = tuple(t.dtype if t is not None else None for t in inputs)
    ctx.has_cls = inputs[2] is not None


def _autograd_backward(ctx, dout):
    need_x, need_bias, need_cls, need_pos = ctx.needs_input_grad[:4]
    dx, dsum = _embed_tokens_bwd(dout, ctx.has_cls, ctx.dtypes[0], need_x, need_bias or need_cls or need_pos)
    T, D = dout.shape[1:]
    mid = (T - 1) // 2
    d_bias = d_cls = d_pos = None
    if need_bias:
        # the bias reaches every token but the class token's
        d_bias = (dsum[:mid].sum(0) + dsum[mid + 1:].sum(0) if ctx.has_cls else dsum.sum(0)).to(ctx.dtypes[1])
    if need_cls:
        d_cls = dsum[mid].reshape(1, 1, D).to(ctx.dtypes[2])
    if need_pos:
        d_pos = dsum.unsqueeze(0).to(ctx.dtypes[3])
    return dx if need_x else None, d_bias, d_cls, d_pos


_embed_tokens_fwd = EagerOp(torch.ops.vim_kernels.embed_tokens_fwd, _forward, _autograd_backward, _setup_context)
_embed_tokens_bwd = EagerOp(torch.ops.vim_kernels.embed_tokens_bwd, _backward)


def embed_tokens_triton(patches: torch.Tensor, bias: Optional[torch.Tensor], cls_token: Optional[torch.Tensor],
                        pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    return _embed_tokens_fwd(patches, bias, cls_token, pos_embed)
