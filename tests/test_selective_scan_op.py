"""selective_scan_fn(backend='triton') as the custom ops vim_kernels::selective_scan_fwd / _bwd.

Schema, fake tensors and the autograd registration against the real kernels (``torch.library.opcheck``),
and an ``aot_eager`` fullgraph compile. Tiny shapes: the kernels run through the Triton interpreter here.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from test_selective_scan import make_inputs, run_both
from vim.kernels.selective_scan import selective_scan_fn
from vim.kernels.selective_scan import triton_op  # noqa: F401  (registers the vim_kernels::selective_scan_* ops)
from vim.kernels.selective_scan import triton_scan

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


pytestmark = pytest.mark.usefixtures("poisoned_kernel_outputs")


def leaves_of(inputs):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]


def op_args(inputs, softplus, reverse, last, train_plan=False):
    return (*inputs, softplus, reverse, last, train_plan)


# (shape args of make_inputs, its flags, softplus, reverse, chunk override, return_last_state)
CASES = {
    "all_features": ((2, 4, 7, 3), {}, True, False, None, True),
    "no_optional_reverse": ((1, 3, 5, 2), dict(has_D=False, has_z=False, has_bias=False), False, True, None, False),
    "z_only_chunked": ((1, 4, 9, 4), dict(has_D=False, has_bias=False), True, False, 4, True),
    "grouped_chunked_reverse": ((1, 4, 7, 2), dict(groups=2), True, True, 3, False),
    "channel_major_no_bias": ((2, 2, 5, 2), dict(token_major=False, has_bias=False), False, False, None, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_op_checks(case):
    """Schema, fake tensors (shapes, dtypes, strides; chunk summaries present or empty) and the
    autograd registration agree with the real kernels."""
    shape, flags, softplus, reverse, chunk, last = CASES[case]
    triton_scan.CHUNK_OVERRIDE = chunk
    inputs = leaves_of(make_inputs(*shape, seed=0, **flags))
    torch.library.opcheck(torch.ops.vim_kernels.selective_scan_fwd.default,
                          op_args(inputs, softplus, reverse, last))


@pytest.mark.parametrize("case", ["all_features", "grouped_chunked_reverse", "no_optional_reverse"])
def test_backward_op_checks(case):
    shape, flags, softplus, reverse, chunk, _ = CASES[case]
    triton_scan.CHUNK_OVERRIDE = chunk
    inputs = make_inputs(*shape, seed=1, **flags)
    _, _, hloc, S = torch.ops.vim_kernels.selective_scan_fwd(*op_args(inputs, softplus, reverse, False))
    assert (hloc.numel() > 0) == (chunk is not None) and (S.numel() > 0) == (chunk is not None)
    dout = torch.randn(inputs[0].shape, device=DEV)
    torch.library.opcheck(torch.ops.vim_kernels.selective_scan_bwd.default,
                          (dout, *inputs, softplus, reverse, hloc, S, False))


def run(fn, inputs, softplus, reverse):
    """out, last state and the gradient of every tensor input (None for absent ones)."""
    leaves = leaves_of(inputs)
    y, last = fn(*leaves, delta_softplus=softplus, return_last_state=True, reverse=reverse)
    assert not last.requires_grad
    (y.float().square().sum() + y.float().sum()).backward()
    return [y, last] + [t.grad if t is not None else None for t in leaves]


def assert_same(a, b, grads_from=None):
    """Same dtype, shape, strides and values; from index ``grads_from`` on (gradients that several chunks'
    programs add up with atomics, in no fixed order) within float32 rounding instead of bit for bit."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x is None or y is None:
            assert x is None and y is None
        else:
            assert x.dtype == y.dtype and x.shape == y.shape and x.stride() == y.stride()
            if grads_from is not None and i >= grads_from:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(x, y)


def test_float64_last_state_and_absent_grads():
    inputs = make_inputs(1, 3, 4, 2, has_D=False, has_bias=False, dtype=torch.float64, seed=3)
    inputs[2] = inputs[2].double()
    out = run(lambda *a, **k: selective_scan_fn(*a, backend="triton", **k), inputs, True, False)
    y, last = out[:2]
    assert y.dtype == torch.float64 and last.dtype == torch.float64 and last.shape == (1, 3, 2)
    # no D, no delta_bias: the op's backward returns None for them (a tensor there is an autograd error)
    assert out[2 + 5] is None and out[2 + 7] is None


def test_compiles_without_graph_breaks():
    triton_scan.CHUNK_OVERRIDE = 3   # chunk summaries saved for backward
    inputs = make_inputs(2, 4, 7, 2, seed=4)

    def fn(u, delta, A, B, C, D, z, bias):
        y, last = selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True,
                                    reverse=True, backend="triton")
        return (y.square().sum() + y.sum()) * 0.5, last

    counter = CompileCounterWithBackend("aot_eager")
    compiled_fn = torch.compile(fn, fullgraph=True, backend=counter)
    results = []
    for f in (fn, compiled_fn):
        leaves = leaves_of(inputs)
        loss, last = f(*leaves)
        loss.backward()
        results.append([loss, last] + [t.grad for t in leaves])
    assert counter.frame_count == 1
    targets = [n.target for g in counter.graphs for n in g.graph.nodes]
    assert {torch.ops.vim_kernels.selective_scan_fwd, torch.ops.vim_kernels.selective_scan_fwd.default} & set(targets)
    assert_same(results[1], results[0], grads_from=2)


def test_bad_shapes_still_raise_before_the_op():
    u, delta, A, Bm, Cm, D, z, bias = make_inputs(1, 4, 6, 2, seed=5)
    with pytest.raises(ValueError, match="z must have"):
        selective_scan_fn(u, delta, A, Bm, Cm, D, z[:, :, :3], backend="triton")
    with pytest.raises(ValueError, match="delta_bias must be"):
        selective_scan_fn(u, delta, A, Bm, Cm, D, z, bias[:2], backend="triton")


def test_triton_backend_on_cpu_tensors_is_a_clear_error(monkeypatch):
    """Where Triton compiles for the GPU (not the interpreter), CPU tensors given to any backend='triton' entry point
    are refused before a launch, which would otherwise fail inside Triton's driver with a pointer error."""
    from vim.kernels import DirectionParams, bimamba_v2_fn, rms_norm_fn

    monkeypatch.setattr(triton_scan, "_interpreted", lambda: False)
    u, delta, A, Bm, Cm, D, z, bias = make_inputs(1, 4, 6, 2, seed=5, device="cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors, got cpu ones"):
        selective_scan_fn(u, delta, A, Bm, Cm, D, z, bias, backend="triton")
    with pytest.raises(ValueError, match="backend='reference'"):
        rms_norm_fn(torch.randn(3, 8), torch.ones(8), backend="triton")
    E, N, R = 4, 2, 1
    direction = DirectionParams(conv_weight=torch.randn(E, 4), conv_bias=None, x_proj_weight=torch.randn(R + 2 * N, E),
                                dt_proj_weight=torch.randn(E, R), dt_proj_bias=torch.randn(E), A_log=torch.randn(E, N),
                                D=torch.ones(E))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        bimamba_v2_fn(torch.randn(1, 5, E), torch.randn(1, 5, E), direction, direction, backend="triton")
    # the automatic choice is unaffected: the reference on the CPU
    selective_scan_fn(u, delta, A, Bm, Cm, D, z, bias)


def test_op_plans_chunks_for_the_backward_where_autograd_records(training_plan_differs, monkeypatch):
    """Under autograd the forward op chunks as suits its backward (``train_plan``) and hands the flag to the backward
    op; without gradients it keeps the forward's own plan. Fakes and kernels agree on the chunk count either way,
    and the gradients are the reference's."""
    inputs = make_inputs(1, 8, 40, 2, seed=6)
    for train, nc in ((False, 2), (True, 3)):
        _, _, hloc, S = torch.ops.vim_kernels.selective_scan_fwd(*op_args(inputs, True, True, False, train))
        assert hloc.shape == (1, nc, 2, 8) and S.shape == (1, nc, 8)
        torch.library.opcheck(torch.ops.vim_kernels.selective_scan_fwd.default,
                              op_args(leaves_of(inputs), True, True, False, train))
        torch.library.opcheck(torch.ops.vim_kernels.selective_scan_bwd.default,
                              (torch.randn(inputs[0].shape, device=DEV), *inputs, True, True, hloc, S, train))
    plans = []
    planner = triton_scan._plan
    monkeypatch.setattr(triton_scan, "_plan", lambda *a, **k: plans.append(k.get("train")) or planner(*a, **k))
    with torch.no_grad():
        selective_scan_fn(*inputs, delta_softplus=True, backend="triton")
    assert plans == [False]
    plans.clear()
    run_both(inputs, reverse=True)   # outputs and gradients against the float64 reference
    assert plans == [True, True]   # the forward and the backward
