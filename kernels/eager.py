"""Eager calls of the ``vim_kernels`` custom ops that go straight to their Python implementations.

The kernels are torch custom ops so that ``torch.compile`` sees one opaque node per call. Called eagerly, a custom op
with an autograd formula passes the dispatcher twice (its autograd kernel, then the CPU or CUDA kernel) and torch's
Python autograd wrapper in between, which walks the arguments as pytrees and fills in defaults: ~170 us a call with
the mixer's 17 arguments on the 2-core dev machine, against ~50 us for an ``autograd.Function`` running the same
implementation, and ~18 against ~3 us without autograd. A vim_tiny training step makes ~100 such calls, and its
eager step waits for the host (docs/benchmarks.md, "Session 37").

``EagerOp`` wraps one op. Where nothing could tell the difference it calls the implementation itself, through an
``autograd.Function`` built from the op's own ``setup_context`` and ``backward`` when autograd records the call.
Everywhere else it calls the op: under ``torch.compile`` and export, FX or TorchScript tracing, torch function or
dispatch modes (``FakeTensorMode``, ``FlopCounterMode``), functorch transforms, on tensor subclasses and on devices
other than the ops' CPU and CUDA. An op without an autograd formula takes the op's path when its inputs need a
gradient, so that torch reports the missing formula as it would. ``ENABLED = False`` sends every call to the op.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# Off: every call goes through the dispatcher (A/B timings, and an escape hatch)
ENABLED = True

_TENSORS = frozenset((torch.Tensor, torch.nn.Parameter))
_DEVICES = frozenset(("cpu", "cuda"))


def _plain(args) -> Optional[bool]:
    """Whether every tensor in ``args`` (lists of tensors included) is a plain tensor on the CPU or a CUDA device;
    None when one is not. Otherwise, True where one of them requires a gradient."""
    grad = False
    for a in args:
        if type(a) is list:
            a = _plain(a)
            if a is None:
                return None
            grad = grad or a
        elif isinstance(a, torch.Tensor):
            if type(a) not in _TENSORS or a.device.type not in _DEVICES:
                return None
            grad = grad or a.requires_grad
    return grad


def _direct() -> bool:
    """Whether the calling context lets a call skip the dispatcher (see the module). ``is_compiling`` is asked first,
    so that Dynamo, tracing a caller, folds the branch and sees none of the other checks."""
    if torch.compiler.is_compiling() or not ENABLED:
        return False
    return not (torch._C._get_tracing_state() is not None or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled()
                or torch._C._functorch.peek_interpreter_stack() is not None)


def _function(name: str, impl: Callable, setup_context: Callable, backward: Callable, list_output: bool):
    """An ``autograd.Function`` with the op's implementation, context set-up and backward. Its ``forward`` takes the
    context and sets it up itself: with a separate ``setup_context``, ``Function.apply`` binds the arguments through
    ``inspect.signature`` on every call (~25 us). An op returning ``Tensor[]`` returns a tuple from ``forward`` (what
    autograd tracks) and its backward receives the list of gradients, as the op's registered one does."""
    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        return tuple(out) if list_output else out

    def grad(ctx, *grads):
        return backward(ctx, list(grads)) if list_output else backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(grad)})


class EagerOp:
    """``op`` (a ``torch.ops.vim_kernels`` overload packet) with ``impl``, the Python function registered as its CPU
    and CUDA kernel. ``backward`` and ``setup_context``: its autograd formula, registered here for the op as
    ``torch.library.register_autograd`` does and used by the direct path too. Called with positional arguments
    only, as the op would be."""

    def __init__(self, op, impl: Callable, backward: Optional[Callable] = None,
                 setup_context: Optional[Callable] = None):
        self.op = op
        self.impl = impl
        schema = op.default._schema
        self.list_output = len(schema.returns) == 1 and str(schema.returns[0].type) == "List[Tensor]"
        self.function = None
        if backward is not None:
            torch.library.register_autograd(schema.name, backward, setup_context=setup_context)
            self.function = _function(schema.name.split("::")[-1], impl, setup_context, backward, self.list_output)

    def __call__(self, *args):
        if _direct():
            grad = _plain(args)
            if grad is not None:
                if not (grad and torch.is_grad_enabled()):
                    return self.impl(*args)
                if self.function is not None:
                    out = self.function.apply(*args)
                    return list(out) if self.list_output else out
        return self.op(*args)
