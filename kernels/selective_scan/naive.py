"""Readable pure-PyTorch selective scan: the reference every kernel is tested against.

Semantics are mamba_ssm's ``selective_scan_fn``::

    delta = softplus(delta + delta_bias)          (when asked)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t
    y_t   = <C_t, h_t> + D * u_t
    y     = y * silu(z)                            (when z is given)

The recurrence is evaluated token by token, as mamba_ssm's kernel does: no differences of cumulative
log decays (nothing to overflow or cancel), so the float64 run is an exact oracle. The per-token terms
``exp(delta_t A)`` and ``delta_t u_t B_t`` are computed for a block of tokens at once in token-first layout
(T, batch, channels, N), so the Python loop does one fused multiply-add per token on a contiguous slice.
Autograd differentiates it as is: the blocks are unbound and the states stacked, so each token costs the
backward one node, not a full-size gradient buffer.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F

# Tokens per block, as elements of a (T, batch, channels, N) term. On the CPU ~1 MB of float32, which stays in
# cache through the token loop (vim_tiny inference at batch 8 on 2 CPU threads: 0.9 s a step against 1.6 s with
# 16 MB blocks). On a GPU every op is a launch, so blocks are larger (~64 MB): a block's handful of ops is then
# shared by many tokens (H200, bf16 inputs, forward at (128, 384, 197, 16): 3.9 ms against 7.5 ms with 16 MB
# blocks and 4.8 ms with 256 MB). Either way long sequences keep a bounded working set in inference (training
# keeps every state for the backward).
_CPU_BLOCK_ELEMENTS = 1 << 18
_GPU_BLOCK_ELEMENTS = 1 << 24


def _expand_groups(M: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, N, L) -> (B, 1, N, L) view, shared by every channel; (B, G, N, L) -> (B, channels, N, L)."""
    if M.dim() == 3:
        return M.unsqueeze(1)
    if M.dim() == 4:
        groups = M.shape[1]
        if groups == 1:
            return M
        if channels % groups:
            raise ValueError(f"{channels} channels cannot be split into {groups} groups of B/C")
        return M.repeat_interleave(channels // groups, dim=1)
    raise ValueError(f"B and C must be (batch, N, L) or (batch, groups, N, L), got shape {tuple(M.shape)}")


def _states(dA: torch.Tensor, bx: torch.Tensor, h: torch.Tensor, reverse: bool) -> torch.Tensor:
    """h_t = dA_t * h_{t -/+ 1} + bx_t over the block's tokens (dim 0), from the state h entering the block."""
    if torch.is_grad_enabled() and (dA.requires_grad or bx.requires_grad or h.requires_grad):
        hs = []
        steps = zip(dA.unbind(0), bx.unbind(0))
        for a_t, b_t in (reversed(list(steps)) if reverse else steps):
            h = torch.addcmul(b_t, a_t, h)
            hs.append(h)
        return torch.stack(hs[::-1] if reverse else hs)
    hs = bx   # without autograd, in place: bx_t becomes h_t
    order = range(hs.shape[0] - 1, -1, -1) if reverse else range(hs.shape[0])
    prev = h
    for t in order:
        hs[t].addcmul_(dA[t], prev)
        prev = hs[t]
    return hs


def _scan(u, delta, A, B, C, reverse: bool):
    """Core recurrence, float32/float64. B, C: (b, 1 or D, N, L). Returns y (b, D, L), last state (b, D, N)."""
    batch, channels, L = u.shape
    dstate = A.shape[1]
    block = _CPU_BLOCK_ELEMENTS if u.device.type == "cpu" else _GPU_BLOCK_ELEMENTS
    T = max(1, block // max(1, batch * channels * dstate))
    h = u.new_zeros(batch, channels, dstate)
    ys = []
    starts = list(range(0, L, T))
    for t0 in (reversed(starts) if reverse else starts):
        t1 = min(t0 + T, L)
        # token-first copies of the (small) inputs, so the large terms come out contiguous: an elementwise
        # result takes its inputs' layout, and strided terms made every op here several times slower
        d = delta[:, :, t0:t1].permute(2, 0, 1).contiguous()                    # (T, b, D)
        du = d * u[:, :, t0:t1].permute(2, 0, 1)
        Bt, Ct = (M[..., t0:t1].permute(3, 0, 1, 2).contiguous() for M in (B, C))   # (T, b, 1 or D, N)
        dA = (d.unsqueeze(-1) * A).exp_()                                       # (T, b, D, N)
        bx = du.unsqueeze(-1) * Bt
        hs = _states(dA, bx, h, reverse)
        if Ct.shape[2] == 1:   # shared C: y_t = H_t C_t as a batched product, C never expanded
            y = torch.matmul(hs, Ct.transpose(-1, -2)).squeeze(-1)
        else:
            y = (hs * Ct).sum(-1)
        ys.append(y.permute(1, 2, 0))                                          # (b, D, T)
        h = hs[0] if reverse else hs[-1]
    if not ys:   # L = 0: no outputs, the state stays at its initial zero
        return u.new_zeros(batch, channels, 0), h
    return torch.cat(ys[::-1] if reverse else ys, dim=2), h


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
):
    """Reference selective scan.

    u, delta, z: (batch, D, L); A: (D, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (D,).
    ``reverse=True`` runs the recurrence from the last token to the first. Computation is in float32
    (float64 when u is float64), also under autocast; the output has u's dtype, the last state stays in the
    compute dtype.
    """
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, channels, L), got shape {tuple(u.shape)}")
    dtype_in = u.dtype
    cdt = torch.float64 if dtype_in == torch.float64 else torch.float32
    channels = u.shape[1]
    u_, delta_ = u.to(cdt), delta.to(cdt)
    if delta_bias is not None:
        delta_ = delta_ + delta_bias.to(cdt)[:, None]
    if delta_softplus:
        delta_ = F.softplus(delta_)
    B_ = _expand_groups(B.to(cdt), channels)
    C_ = _expand_groups(C.to(cdt), channels)
    A_ = A.to(cdt)
    # the state and its C product stay in the compute dtype: autocast would run the product in bf16 / fp16
    device = u.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
        y, last = _scan(u_, delta_, A_, B_, C_, reverse)
    if D is not None:
        y = y + u_ * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y
