"""kernels/eager.py: eager calls of the custom ops skip the dispatcher where nothing could tell, with the op's own
results, and keep the op where something watches (compile, modes, subclasses, other devices)."""
import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vim  # noqa: F401  registers the models
from vim.kernels import eager, rms_norm_fn
from vim.kernels.selective_scan import triton_scan

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or triton_scan._interpreted()),
                                reason="needs a CUDA GPU or Triton's interpreter")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


class Ops(TorchDispatchMode):
    """Records the custom ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vim_kernels":
            self.seen.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _triton_everywhere(monkeypatch):
    """The whole model on the Triton path, also on the CPU (the interpreter)."""
    import vim.kernels.embed.interface as embed_interface
    import vim.kernels.norm.interface as norm_interface
    import vim.kernels.patchify.interface as patchify_interface
    import vim.models.layers as layers

    for module in (embed_interface, norm_interface, patchify_interface):
        monkeypatch.setattr(module, "resolve_backend", lambda *args: "triton")
    monkeypatch.setattr(layers, "_patch_gemm", lambda x, patch, stride: patch == stride)


@pytest.mark.parametrize("packed_inference", [False, True])
def test_direct_calls_give_the_dispatched_results(monkeypatch, packed_inference):
    """A small model's logits and every parameter gradient (or, without gradients, its in-place inference op) are
    those of the dispatched ops, bit for bit (on the GPU the gradients up to the order of atomic sums), and the direct
    path reaches no op through the dispatcher."""
    _triton_everywhere(monkeypatch)
    torch.manual_seed(0)
    model = timm.create_model("vim_tiny", depth=1, embed_dim=32, img_size=32, num_classes=5,
                              scan_backend="triton").to(DEV)
    x = torch.randn(2, 3, 32, 32, device=DEV)

    def run(direct):
        monkeypatch.setattr(eager, "ENABLED", direct)
        model.zero_grad(set_to_none=True)
        if packed_inference:
            with torch.no_grad():
                return [model(x)]
        out = model(x)
        out.square().sum().backward()
        return [out] + [p.grad for p in model.parameters()]

    with Ops() as ops:   # a dispatch mode takes the op's path, direct calls or not: the calls are seen
        expected = run(True)
    assert ops.seen
    # and without a mode none of the calls passes the dispatcher: a vim_kernels op called now fails the test
    packet_call = torch._ops.OpOverloadPacket.__call__

    def refuse(packet, *args, **kwargs):
        assert not packet._qualified_op_name.startswith("vim_kernels::"), packet._qualified_op_name
        return packet_call(packet, *args, **kwargs)

    monkeypatch.setattr(torch._ops.OpOverloadPacket, "__call__", refuse)
    got = run(True)
    assert len(got) == len(expected)
    assert torch.equal(got[0], expected[0])
    for a, b in zip(got[1:], expected[1:]):
        if DEV == "cpu":
            assert torch.equal(a, b)
        else:   # the backward walks sum dB / dC with atomic adds, in no fixed order
            assert ((a - b).norm() / b.norm()).item() < 1e-5
    with pytest.raises(AssertionError, match="vim_kernels::"):
        run(False)


def test_autograd_records_the_direct_call_as_the_ops_function():
    x = torch.randn(3, 8, device=DEV, requires_grad=True)
    w = torch.randn(8, device=DEV, requires_grad=True)
    y = rms_norm_fn(x, w, backend="triton")
    assert type(y.grad_fn).__name__ == "rms_norm_fwdBackward"
    with torch.no_grad():
        assert rms_norm_fn(x, w, backend="triton").grad_fn is None


def test_watched_calls_take_the_op(monkeypatch):
    """Modes, subclasses, other devices and compilation see the op; so does a call of an op without an autograd
    formula whose inputs need a gradient (torch then reports the missing formula)."""
    x = torch.randn(3, 8, device=DEV)
    w = torch.ones(8, device=DEV)
    assert eager._direct()
    with Ops() as ops:
        rms_norm_fn(x, w, backend="triton")
    assert ops.seen == ["rms_norm_fwd"]
    with torch.device(DEV):   # a torch function mode
        assert not eager._direct()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not eager._direct()
    monkeypatch.undo()

    class Sub(torch.Tensor):
        pass

    assert eager._plain([x, [w, None], 1.0]) is False
    assert eager._plain([x, [w.requires_grad_()]]) is True
    assert eager._plain([x.as_subclass(Sub)]) is None
    assert eager._plain([torch.empty(2, device="meta")]) is None

    calls = []
    from vim.kernels.norm import triton_norm

    op = triton_norm._rms_norm_bwd
    monkeypatch.setattr(op, "op", lambda *args: calls.append("op"))
    monkeypatch.setattr(op, "impl", lambda *args: calls.append("impl"))
    dy = torch.randn(3, 8, device=DEV, requires_grad=True)
    rstd = torch.ones(3, device=DEV)
    op(dy, x, w, rstd)
    with torch.no_grad():
        op(dy, x, w, rstd)
    assert calls == ["op", "impl"]


def test_off_switch_sends_every_call_to_the_op(monkeypatch):
    monkeypatch.setattr(eager, "ENABLED", False)
    assert not eager._direct()
    with Ops() as ops:
        rms_norm_fn(torch.randn(3, 8, device=DEV), torch.ones(8, device=DEV), backend="triton")
    assert ops.seen == ["rms_norm_fwd"]
