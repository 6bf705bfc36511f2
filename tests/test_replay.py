"""Replayed mixer calls (kernels/replay.py): inference, and a training step's forward and backward, against the mixer
run afresh: the same launches, the same bits."""
import pytest
import torch

from vim.kernels import launch, replay
from vim.kernels.bimamba import delta as delta_mod
from vim.kernels.bimamba import triton_bimamba as tb
from vim.kernels.selective_scan import triton_scan
from vim.models.mixer import BiMambaMixer

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or triton_scan._interpreted()),
                                reason="needs a CUDA GPU or Triton's interpreter")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(L, dtype, batch=2, dim=16, seed=0):
    torch.manual_seed(seed)
    m = BiMambaMixer(dim, scan_backend="triton").to(DEVICE)
    with torch.no_grad():
        for p in m.parameters():   # trained-looking values, not the init's structure
            p.add_(0.1 * torch.randn_like(p))
        xz = m.in_proj(torch.randn(batch, L, dim, device=DEVICE)).to(dtype)
    return xz, (*m.direction_params(False), *m.direction_params(True))


def _run(xz, flat):
    out = xz.clone()
    tb._fwd_into_x_op(out, *flat)
    return out


def _fresh(xz, flat, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(tb, "REPLAY", False)
        return _run(xz, flat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L,chunk", [(1, None), (13, None), (40, 16)])
def test_replay_gives_the_mixers_bits(monkeypatch, poisoned_kernel_outputs, dtype, L, chunk):
    """Recorded once, replayed on other tensors of the signature (other addresses): bit for bit the mixer's output,
    chunked sequences included; the replay plans nothing."""
    triton_scan.CHUNK_OVERRIDE = chunk
    xz, flat = _inputs(L, dtype)
    expected = _fresh(xz, flat, monkeypatch)
    assert not torch.equal(expected, xz)
    assert torch.equal(_run(xz, flat), expected)   # the recording run
    (rep,) = tb._REPLAYS.values()
    assert isinstance(rep, replay.Replay)
    assert sum(e[0] == "launch" for e in rep.events) == (6 if chunk is None else 8)   # weights, convs, 2 x (dt, scan [+ state pass])


    def planned(*args, **kwargs):
        raise AssertionError("a replayed call ran the mixer")
    monkeypatch.setattr(tb, "_fwd_into_x_run", planned)
    for _ in range(2):
        assert torch.equal(_run(xz, flat), expected)
    assert len(tb._REPLAYS) == 1


def test_a_changed_knob_records_anew(monkeypatch):
    xz, flat = _inputs(9, torch.float32)
    _run(xz, flat)
    monkeypatch.setitem(delta_mod.CONFIG, "BLOCK_M", 32)
    monkeypatch.setattr(tb, "PAIR_CONV", False)
    expected = _fresh(xz, flat, monkeypatch)
    assert torch.equal(_run(xz, flat), expected)
    assert torch.equal(_run(xz, flat), expected)
    assert len(tb._REPLAYS) == 2


def test_new_shapes_and_batches_record_their_own(monkeypatch):
    for L, batch in ((5, 1), (6, 1), (5, 3)):
        xz, flat = _inputs(L, torch.float32, batch=batch, seed=L + batch)
        expected = _fresh(xz, flat, monkeypatch)
        assert torch.equal(_run(xz, flat), expected)
        assert torch.equal(_run(xz, flat), expected)
    assert len(tb._REPLAYS) == 3


def test_tied_parameters_record_apart_from_untied_ones(monkeypatch):
    """The backward direction's parameters passed as the forward's (tied) and as tensors of their own, with the same
    shapes: a recording of the tied call reads the forward's parameters from the later inputs that hold them, so each
    nesting of the inputs gets its own recording (``replay.nesting``), in either order."""
    xz, flat = _inputs(6, torch.float32)
    tied = (*flat[:7], *flat[:7])
    assert replay.nesting((xz, *tied)) and not replay.nesting((xz, *flat))
    for params in (tied, flat, tied, flat):
        expected = _fresh(xz, params, monkeypatch)
        assert torch.equal(_run(xz, params), expected)
    assert len(tb._REPLAYS) == 2 and all(isinstance(r, replay.Replay) for r in tb._REPLAYS.values())


def test_nesting_names_each_input_inside_another():
    x = torch.randn(4, 8)
    assert replay.nesting([x, x[1:], None, x[:, :2], torch.randn(3)]) == ((1, 0, 32), (3, 0, 0))
    assert replay.nesting([x[:, :4], x[:, 4:], None]) == ()   # interleaved halves: neither holds the other


def test_an_unreplayable_call_runs_the_mixer(monkeypatch):
    """A half-precision D is cast on the way (``p.D.float()``): a tensor the recording did not allocate, so the
    signature is kept as not replayable and every call runs the mixer."""
    xz, flat = _inputs(7, torch.float32)
    flat = list(flat)
    flat[6] = flat[6].to(torch.bfloat16)
    expected = _fresh(xz, flat, monkeypatch)
    for _ in range(2):
        assert torch.equal(_run(xz, flat), expected)
    assert list(tb._REPLAYS.values()) == [None]


@pytest.mark.parametrize("switch", ["REPLAY", "PLAN_CACHE", "ENABLED"])
def test_off_switches(monkeypatch, switch):
    monkeypatch.setattr({"REPLAY": tb, "PLAN_CACHE": triton_scan, "ENABLED": launch}[switch], switch, False)
    xz, flat = _inputs(7, torch.float32)
    _run(xz, flat)
    assert not tb._REPLAYS


def test_a_call_during_another_threads_recording_is_not_kept(monkeypatch):
    xz, flat = _inputs(7, torch.float32)
    expected = _fresh(xz, flat, monkeypatch)
    assert replay._RECORDING.acquire(blocking=False)
    try:
        assert torch.equal(_run(xz, flat), expected)
    finally:
        replay._RECORDING.release()
    assert not tb._REPLAYS


def test_the_recorder_refuses_what_a_replay_cannot_stand_for():
    """A launch reading a tensor that is neither an input nor a recorded buffer, a function that returns something
    other than None or tensors, a torch function that returns a view, and a torch copy written in place (reported by
    ``launch.not_replayable``) each make the run unrecordable; it still ran and returned what it returned."""
    src = torch.randn(2, 3, 16, device=DEVICE)
    dst = torch.zeros(2, 3, 16, device=DEVICE)
    assert replay.record(lambda d: delta_mod.narrow_rows(src, d), [dst]) == (None, None)
    assert torch.equal(dst, src)
    assert replay.record(lambda s, d: delta_mod.narrow_rows(s, d) or 1, [src, torch.zeros_like(dst)]) == (None, 1)
    assert replay.record(lambda s: [replay.call(torch.Tensor.view, s, -1)], [src])[0] is None
    # a destination whose rows are not one stride apart: narrow_rows copies with torch
    odd = torch.zeros(3, 2, 16, device=DEVICE).transpose(0, 1)
    rep, _ = replay.record(delta_mod.narrow_rows, [src, odd])
    assert rep is None and torch.equal(odd, src)
    assert launch.RECORDER is None


def test_a_replay_runs_on_new_inputs():
    """The generic case: a recorded function replayed on tensors at other addresses, strided views included."""
    src = torch.randn(2, 3, 16, device=DEVICE)
    dst = torch.zeros(2, 3, 32, device=DEVICE)[..., 8:24]
    rep, result = replay.record(delta_mod.narrow_rows, [src, dst])
    assert isinstance(rep, replay.Replay) and result is None
    src2 = torch.randn(2, 3, 16, device=DEVICE)
    whole = torch.zeros(2, 3, 32, device=DEVICE)
    assert rep([src2, whole[..., 8:24]], torch.device(DEVICE)) is None
    assert torch.equal(whole[..., 8:24], src2)
    assert not whole[..., :8].any() and not whole[..., 24:].any()


def test_a_replay_returns_new_buffers_views_and_empties(poisoned_kernel_outputs):
    """What the function returned comes back from each replay: its buffers (new ones each time, apart from each
    other), views of them, torch results and empty tensors; a tuple of tensors is an argument like any other."""
    def fn(a, w):
        z1, z2 = triton_scan._zeros([(5,), (3, 4)], a.device)   # one launch, a tuple of tensors as its argument
        prod = replay.call(torch.matmul, a, w)
        return [z1, z2.t(), prod, prod[1:], a.new_empty(0)]

    a, w = torch.randn(3, 4, device=DEVICE), torch.randn(4, 2, device=DEVICE)
    rep, first = replay.record(fn, [a, w])
    assert isinstance(rep, replay.Replay)
    assert [e[0] for e in rep.events] == ["alloc", "alloc", "launch", "call"]   # returned buffers are not grouped
    for _ in range(2):
        a2, w2 = torch.randn(3, 4, device=DEVICE), torch.randn(4, 2, device=DEVICE)
        z1, z2t, prod, tail, empty = rep([a2, w2], torch.device(DEVICE))
        assert not z1.any() and z2t.shape == (4, 3) and not z2t.any() and z2t.stride() == (1, 4)
        assert torch.equal(prod, a2 @ w2) and torch.equal(tail, prod[1:])
        assert tail.data_ptr() == prod[1].data_ptr()
        assert empty.shape == (0,) and empty.dtype == a.dtype
        assert z1.data_ptr() != first[0].data_ptr()
        assert z1.untyped_storage().data_ptr() != z2t.untyped_storage().data_ptr()
        assert z1._base is None and prod._base is None   # whole buffers come back as themselves, not as views


def _grad_inputs(L, dtype, packed, seed=0, batch=2, dim=16):
    xz, flat = _inputs(L, dtype, batch=batch, dim=dim, seed=seed)
    E = xz.shape[-1] // 2
    x, z = (xz, None) if packed else (xz[..., :E].contiguous(), xz[..., E:].contiguous())
    return x, z, flat


def _step(x, z, flat, dout):
    """The training step's two mixer ops, called as autograd calls them."""
    out, *saved = tb._fwd_op(x, z, *flat, True)
    grads = tb._bwd_op(dout, x, z, *flat, saved, True)
    return [out, *saved], grads


@pytest.mark.parametrize("dtype,L,chunk,packed", [(torch.float32, 13, None, True), (torch.float32, 13, None, False),
                                                  (torch.float32, 20, 8, True), (torch.bfloat16, 13, None, True)])
def test_training_calls_replay_the_mixers_bits(monkeypatch, poisoned_kernel_outputs, dtype, L, chunk, packed):
    """A training step's forward (what it keeps for the backward included) and backward, replayed on new inputs of
    the recorded signature: every output the mixer's own, bit for bit in the interpreter (on a GPU the backward's
    atomic sums may add in another order); the replays plan nothing, and their outputs are new tensors each time."""
    triton_scan.CHUNK_OVERRIDE = chunk
    x, z, flat = _grad_inputs(L, dtype, packed)
    dout = torch.randn(*x.shape[:2], flat[2].shape[1], device=DEVICE).to(dtype)
    with monkeypatch.context() as m:
        m.setattr(tb, "REPLAY", False)
        expected = _step(x, z, flat, dout)
    recorded = _step(x, z, flat, dout)
    assert len(tb._REPLAYS) == 2 and all(isinstance(r, replay.Replay) for r in tb._REPLAYS.values())

    def planned(*args, **kwargs):
        raise AssertionError("a replayed call ran the mixer")
    monkeypatch.setattr(tb, "_fwd_run", planned)
    monkeypatch.setattr(tb, "_bwd_run", planned)
    replays = [_step(x, z, flat, dout), _step(x, z, flat, dout)]
    for got in (recorded, *replays):
        for part, want in zip(got, expected):
            assert len(part) == len(want)
            for i, (g, w) in enumerate(zip(part, want)):
                assert g.shape == w.shape and g.dtype == w.dtype, i
                if DEVICE == "cpu" or part is got[0]:
                    assert torch.equal(g, w), i
                else:
                    assert torch.allclose(g, w, rtol=1e-3, atol=1e-5), i
    ptrs = [[t.data_ptr() for part in got for t in part if t.numel()] for got in replays]
    assert len(set(ptrs[1])) == len(ptrs[1]) and not set(ptrs[0]) & set(ptrs[1])   # both replays' outputs alive


def test_a_mixers_training_steps_are_replayed(monkeypatch):
    """Through autograd, as a model trains: forward and backward of the mixer twice, the second replayed; the
    output and every gradient equal the mixer's without replays."""
    torch.manual_seed(3)
    m = BiMambaMixer(16, scan_backend="triton").to(DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)

    def step():
        m.zero_grad(set_to_none=True)
        x.grad = None
        y = m(x)
        (y * torch.linspace(-1, 1, y.shape[-1], device=DEVICE)).sum().backward()
        return [y.detach(), x.grad, *[p.grad for p in m.parameters()]]

    with monkeypatch.context() as mp:
        mp.setattr(tb, "REPLAY", False)
        expected = step()
    for _ in range(2):
        got = step()
        for g, w in zip(got, expected):
            assert torch.equal(g, w) if DEVICE == "cpu" else torch.allclose(g, w, rtol=1e-4, atol=1e-6)
    assert {k[0] for k, r in tb._REPLAYS.items() if isinstance(r, replay.Replay)} == {"fwd", "bwd"}


def test_allocations_are_grouped_only_where_no_memory_is_held_longer():
    """Runs of small allocations, and of allocations freed after the same event, become one buffer; two large ones
    freed at different events stay apart (the mixer's two conv outputs: the first is freed before the second
    direction allocates)."""
    big, small = (1024, 1024), (16,)
    f32 = torch.float32
    events = [("alloc", 2, small, f32), ("alloc", 3, small, f32), ("launch",), ("alloc", 4, big, f32),
              ("alloc", 5, big, f32), ("launch",), ("launch",), ("alloc", 6, big, f32), ("alloc", 7, small, f32),
              ("launch",)]
    last_use = {2: 2, 3: 5, 4: 5, 5: 6, 6: 9, 7: 9}
    out, n_slots, remapped = replay._grouped(events, 8, last_use)
    assert [e[0] for e in out] == ["group", "launch", "alloc", "alloc", "launch", "launch", "group", "launch"]
    assert n_slots == 10
    first, second = out[0], out[6]
    assert [m[0] for m in first[3]] == [2, 3] and [m[1] for m in first[3]] == [0, 256]
    assert [m[0] for m in second[3]] == [6, 7] and second[3][1][1] == 4 * 1024 * 1024
    assert all(m[1] % replay.GROUP_ALIGN == 0 for m in first[3] + second[3])
    assert remapped[first[1]] == 4 and remapped[2] == 1 and remapped[3] == 4   # the group lives to its last member
    assert remapped[4] == 4 and remapped[5] == 5 and remapped[second[1]] == 7
