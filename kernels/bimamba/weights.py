"""The weights a mixer call derives from one direction's parameters, in one Triton launch.

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

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..host_math import cdiv, next_pow2
from ..selective_scan import triton_scan

BLOCK_E = 64


class DerivedWeights(NamedTuple):
    x_proj: torch.Tensor    # (width, E): rows [dt (R) | 0 | B, C (2N) | 0], compute dtype
    dt_proj: torch.Tensor   # (E, width): columns [R | 0], compute dtype; the dt GEMM reads its first dt_cols, and
                            # the backward's ddelta @ dt_proj is then x_proj's whole output gradient row but B, C
    A: torch.Tensor         # (E, N) float32, channel-contiguous: strides (1, E)
    conv_taps: torch.Tensor  # (W, E) float32, contiguous: the conv weight (E, 1, W) transposed


@triton.jit
def _derive_kernel(wx_ptr, wdt_ptr, alog_ptr, conv_ptr, wx_out, wdt_out, a_out, taps_out, E, R, N, DT_COLS, WIDTH,
                   W, s_wx_r, s_wx_e, s_wdt_e, s_wdt_r, s_a_e, s_a_n, s_c_e, s_c_k,
                   BLOCK_E: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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


def derive_weights(x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor, A_log: torch.Tensor,
                   conv_weight: torch.Tensor, dt_cols: int, width: int, dtype: torch.dtype) -> DerivedWeights:
    """x_proj_weight (R + 2N, E), dt_proj_weight (E, R), A_log (E, N), conv_weight (E, 1, W) or (E, W), any float
    dtypes and strides -> the padded, cast projection weights, A and the tap-major conv taps (see
    ``DerivedWeights``)."""
    E, R = dt_proj_weight.shape
    N = A_log.shape[1]
    conv = conv_weight.reshape(conv_weight.shape[0], -1)
    if x_proj_weight.shape != (R + 2 * N, E) or A_log.shape[0] != E or conv.shape[0] != E:
        raise ValueError(f"derive_weights: x_proj {tuple(x_proj_weight.shape)}, dt_proj {tuple(dt_proj_weight.shape)}, "
                         f"A_log {tuple(A_log.shape)} and conv {tuple(conv_weight.shape)} do not fit (R + 2N, E), "
                         "(E, R), (E, N), (E, 1, W)")
    if dt_cols < R or width < dt_cols + 2 * N:
        raise ValueError(f"derive_weights: padded layout (dt_cols={dt_cols}, width={width}) narrower than "
                         f"R={R}, 2N={2 * N}")
    dev = x_proj_weight.device
    W = conv.shape[1]
    out = DerivedWeights(triton_scan._empty((width, E), dtype, dev), triton_scan._empty((E, width), dtype, dev),
                         triton_scan._empty((N, E), torch.float32, dev).t(),
                         triton_scan._empty((W, E), torch.float32, dev))
    if E == 0:
        return out
    _derive_kernel[(cdiv(E, BLOCK_E),)](
        x_proj_weight, dt_proj_weight, A_log, conv, out.x_proj, out.dt_proj, out.A, out.conv_taps, E, R, N, dt_cols,
        width, W, *x_proj_weight.stride(), *dt_proj_weight.stride(), *A_log.stride(), *conv.stride(),
        BLOCK_E=BLOCK_E, BLOCK_W=max(16, next_pow2(width)), BLOCK_N=max(16, next_pow2(N)),
        BLOCK_K=max(2, next_pow2(W)), num_warps=4)
    return out
