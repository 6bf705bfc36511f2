"""The ``vim_kernels`` custom ops as Inductor fallbacks, registered before Inductor lowers a graph that calls them.

Inductor lowers an op it has no lowering for through an implicit fallback, made when the op first appears in a graph.
Up to torch 2.11 at least it logs that moment with the op's arguments formatted eagerly, whatever the log level
(``GraphLowering.call_function``: ``log.info(..., error.operator_str(target, args, kwargs))``; later versions format
lazily). An argument's text is its whole IR, printed as a tree: a custom op's output prints the op with its inputs,
those the ops before them, and so on, every shared input once per path to it. In a Vim backward the first RMSNorm
backward is block 0's, at the end of the graph, and its input prints every block's gradient ops behind it: the text
grows ~2.1x a block (on the CPU with the log at INFO: 3.3 MB for 6 blocks, 71 MB and a 50 s backward compile for
10), so compiling a 24-block vim_tiny's training step did not finish in 6 minutes on an H200 (docs/kernels.md, v48).

``register_fake`` registers an op's fake implementation (what ``torch.compile`` traces) and, once Inductor has been
imported, has the first fake call register every ``vim_kernels`` op as Inductor's implicit fallback would, with the
layout constraint that path picks, but without the log. Nothing here imports Inductor: a process that never compiles
never pays for it. On a torch whose Inductor lacks the functions used here, the ops take the implicit path.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, List

import torch

# every op registered through register_fake ("vim_kernels::name")
OPS: List[str] = []
_registered = False


def register_fake(name: str) -> Callable:
    """``torch.library.register_fake(name)``, whose fake first makes sure of the fallbacks (see the module)."""
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def fake(*args, **kwargs):
            if not _registered:
                register_fallbacks()
            return fn(*args, **kwargs)

        global _registered
        OPS.append(name)
        _registered = False   # an op registered late (the scan's, imported on first use) is registered in turn
        torch.library.register_fake(name)(fake)
        return fn

    return decorate


def overloads() -> List[torch._ops.OpOverload]:
    """The default overload of each op in ``OPS``."""
    return [getattr(getattr(torch.ops, namespace), op_name).default
            for namespace, op_name in (name.split("::") for name in OPS)]


def register_fallbacks() -> bool:
    """Registers each op in ``OPS`` as an Inductor fallback, if Inductor has been imported and its lowering does not
    have the op yet. Returns whether the ops are registered."""
    global _registered
    lowering = sys.modules.get("torch._inductor.lowering")
    if lowering is None:
        return False
    try:
        for op in overloads():
            if op not in lowering.lowerings:
                # the layout constraint GraphLowering.call_function gives a custom op's implicit fallback
                tag = lowering.get_layout_constraint_tag(op, with_default=True)
                lowering.make_fallback(op, layout_constraint=lowering.tag_to_layout_constraint(tag))
    except (AttributeError, TypeError):   # another Inductor: the implicit fallbacks, as before
        pass
    _registered = True
    return True
