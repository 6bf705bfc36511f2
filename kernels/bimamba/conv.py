"""Depthwise conv + SiLU over tokens (forward and backward) in Triton, for the fused bidirectional mixer.

Causal: ``out[l] = silu(b + sum_k w[k] x[l + k - (W-1)])``; anti-causal (``reverse``, the backward scan
direction): ``out[l] = silu(b + sum_k w[k] x[l + (W-1-k)])``, zero padding in both. x is read in place
with any strides (the model passes a half of in_proj's output), so no contiguous copy exists.

Backward: the pre-activation is recomputed in-kernel, never stored. dx[s] = sum_k w[k] dact[s - tap_k]
needs dact at W shifted positions; rather than staging dact through memory, each shift recomputes it
from x and the output gradients, whose reloads hit cache: DRAM sees x and the gradients about once and
dx once. The output gradient arrives as several tensors (scan du and the x_proj input gradient) that
are summed in float32 in-kernel, and the two directions' dx meet through one float32 buffer read by
the second launch, so no summed or upcast copy is ever materialised. dweight and dbias are summed in
registers over a program's whole stretch of tokens and leave through a small per-program buffer that
torch reduces: one write per program instead of contended atomics, and a deterministic result.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..host_math import cdiv, next_pow2
from ..selective_scan import triton_scan

# Backward launch: a program walks a long stretch of tokens for one channel block, keeping its dweight
# and dbias partial sums in registers; sequences are split only to reach about this many programs.
# The W shifted recomputations keep many tiles live: at 4 warps a 32 x 64 tile needs ~255 registers and
# spills on sm_90 (ptxas -v), 8 warps halve the elements per thread (~180 registers, no spills).
BWD_TARGET_PROGRAMS = 1024
BWD_BLOCK_L, BWD_BLOCK_E, BWD_NUM_WARPS = 32, 64, 8


@triton.jit
def _tap(k, W: tl.constexpr, REVERSE: tl.constexpr):
    """Offset of the token that weight k reads, relative to the output token."""
    if REVERSE:
        return W - 1 - k
    else:
        return k - (W - 1)


@triton.jit
def _preact(x_base, w_ptr, b_ptr, pos, offs_e, mask_e, L, sx_l, sx_e,
            W: tl.constexpr, HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr):
    """float32 conv output (before SiLU) at token positions pos, [len(pos), BLOCK_E]."""
    if HAS_BIAS:
        acc = tl.load(b_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :] + tl.zeros(
            [pos.shape[0], offs_e.shape[0]], dtype=tl.float32)
    else:
        acc = tl.zeros([pos.shape[0], offs_e.shape[0]], dtype=tl.float32)
    for k in tl.static_range(W):
        src = pos + _tap(k, W, REVERSE)
        m = ((src >= 0) & (src < L))[:, None] & mask_e[None, :]
        xv = tl.load(x_base + src[:, None] * sx_l + offs_e[None, :] * sx_e, mask=m, other=0.0)
        wk = tl.load(w_ptr + offs_e * W + k, mask=mask_e, other=0.0).to(tl.float32)
        acc += xv.to(tl.float32) * wk[None, :]
    return acc


@triton.jit
def _conv_silu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, L, E, sx_b, sx_l, sx_e, so_b, so_l, so_e,
                      W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
                      HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr):
    pid_l = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    acc = _preact(x_ptr + pid_b * sx_b, w_ptr, b_ptr, offs_l, offs_e, mask_e, L, sx_l, sx_e,
                  W, HAS_BIAS, REVERSE)
    out = acc * tl.sigmoid(acc)
    m = (offs_l < L)[:, None] & mask_e[None, :]
    tl.store(out_ptr + pid_b * so_b + offs_l[:, None] * so_l + offs_e[None, :] * so_e,
             out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dact(g_ptrs, g_strides, pid_b, x_base, w_ptr, b_ptr, pos, offs_e, mask_e, L, sx_l, sx_e,
          W: tl.constexpr, HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr):
    """Gradient w.r.t. the pre-activation at positions pos; 0 outside the sequence (the gradients are
    masked there), which is the zero padding seen from the backward side."""
    a = _preact(x_base, w_ptr, b_ptr, pos, offs_e, mask_e, L, sx_l, sx_e, W, HAS_BIAS, REVERSE)
    m = ((pos >= 0) & (pos < L))[:, None] & mask_e[None, :]
    g = tl.zeros([pos.shape[0], offs_e.shape[0]], dtype=tl.float32)
    for i in tl.static_range(len(g_ptrs)):
        sb, sl, se = g_strides[i]
        g += tl.load(g_ptrs[i] + pid_b * sb + pos[:, None] * sl + offs_e[None, :] * se,
                     mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    return g * sig * (1.0 + a * (1.0 - sig))


@triton.jit
def _conv_silu_bwd_kernel(x_ptr, w_ptr, b_ptr, g_ptrs, g_strides, acc_ptr, dx_ptr, part_ptr,
                          L, E, TOKENS, sx_b, sx_l, sx_e,
                          W: tl.constexpr, WP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_ACC: tl.constexpr, REVERSE: tl.constexpr):
    """One program: channel block pid_e of batch row pid_b, tokens [pid_s * TOKENS, +TOKENS). Writes dx
    (plus acc_ptr's float32 dx when HAS_ACC) and its dweight/dbias partial sums: part[(b, s), e, 0..W]."""
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    offs_k = tl.arange(0, WP)
    x_base = x_ptr + pid_b * sx_b
    # dweight / dbias: elementwise accumulators, summed over tokens once at the end (a sum over the tile's
    # rows per tile would cross warps through shared memory and a barrier, five times per tile)
    dw0 = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
    dw3 = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
    db = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
    start = pid_s * TOKENS
    for l0 in range(start, tl.minimum(start + TOKENS, L), BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        dx = tl.zeros([BLOCK_L, BLOCK_E], dtype=tl.float32)
        for k in tl.static_range(W):
            d = _dact(g_ptrs, g_strides, pid_b, x_base, w_ptr, b_ptr, offs_l - _tap(k, W, REVERSE), offs_e,
                      mask_e, L, sx_l, sx_e, W, HAS_BIAS, REVERSE)
            wk = tl.load(w_ptr + offs_e * W + k, mask=mask_e, other=0.0).to(tl.float32)
            dx += d * wk[None, :]
            if k == W - 1:   # tap 0: d is dact on this tile itself, which the weight sums need
                db += d
                for j in tl.static_range(W):
                    src = offs_l + _tap(j, W, REVERSE)
                    m = ((src >= 0) & (src < L))[:, None] & mask_e[None, :]
                    xv = tl.load(x_base + src[:, None] * sx_l + offs_e[None, :] * sx_e, mask=m, other=0.0)
                    if j == 0:
                        dw0 += d * xv.to(tl.float32)
                    elif j == 1:
                        dw1 += d * xv.to(tl.float32)
                    elif j == 2:
                        dw2 += d * xv.to(tl.float32)
                    else:
                        dw3 += d * xv.to(tl.float32)
        m = (offs_l < L)[:, None] & mask_e[None, :]
        out = (pid_b * L + offs_l[:, None]) * E + offs_e[None, :]
        if HAS_ACC:
            dx += tl.load(acc_ptr + out, mask=m, other=0.0)
        tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=m)
    dw = tl.where(offs_k[:, None] == 0, tl.sum(dw0, 0)[None, :], 0.0)
    if W > 1:
        dw += tl.where(offs_k[:, None] == 1, tl.sum(dw1, 0)[None, :], 0.0)
    if W > 2:
        dw += tl.where(offs_k[:, None] == 2, tl.sum(dw2, 0)[None, :], 0.0)
    if W > 3:
        dw += tl.where(offs_k[:, None] == 3, tl.sum(dw3, 0)[None, :], 0.0)
    part = part_ptr + ((pid_b * tl.num_programs(2) + pid_s) * E + offs_e) * (W + 1)
    tl.store(part[None, :] + offs_k[:, None], dw, mask=(offs_k < W)[:, None] & mask_e[None, :])
    tl.store(part + W, tl.sum(db, 0), mask=mask_e)


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias, reverse: bool) -> torch.Tensor:
    """SiLU(depthwise conv over tokens) of x (B, L, E), any strides -> contiguous (B, L, E) in x's dtype."""
    batch, L, E = x.shape
    w = weight.reshape(E, -1).contiguous()
    out = triton_scan._empty((batch, L, E), x.dtype, x.device)
    BLOCK_L, BLOCK_E = 32, min(128, next_pow2(E))
    grid = (cdiv(L, BLOCK_L), cdiv(E, BLOCK_E), batch)
    _conv_silu_kernel[grid](x, w, bias if bias is not None else w, out, L, E, *x.stride(), *out.stride(),
                            W=w.shape[1], BLOCK_L=BLOCK_L, BLOCK_E=BLOCK_E, HAS_BIAS=bias is not None,
                            REVERSE=reverse, num_warps=4)
    return out


def conv_silu_backward(grads: Sequence[torch.Tensor], x: torch.Tensor, weight: torch.Tensor, bias, reverse: bool,
                       dx_accum: Optional[torch.Tensor] = None, dx_dtype: Optional[torch.dtype] = None):
    """Gradients of ``conv_silu(x, weight, bias, reverse)`` given the output gradient as the sum of ``grads``
    (one or more (B, L, E) tensors, any strides and float dtypes).

    Returns (dx, dweight, dbias): dx contiguous (B, L, E) in ``dx_dtype`` (default x's dtype), plus the
    float32 ``dx_accum`` (contiguous (B, L, E)) when given; dweight float32 shaped like ``weight``; dbias
    float32 (E,), or None without a bias.
    """
    batch, L, E = x.shape
    w = weight.reshape(E, -1).contiguous()
    W = w.shape[1]
    if W > 4:
        raise ValueError(f"the Triton conv backward handles kernel widths up to 4 (Vim's d_conv), got {W}; "
                         "use backend='reference'")
    if dx_accum is not None and (dx_accum.dtype != torch.float32 or not dx_accum.is_contiguous()
                                 or dx_accum.shape != x.shape):
        raise ValueError("dx_accum must be a contiguous float32 tensor shaped like x")
    dx = triton_scan._empty((batch, L, E), dx_dtype or x.dtype, x.device)
    n_e = cdiv(E, BWD_BLOCK_E)
    tiles = cdiv(L, BWD_BLOCK_L)
    n_split = min(tiles, cdiv(BWD_TARGET_PROGRAMS, n_e * batch))
    tokens = cdiv(tiles, n_split) * BWD_BLOCK_L
    n_split = cdiv(L, tokens)
    part = triton_scan._empty((batch * n_split, E, W + 1), torch.float32, x.device)
    _conv_silu_bwd_kernel[(n_e, batch, n_split)](
        x, w, bias if bias is not None else w, tuple(grads), tuple(g.stride() for g in grads),
        dx_accum if dx_accum is not None else dx, dx, part, L, E, tokens, *x.stride(),
        W=W, WP=next_pow2(W), BLOCK_L=BWD_BLOCK_L, BLOCK_E=BWD_BLOCK_E,
        HAS_BIAS=bias is not None, HAS_ACC=dx_accum is not None, REVERSE=reverse, num_warps=BWD_NUM_WARPS)
    part = part.sum(0)   # (E, W + 1); the copies below keep the returned gradients from aliasing
    dbias = part[:, W].contiguous() if bias is not None else None
    return dx, part[:, :W].reshape(weight.shape).contiguous(), dbias
