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
- every tensor a launch or ``linear`` reads lies inside one of the inputs or one of the recorded buffers: anything
  else (a torch copy made on the way, a cached tensor) makes the run unrecordable;
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

from . import launch

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
        self.events: list = []
        self.last_use: dict = {}
        self.keep: list = []     # the run's buffers stay alive while it records, so no two share an address
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
        self.keep.append(t)
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
        for slot, r in enumerate(self.ranges):
            if r is not None and r[0] <= ptr and ptr + extent <= r[0] + r[1]:
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
        frees: List[List[int]] = [[] for _ in self.events]
        for slot, i in self.last_use.items():
            if slot >= self.n_inputs and i >= 0:
                frees[i].append(slot)
        return Replay(len(self.ranges), self.events, frees)


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
    return base.as_strided(shape, stride, base.storage_offset() + offset // base.element_size())


class Replay:
    """One recorded run (see the module); called with inputs of the recorded signature."""

    def __init__(self, n_slots: int, events: list, frees: List[List[int]]):
        self.n_slots = n_slots
        self.events = events
        self.frees = frees
        self.interpreted = any(e[0] == "launch" and not e[1].cacheable for e in events)
        self.first_launch = next((i for i, e in enumerate(events) if e[0] == "launch"), -1)
        self.checked = False   # for the caller's first-use check (the mixer's ``_first_replay_checked``)

    def __call__(self, inputs: Sequence[Optional[torch.Tensor]], device: torch.device) -> None:
        from .selective_scan.triton_scan import _empty

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
                else:
                    _, slot, (a, w) = event
                    t = F.linear(_view(slots, a), _view(slots, w))
                    slots[slot], ptrs[slot] = t, t.data_ptr()
                for slot in frees:
                    slots[slot] = None
