"""The bidirectional Mamba mixer of Vim ("bimamba v2") and the pre-norm block around it.

Parameter names follow the official code (``conv1d``/``conv1d_b``, ``x_proj``/``x_proj_b``,
``dt_proj``/``dt_proj_b``, ``A_log``/``A_b_log``, ``D``/``D_b``) so official checkpoints map one to one.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models._features_fx import register_notrace_function, register_notrace_module

from ..kernels import DirectionParams, bimamba_v2_packed_fn
from ..kernels.norm import residual_add
from .layers import RMSNorm

register_notrace_function(residual_add)   # an FX leaf: branches on dtypes


def _dt_bias_init(dim: int, dt_min: float, dt_max: float, dt_floor: float) -> torch.Tensor:
    """Inverse softplus of dt drawn log-uniformly in [dt_min, dt_max] (official Mamba init)."""
    dt = torch.exp(torch.rand(dim) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


@register_notrace_module
class BiMambaMixer(nn.Module):
    """Token mixer: in_proj -> two selective-scan directions (forward, reverse) -> average -> out_proj.

    ``scan_backend``: None picks the fused Triton op on CUDA and the pure-PyTorch reference elsewhere.
    """

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Optional[int] = None, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_floor: float = 1e-4, conv_bias: bool = True, scan_backend: Optional[str] = None):
        super().__init__()
        self.dim = dim
        self.d_state = d_state
        self.d_inner = expand * dim
        self.dt_rank = math.ceil(dim / 16) if dt_rank is None else dt_rank
        self.scan_backend = scan_backend
        E, R, N = self.d_inner, self.dt_rank, d_state

        self.in_proj = nn.Linear(dim, 2 * E, bias=False)
        for suffix in ("", "_b"):
            conv = nn.Conv1d(E, E, kernel_size=d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
            x_proj = nn.Linear(E, R + 2 * N, bias=False)
            dt_proj = nn.Linear(R, E, bias=True)
            nn.init.uniform_(dt_proj.weight, -R ** -0.5, R ** -0.5)
            with torch.no_grad():
                dt_proj.bias.copy_(_dt_bias_init(E, dt_min, dt_max, dt_floor))
            A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
            setattr(self, "conv1d" + suffix, conv)
            setattr(self, "x_proj" + suffix, x_proj)
            setattr(self, "dt_proj" + suffix, dt_proj)
            setattr(self, "A_b_log" if suffix else "A_log", A_log)
            setattr(self, "D" + suffix, nn.Parameter(torch.ones(E)))
        self.out_proj = nn.Linear(E, dim, bias=False)

    def direction_params(self, reverse: bool) -> DirectionParams:
        if reverse:
            return DirectionParams(self.conv1d_b.weight, self.conv1d_b.bias, self.x_proj_b.weight,
                                   self.dt_proj_b.weight, self.dt_proj_b.bias, self.A_b_log, self.D_b)
        return DirectionParams(self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                               self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, dim) -> (B, L, dim)."""
        y = bimamba_v2_packed_fn(self.in_proj(x), self.direction_params(False), self.direction_params(True),
                                 backend=self.scan_backend, overwrite_input=True)   # in_proj's output is ours
        return self.out_proj(y)


class VimBlock(nn.Module):
    """Pre-norm residual block ``x + drop_path(mixer(rmsnorm(x)))`` on a float32 residual stream.

    ``forward`` is the block on its own. The model chains ``forward_pending`` instead, which leaves the
    block's branch to be added by the next block's norm: the official fused add+norm, one Triton pass
    on CUDA. The same sums happen in the same precision either way, and block i's drop path is the
    official rate of the add that follows mixer i.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, norm_eps: float = 1e-5, **mixer_kwargs):
        super().__init__()
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.mixer = BiMambaMixer(dim, **mixer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return residual_add(*self.forward_pending(x))

    def forward_pending(self, x: torch.Tensor, pending: Optional[torch.Tensor] = None):
        """``(x, pending) -> (x + pending, this block's branch)``.

        ``x`` is the residual stream without the previous block's branch ``pending`` (None: nothing
        pending); the returned branch, ``drop_path(mixer(norm(x + pending)))``, is in turn left for the
        caller to add.
        """
        return tuple(self.forward_carry([x, pending]))

    def forward_carry(self, carry: list) -> list:
        """``forward_pending`` on ``carry = [x, pending]``, which it empties: with no other reference the
        replaced stream and the added branch are freed before the mixer runs. Returns ``[x + pending, branch]``."""
        x, pending = carry
        carry.clear()
        x, h = self.norm.forward_add(x, pending)
        del pending
        return [x, self.drop_path(self.mixer(h))]

