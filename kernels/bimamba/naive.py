"""Readable reference of the Vim "bimamba v2" mixer core (everything between in_proj and out_proj).

Each direction has its own depthwise conv, x_proj, dt_proj, A and D. The official code runs the
backward direction on token-flipped x and z and flips the result back; here it is written without
flips: an anti-causal conv (``xc_t = b + sum_k w[k] x_{t+W-1-k}``) and a reverse-order scan, which is
the same function.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..selective_scan.naive import selective_scan_ref


class DirectionParams(NamedTuple):
    """Parameters of one scan direction, official shapes (E = inner channels, R = dt rank, N = d_state)."""

    conv_weight: torch.Tensor      # (E, 1, W) or (E, W)
    conv_bias: Optional[torch.Tensor]  # (E,)
    x_proj_weight: torch.Tensor    # (R + 2N, E)
    dt_proj_weight: torch.Tensor   # (E, R)
    dt_proj_bias: torch.Tensor     # (E,)
    A_log: torch.Tensor            # (E, N); A = -exp(A_log)
    D: torch.Tensor                # (E,)


def depthwise_conv_silu_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            reverse: bool = False) -> torch.Tensor:
    """SiLU(causal depthwise conv) over tokens of x (B, L, E) -> (B, E, L); anti-causal when reverse."""
    L = x.shape[1]
    w = weight.reshape(weight.shape[0], 1, -1)
    width = w.shape[-1]
    xt = x.transpose(1, 2)
    if L == 0:   # conv1d refuses an empty sequence
        return F.silu(xt)
    if reverse:
        out = F.conv1d(xt, w.flip(-1), bias, padding=width - 1, groups=w.shape[0])[..., width - 1:]
    else:
        out = F.conv1d(xt, w, bias, padding=width - 1, groups=w.shape[0])[..., :L]
    return F.silu(out)


def mamba_direction_ref(x: torch.Tensor, z: torch.Tensor, p: DirectionParams, reverse: bool,
                        scan=selective_scan_ref) -> torch.Tensor:
    """One direction, gated: returns (B, E, L) = scan(conv(x)) * silu(z)."""
    dstate = p.A_log.shape[1]
    rank = p.dt_proj_weight.shape[1]
    xc = depthwise_conv_silu_ref(x, p.conv_weight, p.conv_bias, reverse)          # (B, E, L)
    x_dbl = F.linear(xc.transpose(1, 2), p.x_proj_weight)                        # (B, L, R+2N)
    dt, Bm, Cm = torch.split(x_dbl, [rank, dstate, dstate], dim=-1)
    delta = F.linear(dt, p.dt_proj_weight).transpose(1, 2)                      # (B, E, L)
    A = -torch.exp(p.A_log.float())
    return scan(xc, delta, A, Bm.transpose(1, 2), Cm.transpose(1, 2), D=p.D.float(),
                z=z.transpose(1, 2), delta_bias=p.dt_proj_bias.float(), delta_softplus=True,
                reverse=reverse)


def bimamba_v2_ref(x: torch.Tensor, z: torch.Tensor, fwd: DirectionParams, bwd: DirectionParams,
                   scan=selective_scan_ref) -> torch.Tensor:
    """x, z: (B, L, E) token-major (views of in_proj's output are fine). Returns (B, L, E):
    ``(y_fwd + y_bwd) / 2`` with each direction gated by silu(z), ready for out_proj."""
    y_f = mamba_direction_ref(x, z, fwd, reverse=False, scan=scan)
    y_b = mamba_direction_ref(x, z, bwd, reverse=True, scan=scan)
    return ((y_f + y_b) / 2).transpose(1, 2)
