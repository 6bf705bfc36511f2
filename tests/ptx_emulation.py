"""The kernels' inline PTX, emulated in the Triton interpreter, so that the CPU runs their GPU-only paths.

The interpreter refuses ``tl.inline_asm_elementwise``, so the kernels take plain Triton in its place there
(``triton_scan._use_asm``). Those paths (vector row loads, 16-byte vector atomics, ``rcp.approx``, prefetches) then
ran only on a GPU, and only at the shapes of the GPU tests. ``emulate_ptx`` gives the interpreter each of the few
instructions the kernels use, with the same operands and effects, and makes ``_use_asm`` say yes for CPU tensors.

One trait of the GPU comes along: a tensor with fewer elements than the program has threads is held by several
threads each, and each copy runs a side-effecting instruction, which Triton masks for its own stores and atomics
but not for inline PTX. The emulated vector atomic runs once per copy (``triton_scan._bc_quads``)."""
import collections
import os
import re

import numpy as np

from triton.runtime import interpreter as _interp

# VIM_TEST_EMULATE_PTX=1: every interpreter test runs with the emulation (conftest.py), i.e. the kernel tests along
# the GPU's paths; by default only the tests that ask for it (fixture ``emulated_ptx``)
EVERYWHERE = os.environ.get("VIM_TEST_EMULATE_PTX", "0") == "1"

# "[$4]" or "[$4+16]": an address operand and its byte offset
_ADDRESS = re.compile(r"\[\$(\d+)(?:\+(\d+))?\]")


class _Results:
    def __init__(self, handles):
        self._handles = handles

    def get_result(self, i):
        return self._handles[i]


def _element_type(ty):
    return getattr(ty, "element_ty", ty)


def _shape(values, types):
    for v in values:
        if v.data.ndim:
            return v.data.shape
    return getattr(types[0], "shape", ())


def _addresses(value, offset):
    # pointers are uint64 addresses in the interpreter, ``ptr.to(tl.int64)`` their int64 copies
    return value.data.astype(np.uint64) + np.uint64(offset)


def _load_f32(addresses):
    mask = np.ones(addresses.shape, dtype=bool)
    return _interp._interpreter.load(addresses, mask, np.zeros(addresses.shape, np.float32), np.dtype(np.float32))


# what each emulated instruction is called in ``emulate_ptx``'s counts
NAMES = {"rcp": "rcp.approx", "ld": "ld.global.nc.v4", "prefetch": "prefetch", "red": "red.global.add.v4"}


def _dummy_result(shape, types):
    # the instructions run for their effect; the asm returns a register the kernels ignore (``mov.u32 $0, 0``)
    return _interp.TensorHandle(np.zeros(shape, np.int32), _element_type(types[0]))


def _copies(shape, num_warps):
    """How many threads hold each element of a tensor of this shape, Triton's layouts spreading a tensor smaller than
    the program over all its threads."""
    return max(1, 32 * num_warps // max(1, int(np.prod(shape))))


def _emulate(asm, constraints, values, types, is_pure, pack, seen, launch):
    text = " ".join(asm.split())
    shape = _shape(values, types)
    if text == "rcp.approx.ftz.f32 $0, $1;":
        seen[NAMES["rcp"]] += 1
        x = values[0].data.astype(np.float32)
        with np.errstate(divide="ignore"):
            return _Results([_interp.TensorHandle(np.float32(1.0) / x, _element_type(types[0]))])
    if text.startswith("ld.global.nc.v4.f32 {$0, $1, $2, $3}, "):
        seen[NAMES["ld"]] += 1
        operand, offset = _ADDRESS.search(text).groups()
        base = _addresses(values[int(operand) - len(types)], int(offset or 0))   # operands after the outputs
        return _Results([_interp.TensorHandle(_load_f32(base + np.uint64(4 * k)), _element_type(types[k]))
                         for k in range(4)])
    if text == "prefetch.global.L1 [$1]; mov.u32 $0, 0;":
        seen[NAMES["prefetch"]] += 1
        return _Results([_dummy_result(shape, types)])
    if "@p red.relaxed.gpu.global.add.v4.f32 [$1], {$2, $3, $4, $5};" in text:
        seen[NAMES["red"]] += 1
        native = _interp._interpreter
        base = _addresses(values[0], 0)
        pred = np.broadcast_to(values[5].data != 0, shape).copy()
        for _ in range(_copies(shape, launch["num_warps"])):
            for k in range(4):
                q = np.broadcast_to(values[1 + k].data.astype(np.float32), shape).copy()
                native.atomic_rmw(native.RMW_OP.FADD, base + np.uint64(4 * k), q, pred, native.MEM_SEMANTIC.RELAXED)
        return _Results([_dummy_result(shape, types)])
    raise NotImplementedError(f"no emulation of this inline PTX: {asm!r} ({constraints})")


def emulate_ptx(monkeypatch) -> collections.Counter:
    """From here on (``monkeypatch``'s scope) the interpreter runs the kernels' inline PTX, and the kernels take
    their PTX paths on CPU tensors. Returns the counts of the instructions emulated (by ``NAMES``), so that a test
    can check its path was taken."""
    from vim.kernels.selective_scan import triton_scan

    seen, launch = collections.Counter(), {"num_warps": 4}
    run = _interp.GridExecutor.__call__

    def run_recording_warps(self, *args, **kwargs):   # the interpreter drops the launch's num_warps (default 4)
        launch["num_warps"] = kwargs.get("num_warps", 4)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(_interp.GridExecutor, "__call__", run_recording_warps)
    monkeypatch.setattr(_interp.InterpreterBuilder, "create_inline_asm",
                        lambda self, *args: _emulate(*args, seen, launch), raising=True)
    monkeypatch.setattr(triton_scan, "_use_asm", lambda t: True)
    return seen
