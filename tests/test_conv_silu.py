"""Triton depthwise conv + SiLU (forward and backward) against float64 autograd of the readable reference."""
import pytest
import torch

from vim.kernels.bimamba import conv
from vim.kernels.bimamba.naive import depthwise_conv_silu_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("poisoned_kernel_outputs")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def strided(batch, L, E, dtype):
    """First half of a wider (B, L, 2E) tensor, as in_proj's output chunks arrive."""
    return torch.randn(batch, L, 2 * E, device=DEV).to(dtype)[..., :E]


def check(batch, L, E, W, reverse, bias=True, dtype=torch.float32, n_grads=1, accum=False, tol=1e-5):
    x = strided(batch, L, E, dtype)
    weight = (torch.randn(E, 1, W) * 0.5).to(DEV)
    b = (torch.randn(E) * 0.3).to(DEV) if bias else None
    # grads: a transposed (B, E, L) buffer and a strided slice, summed by the kernel
    grads = [torch.randn(batch, E, L, device=DEV).to(dtype).transpose(1, 2), strided(batch, L, E, dtype)][:n_grads]
    dx_accum = torch.randn(batch, L, E, device=DEV) if accum else None

    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = b.double().requires_grad_() if bias else None
    ref = depthwise_conv_silu_ref(x64, w64, b64, reverse).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref, [x64, w64] + ([b64] if bias else []), sum(g.double() for g in grads))

    out = conv.conv_silu(x, weight, b, reverse)
    assert out.dtype == dtype and rel(out, ref) < tol, f"out rel err {rel(out, ref):.2e}"
    dx, dw, db = conv.conv_silu_backward(grads, x, weight, b, reverse, dx_accum=dx_accum,
                                         dx_dtype=torch.float32 if accum else None)
    dx_ref = ref_grads[0] + (dx_accum.double() if accum else 0)
    assert dx.dtype == (torch.float32 if accum else dtype) and dx.shape == x.shape
    assert dw.dtype == torch.float32 and dw.shape == weight.shape
    assert rel(dx, dx_ref) < tol, f"dx rel err {rel(dx, dx_ref):.2e}"
    assert rel(dw, ref_grads[1]) < tol, f"dweight rel err {rel(dw, ref_grads[1]):.2e}"
    if bias:
        assert db.shape == (E,) and rel(db, ref_grads[2]) < tol, f"dbias rel err {rel(db, ref_grads[2]):.2e}"
    else:
        assert db is None


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("L", [1, 2, 3, 5, 37])
def test_lengths(L, reverse):
    check(2, L, 24, 4, reverse)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("W", [2, 3])
def test_other_widths_no_bias(W, reverse):
    check(1, 37, 40, W, reverse, bias=False)


@pytest.mark.parametrize("reverse", [False, True])
def test_two_grads_and_accum(reverse):
    check(2, 37, 40, 4, reverse, n_grads=2, accum=True)


@pytest.mark.parametrize("reverse", [False, True])
def test_whole_sequence_per_program(reverse, monkeypatch):
    """One program walks every tile of a sequence, carrying its dweight/dbias sums across tiles."""
    monkeypatch.setattr(conv, "BWD_TARGET_PROGRAMS", 1)
    check(2, 70, 72, 4, reverse, n_grads=2)   # E=72: two channel blocks, the second partly masked


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, reverse):
    check(2, 37, 24, 4, reverse, dtype=dtype, n_grads=2, tol=1e-2)


@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("reverse", [False, True])
def test_gpu_model_shapes(reverse):
    """Vim-S-like shapes: twelve channel blocks, sequences split over programs, compiled kernels."""
    check(8, 197, 768, 4, reverse, dtype=torch.bfloat16, n_grads=2, accum=True, tol=1e-2)


def test_backward_rejects_wide_kernels():
    x = torch.randn(1, 5, 8, device=DEV)
    with pytest.raises(ValueError, match="widths up to 4"):
        conv.conv_silu_backward((x,), x, torch.randn(8, 1, 5, device=DEV), None, False)
