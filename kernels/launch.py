"""Triton launches that skip ``JITFunction.run``'s argument binding once a launch's signature has compiled.

An eager vim_tiny forward makes ~220 Triton launches and a training step ~650; below batch ~256 the GPU waits for the
host (docs/benchmarks.md, "Session 37"). For every launch Triton binds the arguments, specializes each one in C++
(dtypes, which integers are 1 or multiples of 16, which pointers are 16-byte aligned), builds its cache key and checks
the kernel's globals. That costs ~37 us of host time on the H200 for 26 arguments, and more for the scan's ~70.
Handing the compiled kernel its arguments costs ~12 us.

``cached_launch`` wraps a ``@triton.jit`` kernel so that ``kernel[grid](*args, **kwargs)`` goes through Triton the
first time a signature is seen and straight to that compiled kernel after. The signature is built for speed rather
than as Triton's:
- integers and strings by value, floats and booleans by type and value;
- tensors by dtype and 16-byte alignment, tuples element by element;
- every keyword (constexprs, and options such as ``num_warps``).

That is finer than Triton's specialization, so a signature never maps to a kernel Triton would not have chosen. The
launchers' integers are shapes and strides, which repeat from call to call. A session-37 attempt that built Triton's
own specialization in Python cost more than Triton's binder; this one makes one type lookup per integer.

Triton's own path is kept in its interpreter (the CPU tests), with launch or pre-run hooks installed (profilers such as
proton use them), for grid functions, for argument types other than those above, and with ``ENABLED = False``.
``CHECK = True`` (the GPU tests set it) also asks Triton, before every cached launch, which kernel it would launch, and
fails if that is not the cached one.
"""
from __future__ import annotations

import functools
import threading

import torch
import triton

# Off: every launch through JITFunction.run (A/B timings, and an escape hatch)
ENABLED = True
# On: each cached launch is checked against the kernel Triton picks for its arguments (tests)
CHECK = False
# Signatures kept per kernel; past this the cache starts over (inputs whose sizes change on every call)
MAX_SIGNATURES = 256
# The running ``replay.Recorder`` (set by ``replay.record``): told of every launch its thread makes
RECORDER = None


def recording():
    """The recording this thread is running (``RECORDER``), or None."""
    recorder = RECORDER
    return recorder if recorder is not None and recorder.thread == threading.get_ident() else None


def not_replayable(why: str) -> None:
    """Tells a running recording of this thread (``replay``) that the run did something a replay would not repeat: a
    torch function writing in place into a buffer."""
    recorder = recording()
    if recorder is not None:
        recorder.not_replayable(why)


# by value; floats and booleans by type and value (True == 1 == 1.0 as keys, but Triton types them apart)
_PLAIN = frozenset((int, str, type(None), torch.dtype))
_TENSORS = frozenset((torch.Tensor, torch.nn.Parameter))


def _signature_of(a):
    """A tensor's or tuple's part of a signature (plain values are their own)."""
    t = type(a)
    if t in _TENSORS or isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if t is float or t is bool:
        return t, a
    if t is tuple:
        return tuple(x if type(x) in _PLAIN else _signature_of(x) for x in a)
    raise TypeError(f"no cached launch for a {t.__name__} argument")


def _launcher_fits() -> bool:
    """Whether this Triton's ``CompiledKernel.run`` takes what ``_launch`` hands it, as 3.6 (run on the H200) and 3.8
    (read in its source) do; other versions take Triton's path."""
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 6)


def _hooks_installed(jit_fn) -> bool:
    return launch_hooks_installed() or bool(jit_fn.pre_run_hooks)


def launch_hooks_installed() -> bool:
    """Whether Triton's process-wide launch hooks are set (profilers such as proton use them)."""
    runtime = triton.knobs.runtime
    return (_hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)
            or runtime.add_stages_inspection_hook is not None)


def _hook_set(hook) -> bool:
    """A launch hook is a function or None up to Triton 3.6, a chain of functions (``HookChain``) from 3.7."""
    return hook is not None and bool(getattr(hook, "calls", True))


class CachedLaunch:
    """A ``@triton.jit`` kernel whose launches reuse the compiled kernel of their signature (see the module)."""

    def __init__(self, jit_fn):
        self.jit_fn = jit_fn
        self.cacheable = isinstance(jit_fn, triton.runtime.JITFunction) and _launcher_fits()
        self.kernels = {}
        if self.cacheable:
            self._params = tuple(jit_fn.params)
        functools.update_wrapper(self, jit_fn.fn if hasattr(jit_fn, "fn") else jit_fn)

    def __getattr__(self, name):   # anything else asked of the kernel (src, fn, cache, ...) is the JIT function's
        return getattr(self.__dict__["jit_fn"], name)

    def __getitem__(self, grid):
        if recording() is not None:
            return functools.partial(self._recorded, grid)
        return self._launcher(grid)

    def _launcher(self, grid):
        if not (ENABLED and self.cacheable) or callable(grid):
            return self.jit_fn[grid]
        return functools.partial(self._launch, grid)

    def _recorded(self, grid, *args, **kwargs):
        """A launch, reported to the recording (with the compiled kernel it ran, where it ran one)."""
        kernel = self._launcher(grid)(*args, **kwargs)
        RECORDER.launched(self, grid, args, kwargs, kernel)
        return kernel

    def _tail(self, n_args: int, kwargs: dict) -> tuple:
        """The bound values of the parameters after the positional ones, as Triton binds them."""
        tail = []
        for p in self._params[n_args:]:
            if p.name in kwargs:
                tail.append(kwargs[p.name])
            elif p.has_default:
                tail.append(p.default)
            else:
                raise TypeError(f"{self.jit_fn.fn.__name__}: missing argument {p.name!r}")
        return tuple(tail)

    def _launch(self, grid, *args, **kwargs):
        try:
            # the common cases inline: a list comprehension of them costs ~20% less than one call per argument
            key = (torch._C._cuda_getDevice(),
                   tuple([a if type(a) in _PLAIN else (a.dtype, a.data_ptr() % 16 == 0) if type(a) in _TENSORS
                          else _signature_of(a) for a in args]), tuple(kwargs.items()))
            entry = self.kernels.get(key)
        except TypeError:   # an argument type without a signature, or an unhashable keyword value
            return self.jit_fn[grid](*args, **kwargs)
        if entry is None or _hooks_installed(self.jit_fn):
            kernel = self.jit_fn[grid](*args, **kwargs)
            if entry is None and kernel is not None:
                if len(self.kernels) >= MAX_SIGNATURES:
                    self.kernels.clear()
                self.kernels[key] = (kernel, self._tail(len(args), kwargs))
            return kernel
        if CHECK:   # the kernel Triton would launch, looked up (and compiled if need be) without launching it
            chosen = self.jit_fn.run(*args, grid=grid, warmup=True, **kwargs)
            if chosen is not entry[0]:
                raise AssertionError(f"cached launch of {self.jit_fn.fn.__name__}: the signature {key} maps to a "
                                     "kernel other than the one Triton picks")
        kernel, tail = entry
        n = len(grid)
        device = key[0]
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                   torch._C._cuda_getCurrentRawStream(device), kernel.function, kernel.packed_metadata, None, None,
                   None, *args, *tail)
        return kernel


def cached_launch(jit_fn) -> CachedLaunch:
    """Decorator, above ``@triton.jit``: see the module docstring."""
    return CachedLaunch(jit_fn)
