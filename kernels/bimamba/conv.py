"""Depthwise conv + SiLU over tokens (forward and backward) in Triton, for the fused bidirectional mixer.

Causal: ``out[l] = silu(b + sum_k w[k] x[l + k - (W-1)])``; anti-causal (``reverse``, the backward scan
direction): ``out[l] = silu(b + sum_k w[k] x[l + (W-1-k)])``, zero padding in both. x is read in place
with any strides (the model passes a half of in_proj's output), so no contiguous copy exists.

Forward: ``conv_silu_pair`` (the mixer's) gives both directions from one launch as an ascending walk per program over
a 4-token window of x held in registers, the backward's structure run forwards: each token of x is loaded once and
both outputs are written once (docs/kernels.md, v44). ``conv_silu`` (one direction) and the pair where x's channels
are strided run as tiles of [tokens, channels], each tap a shifted load of the tile that hits L1 after the first. The
taps come tap-major, (W, E) float32 (the mixer derives them with its other weights); the tiles load them as broadcast
tiles in the x tile's own layout, which no vector load gets (docs/kernels.md, v32).

Backward: one ascending walk over the tokens per program, for one or both directions of the same x
(``conv_silu_backward_pair``). The pre-activation is recomputed from a 4-token window of x held in
registers, never stored; each direction keeps its last three dact values in registers too, so dx at a
token (which needs dact at the 4 tokens its taps reach) is finished 3 tokens later, both directions'
contributions summed before the one write of dx in its final dtype. x and each gradient are read about
once (a 3-token halo per segment of ``BWD_SEG``), nothing is re-read per tap and no float32 dx buffer
travels between the directions. The output gradient arrives as several tensors (scan du and the x_proj
input gradient) that are summed in float32 in-kernel. dweight and dbias are summed in registers over a
program's stretch of tokens and leave through a small per-program buffer that a second launch reduces into the
returned gradients: one write per program instead of contended atomics, and a deterministic result.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..host_math import cdiv, next_pow2
from ..launch import cached_launch
from ..selective_scan import triton_scan

# Backward launch: a program owns BWD_BLOCK_E channels of one batch row and walks its stretch of tokens
# in segments of BWD_SEG (unrolled); sequences are split over programs only to reach about
# BWD_TARGET_PROGRAMS. Each segment re-reads a 3-token halo, so longer segments waste less. Chosen by the
# H100 sweep of session 7 (docs/kernels.md, v8; `tools/benchmark_kernels.py --sweep`): 2 warps (two
# channels per thread, 130 registers in the sm_90 SASS) beat 4 warps by 9-11% at every shape swept
# ((128|256, 197, 384), (128, 197, 768), (8, 6085, 384)) and was fastest at the three larger ones; at the
# smallest, 1024 programs or 64 channels at 2 warps were 9% faster, and 9-58% slower at the others.
BWD_TARGET_PROGRAMS = 2048
BWD_SEG, BWD_BLOCK_E, BWD_NUM_WARPS = 32, 128, 2
# Positions ahead whose rows the backward walk loads before the current position's store (0-2; see the kernel).
# ptxas keeps a load behind an earlier store that may alias it, so without lookahead every step waits a full load
# latency after the previous dx store. 2 was fastest on the H200 (session 17, docs/kernels.md v24): vim_tiny's
# training step at bs 128 39.82 -> 38.82 ms, 1 gave 39.26; 146 -> 154 registers (triton 3.6), 6 programs per SM.
BWD_LOOKAHEAD = 2
# Forward launches: [FWD_BLOCK_L tokens, FWD_BLOCK_E channels] tiles (PAIR_*: both directions in one launch). The
# pair's tile is the H200 sweep's best of session 14 (docs/kernels.md, v19): 16 x 64 at 2 warps and 16 x 128 at 4
# (16 elements per thread) tie, first at every shape; more warps or tokens per program ran 1.2-3x slower.
FWD_BLOCK_L, FWD_BLOCK_E, FWD_NUM_WARPS = 32, 128, 4
PAIR_BLOCK_L, PAIR_BLOCK_E, PAIR_NUM_WARPS = 16, 64, 2
# The pair as one walk over a window of x per program (``_conv_silu_pair_walk_kernel``) instead of tiles; it needs x's
# channels at unit stride and kernels up to TAPS wide (else the tiles). A program: WALK_BLOCK_E channels of one batch
# row, at least WALK_MIN_TOKENS tokens, sequences split over programs only to reach about WALK_TARGET_PROGRAMS. Chosen
# in vim_tiny's inference step on an H200 (session 36, docs/kernels.md v44): 2 warps with 4 rows ahead 0.914 ms for the
# 24 launches, 1 warp (4 channels a thread, 80 registers) 0.976, 8 rows ahead (no longer offered) 0.916, the tiles
# 1.183.
PAIR_WALK = True
WALK_BLOCK_E, WALK_NUM_WARPS, WALK_SEG, WALK_LOOKAHEAD = 128, 2, 8, 4
WALK_TARGET_PROGRAMS, WALK_MIN_TOKENS = 4096, 16
TAPS = 4   # the backward walks a 4-token window; narrower kernels are padded with leading zero taps
_TAPS = tl.constexpr(TAPS)   # the same, for the kernels
# Tiles of the partials' reduction (_conv_grad_sum_kernel): 32 channels per program, so that E=384 makes 120
# programs instead of 30; at 128 channels a few SMs read all the partials and the reduction took ~15 us per layer
# (session 16, docs/kernels.md v23: the backward pair 227.6 -> 197.2 us at (256, 197, 384)).
SUM_BLOCK_P, SUM_BLOCK_E = 256, 32


@triton.jit
def _tap(k, W: tl.constexpr, REVERSE: tl.constexpr):
    """Offset of the token that weight k reads, relative to the output token."""
    if REVERSE:
        return W - 1 - k
    else:
        return k - (W - 1)


@triton.jit
def _preact(x_base, w_ptr, b_ptr, pos, offs_e, mask_e, L, E, sx_l, sx_e,
            W: tl.constexpr, HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, EVEN_E: tl.constexpr):
    """float32 conv output (before SiLU) at token positions pos, [len(pos), BLOCK_E]. w_ptr: the (W, E) taps."""
    # the taps and the bias as [len(pos), BLOCK_E] tiles (each row the same): loaded in the tile's own layout, where
    # a [BLOCK_E] vector would be converted to it through shared memory, with a barrier, per tap
    rows = (pos * 0)[:, None]
    if HAS_BIAS:
        if EVEN_E:
            acc = tl.load(b_ptr + offs_e[None, :] + rows).to(tl.float32)
        else:
            acc = tl.load(b_ptr + offs_e[None, :] + rows, mask=mask_e[None, :], other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([pos.shape[0], offs_e.shape[0]], dtype=tl.float32)
    for k in tl.static_range(W):
        src = pos + _tap(k, W, REVERSE)
        if EVEN_E:
            m = ((src >= 0) & (src < L))[:, None]
            wk = tl.load(w_ptr + k * E + offs_e[None, :] + rows).to(tl.float32)
        else:
            m = ((src >= 0) & (src < L))[:, None] & mask_e[None, :]
            wk = tl.load(w_ptr + k * E + offs_e[None, :] + rows, mask=mask_e[None, :], other=0.0).to(tl.float32)
        xv = tl.load(x_base + src[:, None] * sx_l + offs_e[None, :] * sx_e, mask=m, other=0.0)
        acc += xv.to(tl.float32) * wk
    return acc


@triton.jit
def _conv_silu_tile(x_ptr, w_ptr, b_ptr, out_ptr, L, E, sx_b, sx_l, sx_e, so_b, so_l, so_e,
                    W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
                    HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, ASM: tl.constexpr, EVEN_E: tl.constexpr):
    """silu(conv(x)) of the program's [BLOCK_L tokens, BLOCK_E channels] tile, stored into out."""
    pid_l = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    acc = _preact(x_ptr + pid_b * sx_b, w_ptr, b_ptr, offs_l, offs_e, mask_e, L, E, sx_l, sx_e,
                  W, HAS_BIAS, REVERSE, EVEN_E)
    out = acc * triton_scan._sigmoid(acc, ASM)
    if EVEN_E:
        m = (offs_l < L)[:, None]
    else:
        m = (offs_l < L)[:, None] & mask_e[None, :]
    tl.store(out_ptr + pid_b * so_b + offs_l[:, None] * so_l + offs_e[None, :] * so_e,
             out.to(out_ptr.dtype.element_ty), mask=m)


@cached_launch
@triton.jit
def _conv_silu_kernel(x_ptr, w_ptr, b_ptr, out_ptr, L, E, sx_b, sx_l, sx_e, so_b, so_l, so_e,
                      W: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
                      HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, ASM: tl.constexpr, EVEN_E: tl.constexpr):
    _conv_silu_tile(x_ptr, w_ptr, b_ptr, out_ptr, L, E, sx_b, sx_l, sx_e, so_b, so_l, so_e,
                    W, BLOCK_L, BLOCK_E, HAS_BIAS, REVERSE, ASM, EVEN_E)


@cached_launch
@triton.jit
def _conv_silu_pair_kernel(x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, of_ptr, ob_ptr, L, E, sx_b, sx_l, sx_e,
                           so_b, so_l, so_e, WF: tl.constexpr, WB: tl.constexpr, BLOCK_L: tl.constexpr,
                           BLOCK_E: tl.constexpr, HAS_BIAS_F: tl.constexpr, HAS_BIAS_B: tl.constexpr,
                           ASM: tl.constexpr, EVEN_E: tl.constexpr):
    """Both directions of ``_conv_silu_kernel`` on one tile of x (the compiler shares their index arithmetic; every
    shifted load after the first, the offset-0 tile's second included, hits L1). The causal output is stored before
    the anti-causal one is accumulated, so one float32 tile is live at a time."""
    _conv_silu_tile(x_ptr, wf_ptr, bf_ptr, of_ptr, L, E, sx_b, sx_l, sx_e, so_b, so_l, so_e,
                    WF, BLOCK_L, BLOCK_E, HAS_BIAS_F, False, ASM, EVEN_E)
    _conv_silu_tile(x_ptr, wb_ptr, bb_ptr, ob_ptr, L, E, sx_b, sx_l, sx_e, so_b, so_l, so_e,
                    WB, BLOCK_L, BLOCK_E, HAS_BIAS_B, True, ASM, EVEN_E)



@triton.jit
def _window_row(base, pos, offs_e, mask_e, L, s_l, EVEN_E: tl.constexpr):
    """x at one token as float32, 0 outside [0, L); unit channel stride (the walk's loads are then vectors)."""
    if EVEN_E:
        m = (pos >= 0) & (pos < L)
    else:
        m = mask_e & (pos >= 0) & (pos < L)
    return tl.load(base + pos * s_l + offs_e, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _window_preact(b, w0, w1, w2, w3, x0, x1, x2, x3, W: tl.constexpr):
    """b + w0 x0 + w1 x1 + w2 x2 + w3 x3 in the tiles' order, the padding taps of a kernel narrower than 4 left out
    (so a non-finite x they would meet gives what the tiles give)."""
    a = b
    if W >= 4:
        a += w0 * x0
    if W >= 3:
        a += w1 * x1
    if W >= 2:
        a += w2 * x2
    return a + w3 * x3


@cached_launch
@triton.jit
def _conv_silu_pair_walk_kernel(x_ptr, wf_ptr, bf_ptr, wb_ptr, bb_ptr, of_ptr, ob_ptr, L, E, TOKENS, sx_b, sx_l,
                                so_b, so_l, WF: tl.constexpr, WB: tl.constexpr, SEG: tl.constexpr,
                                BLOCK_E: tl.constexpr, HAS_BIAS_F: tl.constexpr, HAS_BIAS_B: tl.constexpr,
                                ASM: tl.constexpr, EVEN_E: tl.constexpr, LOOKAHEAD: tl.constexpr):
    """Both directions' conv + SiLU as one ascending walk over a window of x, the backward's structure
    (``_conv_silu_bwd_kernel``) run forwards: at position p the window holds x[p-3..p], from which the causal output
    at p and the anti-causal one at p - 3 are finished. Each token of x is loaded once (plus a 3-token halo at each
    end of the program's stretch), where the tiles re-read every row once per tap and direction from L1.

    One program: channel block pid_e of batch row pid_b, outputs [pid_s * TOKENS, +TOKENS), walked SEG positions at a
    time. LOOKAHEAD (1-4): the row of position p + LOOKAHEAD is loaded at step p, ahead of step p's stores, which
    ptxas keeps every later load behind. The sums are taken in the tiles' order, so the results are the same bits."""
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    x_base = x_ptr + pid_b * sx_b
    of_base = of_ptr + pid_b * so_b + offs_e
    ob_base = ob_ptr + pid_b * so_b + offs_e
    zero = tl.zeros([BLOCK_E], dtype=tl.float32)
    # the forward's taps are tap-major, (W, E)
    wf0, wf1, wf2, wf3, bf = _taps(wf_ptr, bf_ptr, offs_e, mask_e, WF, HAS_BIAS_F, 1, E)
    wb0, wb1, wb2, wb3, bb = _taps(wb_ptr, bb_ptr, offs_e, mask_e, WB, HAS_BIAS_B, 1, E)
    start = pid_s * TOKENS
    end = tl.minimum(start + TOKENS, L)
    xm3 = _window_row(x_base, start - 3, offs_e, mask_e, L, sx_l, EVEN_E)
    xm2 = _window_row(x_base, start - 2, offs_e, mask_e, L, sx_l, EVEN_E)
    xm1 = _window_row(x_base, start - 1, offs_e, mask_e, L, sx_l, EVEN_E)
    # the rows of the next LOOKAHEAD positions, nearest first (those past LOOKAHEAD stay zero, unused)
    r1 = _window_row(x_base, start, offs_e, mask_e, L, sx_l, EVEN_E)
    r2 = _window_row(x_base, start + 1, offs_e, mask_e, L, sx_l, EVEN_E) if LOOKAHEAD >= 2 else zero
    r3 = _window_row(x_base, start + 2, offs_e, mask_e, L, sx_l, EVEN_E) if LOOKAHEAD >= 3 else zero
    r4 = _window_row(x_base, start + 3, offs_e, mask_e, L, sx_l, EVEN_E) if LOOKAHEAD >= 4 else zero
    for s0 in range(start, end + 3, SEG):
        for i in tl.static_range(SEG):
            p = s0 + i
            x0 = r1
            ahead = _window_row(x_base, p + LOOKAHEAD, offs_e, mask_e, L, sx_l, EVEN_E)
            r1, r2, r3 = r2, r3, r4
            if LOOKAHEAD == 1:
                r1 = ahead
            elif LOOKAHEAD == 2:
                r2 = ahead
            elif LOOKAHEAD == 3:
                r3 = ahead
            else:
                r4 = ahead
            # causal at p: b + w0 x[p-3] + w1 x[p-2] + w2 x[p-1] + w3 x[p]
            a = _window_preact(bf, wf0, wf1, wf2, wf3, xm3, xm2, xm1, x0, WF)
            y = a * triton_scan._sigmoid(a, ASM)
            if EVEN_E:
                m = p < end
            else:
                m = mask_e & (p < end)
            tl.store(of_base + p * so_l, y.to(of_ptr.dtype.element_ty), mask=m)
            # anti-causal at q = p - 3: b + w0 x[q+3] + w1 x[q+2] + w2 x[q+1] + w3 x[q]
            a = _window_preact(bb, wb0, wb1, wb2, wb3, x0, xm1, xm2, xm3, WB)
            y = a * triton_scan._sigmoid(a, ASM)
            q = p - 3
            if EVEN_E:
                m = (q >= start) & (q < end)
            else:
                m = mask_e & (q >= start) & (q < end)
            tl.store(ob_base + q * so_l, y.to(ob_ptr.dtype.element_ty), mask=m)
            xm3, xm2, xm1 = xm2, xm1, x0

@triton.jit
def _row(base, pos, offs_e, mask_e, L, s_l, s_e):
    """float32 values of one token's channels, 0 outside [0, L) (the conv's zero padding)."""
    m = mask_e & (pos >= 0) & (pos < L)
    return tl.load(base + pos * s_l + offs_e * s_e, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _grad_row(g_ptrs, g_strides, pid_b, pos, offs_e, mask_e, L):
    """The output gradient at one token: the float32 sum of the incoming gradient tensors."""
    g = tl.zeros([offs_e.shape[0]], dtype=tl.float32)
    for i in tl.static_range(len(g_ptrs)):
        sb, sl, se = g_strides[i]
        g += _row(g_ptrs[i] + pid_b * sb, pos, offs_e, mask_e, L, sl, se)
    return g


@triton.jit
def _step_rows(x_base, gf_ptrs, gf_strides, gb_ptrs, gb_strides, pid_b, p, offs_e, mask_e, L, sx_l, sx_e,
               HAS_F: tl.constexpr, HAS_B: tl.constexpr):
    """What the backward walk reads at position p: x[p], the causal gradient at p, the anti-causal one at p - 3."""
    x0 = _row(x_base, p, offs_e, mask_e, L, sx_l, sx_e)
    if HAS_F:
        gf = _grad_row(gf_ptrs, gf_strides, pid_b, p, offs_e, mask_e, L)
    else:
        gf = tl.zeros([offs_e.shape[0]], dtype=tl.float32)
    if HAS_B:
        gb = _grad_row(gb_ptrs, gb_strides, pid_b, p - 3, offs_e, mask_e, L)
    else:
        gb = tl.zeros([offs_e.shape[0]], dtype=tl.float32)
    return x0, gf, gb


@triton.jit
def _silu_backward(a, g, ASM: tl.constexpr):
    """d silu(a) / da times g; on the GPU the sigmoid's reciprocal is one MUFU.RCP (triton_scan._rcp)."""
    sig = triton_scan._sigmoid(a, ASM)
    return g * sig * (1.0 + a * (1.0 - sig))


@triton.jit
def _tap4(w_ptr, k: tl.constexpr, offs_e, mask_e, W: tl.constexpr, s_e, s_k):
    """Tap k of a W-tap kernel right-aligned in 4, float32 per channel: the leading 4 - W taps are zero, which
    changes nothing in either direction (tap k of 4 reads the token that tap k - (4 - W) of W reads)."""
    if k < _TAPS - W:
        w = tl.zeros([offs_e.shape[0]], dtype=tl.float32)
    else:
        w = tl.load(w_ptr + offs_e * s_e + (k - (_TAPS - W)) * s_k, mask=mask_e, other=0.0).to(tl.float32)
    return w


@triton.jit
def _taps(w_ptr, b_ptr, offs_e, mask_e, W: tl.constexpr, HAS_BIAS: tl.constexpr, s_e, s_k):
    """The 4 (padded) weights and the bias of a direction, float32 per channel; w_ptr's strides (channel, tap):
    (W, 1) for the (E, W) weight the backward takes, (1, E) for the forward's tap-major (W, E) taps."""
    w0 = _tap4(w_ptr, 0, offs_e, mask_e, W, s_e, s_k)
    w1 = _tap4(w_ptr, 1, offs_e, mask_e, W, s_e, s_k)
    w2 = _tap4(w_ptr, 2, offs_e, mask_e, W, s_e, s_k)
    w3 = _tap4(w_ptr, 3, offs_e, mask_e, W, s_e, s_k)
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([offs_e.shape[0]], dtype=tl.float32)
    return w0, w1, w2, w3, b


@cached_launch
@triton.jit
def _conv_silu_bwd_kernel(x_ptr, wf_ptr, bf_ptr, gf_ptrs, gf_strides, wb_ptr, bb_ptr, gb_ptrs, gb_strides,
                          dx_ptr, part_ptr, L, E, TOKENS, sx_b, sx_l, sx_e, sdx_b, sdx_l,
                          SEG: tl.constexpr, BLOCK_E: tl.constexpr, WF: tl.constexpr, WB: tl.constexpr,
                          HAS_F: tl.constexpr, HAS_B: tl.constexpr,
                          HAS_BIAS_F: tl.constexpr, HAS_BIAS_B: tl.constexpr, ASM: tl.constexpr,
                          LOOKAHEAD: tl.constexpr):
    """Backward of the causal (f) and/or anti-causal (b) conv + SiLU of the same x, in one ascending walk.

    One program: channel block pid_e of batch row pid_b, tokens [pid_s * TOKENS, +TOKENS), SEG tokens at a
    time. At walk position p the window holds x[p-3..p]; the causal direction's dact at p and the
    anti-causal one's at p-3 (whose window is x[p-3..p] too) come from it, each with its last three dact
    values kept in registers, so dx[p-3] of both directions is complete at p: every tensor is read once per
    token (plus a 3-token halo per segment) and dx is written once, in its final dtype. dweight and dbias
    are summed in registers and leave through part[(b, s), dir, 0..4, e]: one write per program, reduced by
    ``_conv_grad_sum_kernel`` (deterministic, no atomics).

    LOOKAHEAD (0-2): the rows of position p + LOOKAHEAD are loaded at the start of step p, before its dx store.
    ptxas does not move a load above a store it cannot tell apart from it, so without this every step's loads
    wait behind the previous step's store and each step pays a full load latency."""
    pid_e = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    x_base = x_ptr + pid_b * sx_b
    zero = tl.zeros([BLOCK_E], dtype=tl.float32)
    if HAS_F:
        wf0, wf1, wf2, wf3, bf = _taps(wf_ptr, bf_ptr, offs_e, mask_e, WF, HAS_BIAS_F, WF, 1)
    if HAS_B:
        wb0, wb1, wb2, wb3, bb = _taps(wb_ptr, bb_ptr, offs_e, mask_e, WB, HAS_BIAS_B, WB, 1)
    # weight / bias gradient sums, f then b
    sf0, sf1, sf2, sf3, sfb = zero, zero, zero, zero, zero
    sb0, sb1, sb2, sb3, sbb = zero, zero, zero, zero, zero
    start = pid_s * TOKENS
    for l0 in range(start, tl.minimum(start + TOKENS, L), SEG):
        xm3 = _row(x_base, l0 - 3, offs_e, mask_e, L, sx_l, sx_e)
        xm2 = _row(x_base, l0 - 2, offs_e, mask_e, L, sx_l, sx_e)
        xm1 = _row(x_base, l0 - 1, offs_e, mask_e, L, sx_l, sx_e)
        df1, df2, df3 = zero, zero, zero   # causal dact at p-1, p-2, p-3
        db1, db2, db3 = zero, zero, zero   # anti-causal dact at p-4, p-5, p-6
        if LOOKAHEAD >= 1:   # the rows one and two positions ahead
            x_1, gf_1, gb_1 = _step_rows(x_base, gf_ptrs, gf_strides, gb_ptrs, gb_strides, pid_b, l0, offs_e, mask_e,
                                         L, sx_l, sx_e, HAS_F, HAS_B)
        if LOOKAHEAD >= 2:
            x_2, gf_2, gb_2 = _step_rows(x_base, gf_ptrs, gf_strides, gb_ptrs, gb_strides, pid_b, l0 + 1, offs_e,
                                         mask_e, L, sx_l, sx_e, HAS_F, HAS_B)
        for i in tl.static_range(SEG + 3):
            p = l0 + i
            if LOOKAHEAD == 0:
                x0, gf, gb = _step_rows(x_base, gf_ptrs, gf_strides, gb_ptrs, gb_strides, pid_b, p, offs_e, mask_e,
                                        L, sx_l, sx_e, HAS_F, HAS_B)
            else:
                x0, gf, gb = x_1, gf_1, gb_1
                if LOOKAHEAD == 1:
                    if i + 1 < SEG + 3:
                        x_1, gf_1, gb_1 = _step_rows(x_base, gf_ptrs, gf_strides, gb_ptrs, gb_strides, pid_b, p + 1,
                                                     offs_e, mask_e, L, sx_l, sx_e, HAS_F, HAS_B)
                else:
                    x_1, gf_1, gb_1 = x_2, gf_2, gb_2
                    if i + 2 < SEG + 3:
                        x_2, gf_2, gb_2 = _step_rows(x_base, gf_ptrs, gf_strides, gb_ptrs, gb_strides, pid_b, p + 2,
                                                     offs_e, mask_e, L, sx_l, sx_e, HAS_F, HAS_B)
            dx = zero
            if HAS_F:   # causal: a[p] = b + w0 x[p-3] + w1 x[p-2] + w2 x[p-1] + w3 x[p]
                a = bf + wf0 * xm3 + wf1 * xm2 + wf2 * xm1 + wf3 * x0
                d = _silu_backward(a, gf, ASM)
                if i < SEG:
                    sf0 += d * xm3
                    sf1 += d * xm2
                    sf2 += d * xm1
                    sf3 += d * x0
                    sfb += d
                dx += wf0 * d + wf1 * df1 + wf2 * df2 + wf3 * df3    # dx[p-3] = sum_k w_k dact[p-3+3-k]
                df1, df2, df3 = d, df1, df2
            if HAS_B:   # anti-causal at q = p-3: a[q] = b + w0 x[q+3] + w1 x[q+2] + w2 x[q+1] + w3 x[q]
                a = bb + wb0 * x0 + wb1 * xm1 + wb2 * xm2 + wb3 * xm3
                d = _silu_backward(a, gb, ASM)
                if i >= 3:
                    sb0 += d * x0
                    sb1 += d * xm1
                    sb2 += d * xm2
                    sb3 += d * xm3
                    sbb += d
                dx += wb0 * db3 + wb1 * db2 + wb2 * db1 + wb3 * d    # dx[q] = sum_k w_k dact[q-3+k]
                db1, db2, db3 = d, db1, db2
            if i >= 3:
                s = p - 3
                tl.store(dx_ptr + pid_b * sdx_b + s * sdx_l + offs_e, dx.to(dx_ptr.dtype.element_ty),
                         mask=mask_e & (s < L))
            xm3, xm2, xm1 = xm2, xm1, x0
    part = part_ptr + (pid_b * tl.num_programs(2) + pid_s) * 10 * E + offs_e
    if HAS_F:
        tl.store(part, sf0, mask=mask_e)
        tl.store(part + E, sf1, mask=mask_e)
        tl.store(part + 2 * E, sf2, mask=mask_e)
        tl.store(part + 3 * E, sf3, mask=mask_e)
        tl.store(part + 4 * E, sfb, mask=mask_e)
    if HAS_B:
        tl.store(part + 5 * E, sb0, mask=mask_e)
        tl.store(part + 6 * E, sb1, mask=mask_e)
        tl.store(part + 7 * E, sb2, mask=mask_e)
        tl.store(part + 8 * E, sb3, mask=mask_e)
        tl.store(part + 9 * E, sbb, mask=mask_e)


@cached_launch
@triton.jit
def _conv_grad_sum_kernel(part_ptr, P, E, dwf_ptr, dbf_ptr, dwb_ptr, dbb_ptr, WF: tl.constexpr, WB: tl.constexpr,
                          HAS_F: tl.constexpr, HAS_B: tl.constexpr, HAS_BIAS_F: tl.constexpr,
                          HAS_BIAS_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """Sum of the backward's per-program partials part (P, 2, 5, E) over P, written straight into the weight
    gradients in their own layouts ((E, W) float32 per direction, its padding taps dropped) and the bias
    gradients: one launch where torch needed a reduction and a copy per returned tensor. Program (pid_e, j):
    row j of the (2, 5) block, i.e. direction j // 5, tap j % 5 (4: the bias)."""
    pid_e = tl.program_id(0)
    j = tl.program_id(1)
    d = j // 5
    k = j % 5
    if d == 0:
        wanted = HAS_F & (((k < _TAPS) & (k >= _TAPS - WF)) | ((k == _TAPS) & HAS_BIAS_F))
    else:
        wanted = HAS_B & (((k < _TAPS) & (k >= _TAPS - WB)) | ((k == _TAPS) & HAS_BIAS_B))
    if wanted:
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        rows = tl.arange(0, BLOCK_P)
        acc = tl.zeros([BLOCK_P, BLOCK_E], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            m = ((p0 + rows) < P)[:, None] & mask_e[None, :]
            acc += tl.load(part_ptr + (p0 + rows)[:, None].to(tl.int64) * (10 * E) + j * E + offs_e[None, :],
                           mask=m, other=0.0)
        total = tl.sum(acc, axis=0)
        if d == 0:
            if k == _TAPS:
                tl.store(dbf_ptr + offs_e, total, mask=mask_e)
            else:
                tl.store(dwf_ptr + offs_e * WF + (k - (_TAPS - WF)), total, mask=mask_e)
        else:
            if k == _TAPS:
                tl.store(dbb_ptr + offs_e, total, mask=mask_e)
            else:
                tl.store(dwb_ptr + offs_e * WB + (k - (_TAPS - WB)), total, mask=mask_e)


def _tap_major(weight: torch.Tensor, E: int, taps: Optional[torch.Tensor]) -> torch.Tensor:
    """The (W, E) float32 contiguous taps the forward kernels load: ``taps`` as given (the mixer derives them with its
    other weights, ``weights.derive_weights``), else the (E, 1, W) or (E, W) weight transposed (a small copy)."""
    if taps is not None:
        if taps.dim() != 2 or taps.shape[1] != E or taps.dtype != torch.float32 or not taps.is_contiguous():
            raise ValueError(f"taps must be contiguous float32 (W, {E}), got {taps.dtype} {tuple(taps.shape)}")
        return taps
    return weight.reshape(E, -1).t().float().contiguous()


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias, reverse: bool,
              taps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SiLU(depthwise conv over tokens) of x (B, L, E), any strides -> contiguous (B, L, E) in x's dtype. ``taps``:
    the weight already as (W, E) float32 (``_tap_major``)."""
    batch, L, E = x.shape
    w = _tap_major(weight, E, taps)
    out = triton_scan._empty((batch, L, E), x.dtype, x.device)
    BLOCK_L, BLOCK_E = FWD_BLOCK_L, min(FWD_BLOCK_E, next_pow2(E))
    grid = (cdiv(L, BLOCK_L), cdiv(E, BLOCK_E), batch)
    _conv_silu_kernel[grid](x, w, bias if bias is not None else w, out, L, E, *x.stride(), *out.stride(),
                            W=w.shape[0], BLOCK_L=BLOCK_L, BLOCK_E=BLOCK_E, HAS_BIAS=bias is not None,
                            REVERSE=reverse, ASM=triton_scan._use_asm(x), EVEN_E=E % BLOCK_E == 0,
                            num_warps=FWD_NUM_WARPS)
    return out


def conv_silu_pair(x: torch.Tensor, weight_f: torch.Tensor, bias_f, weight_b: torch.Tensor, bias_b,
                   taps: Optional[Sequence[torch.Tensor]] = None):
    """``(conv_silu(x, weight_f, bias_f, False), conv_silu(x, weight_b, bias_b, True))`` in one launch that reads x
    from memory once for both directions: a walk over a window of x (``PAIR_WALK``, x's channels at unit stride), else
    tiles whose shifted loads after the first hit L1. The same arithmetic as ``conv_silu``, so the same bits.
    ``taps``: both weights already as (W, E) float32 (``_tap_major``)."""
    batch, L, E = x.shape
    wf = _tap_major(weight_f, E, taps[0] if taps is not None else None)
    wb = _tap_major(weight_b, E, taps[1] if taps is not None else None)
    out_f = triton_scan._empty((batch, L, E), x.dtype, x.device)
    out_b = triton_scan._empty((batch, L, E), x.dtype, x.device)
    if PAIR_WALK and x.stride(-1) == 1 and wf.shape[0] <= TAPS and wb.shape[0] <= TAPS:
        if batch * L * E:
            block_e = min(WALK_BLOCK_E, next_pow2(E))
            n_e = cdiv(E, block_e)
            n_split = max(1, min(cdiv(L, WALK_MIN_TOKENS), cdiv(WALK_TARGET_PROGRAMS, n_e * batch)))
            # a stretch walks tokens + 3 positions in whole segments: sized to fill its last one
            tokens = cdiv(cdiv(L, n_split) + 3, WALK_SEG) * WALK_SEG - 3
            _conv_silu_pair_walk_kernel[(n_e, batch, cdiv(L, tokens))](
                x, wf, bias_f if bias_f is not None else wf, wb, bias_b if bias_b is not None else wb, out_f, out_b,
                L, E, tokens, x.stride(0), x.stride(1), out_f.stride(0), out_f.stride(1), WF=wf.shape[0],
                WB=wb.shape[0], SEG=WALK_SEG, BLOCK_E=block_e, HAS_BIAS_F=bias_f is not None,
                HAS_BIAS_B=bias_b is not None, ASM=triton_scan._use_asm(x), EVEN_E=E % block_e == 0,
                LOOKAHEAD=WALK_LOOKAHEAD, num_warps=WALK_NUM_WARPS)
        return out_f, out_b
    BLOCK_L, BLOCK_E = PAIR_BLOCK_L, min(PAIR_BLOCK_E, next_pow2(E))
    grid = (cdiv(L, BLOCK_L), cdiv(E, BLOCK_E), batch)
    _conv_silu_pair_kernel[grid](x, wf, bias_f if bias_f is not None else wf, wb, bias_b if bias_b is not None else wb,
                                 out_f, out_b, L, E, *x.stride(), *out_f.stride(), WF=wf.shape[0], WB=wb.shape[0],
                                 BLOCK_L=BLOCK_L, BLOCK_E=BLOCK_E, HAS_BIAS_F=bias_f is not None,
                                 HAS_BIAS_B=bias_b is not None, ASM=triton_scan._use_asm(x),
                                 EVEN_E=E % BLOCK_E == 0, num_warps=PAIR_NUM_WARPS)
    return out_f, out_b


class ConvGrad(NamedTuple):
    """One direction of ``conv_silu_backward``: its output gradient as a sum of tensors, and its conv."""

    grads: Sequence[torch.Tensor]   # (B, L, E) each, any strides and float dtypes; summed in float32
    weight: torch.Tensor            # (E, 1, W) or (E, W), W <= 4
    bias: Optional[torch.Tensor]    # (E,)


def _tap_weights(weight: torch.Tensor, E: int) -> torch.Tensor:
    """(E, W) view of a (E, 1, W) or (E, W) conv weight (a copy only if its taps are not contiguous), W <= 4."""
    w = weight.reshape(E, -1)
    if w.shape[1] > TAPS:
        raise ValueError(f"the Triton conv backward handles kernel widths up to {TAPS} (Vim's d_conv), "
                         f"got {w.shape[1]}; use backend='reference'")
    return w.contiguous()


def conv_silu_backward_pair(causal: Optional[ConvGrad], anticausal: Optional[ConvGrad], x: torch.Tensor,
                            dx_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None):
    """Gradients of ``conv_silu(x, w_f, b_f, False)`` and ``conv_silu(x, w_b, b_b, True)`` (either may be
    None) given their output gradients, in one pass over x: both directions share x, so their input
    gradients are summed in registers and dx is written once.

    Returns (dx, (dweight_f, dbias_f), (dweight_b, dbias_b)): dx contiguous (B, L, E) in ``dx_dtype``
    (default x's dtype), or written into ``out`` ((B, L, E) with unit channel stride, e.g. a half of a wider
    gradient buffer); dweight float32 shaped like its weight, dbias float32 (E,) or None without a bias;
    None in place of an absent direction's pair.
    """
    if causal is None and anticausal is None:
        raise ValueError("conv_silu_backward_pair needs at least one direction")
    batch, L, E = x.shape
    dirs = (causal, anticausal)
    taps = [_tap_weights(d.weight, E) if d is not None else None for d in dirs]
    if out is not None:
        if out.shape != x.shape or out.stride(-1) != 1 or out.dtype != (dx_dtype or x.dtype):
            raise ValueError(f"out must be a {tuple(x.shape)} {dx_dtype or x.dtype} tensor with unit channel stride, "
                             f"got {tuple(out.shape)} {out.dtype} with strides {out.stride()}")
        dx = out
    else:
        dx = triton_scan._empty((batch, L, E), dx_dtype or x.dtype, x.device)
    n_e = cdiv(E, BWD_BLOCK_E)
    segs = cdiv(L, BWD_SEG)
    n_split = max(1, min(segs, cdiv(BWD_TARGET_PROGRAMS, max(1, n_e * batch))))
    tokens = max(1, cdiv(segs, n_split)) * BWD_SEG   # an empty batch or sequence launches no program
    n_split = cdiv(L, tokens)
    part = triton_scan._empty((batch * n_split, 2, 5, E), torch.float32, x.device)
    args = []
    for d, w in zip(dirs, taps):
        if d is None:   # placeholders of the absent direction, never read (HAS_F / HAS_B false)
            args += [x, x, (x,), ((0, 0, 0),)]
        else:
            args += [w, d.bias if d.bias is not None else w, tuple(d.grads), tuple(g.stride() for g in d.grads)]
    widths = [w.shape[1] if w is not None else TAPS for w in taps]
    _conv_silu_bwd_kernel[(n_e, batch, n_split)](
        x, *args, dx, part, L, E, tokens, *x.stride(), dx.stride(0), dx.stride(1), SEG=BWD_SEG, BLOCK_E=BWD_BLOCK_E,
        WF=widths[0], WB=widths[1], HAS_F=causal is not None, HAS_B=anticausal is not None,
        HAS_BIAS_F=causal is not None and causal.bias is not None,
        HAS_BIAS_B=anticausal is not None and anticausal.bias is not None, ASM=triton_scan._use_asm(x),
        LOOKAHEAD=BWD_LOOKAHEAD, num_warps=BWD_NUM_WARPS)
    results = [None if d is None else
               (triton_scan._empty(tuple(d.weight.shape), torch.float32, x.device),
                triton_scan._empty((E,), torch.float32, x.device) if d.bias is not None else None) for d in dirs]
    outs = []
    for r in results:   # placeholders of what is absent, never written
        outs += [part, part] if r is None else [r[0], r[1] if r[1] is not None else part]
    if E:
        _conv_grad_sum_kernel[(cdiv(E, SUM_BLOCK_E), 10)](
            part, part.shape[0], E, *outs, WF=widths[0], WB=widths[1], HAS_F=causal is not None,
            HAS_B=anticausal is not None, HAS_BIAS_F=causal is not None and causal.bias is not None,
            HAS_BIAS_B=anticausal is not None and anticausal.bias is not None, BLOCK_P=SUM_BLOCK_P,
            BLOCK_E=SUM_BLOCK_E, num_warps=4)
    return dx, results[0], results[1]


def conv_silu_backward(grads: Sequence[torch.Tensor], x: torch.Tensor, weight: torch.Tensor, bias, reverse: bool,
                       dx_dtype: Optional[torch.dtype] = None):
    """Gradients of ``conv_silu(x, weight, bias, reverse)`` given the output gradient as the sum of ``grads``
    (one or more (B, L, E) tensors, any strides and float dtypes).

    Returns (dx, dweight, dbias): dx contiguous (B, L, E) in ``dx_dtype`` (default x's dtype); dweight float32
    shaped like ``weight``; dbias float32 (E,), or None without a bias.
    """
    one = ConvGrad(tuple(grads), weight, bias)
    dx, f, b = conv_silu_backward_pair(None if reverse else one, one if reverse else None, x, dx_dtype)
    dweight, dbias = b if reverse else f
    return dx, dweight, dbias
