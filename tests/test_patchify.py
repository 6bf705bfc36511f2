"""The Triton patch rows (the model's CUDA stem) against torch's permuting copy: every element, several patch and
image shapes, strided images, half-precision outputs; the reference where the image needs a gradient."""
import pytest
import torch

from vim.kernels import patch_rows, patch_rows_ref
from vim.kernels.selective_scan import triton_scan

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

pytestmark = pytest.mark.usefixtures("poisoned_kernel_outputs")


def assert_rows_equal(out, ref):
    if out.dtype in (torch.bfloat16, torch.float16) and triton_scan._interpreted():
        # the interpreter's casts truncate where a GPU's (and torch's) round to nearest: within one step
        assert torch.allclose(out.float(), ref.float(), rtol=2.0 ** -7, atol=0)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("shape, patch", [((2, 3, 32, 48), (16, 16)), ((1, 1, 16, 16), (16, 16)),
                                          ((3, 4, 28, 42), (14, 14)), ((2, 3, 16, 40), (8, 4)),
                                          ((1, 3, 16, 16 * 17), (16, 16))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(shape, patch, dtype):
    x = torch.randn(shape, device=DEV)
    out = patch_rows(x, patch, dtype, backend="triton")
    ref = patch_rows_ref(x, *patch, dtype)
    assert out.shape == ref.shape == (shape[0], shape[2] // patch[0], shape[3] // patch[1], shape[1], *patch)
    assert out.dtype == dtype
    assert_rows_equal(out, ref)


def test_strided_and_half_images():
    x = torch.randn(2, 3, 32, 64, device=DEV)
    channels_last = x.to(memory_format=torch.channels_last)
    assert torch.equal(patch_rows(channels_last, (16, 16), backend="triton"), patch_rows_ref(x, 16, 16, x.dtype))
    crop = torch.randn(2, 3, 40, 80, device=DEV)[:, :, 4:36, 8:72]
    assert torch.equal(patch_rows(crop, (16, 16), backend="triton"), patch_rows_ref(crop, 16, 16, x.dtype))
    half = x.to(torch.bfloat16)
    assert torch.equal(patch_rows(half, (16, 16), backend="triton"), patch_rows_ref(half, 16, 16, half.dtype))
    empty = torch.randn(0, 3, 32, 32, device=DEV)
    assert patch_rows(empty, (16, 16), backend="triton").shape == (0, 2, 2, 3, 16, 16)


def test_gradient_takes_the_reference():
    """An image that needs a gradient (saliency maps, adversarial inputs) gets torch's differentiable copy."""
    x = torch.randn(1, 3, 32, 32, device=DEV, requires_grad=True)
    rows = patch_rows(x, (16, 16), backend="triton")
    rows.float().pow(2).sum().backward()
    assert torch.allclose(x.grad, 2 * x.detach())
    with torch.no_grad():
        assert torch.equal(patch_rows(x, (16, 16), backend="triton"), rows.detach())


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="multiples of the patch"):
        patch_rows(torch.randn(1, 3, 30, 32, device=DEV), (16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        patch_rows(torch.randn(3, 32, 32, device=DEV), (16, 16))


def test_custom_op_checks_and_compiles():
    x = torch.randn(2, 3, 32, 48, device=DEV)
    torch.library.opcheck(torch.ops.vim_kernels.patch_rows.default, (x, 16, 16, torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda t: patch_rows(t, (16, 16), torch.float32, backend="triton"), backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(compiled(x), patch_rows_ref(x, 16, 16, torch.float32))
