"""Fused RMSNorm: one Triton pass forward, one backward, as torch custom ops.

Eager PyTorch spends several kernels on a float32 norm that feeds a bf16 layer (the norm's own
reductions, then a cast), each a full pass over the activations. Here the forward reads x once and
writes y directly in the compute dtype, plus the per-row ``rstd`` (float32) for the backward. The
backward reads x, dy and rstd once, writes dx, and reduces dweight over rows inside each program:
programs loop over row tiles and store one (dim,) partial each, summed by torch afterwards, so no
atomics hit the same dim addresses from thousands of programs and the result is deterministic.

The pre-norm block's residual add can ride along (``add_rms_norm``): the forward reads the float32
residual stream and the branch once, writes their float32 sum and the normed sum; the backward adds the
sum's residual-stream gradient in and writes the gradient twice, float32 for the stream and in the
branch's dtype for the branch. Per token and channel, with a bf16 branch, that is 12 bytes forward
against 16 for an add then a norm, 16 backward against 28, and one launch instead of two each way.

A program owns a ``[BLOCK_M, BLOCK_N]`` tile: whole rows (``BLOCK_N`` = dim rounded up to a power of
two, masked) and as many rows as fit in ~4K elements, so small widths such as Vim-T's 192 still give
each program a useful amount of work.

Forward and backward are registered as ``vim_kernels::rms_norm_fwd`` / ``rms_norm_bwd`` and
``add_rms_norm_fwd`` / ``add_rms_norm_bwd`` with fake implementations and an autograd formula, so
``torch.compile(fullgraph=True)`` traces them without graph breaks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..eager import EagerOp
from ..host_math import cdiv, next_pow2, sm_count
from ..inductor_fallbacks import register_fake
from ..launch import cached_launch
from ..selective_scan.triton_scan import _empty   # NaN-filled when tests set triton_scan.POISON_OUTPUTS

# Widest row held in registers at once (64 KB of float32); Vim's widths are at most 1024.
MAX_BLOCK_N = 16384
# Elements per program tile: 32 float32 per thread at the matching warp count.
TILE = 4096


@cached_launch
@triton.jit
def _rms_norm_fwd_kernel(x_ptr, branch_ptr, sum_ptr, w_ptr, y_ptr, rstd_ptr, M, N, stride_x, stride_branch, eps,
                         HAS_BRANCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = norm(x), or with HAS_BRANCH s = x + branch (stored, float32) and y = norm(s)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        # the float32 sum PyTorch forms for float32 + bf16 (promotion inside the add): same bits
        x += tl.load(branch_ptr + rows[:, None] * stride_branch + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(sum_ptr + rows[:, None] * N + cols[None, :], x, mask=mask)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@cached_launch
@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dsum_ptr, dx_ptr, dbranch_ptr, dw_ptr, M, N,
                         stride_dy, stride_x, stride_dsum, HAS_DSUM: tl.constexpr, HAS_BRANCH: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """With xhat = x * rstd and g = dy * w: dx = rstd * (g - xhat * mean(g * xhat)), dw = sum_rows dy * xhat.

    Fused add (x is then the sum s = x_in + branch): HAS_DSUM adds the gradient s received from its other
    consumer (the residual stream); HAS_BRANCH also writes dx in the branch's dtype (d branch = d x_in = d s).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for tile in range(pid, tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)   # masked rows: xhat = dy = 0
        xhat = x * rstd[:, None]
        dw += tl.sum(dy * xhat, axis=0)
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / N
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        if HAS_DSUM:
            dx += tl.load(dsum_ptr + rows[:, None] * stride_dsum + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_BRANCH:
            tl.store(dbranch_ptr + rows[:, None] * N + cols[None, :], dx.to(dbranch_ptr.dtype.element_ty),
                     mask=mask)
    tl.store(dw_ptr + pid * N + cols, dw, mask=col_ok)


def _tile(M: int, N: int):
    """Rows per program, padded width and warps for an (M, N) problem."""
    BLOCK_N = next_pow2(N)
    if BLOCK_N > MAX_BLOCK_N:
        raise ValueError(f"the fused RMSNorm holds a row in registers: dim {N} > {MAX_BLOCK_N}; "
                         "use backend='reference'")
    BLOCK_M = min(max(1, TILE // BLOCK_N), next_pow2(max(M, 1)))
    num_warps = min(16, max(1, BLOCK_M * BLOCK_N // 1024))
    return BLOCK_M, BLOCK_N, num_warps


def _bwd_programs(device: torch.device, n_tiles: int, num_warps: int) -> int:
    """Enough programs to keep ~32 warps resident per SM; each extra program costs one (dim,) partial."""
    if device.type == "cuda":
        return min(n_tiles, sm_count(device) * max(1, 32 // num_warps))
    return min(n_tiles, 4)   # the CPU interpreter: a few programs, each looping over several tiles


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride; a view when the leading dims allow it."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _forward(x, weight, eps, out_dtype, branch=None):
    """y = norm(x) and rstd; with a branch also the sum s = x + branch (float32), normed instead of x."""
    x2 = _rows(x)
    M, N = x2.shape
    b2 = _rows(branch) if branch is not None else x2
    # outputs allocated in their final shapes: custom-op outputs must not be views
    s = _empty(x.shape, torch.float32, x.device) if branch is not None else x2
    y = _empty(x.shape, out_dtype, x.device)
    rstd = _empty(x.shape[:-1], torch.float32, x.device)
    BLOCK_M, BLOCK_N, num_warps = _tile(M, N)
    _rms_norm_fwd_kernel[(cdiv(M, BLOCK_M),)](x2, b2, s, weight.contiguous(), y, rstd, M, N, x2.stride(0),
                                              b2.stride(0), eps, HAS_BRANCH=branch is not None,
                                              BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)
    return (s, y, rstd) if branch is not None else (y, rstd)


def _backward(dy, x, weight, rstd, dsum=None, branch_dtype=None):
    """dx (x's dtype) and dweight; for the fused add, x is the sum, ``dsum`` its residual-stream gradient
    (None: unused) and a second copy of dx comes back in ``branch_dtype``."""
    x2, dy2 = _rows(x), _rows(dy)
    M, N = x2.shape
    ds2 = _rows(dsum) if dsum is not None else x2
    dx = _empty(x.shape, x.dtype, x.device)
    dbranch = _empty(x.shape, branch_dtype, x.device) if branch_dtype is not None else dx
    BLOCK_M, BLOCK_N, num_warps = _tile(M, N)
    programs = _bwd_programs(x.device, cdiv(M, BLOCK_M), num_warps)
    dw_partial = _empty((programs, N), torch.float32, x.device)
    _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight.contiguous(), rstd.contiguous(), ds2, dx, dbranch,
                                      dw_partial, M, N, dy2.stride(0), x2.stride(0), ds2.stride(0),
                                      HAS_DSUM=dsum is not None, HAS_BRANCH=branch_dtype is not None,
                                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)
    dw = dw_partial.sum(0).to(weight.dtype)
    return (dx, dbranch, dw) if branch_dtype is not None else (dx, dw)


def _add_forward(x, branch, weight, eps, out_dtype):
    return _forward(x, weight, eps, out_dtype, branch)


def _add_backward(dy, dsum, s, weight, rstd, branch_dtype):
    return _backward(dy, s, weight, rstd, dsum, branch_dtype)


# torch custom ops, so torch.compile sees one opaque node per call instead of breaking the graph.
_lib = torch.library.Library("vim_kernels", "FRAGMENT")
_lib.define("rms_norm_fwd(Tensor x, Tensor weight, float eps, ScalarType out_dtype) -> (Tensor, Tensor)")
_lib.define("rms_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)")
_lib.define("add_rms_norm_fwd(Tensor x, Tensor branch, Tensor weight, float eps, ScalarType out_dtype) "
            "-> (Tensor, Tensor, Tensor)")
_lib.define("add_rms_norm_bwd(Tensor dy, Tensor? dsum, Tensor s, Tensor weight, Tensor rstd, "
            "ScalarType branch_dtype) -> (Tensor, Tensor, Tensor)")
for _key in ("CPU", "CUDA"):
    _lib.impl("rms_norm_fwd", _forward, _key)
    _lib.impl("rms_norm_bwd", _backward, _key)
    _lib.impl("add_rms_norm_fwd", _add_forward, _key)
    _lib.impl("add_rms_norm_bwd", _add_backward, _key)


@register_fake("vim_kernels::rms_norm_fwd")
def _forward_fake(x, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@register_fake("vim_kernels::rms_norm_bwd")
def _backward_fake(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


@register_fake("vim_kernels::add_rms_norm_fwd")
def _add_forward_fake(x, branch, weight, eps, out_dtype):
    return (x.new_empty(x.shape, dtype=torch.float32), x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@register_fake("vim_kernels::add_rms_norm_bwd")
def _add_backward_fake(dy, dsum, s, weight, rstd, branch_dtype):
    return s.new_empty(s.shape), s.new_empty(s.shape, dtype=branch_dtype), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, _, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _autograd_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw, None, None


def _add_setup_context(ctx, inputs, output):
    _, branch, weight, _, _ = inputs
    ctx.branch_dtype = branch.dtype
    ctx.save_for_backward(output[0], weight, output[2])


def _add_autograd_backward(ctx, dsum, dy, _drstd):
    s, weight, rstd = ctx.saved_tensors
    dx, dbranch, dw = _add_rms_norm_bwd(dy, dsum, s, weight, rstd, ctx.branch_dtype)
    return dx, dbranch, dw, None, None


_rms_norm_fwd = EagerOp(torch.ops.vim_kernels.rms_norm_fwd, _forward, _autograd_backward, _setup_context)
_rms_norm_bwd = EagerOp(torch.ops.vim_kernels.rms_norm_bwd, _backward)
_add_rms_norm_fwd = EagerOp(torch.ops.vim_kernels.add_rms_norm_fwd, _add_forward, _add_autograd_backward,
                            _add_setup_context)
_add_rms_norm_bwd = EagerOp(torch.ops.vim_kernels.add_rms_norm_bwd, _add_backward)


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be ({x.shape[-1]},) for x of shape {tuple(x.shape)}; got {tuple(weight.shape)}")


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    _check_weight(x, weight)
    return _rms_norm_fwd(x, weight, eps, out_dtype)[0]


def add_rms_norm_triton(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor, eps: float,
                        out_dtype: torch.dtype):
    """(x + branch, norm(x + branch)) for a float32 x; the sum is float32."""
    _check_weight(x, weight)
    if branch.shape != x.shape:
        raise ValueError(f"branch must match x's shape {tuple(x.shape)}; got {tuple(branch.shape)}")
    s, y, _ = _add_rms_norm_fwd(x, branch, weight, eps, out_dtype)
    return s, y
