"""Host-side replays: a function's launches worked out once per signature, then issued without the planning.

An eager vim_tiny forward waits for its host below batch ~256 (docs/benchmarks.md, "Host overhead"): every mixer call
checks its inputs, plans each kernel, builds views and signature keys, and then issues the same eight launches and two
GEMMs, with the same grids and scalars, as the call before. ``record`` runs such a function once and turns what it did
into a ``Replay``: the same events in the same order, where every tensor argument is a byte offset into one of the
call's inputs or into a buffer the run allocated (through ``triton_scan._empty``, or as the output of ``linear``). A
replay allocates those buffers in the same order, hands the compiled kernels integer addresses (Triton's launcher takes
them as it takes tensors, without the driver's per-pointer query) and drops each buffer after its last use.

What a replay can stand for; the recorder checks it, and a run that breaks it is not replayed:
- the function's only effects are its launches' writes into its inputs (it returns nothing);
- every tensor a launch or ``linear`` reads lies inside one of the inputs or one of the recorded buffers still alive
  (the recording lets the run free its buffers as it would, and tells a live one by its storage): anything else (a
  torch copy made on the way, a cached tensor) makes the run unrecordable;
- its launches go through ``cached_launch`` with a tuple grid, and take tensors, numbers, strings or None;
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
    """A tensor argument: (slot, byte offset, shape, strides, dtype)."""
    __slots__ = ()


class Recorder:
    """What one run did, reported by ``triton_scan._empty``, ``CachedLaunch`` and ``linear`` while it is
    ``launch.RECORDER``."""

    def __init__(self, inputs: Sequence[Optional[torch.Tensor]]):
        self.thread = threading.get_ident()
        self.n_inputs = len(inputs)
        # per slot (inputs, then buffers in order of allocation): (address, extent in bytes), None for an absent input
        self.ranges = [(t.data_ptr(), _extent(t), t.dtype) if t is not None and t.numel() else None for t in inputs]
        # per buffer slot, whether its memory is still held (freed memory may be handed out again, also to tensors
        # the recording does not see)
        self.alive: list = [None] * len(inputs)
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

    def linear(self, a: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
        if self.failure is None:
            try:
                refs = (self._ref(a), self._ref(w))
                self._event(("linear", len(self.ranges), refs), refs)
                self._new_buffer(out, None)
            except Unrecordable as e:
                self.failure = str(e)

    def _new_buffer(self, t: torch.Tensor, event) -> None:
        if self.failure is not None:
            return
        if t.numel() == 0 or not t.is_contiguous():
            self.failure = f"a buffer {tuple(t.shape)} that is empty or not contiguous"
            return
        self.ranges.append((t.data_ptr(), _extent(t), t.dtype))
        self.alive.append(StorageWeakRef(t.untyped_storage()))
        if event is not None:
            self._event(event, ())
        self.last_use[len(self.ranges) - 1] = len(self.events) - 1

    def _ref(self, a):
        if not isinstance(a, _TENSORS):
            if isinstance(a, _SCALARS):
                return a
            raise Unrecordable(f"an argument of type {type(a).__name__}")
        if a.numel() == 0:
            raise Unrecordable("an empty tensor argument")
        ptr, extent = a.data_ptr(), _extent(a)
        # the latest live buffer first: a freed one's addresses may belong to a later one now
        for slot in range(len(self.ranges) - 1, -1, -1):
            r, alive = self.ranges[slot], self.alive[slot]
            if r is not None and r[0] <= ptr and ptr + extent <= r[0] + r[1] and (alive is None or not alive.expired()):
                if r[2] != a.dtype:
                    raise Unrecordable(f"a {a.dtype} view of a {r[2]} tensor")
                return _Ref((slot, ptr - r[0], tuple(a.shape), a.stride(), a.dtype))
        raise Unrecordable(f"a tensor argument {tuple(a.shape)} {a.dtype} outside the inputs and the recorded buffers")

    def _event(self, event, refs) -> None:
        for r in refs:
            if type(r) is _Ref:
                self.last_use[r[0]] = len(self.events)
        self.events.append(event)

    def replay(self) -> "Replay":
        if self.failure is not None:
            raise Unrecordable(self.failure)
        # a GEMM's operands stay buffers of their own: typing a group member for torch costs more than its allocation
        operands = {r[0] for e in self.events if e[0] == "linear" for r in e[2]}
        events, n_slots, last_use = _grouped(self.events, len(self.ranges), dict(self.last_use), operands)
        frees: List[List[int]] = [[] for _ in events]
        for slot, i in last_use.items():
            if slot >= self.n_inputs and i >= 0:
                frees[i].append(slot)
        return Replay(n_slots, events, frees)


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
    remapped = {slot: new_index[i] for slot, i in last_use.items()}
    for e in out:
        if e[0] == "group":
            remapped[e[1]] = max(remapped[m[0]] for m in e[3])
    return out, n_slots, remapped


# One recording at a time in the process; launches from other threads meanwhile are not reported to it
_RECORDING = threading.Lock()
BUSY = object()


def record(fn: Callable, inputs: Sequence[Optional[torch.Tensor]]):
    """Runs ``fn(*inputs)`` once (its effects happen as without recording) and returns its ``Replay``, None where the
    run cannot be replayed (see the module), or ``BUSY`` where another thread was recording (the run was not
    recorded)."""
    if not _RECORDING.acquire(blocking=False):
        fn(*inputs)
        return BUSY
    recorder = Recorder(inputs)
    try:
        launch.RECORDER = recorder
        result = fn(*inputs)
    finally:
        launch.RECORDER = None
        _RECORDING.release()
    if result is not None:
        return None
    try:
        return recorder.replay()
    except Unrecordable:
        return None


def linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(a, w)``, reported to a running recording."""
    out = F.linear(a, w)
    recorder = launch.RECORDER
    if recorder is not None and recorder.thread == threading.get_ident():
        recorder.linear(a, w, out)
    return out


def _view(slots: list, ref) -> torch.Tensor:
    """The tensor argument ``ref`` on this call's slots (the interpreter's launches and ``linear``'s operands)."""
    slot, offset, shape, stride, _ = ref
    base = slots[slot]
    if type(base) is tuple:   # a member of a group, typed on first use: (group buffer, byte offset, shape, dtype)
        buffer, start, bshape, dtype = base
        base = slots[slot] = buffer[start:start + _nbytes(bshape, dtype)].view(dtype).view(bshape)
    return base.as_strided(shape, stride, base.storage_offset() + offset // base.element_size())


class Replay:
    """One recorded run (see the module); called with inputs of the recorded signature."""

    def __init__(self, n_slots: int, events: list, frees: List[List[int]]):
        self.n_slots = n_slots
        self.events = events
        self.frees = frees
        self.interpreted = any(e[0] == "launch" and not e[1].cacheable for e in events)
        self.first_launch = next((i for i, e in enumerate(events) if e[0] == "launch"), -1)

    def __call__(self, inputs: Sequence[Optional[torch.Tensor]], device: torch.device) -> None:
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
                        launcher.jit_fn[grid](*[_view(slots, r) if type(r) is _Ref else r for r in refs], **kwargs)
                    else:
                        n = len(grid)
                        args = [ptrs[r[0]] + r[1] if type(r) is _Ref else r for r in refs]
                        try:
                            kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream,
                                       kernel.function, kernel.packed_metadata, None, None, None, *args, *tail)
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
                    _, slot, (a, w) = event
                    t = F.linear(_view(slots, a), _view(slots, w))
                    slots[slot], ptrs[slot] = t, t.data_ptr()
                for slot in frees:
                    slots[slot] = None
