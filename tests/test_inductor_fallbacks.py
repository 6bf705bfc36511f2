"""kernels/inductor_fallbacks.py: the custom ops reach Inductor as registered fallbacks, never through its implicit
fallback, whose log formatted a deep argument's whole IR and hung the compile of a vim_tiny training step."""
import logging

import pytest
import torch

from vim.kernels import add_rms_norm_fn, inductor_fallbacks, rms_norm_fn
from vim.kernels.selective_scan import triton_op, triton_scan  # noqa: F401  (the scan's ops register on import)

lowering = pytest.importorskip("torch._inductor.lowering")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or triton_scan._interpreted()),
                                reason="needs a CUDA GPU or Triton's interpreter")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def unregistered(monkeypatch):
    """Inductor as in a fresh process: none of the ops lowered yet (put back afterwards)."""
    for op in inductor_fallbacks.overloads():
        monkeypatch.delitem(lowering.lowerings, op, raising=False)
    monkeypatch.setattr(inductor_fallbacks, "_registered", False)


def test_every_op_is_listed():
    """The scan's ops too, whose module selective_scan_fn imports on first use (then ``_registered`` starts over)."""
    names = {f"vim_kernels::{op.__name__.split('.')[0]}" for op in inductor_fallbacks.overloads()}
    assert len(names) == len(inductor_fallbacks.OPS) == 12
    assert {"vim_kernels::bimamba_v2_bwd", "vim_kernels::rms_norm_bwd", "vim_kernels::patch_rows"} <= names


def test_registered_with_the_implicit_paths_layout_constraint(unregistered):
    assert inductor_fallbacks.register_fallbacks()
    for op in inductor_fallbacks.overloads():
        assert op in lowering.lowerings
        implicit = lowering.tag_to_layout_constraint(lowering.get_layout_constraint_tag(op, with_default=True))
        assert lowering.maybe_layout_constraints(op) is implicit


def test_a_compile_registers_them_through_the_fakes(unregistered):
    x = torch.randn(2, 8, device=DEV)
    w = torch.ones(8, device=DEV)
    torch._dynamo.reset()
    torch.compile(lambda t: rms_norm_fn(t, w, backend="triton"), backend="aot_eager")(x)
    assert all(op in lowering.lowerings for op in inductor_fallbacks.overloads())


def test_inductor_compiles_a_norm_chain_without_implicit_fallbacks(unregistered, caplog):
    """A chain of norms, forward and backward, under Inductor: the same values as eager, and no op of ours takes the
    implicit fallback (on torch 2.14 its log is lazy, formatted here only because INFO is captured)."""
    torch.manual_seed(0)
    x0 = torch.randn(3, 16, device=DEV)
    w = torch.randn(16, device=DEV)

    def chain(x, w):
        s, y = x, rms_norm_fn(x, w, backend="triton")
        for _ in range(3):
            s, y = add_rms_norm_fn(s, y * 0.5, w, backend="triton")
        return y

    def run(fn):
        x, ww = x0.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(x, ww)
        y.square().sum().backward()
        return y, x.grad, ww.grad

    expected = run(chain)
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="torch._inductor.graph"):
        got = run(torch.compile(chain, backend="inductor"))
    assert not [r for r in caplog.records if "implicit fallback" in r.getMessage() and "vim_kernels" in r.getMessage()]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
