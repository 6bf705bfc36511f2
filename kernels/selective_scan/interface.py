"""One entry point for every selective-scan backend."""
from __future__ import annotations

from typing import Optional

import torch

from .naive import selective_scan_ref

BACKENDS = ("reference", "triton")


def resolve_backend(backend: Optional[str], device: torch.device,
                    triton_error: Optional[BaseException] = None) -> str:
    """'reference' or 'triton' (None: Triton on CUDA, the reference elsewhere). ``triton_error``: why the
    caller's Triton implementation failed to import, if it did; choosing 'triton' then raises it clearly."""
    if backend is None:
        backend = "triton" if device.type == "cuda" else "reference"
    elif backend not in BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {BACKENDS} or None (auto)")
    if backend == "triton" and triton_error is not None:
        raise RuntimeError(f"backend='triton' needs triton ({triton_error}); use backend='reference'")
    if backend == "triton" and device.type != "cuda":
        from .triton_scan import _interpreted   # only here: the reference path must not need triton

        if not _interpreted():
            raise ValueError(f"backend='triton' needs CUDA tensors, got {device.type} ones: move the inputs to the GPU, "
                             "or use backend='reference' (Triton's CPU interpreter: TRITON_INTERPRET=1 set before "
                             "triton is imported)")
    return backend


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, reverse=False, backend: Optional[str] = None):
    """Selective scan with mamba_ssm's argument layouts and semantics (see ``naive.selective_scan_ref``).

    ``backend``: 'reference' (pure PyTorch, any device), 'triton', or None: Triton on CUDA, the
    reference elsewhere. The Triton backend is the custom op ``vim_kernels::selective_scan_fwd``
    (``triton_op.py``), so ``torch.compile(fullgraph=True)`` traces it without graph breaks.
    """
    backend = resolve_backend(backend, u.device)
    if backend == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  return_last_state, reverse)
    # imports triton (and registers the vim_kernels::selective_scan_* custom ops) only when asked for
    from .triton_op import selective_scan_op
    from .triton_scan import _check_inputs

    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    return selective_scan_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)
