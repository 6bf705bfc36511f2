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


def direction(batch, L, E, W, bias, dtype, n_grads):
    """Weight, bias and incoming gradients of one direction: a transposed (B, E, L) buffer and a strided
    slice, summed by the kernel."""
    weight = (torch.randn(E, 1, W) * 0.5).to(DEV)
    b = (torch.randn(E) * 0.3).to(DEV) if bias else None
    grads = [torch.randn(batch, E, L, device=DEV).to(dtype).transpose(1, 2), strided(batch, L, E, dtype)][:n_grads]
    return conv.ConvGrad(tuple(grads), weight, b)


def reference(x, d: conv.ConvGrad, reverse):
    """float64 output and (dx, dweight, dbias) of one direction through autograd of the readable reference."""
    x64 = x.double().requires_grad_()
    w64 = d.weight.double().requires_grad_()
    b64 = d.bias.double().requires_grad_() if d.bias is not None else None
    out = depthwise_conv_silu_ref(x64, w64, b64, reverse).transpose(1, 2)
    grads = torch.autograd.grad(out, [x64, w64] + ([b64] if b64 is not None else []),
                                sum(g.double() for g in d.grads))
    return out, grads[0], grads[1], grads[2] if b64 is not None else None


def assert_close(name, got, ref, tol):
    if ref is None:
        assert got is None, f"{name}: expected None"
        return
    assert got.dtype == torch.float32 and got.shape == ref.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
    assert rel(got, ref) < tol, f"{name} rel err {rel(got, ref):.2e}"


def check(batch, L, E, W, reverse, bias=True, dtype=torch.float32, n_grads=1, dx_dtype=None, tol=1e-5):
    x = strided(batch, L, E, dtype)
    d = direction(batch, L, E, W, bias, dtype, n_grads)
    out_ref, dx_ref, dw_ref, db_ref = reference(x, d, reverse)
    out = conv.conv_silu(x, d.weight, d.bias, reverse)
    assert out.dtype == dtype and rel(out, out_ref) < tol, f"out rel err {rel(out, out_ref):.2e}"
    dx, dw, db = conv.conv_silu_backward(d.grads, x, d.weight, d.bias, reverse, dx_dtype=dx_dtype)
    assert dx.dtype == (dx_dtype or dtype) and dx.shape == x.shape and dx.is_contiguous()
    assert rel(dx, dx_ref) < tol, f"dx rel err {rel(dx, dx_ref):.2e}"
    assert_close("dweight", dw, dw_ref, tol)
    assert_close("dbias", db, db_ref, tol)


def check_pair(batch, L, E, dtype=torch.float32, biases=(True, True), widths=(4, 4), tol=1e-5):
    """Both directions of one x in one launch: dx is the sum of the two directions' input gradients."""
    x = strided(batch, L, E, dtype)
    f = direction(batch, L, E, widths[0], biases[0], dtype, 2)
    b = direction(batch, L, E, widths[1], biases[1], dtype, 2)
    _, dx_f, dw_f, db_f = reference(x, f, False)
    _, dx_b, dw_b, db_b = reference(x, b, True)
    dx, (gw_f, gb_f), (gw_b, gb_b) = conv.conv_silu_backward_pair(f, b, x)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert rel(dx, dx_f + dx_b) < tol, f"dx rel err {rel(dx, dx_f + dx_b):.2e}"
    for name, got, ref in (("dweight_f", gw_f, dw_f), ("dbias_f", gb_f, db_f),
                           ("dweight_b", gw_b, dw_b), ("dbias_b", gb_b, db_b)):
        assert_close(name, got, ref, tol)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("L", [1, 2, 3, 5, 37])
def test_lengths(L, reverse):
    check(2, L, 24, 4, reverse)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("W", [2, 3])
def test_other_widths_no_bias(W, reverse):
    check(1, 37, 40, W, reverse, bias=False)


@pytest.mark.parametrize("reverse", [False, True])
def test_two_grads_float32_dx(reverse):
    check(2, 37, 40, 4, reverse, n_grads=2, dx_dtype=torch.float32)


@pytest.mark.parametrize("L", [1, 3, 37])
def test_pair(L):
    check_pair(2, L, 40)


def test_pair_mixed_widths_and_bias():
    check_pair(1, 23, 24, biases=(False, True), widths=(3, 4))


@pytest.mark.parametrize("batch, L, E, widths, biases, dtype", [
    (2, 37, 40, (4, 4), (True, True), torch.float32),     # a ragged token tile and channel block
    (1, 1, 24, (4, 4), (True, False), torch.float32),     # one token: every tap but one is padding
    (2, 23, 136, (3, 2), (False, True), torch.float32),   # narrower kernels, a different width per direction
    (2, 19, 24, (4, 4), (True, True), torch.bfloat16),
    (2, 21, 64, (4, 4), (True, True), torch.float32),     # channels filling their blocks (no channel masks)
    (1, 35, 128, (4, 4), (False, True), torch.bfloat16),
])
def test_forward_pair_matches_two_launches(batch, L, E, widths, biases, dtype):
    """``conv_silu_pair`` is both directions' ``conv_silu`` from one read of x: the same bits, and the readable
    reference's values."""
    x = strided(batch, L, E, dtype)
    dirs = [direction(batch, L, E, w, b, dtype, 1) for w, b in zip(widths, biases)]
    out_f, out_b = conv.conv_silu_pair(x, dirs[0].weight, dirs[0].bias, dirs[1].weight, dirs[1].bias)
    for out, d, reverse in ((out_f, dirs[0], False), (out_b, dirs[1], True)):
        assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
        assert torch.equal(out, conv.conv_silu(x, d.weight, d.bias, reverse))
        ref = depthwise_conv_silu_ref(x.double(), d.weight.double(),
                                      d.bias.double() if d.bias is not None else None, reverse).transpose(1, 2)
        assert rel(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("lookahead, seg, programs, min_tokens", [
    (1, 8, 1, 16),          # one program a sequence, segments not dividing L + 3
    (2, 4, 10 ** 6, 1),     # a program a token: every stretch is all halo
    (3, 8, 10 ** 6, 4),
    (4, 16, 10 ** 6, 5),    # a stretch shorter than a segment
])
@pytest.mark.parametrize("batch, L, E, widths, biases, dtype", [
    (2, 37, 40, (4, 4), (True, True), torch.float32),     # a ragged channel block
    (1, 1, 24, (4, 2), (False, True), torch.float32),     # one token
    (2, 23, 128, (3, 4), (True, False), torch.bfloat16),  # channels filling their blocks (no channel masks)
])
def test_forward_walk_matches_tiles(lookahead, seg, programs, min_tokens, batch, L, E, widths, biases, dtype,
                                    monkeypatch):
    """The pair's walk (``PAIR_WALK``) gives the tiles' bits for any lookahead, segment and split of the sequence over
    programs: each stretch's 3-token halos at both ends, its last partial segment and the window carried across
    segments. x with strided channels takes the tiles."""
    x = strided(batch, L, E, dtype)
    dirs = [direction(batch, L, E, w, b, dtype, 1) for w, b in zip(widths, biases)]
    args = (dirs[0].weight, dirs[0].bias, dirs[1].weight, dirs[1].bias)
    monkeypatch.setattr(conv, "PAIR_WALK", False)
    want = conv.conv_silu_pair(x, *args)
    monkeypatch.setattr(conv, "PAIR_WALK", True)
    for name, value in (("WALK_LOOKAHEAD", lookahead), ("WALK_SEG", seg), ("WALK_TARGET_PROGRAMS", programs),
                        ("WALK_MIN_TOKENS", min_tokens), ("WALK_BLOCK_E", 32)):
        monkeypatch.setattr(conv, name, value)
    got = conv.conv_silu_pair(x, *args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    if L > 1 and lookahead == 1:
        every_other = torch.randn(batch, L, 2 * E, device=DEV).to(dtype)[..., ::2]
        monkeypatch.setattr(conv, "PAIR_WALK", False)
        want = conv.conv_silu_pair(every_other, *args)
        monkeypatch.setattr(conv, "PAIR_WALK", True)
        assert all(torch.equal(a, b) for a, b in zip(conv.conv_silu_pair(every_other, *args), want))


def test_backward_into_a_half_of_a_wider_buffer():
    """``out``: dx written into a (B, L, E) view with the row stride of a (B, L, 2E) gradient, the rest untouched."""
    x = strided(2, 23, 40, torch.float32)
    f, b = direction(2, 23, 40, 4, True, torch.float32, 2), direction(2, 23, 40, 4, True, torch.float32, 1)
    dx, *_ = conv.conv_silu_backward_pair(f, b, x)
    wide = torch.full((2, 23, 80), 7.0, device=DEV)
    got, *_ = conv.conv_silu_backward_pair(f, b, x, out=wide[..., :40])
    assert got.data_ptr() == wide.data_ptr() and torch.equal(wide[..., :40], dx)
    assert (wide[..., 40:] == 7.0).all()
    with pytest.raises(ValueError, match="unit channel stride"):
        conv.conv_silu_backward_pair(f, b, x, out=wide[..., ::2])


def test_pair_needs_a_direction():
    x = torch.randn(1, 5, 8, device=DEV)
    with pytest.raises(ValueError, match="at least one direction"):
        conv.conv_silu_backward_pair(None, None, x)


@pytest.mark.parametrize("reverse", [False, True])
def test_whole_sequence_per_program(reverse, monkeypatch):
    """One program walks every segment of a sequence, carrying its dweight/dbias sums across segments; E=72
    with 64-channel blocks: the second block partly masked."""
    monkeypatch.setattr(conv, "BWD_TARGET_PROGRAMS", 1)
    monkeypatch.setattr(conv, "BWD_BLOCK_E", 64)
    check(2, 70, 72, 4, reverse, n_grads=2)


def test_segments_split_over_programs(monkeypatch):
    """Many programs per sequence, segments not dividing L: each segment's halo and each program's partial
    sums must meet exactly, and their reduction must cover ragged tiles of partials (12 rows in tiles of 8) and
    of channels (24 in blocks of 16)."""
    monkeypatch.setattr(conv, "BWD_TARGET_PROGRAMS", 10 ** 6)
    monkeypatch.setattr(conv, "BWD_SEG", 4)
    monkeypatch.setattr(conv, "SUM_BLOCK_P", 8)
    monkeypatch.setattr(conv, "SUM_BLOCK_E", 16)
    check_pair(2, 23, 24)


@pytest.mark.parametrize("lookahead", [1, 2])
@pytest.mark.parametrize("seg, L, dirs", [(4, 23, "fb"), (32, 70, "fb"), (4, 1, "fb"), (4, 9, "f"), (4, 9, "b")])
def test_lookahead_loads_give_the_same_values(lookahead, seg, L, dirs, monkeypatch):
    """BWD_LOOKAHEAD only moves the backward walk's loads earlier (one or two positions ahead, across segment
    starts and ends, for either direction alone): dx, dweight and dbias are the same bits as without it (1e-6 on
    the GPU, where the compiler schedules the two differently)."""
    monkeypatch.setattr(conv, "BWD_TARGET_PROGRAMS", 10 ** 6)
    monkeypatch.setattr(conv, "BWD_SEG", seg)
    x = strided(2, L, 24, torch.bfloat16)
    f = direction(2, L, 24, 4, True, torch.bfloat16, 2) if "f" in dirs else None
    b = direction(2, L, 24, 3, True, torch.bfloat16, 2) if "b" in dirs else None
    monkeypatch.setattr(conv, "BWD_LOOKAHEAD", 0)
    base = conv.conv_silu_backward_pair(f, b, x)
    monkeypatch.setattr(conv, "BWD_LOOKAHEAD", lookahead)
    got = conv.conv_silu_backward_pair(f, b, x)
    flat = lambda r: [r[0]] + [t for pair in r[1:] if pair is not None for t in pair if t is not None]  # noqa: E731
    for g, ref in zip(flat(got), flat(base)):
        if DEV == "cuda":
            assert rel(g, ref) < 1e-6
        else:
            assert torch.equal(g, ref)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype, reverse):
    check(2, 37, 24, 4, reverse, dtype=dtype, n_grads=2, tol=1e-2)


@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("reverse", [False, True])
def test_gpu_model_shapes(reverse):
    """Vim-S-like shapes: twelve channel blocks, sequences split over programs, compiled kernels."""
    check(8, 197, 768, 4, reverse, dtype=torch.bfloat16, n_grads=2, dx_dtype=torch.float32, tol=1e-2)


@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU")
def test_gpu_pair_model_shapes():
    check_pair(8, 197, 384, dtype=torch.bfloat16, tol=1e-2)


def test_backward_rejects_wide_kernels():
    x = torch.randn(1, 5, 8, device=DEV)
    with pytest.raises(ValueError, match="widths up to 4"):
        conv.conv_silu_backward((x,), x, torch.randn(8, 1, 5, device=DEV), None, False)


def test_forward_takes_derived_taps():
    """The mixer hands the forward its taps already tap-major (``weights.derive_weights``): the same bits as from the
    (E, 1, W) weights; taps of another shape, dtype or layout are refused."""
    x = strided(2, 19, 40, torch.float32)
    dirs = [direction(2, 19, 40, 4, True, torch.float32, 1) for _ in range(2)]
    taps = [d.weight.reshape(40, -1).t().contiguous() for d in dirs]
    want = conv.conv_silu_pair(x, dirs[0].weight, dirs[0].bias, dirs[1].weight, dirs[1].bias)
    got = conv.conv_silu_pair(x, dirs[0].weight, dirs[0].bias, dirs[1].weight, dirs[1].bias, taps=taps)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(conv.conv_silu(x, dirs[0].weight, dirs[0].bias, False, taps=taps[0]), want[0])
    for bad in (taps[0].t(), taps[0][:, 1:], taps[0].double()):
        with pytest.raises(ValueError, match="taps must be contiguous float32"):
            conv.conv_silu(x, dirs[0].weight, dirs[0].bias, False, taps=bad)
