"""The stem's fused token embedding (patches + bias, middle class token, position embedding) against the reference:
every output element, every input's gradient against float64, odd token counts and widths, strided and half-precision
patches, absent inputs; its custom ops under opcheck and torch.compile; and the model's CUDA route taken on the CPU."""
import pytest
import timm
import torch

from vim.kernels import embed_tokens_fn, embed_tokens_ref
from vim.kernels.embed import triton_embed

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

pytestmark = pytest.mark.usefixtures("poisoned_kernel_outputs")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(B, M, D, has=(True, True, True), dtypes=(torch.float32,) * 4):
    """(patches, bias, cls_token, pos_embed), each None where ``has`` says so, all needing gradients."""
    has_bias, has_cls, has_pos = has
    x = torch.randn(B, M, D, device=DEV).to(dtypes[0])
    bias = torch.randn(D, device=DEV).to(dtypes[1]) if has_bias else None
    cls = torch.randn(1, 1, D, device=DEV).to(dtypes[2]) if has_cls else None
    pos = torch.randn(1, M + has_cls, D, device=DEV).to(dtypes[3]) if has_pos else None
    return [t.requires_grad_() if t is not None else None for t in (x, bias, cls, pos)]


def check_against_reference(inputs):
    """The Triton output equals the reference's bits (both add in float32 in one order); each gradient is within
    float32 summation of the float64 reference's, in its input's dtype."""
    out = embed_tokens_fn(*inputs, backend="triton")
    ref = embed_tokens_ref(*inputs)
    assert out.dtype == torch.float32 and out.is_contiguous() and out.shape == ref.shape
    assert torch.equal(out, ref)
    leaves = [t for t in inputs if t is not None]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    inputs64 = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    leaves64 = [t for t in inputs64 if t is not None]
    grads64 = torch.autograd.grad(embed_tokens_ref(*inputs64), leaves64, g.double())
    for leaf, got, want in zip(leaves, grads, grads64):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        if got.dtype in (torch.bfloat16, torch.float16):
            # the patches' gradient is the token gradient cast: within one step of the dtype (the CPU interpreter
            # truncates where a GPU rounds to nearest)
            step = 2.0 ** -7 if got.dtype == torch.bfloat16 else 2.0 ** -10
            assert torch.allclose(got.double(), want, rtol=step, atol=1e-30)
        else:
            assert rel(got, want) < 1e-6
    return out


HAS = {"all": (True, True, True), "none": (False, False, False), "no-cls": (True, False, True),
       "cls-only": (False, True, False), "cls-pos": (False, True, True)}   # (bias, cls_token, pos_embed)


@pytest.mark.parametrize("B, M, D", [(1, 1, 20), (3, 7, 48), (2, 13, 40), (3, 37, 80)])
@pytest.mark.parametrize("has", list(HAS.values()), ids=list(HAS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(B, M, D, has, dtype):
    check_against_reference(make_inputs(B, M, D, has, (dtype, torch.float32, torch.float32, torch.float32)))


def test_reference_is_the_models_cat_and_add():
    """The class token at M // 2, as the model's ``insert_cls_token`` puts it, and the same float32 bits."""
    from vim.models.layers import insert_cls_token

    for M in (1, 6, 7):
        x, bias, cls, pos = make_inputs(2, M, 8)
        assert torch.equal(embed_tokens_ref(x, bias, cls, pos), insert_cls_token(x + bias, cls) + pos)


def test_mixed_dtypes_keep_each_gradients_dtype():
    """fp16 patches, a bf16 bias and position embedding, a float32 class token: each gradient in its input's dtype."""
    check_against_reference(make_inputs(2, 9, 24, dtypes=(torch.float16, torch.bfloat16, torch.float32,
                                                          torch.bfloat16)))


def test_strided_patches():
    """A (B, H, W, D) grid flattened from a channel-major map (the conv's layout) and every other channel of a wider
    one: read through their strides, gradients back to the base tensors."""
    B, H, W, D = 2, 3, 5, 24
    for leaf, view in ((torch.randn(B, D, H, W, device=DEV), lambda t: t.permute(0, 2, 3, 1).reshape(B, -1, D)),
                       (torch.randn(B, H * W, 2 * D, device=DEV), lambda t: t[..., ::2])):
        x = view(leaf.requires_grad_())
        assert not x.is_contiguous()
        _, bias, cls, pos = make_inputs(B, H * W, D)
        out = embed_tokens_fn(x, bias, cls, pos, backend="triton")
        ref = embed_tokens_ref(x, bias, cls, pos)
        assert torch.equal(out, ref)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (leaf, bias, cls, pos), g),
                        torch.autograd.grad(ref, (leaf, bias, cls, pos), g)):
            assert rel(a, b) < 1e-6


def test_only_needed_gradients_are_computed():
    """Each input that needs no gradient gets none; the backward op skips the patches' gradient or the batch sum."""
    x, bias, cls, pos = make_inputs(3, 7, 20)
    for needs in ((True, False, False, False), (False, False, False, True), (False, True, True, False)):
        ins = [t.detach().requires_grad_(n) for t, n in zip((x, bias, cls, pos), needs)]
        embed_tokens_fn(*ins, backend="triton").square().sum().backward()
        assert [t.grad is not None for t in ins] == list(needs)
        ref = [t.detach().requires_grad_(n) for t, n in zip((x, bias, cls, pos), needs)]
        embed_tokens_ref(*ref).square().sum().backward()
        for t, r in zip(ins, ref):
            if t.grad is not None:
                assert rel(t.grad, r.grad) < 1e-6
    dout = torch.randn(3, 8, 20, device=DEV)
    dx, dsum = torch.ops.vim_kernels.embed_tokens_bwd(dout, True, torch.bfloat16, False, True)
    # summed in another order than torch's: near-zero sums differ past allclose's absolute 1e-8
    assert dx.numel() == 0 and rel(dsum, dout.sum(0)) < 1e-6
    dx, dsum = torch.ops.vim_kernels.embed_tokens_bwd(dout, True, torch.float32, True, False)
    assert dsum.numel() == 0 and torch.equal(dx, torch.cat([dout[:, :3], dout[:, 4:]], 1))


@pytest.mark.parametrize("per_split", [1, 2, 3, 100])
def test_batch_splits_sum_to_the_same(per_split, monkeypatch):
    """However the batch is split over programs (ragged last split, more images a split than a loop step holds), the
    splits' sums add up to the batch sum."""
    monkeypatch.setattr(triton_embed, "_bwd_plan",
                        lambda B, n_tiles, device: (2, per_split, max(1, -(-B // per_split))))
    check_against_reference(make_inputs(7, 5, 20))


def test_empty_batch_no_patches_and_broadcast_gradient():
    """No images, no patches, and the stride-0 token gradient of ``out.sum()``."""
    for B, M in ((0, 5), (2, 0), (3, 7)):
        x, bias, cls, pos = make_inputs(B, M, 8)
        out = embed_tokens_fn(x, bias, cls, pos, backend="triton")
        assert out.shape == (B, M + 1, 8)
        out.sum().backward()
        assert torch.equal(pos.grad, torch.full_like(pos, B)) and torch.equal(cls.grad, torch.full_like(cls, B))
        assert torch.equal(bias.grad, torch.full_like(bias, B * M)) and torch.equal(x.grad, torch.ones_like(x))


def test_backends_and_bad_shapes():
    x, bias, cls, pos = make_inputs(2, 4, 8)
    if not CUDA:   # auto picks the reference off CUDA
        assert torch.equal(embed_tokens_fn(x, bias, cls, pos), embed_tokens_ref(x, bias, cls, pos))
    # float64 (a gradient check) takes the reference in float64 whichever backend is asked for
    out = embed_tokens_fn(x.double(), bias, cls, pos, backend="triton")
    assert out.dtype == torch.float64
    with pytest.raises(ValueError, match=r"\(B, M, D\)"):
        embed_tokens_fn(x[0], bias, cls, pos)
    with pytest.raises(ValueError, match=r"pos_embed must be \(1, 4, 8\) .* \(no class token\)"):
        embed_tokens_fn(x, bias, None, pos)
    with pytest.raises(ValueError, match=r"bias must be \(8,\)"):
        embed_tokens_fn(x, bias[:4], cls, pos)
    with pytest.raises(ValueError, match=r"cls_token must be \(1, 1, 8\)"):
        embed_tokens_fn(x, bias, cls[0], pos)


def test_custom_ops_check_and_compile():
    x, bias, cls, pos = make_inputs(2, 5, 24)
    fwd = torch.ops.vim_kernels.embed_tokens_fwd.default
    torch.library.opcheck(fwd, (x, bias, cls, pos))
    torch.library.opcheck(fwd, (x.detach().bfloat16().requires_grad_(), None, None, pos[:, :5]))
    torch.library.opcheck(torch.ops.vim_kernels.embed_tokens_bwd.default,
                          (torch.randn(2, 6, 24, device=DEV), True, torch.bfloat16, True, True),
                          test_utils=("test_schema", "test_faketensor"))

    def fn(x, bias, cls, pos):
        return embed_tokens_fn(x, bias, cls, pos, backend="triton").square().sum()

    inputs = (x, bias, cls, pos)
    eager = fn(*inputs)
    g_eager = torch.autograd.grad(eager, inputs)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*inputs)
    assert torch.equal(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled, inputs), g_eager):
        assert torch.equal(a, b)


@pytest.fixture
def cuda_stem_route(monkeypatch):
    """The model's CUDA stem on CPU tensors: the patch-row GEMM without its bias, then the fused Triton embedding."""
    from vim.kernels.embed import interface
    from vim.models import layers

    calls = []
    monkeypatch.setattr(layers, "_patch_gemm", lambda x, patch, stride: patch == stride)
    monkeypatch.setattr(interface, "resolve_backend", lambda backend, device, err: calls.append(1) or "triton")
    return calls


def test_model_takes_the_fused_route(cuda_stem_route, monkeypatch):
    """The model's tokens, logits and every gradient through the GEMM + fused embedding equal those of the conv route
    within float32 rounding, fixed and dynamic sizes (resampled position embedding), with and without the class
    token; PatchEmbed called directly still returns the biased grid, and FX graphs trace the same route."""
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    from vim.models import layers

    torch.manual_seed(0)
    for kwargs, size in ((dict(), (48, 48)), (dict(dynamic_img_size=True, class_token=False, global_pool="avg"),
                                              (64, 32))):
        model = timm.create_model("vim_tiny", depth=1, embed_dim=32, img_size=48, num_classes=3, **kwargs).to(DEV)
        x = torch.randn(2, 3, *size, device=DEV)
        results = []
        for fused in (True, False):
            monkeypatch.setattr(layers, "_patch_gemm", lambda x, patch, stride, fused=fused: fused and patch == stride)
            cuda_stem_route.clear()
            model.zero_grad()
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):   # the conv route in float32 on a GPU
                out = model(x)
                out.square().sum().backward()
            assert bool(cuda_stem_route) == fused
            results.append((out, {k: p.grad.clone() for k, p in model.named_parameters()}))
        (out, grads), (ref, ref_grads) = results
        # on a GPU the scan's atomics also sum in no fixed order (test_cuda_model: 2e-5 between two runs)
        tol = 1e-3 if CUDA else 1e-5
        assert rel(out, ref) < tol
        for k, g in ref_grads.items():
            assert rel(grads[k], g) < tol, k
        monkeypatch.setattr(layers, "_patch_gemm", lambda x, patch, stride: patch == stride)
        with torch.no_grad():
            grid = model.patch_embed(x)
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                conv = model.patch_embed.proj(x).permute(0, 2, 3, 1)
            torch.testing.assert_close(grid, conv, rtol=1e-5, atol=1e-5)
            expected = model(x)
            _, eval_nodes = get_graph_node_names(model)
            fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
            assert torch.equal(tuple(fx_model(x).values())[0], expected)
