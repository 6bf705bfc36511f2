"""kernels.launch: which launches reuse a compiled kernel and what they hand it (CPU: Triton's JIT and the compiled
kernel are stand-ins; the GPU tests run every kernel with ``launch.CHECK`` on, see conftest.py)."""
import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from vim.kernels import launch


def _kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = 3):
    pass


class _Compiled:
    """A compiled kernel: records what its launcher is handed."""

    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class _Jit(JITFunction):
    """Triton's JIT function with its compile-and-launch replaced: one stand-in kernel per Triton signature."""

    def __init__(self):
        super().__init__(_kernel)
        self.calls = []
        self.compiled = {}

    def run(self, *args, grid, warmup, **kwargs):
        self.calls.append((grid, args, warmup))
        sig = tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (type(a), repr(a))
                    for a in args)
        return self.compiled.setdefault((sig, tuple(kwargs.items())), _Compiled())


@pytest.fixture
def site(monkeypatch):
    if not launch._launcher_fits():
        pytest.skip(f"Triton {triton.__version__}: launches take Triton's path")
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234)
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.setattr(launch, "CHECK", False)
    return launch.CachedLaunch(_Jit())


def test_a_repeated_signature_skips_triton_and_gets_every_argument(site):
    x, y = torch.zeros(64), torch.zeros(64)
    first = site[(4, 2)](x, y, 64, 0.5, BLOCK=32, num_warps=4)
    assert len(site.jit_fn.calls) == 1 and first.launches == []   # Triton's path launched it
    x2, y2 = torch.ones(64), torch.ones(64)
    again = site[(4, 2)](x2, y2, 64, 0.5, BLOCK=32, num_warps=4)
    assert again is first and len(site.jit_fn.calls) == 1
    (launched,) = first.launches
    # grid padded to 3-D, the current stream, the compiled function; no hooks; arguments then defaults in order
    assert launched[:9] == (4, 2, 1, 1234, "function", "metadata", None, None, None)
    assert launched[9] is x2 and launched[10] is y2 and launched[11:] == (64, 0.5, 32, 3)


def test_what_triton_specializes_on_makes_a_new_signature(site):
    x = torch.zeros(64)
    site[(1,)](x, x, 64, 0.5, BLOCK=32)
    site[(1,)](x, x, 64, 0.5, BLOCK=32)
    assert len(site.jit_fn.calls) == 1
    variants = [((x[1:], x, 64, 0.5), {"BLOCK": 32}),                   # a pointer 16-byte aligned no more
                ((x.half(), x, 64, 0.5), {"BLOCK": 32}),                # another dtype
                ((x, x, 65, 0.5), {"BLOCK": 32}),                       # another integer
                ((x, x, 64, 1.0), {"BLOCK": 32}),                       # another float
                ((x, x, 64, 1), {"BLOCK": 32}),                         # equal to the float 1.0, typed apart
                ((x, x, 64, 0.5), {"BLOCK": 64}),                       # another constexpr
                ((x, x, 64, 0.5), {"BLOCK": 32, "num_warps": 8})]       # another option
    for i, (args, kwargs) in enumerate(variants):
        site[(1,)](*args, **kwargs)
        assert len(site.jit_fn.calls) == 2 + i, i


def test_triton_keeps_the_launch_with_hooks_grid_functions_and_unknown_arguments(site, monkeypatch):
    x = torch.zeros(64)
    site[(1,)](x, x, 64, 0.5, BLOCK=32)
    site[lambda meta: (1,)](x, x, 64, 0.5, BLOCK=32)
    site[(1,)](x, x, 64, [0.5], BLOCK=32)   # a list: no signature of ours
    assert len(site.jit_fn.calls) == 3
    runtime = triton.knobs.runtime
    hook = lambda *a: None   # noqa: E731
    if hasattr(runtime.launch_enter_hook, "add"):   # Triton >= 3.7: chains of hooks
        runtime.launch_enter_hook.add(hook)
        try:
            site[(1,)](x, x, 64, 0.5, BLOCK=32)
        finally:
            runtime.launch_enter_hook.remove(hook)
    else:
        monkeypatch.setattr(runtime, "launch_enter_hook", hook)
        site[(1,)](x, x, 64, 0.5, BLOCK=32)
    assert len(site.jit_fn.calls) == 4
    monkeypatch.setattr(launch, "ENABLED", False)
    site[(1,)](x, x, 64, 0.5, BLOCK=32)
    assert len(site.jit_fn.calls) == 5


def test_check_compares_with_the_kernel_triton_picks(site, monkeypatch):
    x = torch.zeros(64)
    compiled = site[(1,)](x, x, 64, 0.5, BLOCK=32)
    monkeypatch.setattr(launch, "CHECK", True)
    site[(1,)](x, x, 64, 0.5, BLOCK=32)
    assert site.jit_fn.calls[-1][2] is True and len(compiled.launches) == 1   # looked up, not launched, by Triton
    site.kernels[next(iter(site.kernels))] = (_Compiled(), (32, 3))           # a stale entry
    with pytest.raises(AssertionError, match="other than the one Triton picks"):
        site[(1,)](x, x, 64, 0.5, BLOCK=32)


def test_the_cache_starts_over_when_full(site, monkeypatch):
    monkeypatch.setattr(launch, "MAX_SIGNATURES", 3)
    x = torch.zeros(64)
    for n in range(5):
        site[(1,)](x, x, n, 0.5, BLOCK=32)
    assert len(site.kernels) == 2


def test_interpreted_kernels_take_tritons_path():
    from vim.kernels.selective_scan import triton_scan
    kernel = triton_scan._fwd_kernel
    assert isinstance(kernel, launch.CachedLaunch)
    if triton_scan._interpreted():
        assert not kernel.cacheable
