"""Time the selective-scan kernels against the pure-PyTorch reference (and mamba_ssm when importable),
the fused bidirectional mixer core against two one-direction scans with flips, the conv + SiLU
backward of both directions against PyTorch autograd, and the mixer's dt_proj + softplus kernel against the
plain dt_proj GEMM (cuBLAS) it replaced.

    python tools/benchmark_kernels.py --out kernels.json            # GPU: the issue's shapes, bf16
    python tools/benchmark_kernels.py --out /tmp/k.json             # CPU: tiny shapes (smoke test)
    python tools/benchmark_kernels.py --sweep --out sweep.json      # GPU: also sweep kernel configs
    python tools/benchmark_kernels.py --sweep conv dt --out s.json  # GPU: only these sweep groups
    python tools/benchmark_kernels.py --sweep waves --out w.json    # GPU: forward time against program count

Inputs are token-major, as in the model: u, delta, z are (B, L, E) storage viewed as (B, E, L), and
B, C are slices of the x_proj output (B, L, R + 2N). Timings are medians of triton.testing.do_bench
on fresh random data; achieved GB/s counts the bytes that must move (each input read once, each
output written once) and is printed next to the device's measured copy bandwidth. "GPU time" is the
summed time of the kernels one call launches (torch.profiler): at small shapes the eager wall clock
is partly Python launch overhead, which the model hides by queueing layers ahead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without install

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vim.kernels import DirectionParams, bimamba_v2_fn  # noqa: E402
from vim.kernels.selective_scan import selective_scan_fn, selective_scan_ref  # noqa: E402
from vim.kernels.bimamba import conv, delta  # noqa: E402
from vim.kernels.bimamba.naive import depthwise_conv_silu_ref  # noqa: E402
from vim.kernels.selective_scan import triton_scan  # noqa: E402

# (BLOCK_D, SPLIT, UNROLL, NUM_WARPS)
SWEEP_FWD = [(16, 2, 1, 1), (8, 4, 1, 1), (64, 1, 1, 1)]
# forward load timing at the default block: the next group's loads a group early in no launch / every launch
# (LOOKAHEAD; the default is the accumulating launch only), prefetch distance
SWEEP_FWD_LOADS = [dict(LOOKAHEAD=0), dict(LOOKAHEAD=1), dict(PREFETCH=1)]
# (BLOCK_D_BWD, SPLIT_BWD, UNROLL_BWD, NUM_WARPS_BWD, MAXNREG_REV)
SWEEP_BWD = [(32, 1, 2, 1, 168), (32, 1, 2, 1, None), (32, 1, 2, 1, 128), (32, 1, 1, 1, 168), (16, 2, 2, 1, None)]
# the walks' per-token dB / dC channel sums as a reduce-scatter, as one butterfly over the block, or as 2, 4 or 16
# partial sums per block added atomically instead of the default 8 (fewer butterfly levels, more atomic adds); and
# X / Y formed apart from those sums' products (SHARED_PRODUCTS off: one multiply per state and token more); and the
# 8 parts added through the tile's shared-memory path instead of reduce-scattered to 4 adjacent states a lane, one
# vector atomic each (BC_QUADS off; v37 made it the default); and the walks' per-token addresses as 64-bit row
# pointers (LANE_OFFSETS off; v39's 32-bit offsets the default since session 29); and walk programs of 2 and 4 warps
# (8 parts a warp, so that the quads hold), whose warps share the B / C rows through L1 (session 30: the training
# step 0.2-0.8% slower with them, docs/kernels.md v40)
SWEEP_BWD_SUMS = [dict(BC_SCATTER=True), dict(BC_PARTS=1), dict(BC_PARTS=2), dict(BC_PARTS=4), dict(BC_PARTS=16),
                  dict(SHARED_PRODUCTS=False), dict(BC_QUADS=False), dict(LANE_OFFSETS=False),
                  dict(BLOCK_D_BWD=64, NUM_WARPS_BWD=2, BC_PARTS=16),
                  dict(BLOCK_D_BWD=128, NUM_WARPS_BWD=4, BC_PARTS=32)]
SWEEP_CHUNK = [(16384, 64), (2048, 64)]
# the forward's GPU time against its program count (vim_tiny's layer at these batches, 24 programs per row), with
# and without the register cap that saves a wave (MAXNREG_FWD_WAVE; 3,697-4,224 programs on 132 SMs)
WAVE_BATCHES = [128, 144, 160, 176, 192, 224, 256]
SWEEP_GROUPS = ["fwd", "bwd", "chunk", "conv", "dt", "waves"]   # --sweep GROUP ...
# conv backward (BWD_SEG, BWD_BLOCK_E, BWD_NUM_WARPS, BWD_TARGET_PROGRAMS, BWD_LOOKAHEAD)
SWEEP_CONV = [(32, 128, 2, 2048, 0), (32, 128, 4, 2048, 0), (16, 128, 2, 2048, 0), (64, 128, 2, 2048, 0),
              (32, 256, 4, 2048, 0), (32, 256, 2, 2048, 0), (32, 128, 2, 1024, 0), (32, 128, 2, 4096, 0),
              # more, shorter programs: cheap since the partials' reduction got 120+ programs (session 16, v23)
              (32, 128, 2, 8192, 0), (16, 128, 2, 4096, 0), (32, 64, 2, 4096, 0), (32, 64, 1, 4096, 0),
              # each position's rows loaded one or two positions ahead, before the previous dx store (session 16)
              (32, 128, 2, 2048, 1), (32, 128, 2, 2048, 2), (32, 128, 2, 4096, 2), (32, 64, 1, 4096, 2)]
# dt_proj + softplus (BLOCK_M, BLOCK_E, NUM_WARPS), at the (tokens, E, dt columns) of DT_SHAPES
SWEEP_DT = [(64, 128, 4), (128, 128, 8), (128, 64, 4), (64, 64, 4), (32, 128, 4), (128, 128, 4), (256, 64, 8)]
DT_SHAPES = [(256 * 197, 384, 16), (256 * 197, 768, 24), (256 * 197, 1536, 48)]   # vim_tiny / small / base, bs 256
GPU_SHAPES = [(128, 384, 197, 16), (128, 768, 197, 16), (8, 384, 6085, 16)]
CPU_SHAPES = [(2, 8, 24, 4)]
# mamba_ssm 2.3.2 CUDA kernel on an H100, bf16 (shared/anchors), ms: (fwd, fwd+bwd)
ANCHORS = {(128, 384, 197, 16): (0.403, 1.70), (128, 768, 197, 16): (0.789, 3.29), (8, 384, 6085, 16): (0.581, 3.13)}


def _bench(fn, cuda: bool, rep_ms: int = 100):
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _gpu_ms(fn, cuda: bool, iters: int = 10):
    """GPU time of one call: the summed time of every kernel it launches (torch.profiler), after a warm-up
    call. Eager wall-clock timings of small shapes are partly the host's launch overhead (the model hides
    it by queueing layers ahead); this is what the GPU itself spends. L2 is not flushed between calls."""
    if not cuda:
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA)
    return us / iters / 1e3


def copy_bandwidth_gbs(cuda: bool) -> float:
    n = (1 << 28) if cuda else (1 << 20)
    src = torch.randn(n, device="cuda" if cuda else "cpu")
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), cuda)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def make_inputs(batch, E, L, N, dtype, device, requires_grad=False):
    R = math.ceil(E / 32)
    x = torch.randn(batch, L, E, device=device, dtype=dtype)
    z = torch.randn(batch, L, E, device=device, dtype=dtype)
    dl = (torch.randn(batch, L, E, device=device) * 0.5 - 1.0).to(dtype)
    xdbl = torch.randn(batch, L, R + 2 * N, device=device, dtype=dtype)
    A = -torch.exp(torch.rand(N, E, device=device) * 2).t()   # channel-contiguous, as the mixer derives it
    D = torch.randn(E, device=device)
    bias = torch.randn(E, device=device) * 0.5
    leaves = [x, dl, A, xdbl, D, z, bias]
    for t in leaves:
        t.requires_grad_(requires_grad)
    u = x.transpose(1, 2)
    Bm = xdbl[..., R:R + N].transpose(1, 2)
    Cm = xdbl[..., R + N:].transpose(1, 2)
    args = (u, dl.transpose(1, 2), A, Bm, Cm, D, z.transpose(1, 2), bias)
    return args, leaves


def min_bytes(batch, E, L, N, itemsize, backward):
    per_elem = 4 + (7 if backward else 0)   # fwd: u, delta, z, out; bwd: + dy, u, delta, z read, du, ddelta, dz
    per_tok = 2 * N * (1 + (3 if backward else 0))
    return batch * L * (E * per_elem + per_tok) * itemsize


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_scan(batch, E, L, N, device, reverse):
    """fp32 Triton vs float64 reference: output and every gradient (relative norm error)."""
    args, leaves = make_inputs(batch, E, L, N, torch.float32, device, requires_grad=True)
    y = selective_scan_fn(*args, delta_softplus=True, reverse=reverse, backend="triton")
    g = torch.randn_like(y)
    y.backward(g)
    grads = [t.grad.clone() for t in leaves]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    R = math.ceil(E / 32)
    x, dl, A, xdbl, D, z, bias = leaves64
    args64 = (x.transpose(1, 2), dl.transpose(1, 2), A, xdbl[..., R:R + N].transpose(1, 2),
              xdbl[..., R + N:].transpose(1, 2), D, z.transpose(1, 2), bias)
    yr = selective_scan_ref(*args64, delta_softplus=True, reverse=reverse)
    yr.backward(g.double())
    errs = {"out": rel_err(y, yr)}
    for name, a, b in zip(["u", "delta", "A", "BC", "D", "z", "delta_bias"], grads, leaves64):
        errs["d" + name] = rel_err(a, b.grad)
    return errs


def time_scan(shape, device, cuda, reverse, dtype, with_ref=True):
    batch, E, L, N = shape
    args, leaves = make_inputs(batch, E, L, N, dtype, device, requires_grad=True)
    kw = dict(delta_softplus=True, reverse=reverse)
    res = {}
    fns = {"triton": lambda *a: selective_scan_fn(*a, backend="triton", **kw)}
    if with_ref:
        fns["reference"] = lambda *a: selective_scan_ref(*a, **kw)
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_scan  # type: ignore

        if not reverse:
            fns["mamba_ssm"] = lambda *a: mamba_scan(*a, delta_softplus=True)
    except Exception:
        pass
    g = torch.randn(batch, E, L, device=device, dtype=dtype)
    for name, fn in fns.items():
        with torch.no_grad():
            fwd = _bench(lambda: fn(*args), cuda)

        def step():
            for t in leaves:
                t.grad = None
            fn(*args).backward(g)

        big = name == "reference" and batch * E * L * N > 2e8
        with torch.no_grad():
            gpu_fwd = _gpu_ms(lambda: fn(*args), cuda) if name != "reference" else None
        res[name] = {"fwd_ms": fwd, "fwd_bwd_ms": None if big else _bench(step, cuda), "gpu_fwd_ms": gpu_fwd,
                     "gpu_fwd_bwd_ms": _gpu_ms(step, cuda) if name != "reference" else None}
    return res


def time_forward_waves(batches, cap, device, cuda, dtype, E=384, L=197, N=16):
    """The forward's GPU time at each batch with ``MAXNREG_FWD_WAVE = cap``, ungated (the mixer's first
    direction), and its program count: its time follows the programs, with a step where they outgrow a wave."""
    res = {}
    saved = triton_scan.CONFIG["MAXNREG_FWD_WAVE"]
    triton_scan.CONFIG["MAXNREG_FWD_WAVE"] = cap
    try:
        for b in batches:
            u, dl, A, Bm, Cm, D, _, bias = make_inputs(b, E, L, N, dtype, device)[0]
            with torch.no_grad():
                ms = _gpu_ms(lambda: selective_scan_fn(u, dl, A, Bm, Cm, D, None, bias, delta_softplus=True,
                                                       backend="triton"), cuda)
            _, n_d, _, nc, _ = triton_scan._plan(b, E, L, 1, device=u.device)   # the launch's grid: (n_d, nc, b)
            res[str((b, E, L, N))] = {"batch": b, "programs": n_d * nc * b, "gpu_fwd_ms": ms}
    finally:
        triton_scan.CONFIG["MAXNREG_FWD_WAVE"] = saved
    return res


def bimamba_params(E, N, R, device):
    def one():
        return DirectionParams(
            conv_weight=torch.randn(E, 1, 4, device=device) * 0.3, conv_bias=torch.randn(E, device=device) * 0.1,
            x_proj_weight=torch.randn(R + 2 * N, E, device=device) / math.sqrt(E),
            dt_proj_weight=torch.randn(E, R, device=device) / math.sqrt(R),
            dt_proj_bias=torch.randn(E, device=device) * 0.5 - 3,
            A_log=torch.log(torch.arange(1, N + 1, device=device, dtype=torch.float32)).repeat(E, 1),
            D=torch.ones(E, device=device))
    return one(), one()


def time_bimamba(batch, E, L, N, device, cuda, dtype):
    R = math.ceil(E / 2 / 16)
    fwd, bwd = bimamba_params(E, N, R, device)
    params = [p for p in (*fwd, *bwd) if p is not None]
    for p in params:
        p.requires_grad_(True)
    xz = torch.randn(batch, L, 2 * E, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(batch, L, E, device=device, dtype=dtype)

    amp = dict(device_type=device, dtype=dtype, enabled=cuda)   # as the model runs it: bf16 autocast

    def fused():
        x, z = xz.split([E, E], dim=-1)
        with torch.autocast(**amp):
            return bimamba_v2_fn(x, z, fwd, bwd, backend="triton")

    def unfused():   # two one-direction fused scans with flips, as the official code runs
        x, z = xz.split([E, E], dim=-1)
        with torch.autocast(**amp):
            return _unfused(x, z)

    def _unfused(x, z):
        from vim.kernels.bimamba.naive import mamba_direction_ref
        scan = lambda *a, **k: selective_scan_fn(*a, backend="triton", **{**k, "reverse": False})  # noqa: E731
        y_f = mamba_direction_ref(x, z, fwd, reverse=False, scan=scan)
        y_b = mamba_direction_ref(x.flip(1), z.flip(1), bwd, reverse=False, scan=scan).flip(-1)
        return ((y_f + y_b) / 2).transpose(1, 2)

    res = {}
    for name, fn in (("fused_triton", fused), ("two_scans_with_flips", unfused)):
        with torch.no_grad():
            f = _bench(fn, cuda)

        def step():
            for p in params + [xz]:
                p.grad = None
            fn().backward(g)
        fb = _bench(step, cuda)
        with torch.no_grad():
            gpu_f = _gpu_ms(fn, cuda)
        gpu_fb = _gpu_ms(step, cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            y = fn()
            mem = (torch.cuda.max_memory_allocated() - base) / 2**20
            del y
        else:
            mem = None
        res[name] = {"fwd_ms": f, "fwd_bwd_ms": fb, "gpu_fwd_ms": gpu_f, "gpu_fwd_bwd_ms": gpu_fb,
                     "fwd_peak_extra_MiB": mem}
    return res


def conv_backward_bytes(batch, L, E, itemsize):
    """Both directions: x and four incoming gradients read once, dx written once."""
    return 6 * batch * L * E * itemsize


def time_conv_backward(batch, L, E, device, cuda, dtype, with_ref=True):
    """Backward of both directions' depthwise conv + SiLU of one x, as the mixer's backward runs it: each
    direction's output gradient arrives as two tensors (scan du and the x_proj input gradient)."""
    x = torch.randn(batch, L, 2 * E, device=device, dtype=dtype)[..., :E]   # a half of in_proj's output
    dirs = []
    for _ in range(2):
        grads = tuple(torch.randn(batch, L, E, device=device, dtype=dtype) for _ in range(2))
        dirs.append(conv.ConvGrad(grads, torch.randn(E, 1, 4, device=device) * 0.3,
                                  torch.randn(E, device=device) * 0.1))

    def triton_pair():
        return conv.conv_silu_backward_pair(dirs[0], dirs[1], x)

    xr = x.detach().clone().requires_grad_()
    wr = [d.weight.clone().requires_grad_() for d in dirs]
    br = [d.bias.clone().requires_grad_() for d in dirs]

    def reference():
        for t in (xr, *wr, *br):
            t.grad = None
        with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=cuda):   # as the model runs it
            outs = [depthwise_conv_silu_ref(xr, wr[i], br[i], reverse=bool(i)).transpose(1, 2) for i in range(2)]
        torch.autograd.backward(outs, [d.grads[0] + d.grads[1] for d in dirs])

    res = {}
    nbytes = conv_backward_bytes(batch, L, E, x.element_size())
    for name, fn in (("triton_pair", triton_pair), ("reference", reference)):
        if name == "reference" and not with_ref:
            continue
        ms = _bench(fn, cuda)
        gpu = _gpu_ms(fn, cuda)
        res[name] = {"ms": ms, "gpu_ms": gpu, "GBps_gpu_time": nbytes / gpu / 1e6 if gpu else None}
    return res


def time_dt_softplus(tokens, E, K, device, cuda, dtype, with_ref=True):
    """The mixer's delta (``delta.dt_softplus``: dt_proj, bias and softplus, float16 out) against the bf16 dt_proj
    GEMM alone (F.linear, what the scan read before and activated itself), dt a column slice of x_proj's rows; and
    as the mixer calls it, also widening the rows' 32 B / C columns to float32 (``dt_softplus_widen``).
    Byte floor: dt read and delta written once (``floor_bytes``), plus the B / C columns read and written once
    (``floor_bytes_widen``)."""
    rows = torch.randn(1, tokens, K + 32, device=device, dtype=dtype)
    dt, bc = rows[..., :K], rows[..., K:]
    w = torch.randn(E, K, device=device, dtype=dtype) / math.sqrt(K)
    b = torch.randn(E, device=device) - 3.0
    out_dtype = delta.delta_dtype(dtype)
    res = {"floor_bytes": tokens * K * dt.element_size() + tokens * E * torch.finfo(out_dtype).bits // 8}
    res["floor_bytes_widen"] = res["floor_bytes"] + tokens * 32 * (bc.element_size() + 4)
    fns = {"dt_softplus": lambda: delta.dt_softplus(dt, w, b, out_dtype),
           "dt_softplus_widen": lambda: delta.dt_softplus(dt, w, b, out_dtype, widen=bc)}
    if with_ref:
        fns["linear"] = lambda: torch.nn.functional.linear(dt, w)
    for name, fn in fns.items():
        res[name] = {"ms": _bench(fn, cuda), "gpu_ms": _gpu_ms(fn, cuda)}
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--sweep", nargs="*", choices=SWEEP_GROUPS, default=None, metavar="GROUP",
                    help="also time kernel configs (GPU only): the scan forward's and backward's blocks and loads, its "
                         f"chunking, the conv backward's tiles, the dt kernel's tiles; groups {SWEEP_GROUPS}, "
                         "none named: all")
    ap.add_argument("--no-check", action="store_true", help="skip the fp32-vs-float64 correctness check")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "dtype": str(dtype), "config": dict(triton_scan.CONFIG)}
    bw = copy_bandwidth_gbs(cuda)
    report["copy_GBps"] = bw
    print(f"device {report['device']}  copy bandwidth {bw:.0f} GB/s")
    if not args.no_check:
        checks = {}
        for rev in (False, True):
            for shp in ([(2, 64, 300, 16), (1, 48, 1000, 16)] if cuda else [(1, 8, 20, 4)]):
                checks[f"{shp} reverse={rev}"] = check_scan(*shp, device, rev)
        report["check_fp32_vs_fp64"] = checks
        worst = max(v for c in checks.values() for v in c.values())
        print(f"check: worst relative error (fp32 triton vs fp64 reference, out + all grads) = {worst:.2e}")
    rows = []
    report["scan"] = {}
    for shp in shapes:
        for rev in (False, True):
            r = time_scan(shp, device, cuda, rev, dtype, with_ref=(not rev and shp == shapes[0]))
            report["scan"][f"{shp} reverse={rev}"] = r
            tr = r["triton"]
            gbs_f = min_bytes(*shp, 2 if cuda else 4, False) / tr["fwd_ms"] / 1e6
            gbs_b = min_bytes(*shp, 2 if cuda else 4, True) / tr["fwd_bwd_ms"] / 1e6
            anc = ANCHORS.get(shp)
            rows.append((shp, rev, tr["fwd_ms"], tr["fwd_bwd_ms"], gbs_f, gbs_b,
                         r.get("reference", {}).get("fwd_ms"), anc, tr["gpu_fwd_ms"], tr["gpu_fwd_bwd_ms"]))
    groups = set(SWEEP_GROUPS if args.sweep == [] else args.sweep or [])
    if groups and cuda:
        report["sweep"] = {}
        base = dict(triton_scan.CONFIG)
        fwd_cfgs = [dict(BLOCK_D=bd, SPLIT=sp, UNROLL=un, NUM_WARPS=nw) for bd, sp, un, nw in SWEEP_FWD]
        fwd_cfgs += SWEEP_FWD_LOADS
        bwd_cfgs = [dict(BLOCK_D_BWD=bd, SPLIT_BWD=sp, UNROLL_BWD=un, NUM_WARPS_BWD=nw, MAXNREG_REV=mr)
                    for bd, sp, un, nw, mr in SWEEP_BWD]
        bwd_cfgs += SWEEP_BWD_SUMS
        tgt_cfgs = [dict(TARGET_PROGRAMS=tp, MIN_CHUNK=mc) for tp, mc in SWEEP_CHUNK]
        for kind, cfgs, sweep_shapes in (("fwd", fwd_cfgs, shapes), ("bwd", bwd_cfgs, shapes),
                                         ("chunk", tgt_cfgs, shapes[-1:])):
            for cfg in (cfgs if kind in groups else []):
                triton_scan.CONFIG.update(base)
                triton_scan.CONFIG.update(cfg)
                key = f"{kind} " + " ".join(f"{k}={v}" for k, v in cfg.items())
                report["sweep"][key] = {}
                for shp in sweep_shapes:
                    r = time_scan(shp, device, cuda, False, dtype, with_ref=False)["triton"]
                    report["sweep"][key][str(shp)] = r
                    print(f"sweep {key:48s} {str(shp):20s} fwd {r['fwd_ms']:.4f} ms  fwd+bwd {r['fwd_bwd_ms']:.4f} ms"
                          f"  GPU time fwd {r['gpu_fwd_ms']:.4f} fwd+bwd {r['gpu_fwd_bwd_ms']:.4f} ms", flush=True)
        triton_scan.CONFIG.update(base)
        for cap in ((triton_scan.CONFIG["MAXNREG_FWD_WAVE"], None) if "waves" in groups else ()):
            key = f"waves MAXNREG_FWD_WAVE={cap}"
            report["sweep"][key] = time_forward_waves(WAVE_BATCHES, cap, device, cuda, dtype)
            for shp, r in report["sweep"][key].items():
                print(f"sweep {key:48s} {shp:20s} {r['programs']:6d} programs  GPU time fwd {r['gpu_fwd_ms']:.4f} ms"
                      f"  {r['gpu_fwd_ms'] * 1e3 / r['batch']:.3f} us per row", flush=True)
        conv_base = (conv.BWD_SEG, conv.BWD_BLOCK_E, conv.BWD_NUM_WARPS, conv.BWD_TARGET_PROGRAMS, conv.BWD_LOOKAHEAD)
        for cfg in (SWEEP_CONV if "conv" in groups else []):
            conv.BWD_SEG, conv.BWD_BLOCK_E, conv.BWD_NUM_WARPS, conv.BWD_TARGET_PROGRAMS, conv.BWD_LOOKAHEAD = cfg
            key = "conv SEG={} BLOCK_E={} warps={} programs={} lookahead={}".format(*cfg)
            report["sweep"][key] = {}
            for b, E, L, _ in shapes:
                r = time_conv_backward(b, L, E, device, cuda, dtype, with_ref=False)["triton_pair"]
                report["sweep"][key][str((b, L, E))] = r
                print(f"sweep {key:48s} {str((b, L, E)):20s} GPU time {r['gpu_ms']:.4f} ms"
                      f"  {r['GBps_gpu_time']:.0f} GB/s", flush=True)
        conv.BWD_SEG, conv.BWD_BLOCK_E, conv.BWD_NUM_WARPS, conv.BWD_TARGET_PROGRAMS, conv.BWD_LOOKAHEAD = conv_base
        dt_base = dict(delta.CONFIG)
        for bm, be, nw in (SWEEP_DT if "dt" in groups else []):
            delta.CONFIG.update(BLOCK_M=bm, BLOCK_E=be, NUM_WARPS=nw)
            key = f"dt BLOCK_M={bm} BLOCK_E={be} warps={nw}"
            report["sweep"][key] = {}
            for shp in DT_SHAPES:
                r = time_dt_softplus(*shp, device, cuda, dtype, with_ref=False)["dt_softplus"]
                report["sweep"][key][str(shp)] = r
                print(f"sweep {key:48s} {str(shp):20s} GPU time {r['gpu_ms']:.4f} ms", flush=True)
        delta.CONFIG.update(dt_base)
    report["conv_backward"] = {}
    for b, E, L, _ in shapes:
        report["conv_backward"][str((b, L, E))] = time_conv_backward(b, L, E, device, cuda, dtype)
    report["dt_softplus"] = {}
    for shp in (DT_SHAPES if cuda else [(48, 24, 12)]):
        report["dt_softplus"][str(shp)] = time_dt_softplus(*shp, device, cuda, dtype)
    report["bimamba"] = {}
    for shp in (shapes[:1] if cuda else shapes):
        b, E, L, N = shp
        try:
            report["bimamba"][str(shp)] = time_bimamba(b, E, L, N, device, cuda, dtype)
        except NotImplementedError as e:
            print(f"bimamba skipped: {e}")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"\n{'shape (B,E,L,N)':22s} {'rev':5s} {'fwd ms':>8s} {'f+b ms':>8s} {'GPU fwd':>8s} {'GPU f+b':>8s}"
          f" {'fwd GB/s':>9s} {'f+b GB/s':>9s} {'ref fwd':>8s} {'mamba fwd/f+b (anchor)':>24s} {'speedup fwd/f+b':>16s}"
          f" {'on GPU time':>12s}")
    nan = float("nan")
    for shp, rev, f, fb, gf, gb, ref, anc, gpu_f, gpu_fb in rows:
        sp = f"{anc[0] / f:.1f}x / {anc[1] / fb:.1f}x" if anc else "-"
        sp_gpu = f"{anc[0] / gpu_f:.1f}x / {anc[1] / gpu_fb:.1f}x" if anc and gpu_f else "-"
        ancs = f"{anc[0]:.3f} / {anc[1]:.2f}" if anc else "-"
        print(f"{str(shp):22s} {str(rev):5s} {f:8.4f} {fb:8.4f} {(gpu_f or nan):8.4f} {(gpu_fb or nan):8.4f} "
              f"{gf:9.0f} {gb:9.0f} {(ref or nan):8.3f} {ancs:>24s} {sp:>16s} {sp_gpu:>12s}")
    for shp, r in report["bimamba"].items():
        for name, v in r.items():
            print(f"bimamba {shp} {name:22s} fwd {v['fwd_ms']:.4f} ms  fwd+bwd {v['fwd_bwd_ms']:.4f} ms"
                  f"  GPU time fwd {v['gpu_fwd_ms'] or nan:.4f} fwd+bwd {v['gpu_fwd_bwd_ms'] or nan:.4f} ms"
                  f"  fwd extra MiB {v['fwd_peak_extra_MiB']}")
    for shp, r in report["conv_backward"].items():
        v, ref = r["triton_pair"], r["reference"]
        print(f"conv+SiLU backward, both directions, (B, L, E) = {shp}: triton {v['ms']:.4f} ms wall,"
              f" GPU time {v['gpu_ms'] or nan:.4f} ms ({v['GBps_gpu_time'] or nan:.0f} GB/s);"
              f" PyTorch autograd {ref['ms']:.4f} ms wall, GPU time {ref['gpu_ms'] or nan:.4f} ms")
    for shp, r in report["dt_softplus"].items():
        v, ref = r["dt_softplus"], r["linear"]
        floor = r["floor_bytes"] / bw / 1e6
        wide = r.get("dt_softplus_widen")
        widened = (f"; with the B / C widening {wide['ms']:.4f} ms wall, GPU time {wide['gpu_ms'] or nan:.4f} ms"
                   f" (floor {r['floor_bytes_widen'] / bw / 1e6:.4f} ms)" if wide else "")
        print(f"dt_proj + softplus, (tokens, E, K) = {shp}: {v['ms']:.4f} ms wall, GPU time {v['gpu_ms'] or nan:.4f}"
              f" ms; dt_proj GEMM alone (F.linear) {ref['ms']:.4f} ms wall, GPU time {ref['gpu_ms'] or nan:.4f} ms;"
              f" byte floor at the copy bandwidth {floor:.4f} ms{widened}")
    print(f"copy bandwidth {bw:.0f} GB/s; wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
