"""The weights a mixer call derives from its two directions' parameters, in one Triton launch.

Each call needs x_proj's and dt_proj's weights in the compute dtype and in the column-padded layout of
``triton_bimamba.XPROJ_ALIGN``, ``A = -exp(A_log)`` in float32, and the conv's taps tap-major in float32 (the layout
the conv forward loads them in, ``conv.conv_silu_pair``). Written with torch these were up to seven
small kernels per direction (at vim_tiny's widths: two zero fills, three slice copies with casts, exp and
negation), 336 launches per vim_tiny forward and as many again in its backward, each a few microseconds even
inside a CUDA graph (docs/kernels.md, v18). They are derived on every call rather than cached so that optimizer
steps, ``load_state_dict`` and CUDA-graph replays always see the current parameters.

``A`` comes from Triton's ``exp`` (on the GPU ``ex2.approx``: ~1e-7 relative, where torch's is exact to float32
rounding) and is written channel-contiguous, the layout the scan kernels pin their tiles to
(``triton_scan.channel_major``), so no scan call copies it.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..host_math import cdiv, next_pow2
from ..launch import cached_launch
from ..selective_scan import triton_scan

BLOCK_E = 64


class DerivedWeights(NamedTuple):
    x_proj: torch.Tensor    # (width, E): rows [dt (R) | 0 | B, C (2N) | 0], compute dtype
    dt_proj: torch.Tensor   # (E, width): columns [R | 0], compute dtype; the dt GEMM reads its first dt_cols, and
                            # the backward's ddelta @ dt_proj is then x_proj's whole output gradient row but B, C
    A: torch.Tensor         # (E, N) float32, channel-contiguous: strides (1, E)
    conv_taps: torch.Tensor  # (W, E) float32, contiguous: the conv weight (E, 1, W) transposed


@triton.jit
def _derive_one(wx_ptr, wdt_ptr, alog_ptr, conv_ptr, wx_out, wdt_out, a_out, taps_out, s_wx_r, s_wx_e, s_wdt_e,
                s_wdt_r, s_a_e, s_a_n, s_c_e, s_c_k, E, R, N, DT_COLS, WIDTH, W,
                BLOCK_E: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One direction's weights, channels [program_id(0) * BLOCK_E, +BLOCK_E)."""
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    cdt = wx_out.dtype.element_ty
    # x_proj: output row r reads weight row r (dt) or r - DT_COLS + R (B, C); the padding rows are zero
    r = tl.arange(0, BLOCK_W)
    src = tl.where(r < DT_COLS, r, r - DT_COLS + R)
    keep = (r < R) | ((r >= DT_COLS) & (src < R + 2 * N))
    w = tl.load(wx_ptr + src[:, None] * s_wx_r + offs_e[None, :] * s_wx_e, mask=keep[:, None] & mask_e[None, :],
                other=0.0)
    tl.store(wx_out + r[:, None] * E + offs_e[None, :], w.to(cdt), mask=(r < WIDTH)[:, None] & mask_e[None, :])
    c = tl.arange(0, BLOCK_W)
    w = tl.load(wdt_ptr + offs_e[:, None] * s_wdt_e + c[None, :] * s_wdt_r, mask=mask_e[:, None] & (c < R)[None, :],
                other=0.0)
    tl.store(wdt_out + offs_e[:, None] * WIDTH + c[None, :], w.to(cdt), mask=mask_e[:, None] & (c < WIDTH)[None, :])
    n = tl.arange(0, BLOCK_N)
    m = mask_e[:, None] & (n < N)[None, :]
    a = tl.load(alog_ptr + offs_e[:, None] * s_a_e + n[None, :] * s_a_n, mask=m, other=0.0)
    tl.store(a_out + n[None, :] * E + offs_e[:, None], -tl.exp(a.to(tl.float32)), mask=m)
    k = tl.arange(0, BLOCK_K)
    m = mask_e[:, None] & (k < W)[None, :]
    w = tl.load(conv_ptr + offs_e[:, None] * s_c_e + k[None, :] * s_c_k, mask=m, other=0.0)
    tl.store(taps_out + k[None, :] * E + offs_e[:, None], w.to(tl.float32), mask=m)


@cached_launch
@triton.jit
def _derive_kernel(wx0, wdt0, alog0, conv0, wxo0, wdto0, ao0, tapso0, sx0_r, sx0_e, sdt0_e, sdt0_r, sa0_e, sa0_n,
                   sc0_e, sc0_k, wx1, wdt1, alog1, conv1, wxo1, wdto1, ao1, tapso1, sx1_r, sx1_e, sdt1_e, sdt1_r,
                   sa1_e, sa1_n, sc1_e, sc1_k, E, R, N, DT_COLS, WIDTH, W,
                   BLOCK_E: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program row program_id(1) derives direction 0 or 1 (a one-direction launch has one row)."""
    if tl.program_id(1) == 0:
        _derive_one(wx0, wdt0, alog0, conv0, wxo0, wdto0, ao0, tapso0, sx0_r, sx0_e, sdt0_e, sdt0_r, sa0_e, sa0_n,
                    sc0_e, sc0_k, E, R, N, DT_COLS, WIDTH, W, BLOCK_E, BLOCK_W, BLOCK_N, BLOCK_K)
    else:
        _derive_one(wx1, wdt1, alog1, conv1, wxo1, wdto1, ao1, tapso1, sx1_r, sx1_e, sdt1_e, sdt1_r, sa1_e, sa1_n,
                    sc1_e, sc1_k, E, R, N, DT_COLS, WIDTH, W, BLOCK_E, BLOCK_W, BLOCK_N, BLOCK_K)


def derive_weights(x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor, A_log: torch.Tensor,
                   conv_weight: torch.Tensor, dt_cols: int, width: int, dtype: torch.dtype) -> DerivedWeights:
    """x_proj_weight (R + 2N, E), dt_proj_weight (E, R), A_log (E, N), conv_weight (E, 1, W) or (E, W), any float
    dtypes and strides -> the padded, cast projection weights, A and the tap-major conv taps (see
    ``DerivedWeights``)."""
    return _derive((x_proj_weight, dt_proj_weight, A_log, conv_weight), dt_cols, width, dtype)[0]


def derive_weights_pair(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor], dt_cols: int, width: int,
                        dtype: torch.dtype) -> Tuple[DerivedWeights, DerivedWeights]:
    """``derive_weights`` of both directions of a mixer, each given as (x_proj_weight, dt_proj_weight, A_log,
    conv_weight), from one launch where their shapes agree (Vim's always do): 24 launches fewer per vim_tiny pass."""
    shapes = [tuple(tuple(t.shape) for t in params) for params in (first, second)]
    if shapes[0] != shapes[1]:
        return (_derive(tuple(first), dt_cols, width, dtype)[0], _derive(tuple(second), dt_cols, width, dtype)[0])
    return _derive(tuple(first), dt_cols, width, dtype, tuple(second))


def _derive(params, dt_cols: int, width: int, dtype: torch.dtype, second=None):
    """One launch for one direction's ``params`` (x_proj, dt_proj, A_log, conv weights), or two of the same shapes."""
    outs = []
    args = []
    for x_proj_weight, dt_proj_weight, A_log, conv_weight in (params,) if second is None else (params, second):
        E, R = dt_proj_weight.shape
        N = A_log.shape[1]
        conv = conv_weight.reshape(conv_weight.shape[0], -1)
        if x_proj_weight.shape != (R + 2 * N, E) or A_log.shape[0] != E or conv.shape[0] != E:
            raise ValueError(f"derive_weights: x_proj {tuple(x_proj_weight.shape)}, dt_proj "
                             f"{tuple(dt_proj_weight.shape)}, A_log {tuple(A_log.shape)} and conv "
                             f"{tuple(conv_weight.shape)} do not fit (R + 2N, E), (E, R), (E, N), (E, 1, W)")
        if dt_cols < R or width < dt_cols + 2 * N:
            raise ValueError(f"derive_weights: padded layout (dt_cols={dt_cols}, width={width}) narrower than "
                             f"R={R}, 2N={2 * N}")
        dev = x_proj_weight.device
        W = conv.shape[1]
        out = DerivedWeights(triton_scan._empty((width, E), dtype, dev), triton_scan._empty((E, width), dtype, dev),
                             triton_scan._empty((N, E), torch.float32, dev).t(),
                             triton_scan._empty((W, E), torch.float32, dev))
        outs.append(out)
        args.append((x_proj_weight, dt_proj_weight, A_log, conv, *out, *x_proj_weight.stride(),
                     *dt_proj_weight.stride(), *A_log.stride(), *conv.stride()))
    if E:
        _derive_kernel[(cdiv(E, BLOCK_E), len(args))](
            *args[0], *args[-1], E, R, N, dt_cols, width, W, BLOCK_E=BLOCK_E, BLOCK_W=max(16, next_pow2(width)),
            BLOCK_N=max(16, next_pow2(N)), BLOCK_K=max(2, next_pow2(W)), num_warps=4)
    return tuple(outs)
