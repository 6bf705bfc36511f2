"""Replayed inference mixer calls (kernels/replay.py) against the mixer run afresh: the same launches, the same bits."""
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


@pytest.fixture(autouse=True)
def fresh_replays():
    tb.clear_replays()
    yield
    tb.clear_replays()


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
    """A launch reading a tensor that is neither an input nor a recorded buffer, a function that returns something,
    and a tuple of tensors as an argument, each make the run unrecordable; it still ran."""
    src = torch.randn(2, 3, 16, device=DEVICE)
    dst = torch.zeros(2, 3, 16, device=DEVICE)
    assert replay.record(lambda d: delta_mod.narrow_rows(src, d), [dst]) is None
    assert torch.equal(dst, src)
    assert replay.record(lambda s, d: delta_mod.narrow_rows(s, d) or 1, [src, torch.zeros_like(dst)]) is None
    z = torch.ones(4, device=DEVICE)
    assert replay.record(lambda t: triton_scan._zeros([(4,)], t.device) and None, [z]) is None
    assert launch.RECORDER is None


def test_a_replay_runs_on_new_inputs():
    """The generic case: a recorded function replayed on tensors at other addresses, strided views included."""
    src = torch.randn(2, 3, 16, device=DEVICE)
    dst = torch.zeros(2, 3, 32, device=DEVICE)[..., 8:24]
    rep = replay.record(delta_mod.narrow_rows, [src, dst])
    assert isinstance(rep, replay.Replay)
    src2 = torch.randn(2, 3, 16, device=DEVICE)
    whole = torch.zeros(2, 3, 32, device=DEVICE)
    rep([src2, whole[..., 8:24]], torch.device(DEVICE))
    assert torch.equal(whole[..., 8:24], src2)
    assert not whole[..., :8].any() and not whole[..., 24:].any()


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
