"""The fused Triton selective scan as torch custom ops, so ``torch.compile(fullgraph=True)`` traces it.

``vim_kernels::selective_scan_fwd`` / ``selective_scan_bwd`` wrap the launchers ``triton_scan.scan_forward``
/ ``scan_backward`` with fake implementations (shapes, dtypes and strides without running a kernel) and an
autograd formula, as ``kernels/bimamba/triton_bimamba.py`` and ``kernels/norm/triton_norm.py`` do. The ops'
outputs are all tensors: the last state and the chunk summaries (which exist only when ``_plan`` splits
the sequence into more than one chunk), and the gradients of absent optional inputs, come back as empty
tensors when there is nothing to return. Custom-op outputs must not alias inputs or each other, so every
empty one is a distinct allocation.
"""
from __future__ import annotations

import torch

from ..eager import EagerOp
from ..inductor_fallbacks import register_fake
from . import triton_scan
from .triton_scan import _absent, _needs_grad, _none_if_absent


def _token_major(batch: int, Dm: int, L: int, dtype, device) -> torch.Tensor:
    """(B, D, L) whose storage is (B, L, D): what the kernels write (and out_proj wants). Allocated with
    those strides rather than as a transposed view, so the op's output is not a view of a temporary."""
    t = torch.empty_strided((batch, Dm, L), (L * Dm, 1, Dm), dtype=dtype, device=device)
    if triton_scan.POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


def _num_chunks(u: torch.Tensor, B: torch.Tensor, train_plan: bool) -> int:
    batch, Dm, L = u.shape
    G = 1 if B.dim() == 3 else B.shape[1]
    return triton_scan._plan(batch, Dm, L, G, device=u.device, train=train_plan)[3]


def _last_dtype(u: torch.Tensor) -> torch.dtype:
    # the kernel keeps the state in float32; float64 callers get it back in float64, as the reference does
    return torch.float64 if u.dtype == torch.float64 else torch.float32


# torch custom ops, so torch.compile sees one opaque node per call instead of breaking the graph. ``train_plan``:
# chunk the sequence for the backward that follows (``triton_scan._plan``); the backward gets the forward's flag.
_ARGS = ("Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
         "bool delta_softplus, bool reverse")
_lib = torch.library.Library("vim_kernels", "FRAGMENT")
_lib.define(f"selective_scan_fwd({_ARGS}, bool return_last_state, bool train_plan) -> (Tensor, Tensor, Tensor, Tensor)")
_lib.define(f"selective_scan_bwd(Tensor dout, {_ARGS}, Tensor hloc, Tensor S, bool train_plan) "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def _fwd_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, return_last_state, train_plan):
    """out (B, D, L) token-major in u's dtype; last state (B, D, N) or empty; chunk states hloc
    (B, NC, N, D) and delta sums S (B, NC, D), float32, or empty when there is one chunk."""
    batch, Dm, L = u.shape
    out = _token_major(batch, Dm, L, u.dtype, u.device)
    out, last, hloc, S = triton_scan.scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse,
                                                  out=out, want_last=return_last_state, train_plan=train_plan)
    if last is None:
        last = _absent(u)
    else:
        last = last.to(_last_dtype(u))
    return (out, last, hloc if hloc is not None else _absent(u), S if S is not None else _absent(u))


def _bwd_op(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hloc, S, train_plan):
    """du, ddelta, dA, dB, dC, dD, dz, ddelta_bias; empty tensors for the absent D, z, delta_bias."""
    grads = triton_scan.scan_backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse,
                                      _none_if_absent(hloc), _none_if_absent(S), train_plan=train_plan)
    return tuple(g if g is not None else _absent(u) for g in grads)


for _key in ("CPU", "CUDA"):
    _lib.impl("selective_scan_fwd", _fwd_op, _key)
    _lib.impl("selective_scan_bwd", _bwd_op, _key)


@register_fake("vim_kernels::selective_scan_fwd")
def _fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, return_last_state, train_plan):
    batch, Dm, L = u.shape
    N = A.shape[1]
    out = u.new_empty_strided((batch, Dm, L), (L * Dm, 1, Dm))
    last = u.new_empty((batch, Dm, N), dtype=_last_dtype(u)) if return_last_state else _absent(u)
    nc = _num_chunks(u, B, train_plan)
    if nc > 1:
        hloc = u.new_empty((batch, nc, N, Dm), dtype=torch.float32)
        S = u.new_empty((batch, nc, Dm), dtype=torch.float32)
    else:
        hloc, S = _absent(u), _absent(u)
    return out, last, hloc, S


@register_fake("vim_kernels::selective_scan_bwd")
def _bwd_fake(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hloc, S, train_plan):
    batch, Dm, L = u.shape

    def vec(v):   # dD, ddelta_bias: (D,) in the input's dtype
        return v.new_empty(v.shape) if v is not None else _absent(u)

    def seq(like):   # du, ddelta, dz: token-major like the forward's output
        return like.new_empty_strided((batch, Dm, L), (L * Dm, 1, Dm))

    return (seq(u), seq(delta),
            A.new_empty(A.shape),            # contiguous whatever A's layout
            B.new_empty(B.shape), C.new_empty(C.shape),
            vec(D),
            seq(z) if z is not None else _absent(u),
            vec(delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, _, train_plan = inputs
    _, last, hloc, S = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, hloc, S)
    ctx.flags = (delta_softplus, reverse, train_plan)
    ctx.mark_non_differentiable(last, hloc, S)


def _autograd_backward(ctx, dout, _dlast, _dhloc, _dS):
    u, delta, A, B, C, D, z, delta_bias, hloc, S = ctx.saved_tensors
    delta_softplus, reverse, train_plan = ctx.flags
    grads = _selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, hloc, S,
                                train_plan)
    du, ddelta, dA, dB, dC, dD, dz, dbias = grads
    return (du, ddelta, dA, dB, dC,
            dD if D is not None else None, dz if z is not None else None, dbias if delta_bias is not None else None,
            None, None, None, None)


_selective_scan_fwd = EagerOp(torch.ops.vim_kernels.selective_scan_fwd, _fwd_op, _autograd_backward, _setup_context)
_selective_scan_bwd = EagerOp(torch.ops.vim_kernels.selective_scan_bwd, _bwd_op)


def selective_scan_op(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, reverse=False):
    """The custom op behind ``selective_scan_fn(backend='triton')``: out, or (out, last_state).
    Arguments as ``selective_scan_ref``; the caller checks them (``triton_scan._check_inputs``). Where autograd
    records the call, its chunks are planned for the backward (``train_plan``)."""
    out, last, _, _ = _selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse), bool(return_last_state),
        _needs_grad(u, delta, A, B, C, D, z, delta_bias))
    return (out, last) if return_last_state else out
