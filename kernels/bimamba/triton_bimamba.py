"""Fused bidirectional Vim v2 mixer core: one autograd function, no flips.

Per direction: depthwise conv + SiLU (Triton, conv.py; anti-causal for the backward direction), x_proj as a
matmul (cuBLAS through torch, on column-padded weights: ``XPROJ_ALIGN``), dt_proj with softplus(. + bias) in its
epilogue (Triton, delta.py; delta stored in float16 under half precision), then the fused selective scan with D
in-kernel. The first direction's scan writes its ungated
output; the second adds its own, applies the silu(z) gate to the sum and halves it (``out = (y_f + y_b) / 2 *
silu(z)``), so the gate is computed once and no separate average pass or flipped copy exists. Only x, z, the
small x_proj outputs and per-chunk scan summaries are kept for backward; the conv outputs and delta are
recomputed there (``RECOMPUTE``), and both directions' conv backwards run as one pass over x (they share it).

The forward and backward are registered as torch custom ops (``vim_kernels::bimamba_v2_fwd`` / ``_bwd``)
with fake implementations and an autograd formula, so ``torch.compile(fullgraph=True)`` traces a model
that calls them without graph breaks.
"""
from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from .. import launch, replay
from ..eager import EagerOp
from ..inductor_fallbacks import register_fake
from ..selective_scan import triton_scan
from ..selective_scan.triton_scan import _absent, _needs_grad, _none_if_absent
from . import conv as _conv_knobs, delta as _delta_knobs, weights as _weights_knobs
from .conv import ConvGrad, conv_silu, conv_silu_backward_pair, conv_silu_pair
from .delta import delta_dtype, dt_softplus, narrow_rows
from .naive import DirectionParams
from .weights import derive_weights, derive_weights_pair


# Columns of the x_proj output rows, laid out [dt | 0 | B | C | 0] with dt, B and each row starting on a multiple of
# XPROJ_ALIGN elements (16 bytes in bf16): the GEMMs that write and read these rows (x_proj, dt_proj and their
# gradients) then get cuBLAS's aligned kernels, where vim's 12 + 2 * 16 = 44 columns got its align-2 ones. The zero
# weight rows and columns keep every result equal to the unpadded one. 1 turns the padding off.
XPROJ_ALIGN = 8


def _xproj_columns(rank: int, N: int):
    """(dt columns incl. padding, row width) of the padded x_proj output."""
    def up(n):
        return -(-n // XPROJ_ALIGN) * XPROJ_ALIGN
    dt_cols = up(rank)
    return dt_cols, up(dt_cols + 2 * N)


def _weights(params, cdt):
    """Per direction of ``params`` (DirectionParams, both directions), (``DerivedWeights``, dt_cols, width): x_proj
    (width, E) and dt_proj (E, width) weights in the padded layout and the compute dtype, A = -exp(A_log) (E, N) in
    float32 and channel-contiguous as the scan kernels read it, the conv's taps (W, E) in float32 as the conv forward
    reads them, both directions' from one launch (weights.py); and the layout."""
    layouts = [_xproj_columns(p.dt_proj_weight.shape[1], p.A_log.shape[1]) for p in params]
    weights = [(p.x_proj_weight, p.dt_proj_weight, p.A_log, p.conv_weight) for p in params]
    if layouts[0] == layouts[1]:
        derived = derive_weights_pair(*weights, *layouts[0], cdt)
    else:
        derived = [derive_weights(*w, *layout, cdt) for w, layout in zip(weights, layouts)]
    return [(d, *layout) for d, layout in zip(derived, layouts)]


# Both directions' conv + SiLU from one launch that reads x once (conv.conv_silu_pair); off: one launch each.
PAIR_CONV = True


def _convs(x, fwd: DirectionParams, bwd: DirectionParams, taps):
    """The two directions' scan inputs, silu(causal conv(x)) and silu(anti-causal conv(x)); ``taps``: their derived
    (W, E) weights."""
    if PAIR_CONV:
        return conv_silu_pair(x, fwd.conv_weight, fwd.conv_bias, bwd.conv_weight, bwd.conv_bias, taps=taps)
    return (conv_silu(x, fwd.conv_weight, fwd.conv_bias, False, taps=taps[0]),
            conv_silu(x, bwd.conv_weight, bwd.conv_bias, True, taps=taps[1]))


def _scan_rows(xdbl, wdt, bias, dt_cols, N, cdt):
    """From x_proj's output: delta (dt_proj + softplus, ``delta_dtype``) and one float32 (B, L, 2N) copy of its B / C
    columns, the rows the scan kernels load whole (``triton_scan._bc_rows``), made by delta's launch."""
    return dt_softplus(xdbl[..., :dt_cols], wdt[:, :dt_cols], bias, delta_dtype(cdt),
                       widen=xdbl[..., dt_cols:dt_cols + 2 * N])


def _bc_views(bc, N):
    """B and C as (B, N, L) views of the scan's float32 (B, L, 2N) rows."""
    return bc[..., :N].transpose(1, 2), bc[..., N:].transpose(1, 2)


# Whether the backward recomputes each direction's conv output and delta (with the B / C rows made beside it), True,
# or the forward keeps them for it, False: per token, layer and direction E elements in the compute dtype and E in
# delta's, plus 2N float32, more activation memory for training; one conv + SiLU pair launch and two dt_proj +
# softplus launches less per layer in the backward.
RECOMPUTE = True


def _keeps_scan_inputs(train_plan: bool) -> bool:
    """Whether the forward op returns the scan's inputs for its backward (the op and its fake agree through this)."""
    return train_plan and not RECOMPUTE


# torch.mm(..., out_dtype=) (the aten::mm.dtype overload, CUDA only) is newer than the oldest torch we support
MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _grad_mm(a, b):
    """a @ b (2-D) as a float32 weight gradient: on CUDA cuBLAS writes float32 from half inputs (``out_dtype``), so
    the gradient is not rounded to the half type and needs no cast pass to the float32 parameter's dtype. Without
    that overload, the half-precision product is cast afterwards; on the CPU the product is taken in float32."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        if MM_OUT_DTYPE:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b).float()
    return torch.mm(a.float(), b.float())


def _forward_impl(x, z, flat, out=None, train_plan=False, saving=True):
    """Returns out (B, L, E) and what backward needs: per direction (x_proj output, chunk states, delta sums);
    absent chunk summaries (one chunk) come back as empty tensors so the op's outputs are all tensors. ``out``: where
    the output goes, any strides; it may be x itself, which nothing reads after the convs. ``train_plan``: a backward
    follows; the scans chunk long sequences as suits it (``triton_scan._plan``). ``saving=False``: nothing is kept
    for a backward (the list comes back empty)."""
    fwd, bwd = DirectionParams(*flat[:7]), DirectionParams(*flat[7:])
    cdt = x.dtype
    batch, L, E = x.shape
    if out is None:
        out = triton_scan._empty((batch, L, E), cdt, x.device)
    saved = []
    with torch.autocast(device_type=x.device.type, enabled=False):
        derived = _weights((fwd, bwd), cdt)
        xcs = list(_convs(x, fwd, bwd, [w.conv_taps for w, _, _ in derived]))
        for i, (p, reverse) in enumerate(((fwd, False), (bwd, True))):
            N = p.A_log.shape[1]
            (wx, wdt, A, _), dt_cols, _ = derived[i]
            xc, xcs[i] = xcs[i], None
            xdbl = replay.linear(xc, wx)
            delta, bc = _scan_rows(xdbl, wdt, p.dt_proj_bias, dt_cols, N, cdt)
            Bm, Cm = _bc_views(bc, N)
            # the first direction writes its ungated y; the second adds its own and gates the sum once:
            # out = (y_f + y_b) / 2 * silu(z), the average of the two gated outputs
            _, _, hloc, S = triton_scan.scan_forward(
                xc.transpose(1, 2), delta.transpose(1, 2), A, Bm, Cm, p.D.float(),
                z.transpose(1, 2) if i == 1 else None, p.dt_proj_bias, True, reverse, delta_activated=True,
                out=out.transpose(1, 2), out_scale=0.5 if i == 1 else 1.0, accumulate=(i == 1), train_plan=train_plan)
            if saving:   # distinct empty tensors: custom-op outputs must not alias each other
                saved += [xdbl, hloc if hloc is not None else _absent(x),
                          S if S is not None else _absent(x)]
                if _keeps_scan_inputs(train_plan):
                    saved += [xc, delta, bc]
            # freed before the second direction allocates its own (one (B, L, E) delta less at the peak)
            del xc, delta, bc, Bm, Cm, hloc, S
    return out, saved


def _backward_impl(dout, x, z, flat, saved, dxz=None, train_plan=False):
    """Gradients of x, z and the 14 direction parameters (empty tensors for an absent conv bias). With ``dxz``
    ((B, L, 2E), x's dtype) dx and dz are written into its two halves. ``train_plan``: the forward's."""
    params = (DirectionParams(*flat[:7]), DirectionParams(*flat[7:]))
    cdt = x.dtype
    batch, L, E = x.shape
    dy = dout.to(cdt).transpose(1, 2)   # each direction carries half the output: the scans take it times 0.5
    grads = []
    conv_grads = []
    dz_total = dxz[..., E:].transpose(1, 2) if dxz is not None else None
    with torch.autocast(device_type=x.device.type, enabled=False):
        # each direction's dB and dC are summed by the walks' atomic adds into one zeroed token-major (B, L, 2N)
        # float32 buffer, the layout of their columns in x_proj's output gradient: both zeroed by one launch
        dbcs = triton_scan._zeros([(batch, L, 2 * p.A_log.shape[1]) for p in params], x.device)
        derived = _weights(params, cdt)
        # per direction: x_proj's output, chunk states, delta sums, and where the forward kept them (``RECOMPUTE``
        # off) the scan's inputs: conv output, delta, B / C rows
        per_direction = len(saved) // 2
        kept = per_direction == 6
        xcs = [None, None] if kept else list(_convs(x, *params, [w.conv_taps for w, _, _ in derived]))
        for i, (p, reverse) in enumerate(zip(params, (False, True))):
            xdbl, hloc, S, *inputs = saved[per_direction * i:per_direction * (i + 1)]
            hloc, S = _none_if_absent(hloc), _none_if_absent(S)
            N = p.A_log.shape[1]
            rank = p.dt_proj_weight.shape[1]
            (wx, wdt, A, _), dt_cols, width = derived[i]
            if kept:
                xc, delta, bc = inputs
            else:   # the forward's, recomputed
                xc, xcs[i] = xcs[i], None
                delta, bc = _scan_rows(xdbl, wdt, p.dt_proj_bias, dt_cols, N, cdt)
            dt = xdbl[..., :dt_cols]
            Bm, Cm = _bc_views(bc, N)
            dbc = dbcs[i]
            # ddelta: the gradient of dt_proj's output (before bias and softplus), in the compute dtype
            du, ddelta, dA_log, _, _, dD, dz, dbias = triton_scan.scan_backward(
                dy, xc.transpose(1, 2), delta.transpose(1, 2), A, Bm, Cm, p.D.float(), z.transpose(1, 2),
                p.dt_proj_bias.float(), True, reverse, hloc, S, dz_out=dz_total, dz_accumulate=i == 1,
                delta_activated=True, ddelta_dtype=cdt, dout_scale=0.5, grad_A_log=True,
                dB_acc=dbc[..., :N].transpose(1, 2).unsqueeze(1), dC_acc=dbc[..., N:].transpose(1, 2).unsqueeze(1),
                train_plan=train_plan)
            dz_total = dz
            ddelta = ddelta.transpose(1, 2)                                    # (B, L, E)
            # over all dt_cols columns (the padding ones are zero and sliced off): at vim_tiny's rank 12 the slice
            # was 24 bytes a row, which cuBLAS ran with an Ampere align-2 kernel, 20 us a call on an H200
            # (torch's products and copies through ``replay.call``, so that a recording of this backward follows them)
            dWdt = replay.call(_grad_mm, ddelta.reshape(-1, ddelta.shape[-1]).t(), dt.reshape(-1, dt_cols))
            if dt_cols != rank:
                dWdt = replay.call(torch.Tensor.contiguous, dWdt[:, :rank])
            # x_proj's output gradient: dt_proj's input gradient from the full-width weight (zero outside the dt
            # columns), then dB / dC into their columns
            dxdbl = replay.call(torch.matmul, ddelta, wdt)
            narrow_rows(dbc, dxdbl[..., dt_cols:dt_cols + 2 * N])
            dWx = replay.call(_grad_mm, dxdbl.reshape(-1, width).t(), xc.reshape(-1, xc.shape[-1]))
            if width != rank + 2 * N:
                dWx = replay.call(torch.cat, (dWx[:rank], dWx[dt_cols:dt_cols + 2 * N]))
            # the conv output's gradient is du + dxdbl @ Wx, summed inside the conv backward
            conv_grads.append(ConvGrad((du.transpose(1, 2), replay.call(torch.matmul, dxdbl, wx)), p.conv_weight,
                                       p.conv_bias))
            grads.append([None, None, dWx.to(p.x_proj_weight.dtype), dWdt.to(p.dt_proj_weight.dtype),
                          dbias.to(p.dt_proj_bias.dtype), dA_log.to(p.A_log.dtype), dD.to(p.D.dtype)])
        # both convs read the same x: one pass gives their weight gradients and the summed dx
        dx, *conv_wb = conv_silu_backward_pair(conv_grads[0], conv_grads[1], x,
                                               out=dxz[..., :E] if dxz is not None else None)
        for g, p, (dconv_w, dconv_b) in zip(grads, params, conv_wb):
            g[0] = dconv_w.to(p.conv_weight.dtype)
            g[1] = dconv_b.to(p.conv_bias.dtype) if dconv_b is not None else _absent(x)
    return dx, dz_total.transpose(1, 2).to(z.dtype), grads[0] + grads[1]


# torch custom ops, so torch.compile sees one opaque node per call instead of breaking the graph. ``z`` absent: ``x``
# is in_proj's whole output (B, L, 2E), x and z its halves, and the backward returns one (B, L, 2E) gradient (written
# in place by the conv and scan backwards) instead of dx and dz that autograd would concatenate: one pass over it less.
# ``train_plan``: the forward chunks long sequences for the backward that follows (``triton_scan._plan``); the
# backward gets the forward's flag.
_PARAM_ARGS = ", ".join(f"Tensor{'?' if k == 1 else ''} {d}{k}" for d in "fb" for k in range(7))
_lib = torch.library.Library("vim_kernels", "FRAGMENT")
_lib.define(f"bimamba_v2_fwd(Tensor x, Tensor? z, {_PARAM_ARGS}, bool train_plan) -> Tensor[]")
_lib.define(f"bimamba_v2_bwd(Tensor dout, Tensor x, Tensor? z, {_PARAM_ARGS}, Tensor[] saved, bool train_plan) "
            "-> Tensor[]")
# Inference on in_proj's packed output: the output overwrites x's half, dead once the convs have read it, so the
# mixer's peak holds one (B, L, E) tensor less. No autograd formula: only for calls that need no gradient.
_lib.define(f"bimamba_v2_fwd_into_x_(Tensor(a!) xz, {_PARAM_ARGS}) -> ()")


def _halves(x, z):
    """(x, z) as the mixer computes on them: the given pair, or the two halves of a packed x."""
    return x.chunk(2, dim=-1) if z is None else (x, z)


def _fwd_run(train_plan, x, z, *flat):
    out, saved = _forward_impl(*_halves(x, z), flat, train_plan=train_plan)
    return [out, *saved]


def _fwd_op(x, z, *rest):
    *flat, train_plan = rest
    return _replayed("fwd", _fwd_run, (x, z, *flat), train_plan)


def _bwd_run(train_plan, dout, x, z, *rest):
    flat, saved = rest[:14], list(rest[14:])
    if z is None:
        dxz = triton_scan._empty(tuple(x.shape), x.dtype, x.device)   # poisoned in tests: both halves must be written
        _, _, grads = _backward_impl(dout, *_halves(x, z), flat, saved, dxz=dxz, train_plan=train_plan)
        return [dxz, _absent(x), *grads]
    dx, dz, grads = _backward_impl(dout, x, z, flat, saved, train_plan=train_plan)
    return [dx, dz, *grads]


def _bwd_op(dout, x, z, *rest):
    *flat, saved, train_plan = rest
    return _replayed("bwd", _bwd_run, (dout, x, z, *flat, *saved), train_plan)


def _fwd_into_x_run(xz, *flat):
    x, z = _halves(xz, None)
    _forward_impl(x, z, flat, out=x, saving=False)


# Mixer calls replayed (``kernels/replay.py``): the first call of a signature runs the mixer and records its launches,
# allocations and torch products, later ones issue them without re-planning. That covers the three ops: inference,
# and a training step's forward and backward. Off: every call runs the mixer.
REPLAY = True
MAX_REPLAYS = 256
_REPLAYS: dict = {}
_UNSEEN = object()


def _knob_names(module, covered=()) -> tuple:
    """A module's knobs: its public upper-case globals holding numbers, strings, None or dicts of them (not the
    running recording, ``launch.RECORDER``, nor the names in ``covered``)."""
    return tuple(n for n, v in vars(module).items() if n.isupper() and not n.startswith("_") and n != "RECORDER"
                 and n not in covered and type(v) in (int, float, bool, str, dict, type(None)))


def _knobs() -> tuple:
    """The current values of every knob a mixer call's launches depend on (part of a replay's key): the scan's
    settings and planners, and the knobs of the mixer's modules."""
    return (triton_scan._settings(), *[tuple(v if type(v) is not dict else tuple(v.items())
                                             for v in map(m.__dict__.get, names)) for m, names in _KNOB_MODULES])


def _meta(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16)


def _replaying() -> bool:
    """Replays are on, and so are the caches they stand in for (off, every call plans and launches afresh); no
    launch hook (a profiler's) is set, which a replay's launches would pass by."""
    return REPLAY and triton_scan.PLAN_CACHE and launch.ENABLED and not launch.launch_hooks_installed()


def _replayed(op: str, run, inputs: tuple, *flags):
    """``run(*flags, *inputs)`` for the op named ``op``: the mixer run, or its replay where the signature was recorded
    before. ``inputs``: tensors or None, the first one present; ``flags``: the run's other arguments, in the key."""
    first = inputs[0]
    if not (_replaying() and first.numel()):
        return run(*flags, *inputs)
    # the current device too: the recorded kernels were loaded for it (as ``launch.CachedLaunch`` keys them)
    key = (op, *flags, first.device, torch._C._cuda_getDevice() if first.is_cuda else None, *map(_meta, inputs),
           replay.nesting(inputs), _knobs())
    rep = _REPLAYS.get(key, _UNSEEN)
    if rep is _UNSEEN:   # recorded now (kept as None where it cannot be replayed)
        rep, result = replay.record(functools.partial(run, *flags), inputs)
        if rep is not replay.BUSY:
            if len(_REPLAYS) >= MAX_REPLAYS:
                _REPLAYS.clear()
            _REPLAYS[key] = rep
        return result
    if rep is not None:
        try:
            return rep(inputs, first.device)
        except replay.Unrecordable:   # refused before its first launch: never replayed again
            _REPLAYS[key] = None
    return run(*flags, *inputs)


def _fwd_into_x_op(xz, *flat):
    _replayed("fwd_into_x", _fwd_into_x_run, (xz, *flat))


def clear_replays() -> None:
    """Forget the recorded calls (changed knobs need not call it: they are part of the key)."""
    _REPLAYS.clear()


for _key in ("CPU", "CUDA"):
    _lib.impl("bimamba_v2_fwd", _fwd_op, _key)
    _lib.impl("bimamba_v2_bwd", _bwd_op, _key)
    _lib.impl("bimamba_v2_fwd_into_x_", _fwd_into_x_op, _key)


@register_fake("vim_kernels::bimamba_v2_fwd_into_x_")
def _fwd_into_x_fake(xz, *flat):
    return None


@register_fake("vim_kernels::bimamba_v2_fwd")
def _fwd_fake(x, z, *rest):
    *flat, train_plan = rest
    x, _ = _halves(x, z)
    batch, L, E = x.shape
    outs = [x.new_empty((batch, L, E))]
    for p in (DirectionParams(*flat[:7]), DirectionParams(*flat[7:])):
        N = p.A_log.shape[1]
        outs.append(x.new_empty((batch, L, _xproj_columns(p.dt_proj_weight.shape[1], N)[1])))
        _, _, _, nc, _ = triton_scan._plan(batch, E, L, 1, device=x.device, train=train_plan)
        if nc > 1:
            outs += [x.new_empty((batch, nc, N, E), dtype=torch.float32),
                     x.new_empty((batch, nc, E), dtype=torch.float32)]
        else:
            outs += [_absent(x), _absent(x)]
        if _keeps_scan_inputs(train_plan):
            outs += [x.new_empty((batch, L, E)), x.new_empty((batch, L, E), dtype=delta_dtype(x.dtype)),
                     x.new_empty((batch, L, 2 * N), dtype=torch.float32)]
    return outs


@register_fake("vim_kernels::bimamba_v2_bwd")
def _bwd_fake(dout, x, z, *rest):
    *flat, saved, _ = rest
    return [torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(z) if z is not None else _absent(x)] + [
        torch.empty_like(p) if p is not None else _absent(x) for p in flat]


def _setup_context(ctx, inputs, output):
    x, z, *flat, train_plan = inputs
    ctx.packed = z is None
    ctx.train_plan = train_plan
    ctx.save_for_backward(x, *([] if ctx.packed else [z]), *flat, *output[1:])
    ctx.has_bias = (flat[1] is not None, flat[8] is not None)
    # what the backward reads back (x_proj outputs, chunk summaries, kept scan inputs) takes no gradient; without
    # these, autograd would fill a zero gradient for each of them (two (B, L, width) fills a layer) that nothing reads
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grads):
    x, *rest = ctx.saved_tensors
    z = None if ctx.packed else rest.pop(0)
    flat, saved = list(rest[:14]), list(rest[14:])
    res = _bwd(grads[0].contiguous(), x, z, *flat, saved, ctx.train_plan)
    dx, dz, *pg = res
    for i in (1, 8):
        if not ctx.has_bias[i // 8]:
            pg[i] = None
    return (dx, None if ctx.packed else dz, *pg, None)


_fwd = EagerOp(torch.ops.vim_kernels.bimamba_v2_fwd, _fwd_op, _autograd_backward, _setup_context)
_bwd = EagerOp(torch.ops.vim_kernels.bimamba_v2_bwd, _bwd_op)
_fwd_into_x = EagerOp(torch.ops.vim_kernels.bimamba_v2_fwd_into_x_, _fwd_into_x_op)


def bimamba_v2_triton(x, z, fwd: DirectionParams, bwd: DirectionParams, overwrite_x: bool = False) -> torch.Tensor:
    """The mixer core on CUDA (or the interpreter). ``z`` None: x is (B, L, 2E), x and z its halves (checked by
    ``interface.bimamba_v2_packed_fn``, for both backends). ``overwrite_x`` (packed only): where no gradient is
    needed, the output is written over x's half and returned as a view of it."""
    if z is None and overwrite_x and not _needs_grad(x, *fwd, *bwd):
        _fwd_into_x(x, *fwd, *bwd)
        return x[..., :x.shape[-1] // 2]
    if z is not None:
        if x.dim() != 3 or z.shape != x.shape:
            raise ValueError(f"x and z must both be (B, L, E); got {tuple(x.shape)} and {tuple(z.shape)}")
        if z.dtype != x.dtype:
            raise ValueError(f"x and z must share a dtype; got {x.dtype} and {z.dtype}")
    return _fwd(x, z, *fwd, *bwd, _needs_grad(x, z, *fwd, *bwd))[0]


# the scan's CONFIG and CHUNK_OVERRIDE are in ``triton_scan._settings()`` already
_KNOB_MODULES = tuple((m, _knob_names(m, ("CONFIG", "CHUNK_OVERRIDE") if m is triton_scan else ()))
                      for m in (sys.modules[__name__], _conv_knobs, _delta_knobs, _weights_knobs, triton_scan, launch))
