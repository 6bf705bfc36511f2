"""Readable pure-PyTorch selective scan: the reference every kernel is tested against.

Semantics are mamba_ssm's ``selective_scan_fn``::

    delta = softplus(delta + delta_bias)          (when asked)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t
    y_t   = <C_t, h_t> + D * u_t
    y     = y * silu(z)                            (when z is given)

The recurrence is evaluated chunk by chunk: inside a chunk of T tokens the state is a masked
(T x T) sum over decays ``exp(cumsum(dA)_t - cumsum(dA)_s)``, and only the chunk boundaries are
carried sequentially. That keeps the Python loop at L / T iterations (a handful at vision lengths)
while every exponent stays <= 0, so nothing overflows. Autograd differentiates it as is.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

# Target size of one (batch, channels, T, T, N) decay tensor: small chunks stay in cache and were
# several times faster on the CPU than large ones (T=4..8 at vision shapes).
_CHUNK_ELEMENTS = 1 << 19


def _expand_groups(M: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, N, L) or (B, G, N, L) -> (B, channels, N, L) view/expansion."""
    if M.dim() == 3:
        return M.unsqueeze(1).expand(-1, channels, -1, -1)
    if M.dim() == 4:
        groups = M.shape[1]
        if channels % groups:
            raise ValueError(f"{channels} channels cannot be split into {groups} groups of B/C")
        return M.repeat_interleave(channels // groups, dim=1)
    raise ValueError(f"B and C must be (batch, N, L) or (batch, groups, N, L), got shape {tuple(M.shape)}")


def _chunk_len(batch: int, channels: int, dstate: int, L: int) -> int:
    per_token_pair = max(1, batch * channels * dstate)
    T = int(math.isqrt(max(1, _CHUNK_ELEMENTS // per_token_pair)))
    return max(1, min(L, max(4, min(16, T))))


def _scan_forward_order(u, delta, A, B, C):
    """Core recurrence in the forward order, float32/float64. Returns y (B, D, L), last state (B, D, N)."""
    batch, channels, L = u.shape
    dstate = A.shape[1]
    T = _chunk_len(batch, channels, dstate, L)
    h = u.new_zeros(batch, channels, dstate)
    causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()
    ys = []
    for t0 in range(0, L, T):
        t1 = min(t0 + T, L)
        n = t1 - t0
        d = delta[:, :, t0:t1]                                        # (b, d, n)
        dA = d.unsqueeze(-1) * A[None, :, None, :]                   # (b, d, n, N), <= 0
        cs = dA.cumsum(dim=2)                                         # log decay from chunk start
        bx = (d * u[:, :, t0:t1]).unsqueeze(-1) * B[:, :, :, t0:t1].transpose(2, 3)  # (b, d, n, N)
        # seg[t, s] = cs[t] - cs[s]: log of prod_{r=s+1..t} exp(dA_r), masked above the diagonal
        seg = cs.unsqueeze(3) - cs.unsqueeze(2)                       # (b, d, t, s, N)
        seg = seg.masked_fill(~causal[:n, :n, None], float("-inf"))
        hs = torch.einsum("bdtsn,bdsn->bdtn", seg.exp(), bx) + cs.exp() * h.unsqueeze(2)
        ys.append(torch.einsum("bdtn,bdnt->bdt", hs, C[:, :, :, t0:t1]))
        h = hs[:, :, -1]
    if not ys:   # L = 0: no outputs, the state stays at its initial zero
        return u.new_zeros(batch, channels, 0), h
    return torch.cat(ys, dim=2), h


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
    (float64 when u is float64); the output has u's dtype, the last state stays in the compute dtype.
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
    if reverse:
        y, last = _scan_forward_order(u_.flip(-1), delta_.flip(-1), A_, B_.flip(-1), C_.flip(-1))
        y = y.flip(-1)
    else:
        y, last = _scan_forward_order(u_, delta_, A_, B_, C_)
    if D is not None:
        y = y + u_ * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y
