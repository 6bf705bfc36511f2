"""Host-side replays: a function's launches worked out once per signature, then issued without the planning.

An eager vim_tiny step waits for its host below batch ~256 (docs/benchmarks.md, "Host overhead"): every mixer call
checks its inputs, plans each kernel, builds views and signature keys, and then issues the same launches and GEMMs,
with the same grids and scalars, as the call before. ``record`` runs such a function once and turns what it did into
a ``Replay``: the same events in the same order, where every tensor argument is a byte offset into one of the call's
inputs or into a buffer the run allocated (through ``triton_scan._empty``, or as the result of a torch function run
through ``call``). A replay allocates those buffers in the same order, hands the compiled kernels integer addresses
(Triton's launcher takes them as it takes tensors, without the driver's per-pointer query), calls the torch functions
on views at the recorded offsets, drops each buffer after its last use, and returns what the function returned: the
same buffers, views and empty tensors.

What a replay can stand for; the recorder checks it, and a run that breaks it is not replayed:
- the function's only effects are its launches' writes into its inputs and into the buffers it returns; it returns
  None or a list of tensors, each empty or lying in an input or a recorded buffer;
- every tensor a launch or ``call`` reads lies inside one of the inputs or one of the recorded buffers still alive
  (the recording lets the run free its buffers as it would, and tells a live one by its storage): anything else (a
  torch copy made on the way, a cached tensor) makes the run unrecordable. Torch functions that write in place are
  not followed: code that runs one on the way says so (``launch.not_replayable``);
- its launches go through ``cached_launch`` with a tuple grid, and take tensors, numbers, strings, None or tuples of
  them;
- what it planned depends only on the key its caller keeps the replay under (the inputs' shapes, strides, dtypes and
  16-byte alignment, and the knobs of the modules it runs).
In Triton's interpreter (the CPU tests) a replay launches through the interpreter on views at the same offsets, so the
tests hold it against the recorded function bit for bit.
"""
from __future__ import annotations

import threading
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from . import launch
from .selective_scan.triton_scan import _empty

_TENSORS = (torch.Tensor, torch.nn.Parameter)
_SCALARS = (int, float, bool, str, type(None), torch.dtype)


class Unrecordable(Exception):
    """The run did something a replay cannot stand for (see the module)."""


def _extent(t: torch.Tensor) -> int:
    """Bytes from t's first element to one past its last."""
    return (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()


class _Ref(tuple):
    """A tensor argument: (slot, byte offset, shape, strides, dtype, whole), whole where it is its slot's tensor as
    the slot holds it (the same start, shape and strides)."""
    __slots__ = ()


class _Refs(tuple):
    """A tuple argument holding tensors: its elements, tensors as ``_Ref``."""
    __slots__ = ()


def _slots_of(refs):
    """The slots a list of arguments reads."""
    for r in refs:
        if type(r) is _Ref:
            yield r[0]
        elif type(r) is _Refs:
            yield from _slots_of(r)


class Recorder:
    """What one run did, reported by ``triton_scan._empty``, ``CachedLaunch`` and ``call`` while it is
    ``launch.RECORDER``."""

    def __init__(self, inputs: Sequence[Optional[torch.Tensor]]):
        self.thread = threading.get_ident()
        self.n_inputs = len(inputs)
        # per slot (inputs, then buffers in order of allocation): (address, extent in bytes), None for an absent input
        self.ranges = [(t.data_ptr(), _extent(t), t.dtype) if t is not None and t.numel() else None for t in inputs]
        # per buffer slot, whether its memory is still held (freed memory may be handed out again, also to tensors
        # the recording does not see)
        self.alive: list = [None] * len(inputs)
        # per slot, (shape, strides) of the tensor a replay holds there
        self.layouts: list = [(tuple(t.shape), t.stride()) if t is not None else None for t in inputs]
        self.events: list = []
        self.last_use: dict = {}
        self.failure: Optional[str] = None

    def allocated(self, t: torch.Tensor) -> None:
        self._new_buffer(t, ("alloc", len(self.ranges), tuple(t.shape), t.dtype))

    def launched(self, launcher, grid, args, kwargs, kernel) -> None:
        if self.failure is None:
            try:
                if type(grid) is not tuple or (launcher.cacheable and kernel is None) or launcher.jit_fn.pre_run_hooks:
                    raise Unrecordable(f"{launcher.__name__}: a launch without a tuple grid or a compiled kernel, or "
                                       "with pre-run hooks")
                refs = tuple(self._ref(a) for a in args)
                tail = launcher._tail(len(args), kwargs) if launcher.cacheable else None
                self._event(("launch", launcher, grid, refs, dict(kwargs), kernel, tail), refs)
            except Unrecordable as e:
                self.failure = str(e)

    def called(self, fn: Callable, args, kwargs, out) -> None:
        if self.failure is None:
            try:
                if not all(isinstance(v, _SCALARS) for v in kwargs.values()):
                    raise Unrecordable(f"{getattr(fn, '__name__', fn)}: a keyword argument that is not a number, "
                                       "string, dtype or None")
                refs = tuple(self._ref(a) for a in args)
                if type(out) not in _TENSORS or self._inside(out) is not None:
                    raise Unrecordable(f"{getattr(fn, '__name__', fn)} returned something other than a new tensor")
                self._event(("call", len(self.ranges), fn, refs, dict(kwargs)), refs)
                self._new_buffer(out, None)
            except Unrecordable as e:
                self.failure = str(e)

    def not_replayable(self, why: str) -> None:
        if self.failure is None:
            self.failure = why

    def _new_buffer(self, t: torch.Tensor, event) -> None:
        if self.failure is not None:
            return
        if t.numel() == 0 or not t.is_contiguous():
            self.failure = f"a buffer {tuple(t.shape)} that is empty or not contiguous"
            return
        self.ranges.append((t.data_ptr(), _extent(t), t.dtype))
        self.alive.append(StorageWeakRef(t.untyped_storage()))
        self.layouts.append((tuple(t.shape), t.stride()))
        if event is not None:
            self._event(event, ())
        self.last_use[len(self.ranges) - 1] = len(self.events) - 1

    def _inside(self, a: torch.Tensor) -> Optional[int]:
        """The slot whose live memory holds all of ``a``, None if none does; the latest first (a freed buffer's
        addresses may belong to a later one now)."""
        ptr, extent = a.data_ptr(), _extent(a)
        for slot in range(len(self.ranges) - 1, -1, -1):
            r, alive = self.ranges[slot], self.alive[slot]
            if r is not None and r[0] <= ptr and ptr + extent <= r[0] + r[1] and (alive is None or not alive.expired()):
                return slot
        return None

    def _ref(self, a):
        if not isinstance(a, _TENSORS):
            if isinstance(a, _SCALARS):
                return a
            if type(a) is tuple:
                refs = tuple(self._ref(x) for x in a)
                return _Refs(refs) if any(type(x) in (_Ref, _Refs) for x in refs) else a
            raise Unrecordable(f"an argument of type {type(a).__name__}")
        if a.numel() == 0:
            raise Unrecordable("an empty tensor argument")
        slot = self._inside(a)
        if slot is None:
            raise Unrecordable(f"a tensor argument {tuple(a.shape)} {a.dtype} outside the inputs and the recorded "
                               "buffers")
        if self.ranges[slot][2] != a.dtype:
            raise Unrecordable(f"a {a.dtype} view of a {self.ranges[slot][2]} tensor")
        offset, shape, stride = a.data_ptr() - self.ranges[slot][0], tuple(a.shape), a.stride()
        return _Ref((slot, offset, shape, stride, a.dtype, offset == 0 and (shape, stride) == self.layouts[slot]))

    def _event(self, event, refs) -> None:
        for slot in _slots_of(refs):
            self.last_use[slot] = len(self.events)
        self.events.append(event)

    def _outputs(self, result) -> Optional[tuple]:
        """What the run returned, as a replay rebuilds it: per tensor, ("empty", dtype) or ("ref", _Ref); None for
        None."""
        if result is None:
            return None
        if type(result) not in (list, tuple) or not all(type(t) in _TENSORS for t in result):
            raise Unrecordable("the function returned something other than None or a list of tensors")
        return tuple(("empty", t.dtype) if t.numel() == 0 else ("ref", self._ref(t)) for t in result)

    def replay(self, result=None) -> "Replay":
        if self.failure is not None:
            raise Unrecordable(self.failure)
        outputs = self._outputs(result)
        last_use = dict(self.last_use)
        returned = {o[1][0] for o in outputs or () if o[0] == "ref"}
        for slot in returned:   # returned: never freed by the replay
            last_use[slot] = -1
        # a torch call's operands stay buffers of their own (typing a group member for torch costs more than its
        # allocation), and so do returned buffers (a custom op's outputs must not share memory)
        apart = {s for e in self.events if e[0] == "call" for s in _slots_of(e[3])} | returned
        events, n_slots, last_use = _grouped(self.events, len(self.ranges), last_use, apart)
        frees: List[List[int]] = [[] for _ in events]
        for slot, i in last_use.items():
            if slot >= self.n_inputs and i >= 0:
                frees[i].append(slot)
        return Replay(n_slots, events, frees, outputs)


# Consecutive allocations a replay makes as one: those freed after the same event, and any run of small ones (the
# mixer's derived weights), which then live until the last of them is freed. A vim mixer call's 16 allocations become 8
# (its GEMMs' operands, both conv outputs among them, stay apart: ``Recorder.replay``).
GROUP_SMALL_BYTES = 1 << 20
GROUP_ALIGN = 256   # each member's offset in its group's buffer, bytes: every address keeps the alignment it had


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def _grouped(events: list, n_slots: int, last_use: dict, apart=frozenset()):
    """``events`` with runs of allocations merged into ("group", slot, bytes, members) events (see above), members
    (slot, byte offset, shape, dtype) and the group a new slot; and ``last_use`` in the new list's indices, a group's
    its last member's. The slots in ``apart`` stay allocations of their own."""
    out, new_index, run = [], [], []

    def flush():
        nonlocal n_slots
        groups = []
        for i, e in run:
            if groups:
                g = groups[-1]
                small = all(_nbytes(*x[2:]) <= GROUP_SMALL_BYTES for _, x in g + [(i, e)])
                if small or last_use[e[1]] == last_use[g[0][1][1]]:
                    g.append((i, e))
                    continue
            groups.append([(i, e)])
        for g in groups:
            if len(g) == 1:
                event = g[0][1]
            else:
                members, offset = [], 0
                for _, (_, slot, shape, dtype) in g:
                    members.append((slot, offset, shape, dtype))
                    offset += -(-_nbytes(shape, dtype) // GROUP_ALIGN) * GROUP_ALIGN
                event = ("group", n_slots, offset, tuple(members))
                n_slots += 1
            for i, _ in g:
                new_index[i] = len(out)
            out.append(event)
        run.clear()

    for i, e in enumerate(events):
        new_index.append(None)
        if e[0] == "alloc" and e[1] not in apart:
            run.append((i, e))
            continue
        flush()
        new_index[i] = len(out)
        out.append(e)
    flush()
    remapped = {slot: new_index[i] if i >= 0 else i for slot, i in last_use.items()}   # -1: never freed
    for e in out:
        if e[0] == "group":
            remapped[e[1]] = max(remapped[m[0]] for m in e[3])
    return out, n_slots, remapped


# One recording at a time in the process; launches from other threads meanwhile are not reported to it
_RECORDING = threading.Lock()
BUSY = object()


def record(fn: Callable, inputs: Sequence[Optional[torch.Tensor]]):
    """Runs ``fn(*inputs)`` once (its effects happen as without recording) and returns (its ``Replay``, what it
    returned): the replay None where the run cannot be replayed (see the module), or ``BUSY`` where another thread was
    recording (the run was not recorded)."""
    if not _RECORDING.acquire(blocking=False):
        return BUSY, fn(*inputs)
    recorder = Recorder(inputs)
    try:
        launch.RECORDER = recorder
        result = fn(*inputs)
    finally:
        launch.RECORDER = None
        _RECORDING.release()
    try:
        return recorder.replay(result), result
    except Unrecordable:
        return None, result


def nesting(inputs: Sequence[Optional[torch.Tensor]]) -> tuple:
    """Which inputs lie inside another's memory, and where: (i, j, byte offset) per input i inside input j; part of a
    replay's key. A recording refers to a tensor argument by the latest input that holds it, so its replay stands only
    for calls whose inputs nest the same way: one tensor passed as two arguments (tied parameters) must not be
    replayed for two tensors, nor the other way round."""
    # only inputs sharing a storage can nest; ordinarily none do, which the storages' addresses tell cheaply
    storages: dict = {}
    for i, t in enumerate(inputs):
        if t is not None and t.numel():
            storages.setdefault(t.data_ptr() - t.storage_offset() * t.element_size(), []).append((i, t))
    nested = []
    for shared in storages.values():
        if len(shared) > 1:
            spans = [(i, t.data_ptr(), t.data_ptr() + _extent(t)) for i, t in shared]
            nested += [(i, j, start - outer) for i, start, end in spans
                       for j, outer, outer_end in spans if j != i and outer <= start and end <= outer_end]
    return tuple(sorted(nested))


def call(fn: Callable, *args, **kwargs) -> torch.Tensor:
    """``fn(*args, **kwargs)``, a torch function that returns a new tensor (a product, a copy), reported to a running
    recording. Its tensor arguments, in tuples too, are read; none is written."""
    out = fn(*args, **kwargs)
    recorder = launch.recording()
    if recorder is not None:
        recorder.called(fn, args, kwargs, out)
    return out


def linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(a, w)``, reported to a running recording."""
    return call(F.linear, a, w)


def _view(slots: list, ref) -> torch.Tensor:
    """The tensor argument ``ref`` on this call's slots (the interpreter's launches and ``call``'s operands)."""
    slot, offset, shape, stride, _, whole = ref
    base = slots[slot]
    if type(base) is tuple:   # a member of a group, typed on first use: (group buffer, byte offset, shape, dtype)
        buffer, start, bshape, dtype = base
        base = slots[slot] = buffer[start:start + _nbytes(bshape, dtype)].view(dtype).view(bshape)
    if whole:
        return base
    return base.as_strided(shape, stride, base.storage_offset() + offset // base.element_size())


def _tensor_arg(slots: list, r):
    """An argument for torch or the interpreter: tensors as views, tuples element by element."""
    t = type(r)
    if t is _Ref:
        return _view(slots, r)
    if t is _Refs:
        return tuple(_tensor_arg(slots, x) for x in r)
    return r


def _address_arg(ptrs: list, r):
    """A tuple argument for a compiled launch: tensors as addresses."""
    return tuple(ptrs[x[0]] + x[1] if type(x) is _Ref else _address_arg(ptrs, x) if type(x) is _Refs else x
                 for x in r)


def _compiled_launch(event) -> tuple:
    """A launch event as a compiled replay issues it: (its three grid dimensions, its arguments with tensors left
    out, (position, slot, byte offset) per tensor, (position, ``_Refs``) per tuple holding tensors)."""
    _, _, grid, refs, _, _, _ = event
    n = len(grid)
    return ((grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1),
            [None if type(r) in (_Ref, _Refs) else r for r in refs],
            tuple((j, r[0], r[1]) for j, r in enumerate(refs) if type(r) is _Ref),
            tuple((j, r) for j, r in enumerate(refs) if type(r) is _Refs))


class Replay:
    """One recorded run (see the module); called with inputs of the recorded signature."""

    def __init__(self, n_slots: int, events: list, frees: List[List[int]], outputs: Optional[tuple] = None):
        self.n_slots = n_slots
        self.events = events
        self.frees = frees
        self.outputs = outputs
        self.interpreted = any(e[0] == "launch" and not e[1].cacheable for e in events)
        self.first_launch = next((i for i, e in enumerate(events) if e[0] == "launch"), -1)
        self.compiled = [_compiled_launch(e) if e[0] == "launch" and not self.interpreted else None for e in events]

    def __call__(self, inputs: Sequence[Optional[torch.Tensor]], device: torch.device):
        n_in = len(inputs)
        slots: list = list(inputs) + [None] * (self.n_slots - n_in)
        ptrs: list = [t.data_ptr() if t is not None else 0 for t in inputs] + [0] * (self.n_slots - n_in)
        interpreted = self.interpreted
        stream = None if interpreted else torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice())
        with torch.autocast(device_type=device.type, enabled=False):
            for i, (event, frees) in enumerate(zip(self.events, self.frees)):
                kind = event[0]
                if kind == "launch":
                    _, launcher, grid, refs, kwargs, kernel, tail = event
                    if interpreted:
                        launcher.jit_fn[grid](*[_tensor_arg(slots, r) for r in refs], **kwargs)
                    else:
                        grid3, args, direct, nested = self.compiled[i]
                        args = args.copy()
                        for j, slot, offset in direct:
                            args[j] = ptrs[slot] + offset
                        for j, r in nested:
                            args[j] = _address_arg(ptrs, r)
                        try:
                            kernel.run(*grid3, stream, kernel.function, kernel.packed_metadata, None, None, None, *args,
                                       *tail)
                        except TypeError as e:
                            # a launcher that refuses integer addresses does so at the first launch, before any
                            # effect: the caller runs the function instead
                            if i == self.first_launch:
                                raise Unrecordable(f"the launcher refused a replayed launch: {e}") from e
                            raise
                elif kind == "alloc":
                    _, slot, shape, dtype = event
                    t = _empty(shape, dtype, device)
                    slots[slot], ptrs[slot] = t, t.data_ptr()
                elif kind == "group":
                    _, slot, nbytes, members = event
                    t = _empty((nbytes,), torch.uint8, device)
                    slots[slot] = t
                    base = t.data_ptr()
                    for m, offset, shape, dtype in members:
                        slots[m], ptrs[m] = (t, offset, shape, dtype), base + offset
                else:
                    _, slot, fn, refs, kwargs = event
                    t = fn(*[_tensor_arg(slots, r) for r in refs], **kwargs)
                    slots[slot], ptrs[slot] = t, t.data_ptr()
                for slot in frees:
                    slots[slot] = None
        if self.outputs is None:
            return None
        return [torch.empty(0, dtype=o[1], device=device) if o[0] == "empty" else _view(slots, o[1])
                for o in self.outputs]
