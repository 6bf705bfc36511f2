import os

import pytest

# pytest -n (xdist) runs a worker a core; intra-op threads on top of that would only contend for the same cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

# Triton kernels run on the CPU through the interpreter when no GPU is present; the variable
# must be set before triton is first imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def checked_cached_launches(monkeypatch):
    """On the GPU, every cached Triton launch (kernels.launch) first asks Triton which kernel it would have launched
    and fails where that is not the one the cache holds."""
    from vim.kernels import launch

    monkeypatch.setattr(launch, "CHECK", True)


@pytest.fixture(autouse=True)
def fresh_replays():
    """Each test starts without recorded mixer calls (kernels/replay.py): a recording made by an earlier test would
    stand in for the mixer where a test watches the mixer's own functions run."""
    from vim.kernels.bimamba import triton_bimamba

    triton_bimamba.clear_replays()
    yield
    triton_bimamba.clear_replays()


@pytest.fixture
def poisoned_kernel_outputs():
    """Every buffer a kernel allocates (through triton_scan._empty: scan, bimamba, conv, norm) starts as NaN,
    so an element a kernel never writes fails the comparison; a test's chunk override is undone after it."""
    from vim.kernels.selective_scan import triton_scan

    triton_scan.POISON_OUTPUTS = True
    yield
    triton_scan.POISON_OUTPUTS = False
    triton_scan.CHUNK_OVERRIDE = None


@pytest.fixture
def training_plan_differs(monkeypatch):
    """Targets under which a short sequence is chunked one way for a forward alone and another where a backward
    follows (``train_plan``): L = 40 tokens of one (batch row, 8-channel block) get 2 chunks of 32 tokens from the
    forward's plan and 3 of 16 from the training plan."""
    from vim.kernels.selective_scan import triton_scan

    monkeypatch.setitem(triton_scan.CONFIG, "MIN_CHUNK", 1)
    monkeypatch.setitem(triton_scan.CONFIG, "TARGET_PROGRAMS", 2)
    monkeypatch.setattr(triton_scan, "_walk_chunk_target", lambda device: 3)


@pytest.fixture
def rule_verdicts(monkeypatch):
    """``watch(name)`` wraps the launch rule ``triton_scan.<name>`` and returns the list of every verdict it then
    gives, so that a test can check the rule took its path in every launch."""
    from vim.kernels.selective_scan import triton_scan

    def watch(name):
        verdicts, rule = [], getattr(triton_scan, name)
        monkeypatch.setattr(triton_scan, "PLAN_CACHE", False)   # every launch asks the rule, none reuses a plan
        monkeypatch.setattr(triton_scan, name, lambda *args: verdicts.append(rule(*args)) or verdicts[-1])
        return verdicts
    return watch


def _interpreted() -> bool:
    from vim.kernels.selective_scan import triton_scan

    return triton_scan._interpreted()


@pytest.fixture
def emulated_ptx(monkeypatch):
    """The kernels' GPU-only inline PTX paths, run on the CPU by the interpreter (``tests/ptx_emulation.py``):
    returns the counts of the instructions emulated. Skips where the kernels run compiled (a GPU runs the PTX)."""
    if not _interpreted():
        pytest.skip("the interpreter emulates the inline PTX; compiled, the GPU runs it")
    from triton.runtime import interpreter

    # private hooks (triton 3.6 and 3.8 have both): a triton without them skips these tests, saying so
    if not (hasattr(interpreter, "GridExecutor") and hasattr(interpreter.InterpreterBuilder, "create_inline_asm")):
        pytest.skip("this triton's interpreter has no inline-asm hook to emulate the PTX through")
    from ptx_emulation import emulate_ptx

    return emulate_ptx(monkeypatch)


@pytest.fixture(autouse=True)
def _ptx_everywhere(request):
    """With VIM_TEST_EMULATE_PTX=1, every test that runs the interpreter runs the kernels' inline PTX emulated."""
    if _interpreted():
        from ptx_emulation import EVERYWHERE

        if EVERYWHERE:
            request.getfixturevalue("emulated_ptx")
