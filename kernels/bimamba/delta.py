"""dt_proj with softplus(. + bias) in its epilogue, for the fused bidirectional mixer (Triton).

``delta = softplus(dt @ W^T + bias)``, written once as the scan reads it. The scan then loads a finished delta
instead of computing softplus on every (token, channel) on both threads of a channel, which made the mixer's
forward scans 10-17% faster (docs/kernels.md, v17); the backward walks recover softplus's slope from delta
(``triton_scan._softplus_slope_of_output``), so forward and backward use the same delta. The backward of this
GEMM itself is torch's (the walks return the gradient of the pre-activation, as before).

Storage: float16 when the mixer computes in bf16 or fp16. delta is positive, and float16 keeps 3 more mantissa
bits than bf16: delta is rounded to 2^-12 relative instead of 2^-9 (measured on the mixer's output against the
in-scan softplus: 9.4e-4 relative with delta in float16, 2.7e-3 in bf16). Values above float16's range are
clamped; they decay any state to zero either way.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import launch
from ..host_math import cdiv, next_pow2
from ..launch import cached_launch
from ..selective_scan import triton_scan
from ..selective_scan.triton_scan import LOG2E

FP16_MAX = tl.constexpr(65504.0)
# Tile of (tokens, channels) per program and its warps (tools/benchmark_kernels.py --sweep times them);
# WIDEN_VEC: columns a thread copies in the B / C widening (0: the compiler's choice, 8 for bf16; docs/kernels.md v33)
CONFIG = dict(BLOCK_M=64, BLOCK_E=128, NUM_WARPS=4, WIDEN_VEC=4)


@triton.jit
def _softplus_fast(x):
    """softplus(x) = max(x, 0) + log1p(e), e = exp(-|x|), to ~3e-6 relative: ample for a float16 result, with one
    MUFU instruction where the scan's float32-exact ``_softplus`` takes three (an exp2 and two reciprocals) and a
    precise log takes ~20 instructions. This epilogue, not its bytes, bounds the kernel (docs/kernels.md, v17)."""
    e = tl.exp2(-tl.abs(x) * LOG2E)
    # log1p(e) / e on [0, 1], degree 6 (a Chebyshev fit; 3.1e-6 relative evaluated in float32)
    q = 0.01402662880718708 * e - 0.06576914340257645
    q = q * e + 0.1481052041053772
    q = q * e - 0.234172523021698
    q = q * e + 0.3307874798774719
    q = q * e - 0.4998254179954529
    q = q * e + 0.999997079372406
    return tl.maximum(x, 0.0) + e * q


@cached_launch
@triton.jit
def _dt_softplus_kernel(dt_ptr, w_ptr, b_ptr, out_ptr, src_ptr, wide_ptr, M, E, K, C,
                        s_dm, s_dk, s_we, s_wk, s_om, s_oe, s_sm, s_sc,
                        BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                        CLAMP: tl.constexpr, IEEE: tl.constexpr, ASM: tl.constexpr, WIDEN_VEC: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_e = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if BLOCK_C > 0:   # the first channel block also widens its rows' ``widen`` columns to float32
        if pid_e == 0:
            # 4 contiguous columns a thread: the bf16 load then takes the float32 store's layout (16-byte vectors),
            # where 8 would move the tile through shared memory between them
            offs_c = tl.max_contiguous(tl.arange(0, BLOCK_C), WIDEN_VEC) if WIDEN_VEC > 0 else tl.arange(0, BLOCK_C)
            mc = (offs_m < M)[:, None] & (offs_c < C)[None, :]
            v = tl.load(src_ptr + offs_m[:, None] * s_sm + offs_c[None, :] * s_sc, mask=mc, other=0.0)
            tl.store(wide_ptr + offs_m[:, None] * C + offs_c[None, :], v.to(tl.float32), mask=mc)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_e = offs_e < E
    a = tl.load(dt_ptr + offs_m[:, None] * s_dm + offs_k[None, :] * s_dk,
                mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
    w = tl.load(w_ptr + offs_e[:, None] * s_we + offs_k[None, :] * s_wk,
                mask=mask_e[:, None] & (offs_k < K)[None, :], other=0.0)
    if IEEE:   # float32 products, not TF32: for float32 callers, and in the interpreter (whose bf16 dot is wrong)
        acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
    else:
        acc = tl.dot(a, tl.trans(w))
    acc += tl.load(b_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    if CLAMP:   # float16 out
        sp = tl.minimum(_softplus_fast(acc), FP16_MAX)
    else:
        sp, _ = triton_scan._softplus(acc, ASM)
    tl.store(out_ptr + offs_m[:, None] * s_om + offs_e[None, :] * s_oe, sp.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_e[None, :])


@cached_launch
@triton.jit
def _narrow_kernel(src_ptr, dst_ptr, M, C, s_dm, s_dc, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    m = (rows < M)[:, None] & (cols < C)[None, :]
    v = tl.load(src_ptr + rows[:, None] * C + cols[None, :], mask=m)
    tl.store(dst_ptr + rows[:, None] * s_dm + cols[None, :] * s_dc, v.to(dst_ptr.dtype.element_ty), mask=m)


def narrow_rows(src: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst.copy_(src)`` for the backward's dB / dC: the walks' float32 rows src (B, L, C), contiguous, into
    x_proj's output gradient columns dst (B, L, C), any strides, cast to dst's dtype. The inverse of ``dt_softplus``'s
    widening; torch's strided casting copy took 6.4 us a direction and layer at vim_tiny's (256, 197, 32) on an
    H200 (session 35)."""
    if src.shape != dst.shape or src.dim() != 3 or not src.is_contiguous():
        raise ValueError(f"narrow_rows: contiguous (B, L, C) src and a dst of its shape expected, got "
                         f"{tuple(src.shape)} and {tuple(dst.shape)}")
    batch, L, C = src.shape
    M = batch * L
    if M == 0 or C == 0:
        return
    s_row = dst.stride(1) if L > 1 else dst.stride(0)
    if batch > 1 and L > 1 and dst.stride(0) != L * dst.stride(1):
        launch.not_replayable("narrow_rows: a torch copy")
        dst.copy_(src)   # its rows are not one stride apart across the batch (not the mixer's layout)
        return
    BLOCK_C = next_pow2(C)
    BLOCK_M = max(1, 4096 // BLOCK_C)
    _narrow_kernel[(cdiv(M, BLOCK_M),)](src, dst, M, C, s_row, dst.stride(2), BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C,
                                        num_warps=4)


def delta_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype the mixer stores delta in: float16 for half-precision compute (see the module's docstring)."""
    return torch.float16 if compute_dtype in (torch.bfloat16, torch.float16) else compute_dtype


def dt_softplus(dt: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype,
                widen: Optional[torch.Tensor] = None):
    """softplus(dt @ weight^T + bias): dt (B, L, K) any strides (a column slice of x_proj's output), weight (E, K)
    in dt's dtype, bias (E,) -> contiguous (B, L, E) in ``out_dtype``, accumulated and activated in float32.

    ``widen`` (B, L, C), any strides (x_proj's B / C columns): also returned as a contiguous float32 copy, made by
    the same launch (the scan reads B and C as float32 rows; a separate copy was 48 launches and 2% of a vim_tiny
    forward). Returns (delta, widened) then."""
    batch, L, K = dt.shape
    E = weight.shape[0]
    if weight.shape[1] != K or bias.shape != (E,):
        raise ValueError(f"dt_proj weight (E, {K}) and bias (E,) expected, got {tuple(weight.shape)} and "
                         f"{tuple(bias.shape)}")
    if weight.dtype != dt.dtype:
        raise ValueError(f"dt_proj weight must have dt's dtype {dt.dtype} (cast it first), got {weight.dtype}")
    if widen is not None and widen.shape[:2] != (batch, L):
        raise ValueError(f"widen must have dt's (B, L) = {(batch, L)}, got {tuple(widen.shape)}")
    M = batch * L
    out = triton_scan._empty((batch, L, E), out_dtype, dt.device)
    C = widen.shape[2] if widen is not None else 0
    wide = triton_scan._empty((batch, L, C), torch.float32, dt.device) if widen is not None else None
    if M == 0 or E == 0:
        if wide is not None:
            launch.not_replayable("dt_softplus: a torch copy")
            wide.copy_(widen)
        return out if widen is None else (out, wide)
    d2 = dt.reshape(M, K)   # a view for a column slice of x_proj's output; other strides may copy (small)
    s2 = widen.reshape(M, C) if widen is not None else d2
    BLOCK_M, BLOCK_E = CONFIG["BLOCK_M"], min(CONFIG["BLOCK_E"], max(16, next_pow2(E)))
    grid = (cdiv(M, BLOCK_M), cdiv(E, BLOCK_E))
    asm = triton_scan._use_asm(dt)
    ieee = dt.dtype == torch.float32 or triton_scan._interpreted()   # (the kernel's IEEE says why)
    _dt_softplus_kernel[grid](d2, weight, bias, out, s2, wide if wide is not None else out, M, E, K, C,
                              *d2.stride(), *weight.stride(), E, 1, *s2.stride(),
                              BLOCK_M=BLOCK_M, BLOCK_E=BLOCK_E, BLOCK_K=max(16, next_pow2(K)),
                              BLOCK_C=max(16, next_pow2(C)) if C else 0,
                              CLAMP=out_dtype == torch.float16,
                              IEEE=ieee, ASM=asm, WIDEN_VEC=CONFIG["WIDEN_VEC"],
                              num_warps=CONFIG["NUM_WARPS"])
    return out if widen is None else (out, wide)
