#!/usr/bin/env python
"""Throughput and peak memory of registered models against timm baselines, across resolutions.

    python tools/benchmark.py                                    # vim_{tiny,small,base} vs deit_*, GPU
    python tools/benchmark.py --models vim_tiny --baselines deit_tiny_patch16_224 \
        --resolutions 224 512 1024 1248 2048 --modes infer train --out-dir bench/
    python tools/benchmark.py --device cpu --models vim_tiny --baselines deit_tiny_patch16_224 \
        --resolutions 32 --batch-size 2 --model-kwargs depth=2 --baseline-kwargs depth=2   # anywhere

Each case (model, resolution, mode) builds the model at that ``img_size`` (position embedding of
that grid, for ours and the baseline alike), draws fresh random images before every timed step,
and reports the median step time after warm-up (CUDA events on GPU, as ``triton.testing.do_bench``)
as images/s, with the peak of ``torch.cuda.max_memory_allocated`` (reset per case). ``infer`` is
a forward under ``torch.inference_mode``; ``train`` is forward + cross-entropy + backward + AdamW
step. bf16 autocast by default on GPU (``--dtype``). Batch sizes: ``--batch-size`` (one value,
or one per resolution) or found per case by doubling until out of memory, ``--max-batch-size`` or
a step longer than ``--max-step-ms``, then backing off; a model and its baseline are timed at
the smaller of their two batch sizes so that their ratio compares like with like.

Writes ``benchmark.json`` (after every case, so an interrupted run keeps what it measured),
``throughput.png`` and ``memory.png`` to ``--out-dir``, and prints a table with ours / baseline
ratios. Exit status 1 when a case failed with an error other than running out of memory.

``--variant NAME:SPEC[,SPEC...]`` (repeatable) measures each of our models' cases under every variant in
one process, e.g. a kernel knob off and on: a SPEC is ``dotted.module.ATTR=VALUE`` or
``dotted.module.DICT[KEY]=VALUE``, set before the model is built and restored after its measurement.
The variants alternate over ``--rounds`` rounds at the batch size found with the defaults; baselines are
measured once. The table gains a variant column and an A/B table (ms per step and ratio to the first
variant) follows; plots show the first variant only.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

sys.path.insert(1, str(Path(__file__).resolve().parent))  # tools/, for its shared modules also when not run as a script
from knobs import SPEC_SEP, Knob, resolve_knob  # noqa: E402
from vim import inference as inf  # noqa: E402  (also registers the vim_* models)

DEFAULT_MODELS = ["vim_tiny", "vim_small", "vim_base"]
DEFAULT_BASELINES = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
GPU_RESOLUTIONS = [224, 384, 512, 768, 1024, 1248, 1536, 2048]
CPU_RESOLUTIONS = [32, 64]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="our models (any registered timm name)")
    p.add_argument("--baselines", nargs="*", default=DEFAULT_BASELINES,
                   help="baselines, paired with --models in order for the ratios (none: no baselines)")
    p.add_argument("--resolutions", type=int, nargs="+", default=None,
                   help=f"square input sizes (default GPU {GPU_RESOLUTIONS}, CPU {CPU_RESOLUTIONS})")
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--batch-size", type=int, nargs="+", default=None,
                   help="one batch size for all resolutions or one per resolution; default: search")
    p.add_argument("--max-batch-size", type=int, default=None, help="search limit (default GPU 256, CPU 8)")
    p.add_argument("--max-step-ms", type=float, default=None,
                   help="search stops doubling once a step takes this long (default GPU 400, CPU 2000)")
    p.add_argument("--dtype", default="auto", choices=["auto", *inf.DTYPES],
                   help="autocast dtype; auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile each model, in MODE (default, reduce-overhead: CUDA graphs, max-autotune, "
                        "max-autotune-no-cudagraphs); the batch search runs eager")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each step in a CUDA graph and time its replays (GPU only; batch search runs eager): "
                        "the step without Python and kernel-launch cost on the host")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="NAME=VALUE",
                   help="timm.create_model overrides for --models (e.g. depth=2 for a smoke test)")
    p.add_argument("--baseline-kwargs", nargs="*", default=[], metavar="NAME=VALUE",
                   help="timm.create_model overrides for --baselines")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu")
    p.add_argument("--warmup-ms", type=float, default=None, help="warm-up time per case (default GPU 200, CPU 0)")
    p.add_argument("--rep-ms", type=float, default=None, help="timed time per case (default GPU 1000, CPU 0)")
    p.add_argument("--min-reps", type=int, default=None, help="fewest timed steps (default GPU 10, CPU 3)")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="stop starting new cases after this many seconds (they are recorded as skipped); "
                        "the table, JSON and plots still cover what was measured")
    p.add_argument("--out-dir", default="benchmark_results", help="where benchmark.json and the PNGs go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:SPEC[,SPEC...]",
                   help="repeatable: each of our models' cases is measured under every variant; SPEC is "
                        "dotted.module.ATTR=VALUE or dotted.module.DICT[KEY]=VALUE (VALUE a Python literal, else "
                        "a string); NAME: alone keeps the defaults")
    p.add_argument("--rounds", type=int, default=2,
                   help="with --variant: rounds over all variants, each variant timed once per round")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# --variant: module-level knobs set for one measurement


@dataclass
class Variant:
    name: str
    knobs: List[Knob]

    @contextlib.contextmanager
    def applied(self):
        """The knobs set, and put back as they were however the block ends, so the next variant (and
        the baselines) start from the defaults."""
        saved = []
        try:
            for knob in self.knobs:
                saved.append((knob, knob.get()))
                knob.set(knob.value)
            yield
        finally:
            for knob, old in reversed(saved):
                knob.set(old)


def parse_variants(texts: Sequence[str]) -> List[Variant]:
    variants = []
    for text in texts:
        name, sep, specs = text.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"--variant {text!r}: expected NAME:SPEC[,SPEC...] (NAME: alone for the defaults)")
        if name in (v.name for v in variants):
            raise SystemExit(f"--variant {text!r}: variant {name!r} given twice")
        variants.append(Variant(name, [resolve_knob(s) for s in re.split(SPEC_SEP, specs) if s.strip()]))
    return variants


# ----------------------------------------------------------------------------------------------
# one measured case


@dataclass
class Case:
    model: str
    role: str  # "model" or "baseline"
    mode: str
    resolution: int
    batch_size: Optional[int] = None
    batch_source: str = ""  # "given", "search"
    status: str = "pending"  # ok, oom, error, skipped
    ms: Optional[float] = None  # median step time
    img_s: Optional[float] = None
    peak_gib: Optional[float] = None
    reps: int = 0
    group: int = 0  # cases of one group (a model and its baseline) share batch sizes
    params_m: Optional[float] = None
    message: str = ""
    variant: Optional[str] = None  # --variant name (our models only)
    round_ms: List[float] = field(default_factory=list)  # with a variant: each round's median


def record(c: Case) -> Dict[str, Any]:
    """``c`` for benchmark.json; runs without ``--variant`` keep the fields they always had."""
    out = asdict(c)
    if c.variant is None:
        del out["variant"], out["round_ms"]
    return out


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device: torch.device, compiled: bool = False) -> None:
    if compiled:
        torch._dynamo.reset()  # compiled graphs hold the model's parameters
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        # cuBLAS keeps a workspace (32 MiB on Hopper) per stream it has run on, allocated through the caching
        # allocator: each case's capture stream left one behind, counted in every later case's peak (session 16
        # saw the peak grow by 0.064 GiB per two-round variant). PyTorch's own leak checks clear them the same way.
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        torch.cuda.empty_cache()


def build(name: str, resolution: int, kwargs: Dict[str, Any], num_classes: int, device: torch.device) -> nn.Module:
    import timm

    def create():
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=resolution,
                                     **kwargs)
        except TypeError as e:  # CNNs take any input size and have no img_size argument
            if "img_size" not in str(e) or "img_size" in kwargs:
                raise
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)

    if device.type == "cuda":
        # initialising on the GPU is much faster than on the CPU for the base models
        try:
            with torch.device(device):
                return create()
        except Exception as e:  # noqa: BLE001  (an init that cannot run on the GPU: build on CPU)
            if _is_oom(e):
                raise
    return create().to(device)


class Step:
    """One benchmark step on fresh random data: ``refresh()`` redraws the batch (outside the
    timed region), ``__call__`` runs the forward (infer) or forward + backward + AdamW (train).
    With ``cuda_graph`` the step is captured once (``capture()``) and each call replays the graph on the
    same input buffers, which ``refresh()`` redraws in place."""

    def __init__(self, model: nn.Module, mode: str, batch: int, resolution: int, num_classes: int,
                 device: torch.device, dtype: torch.dtype, compile: Optional[str] = None, cuda_graph: bool = False):
        self.mode, self.device, self.dtype = mode, device, dtype
        self.model = model.train(mode == "train")
        self.fn = torch.compile(model, mode=None if compile == "default" else compile) if compile else model
        # CUDA-graph trees replay into the previous step's outputs: each step is marked as a new one
        self.mark_steps = bool(compile) and compile in ("reduce-overhead", "max-autotune")
        in_chans = getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "in_channels", None) \
            or model.pretrained_cfg.get("input_size", (3,))[0]
        self.x = torch.empty(batch, in_chans, resolution, resolution, device=device)
        self.y = torch.empty(batch, dtype=torch.long, device=device)
        self.num_classes = max(num_classes, 1)
        cuda = device.type == "cuda"
        # a captured optimizer step must keep its step count on the GPU (capturable)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda, capturable=cuda_graph) \
            if mode == "train" else None
        self.cuda_graph = cuda_graph
        self.graph: Optional[torch.cuda.CUDAGraph] = None

    def refresh(self) -> None:
        self.x.normal_()
        self.y.random_(0, self.num_classes)

    def _run(self) -> None:
        if self.mark_steps:
            torch.compiler.cudagraph_mark_step_begin()
        with inf.autocast(self.device, self.dtype, cache_enabled=not self.cuda_graph):
            if self.mode == "infer":
                with torch.inference_mode():
                    self.fn(self.x)
                return
            loss = F.cross_entropy(self.fn(self.x).float(), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def capture(self) -> None:
        """Warm up on a side stream (first calls compile kernels and allocate optimizer state), then
        capture one step, as PyTorch's whole-network capture recipe does."""
        self.refresh()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._run()

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()


def time_step(step: Step, warmup_ms: float, rep_ms: float, min_reps: int, max_reps: int = 200) -> List[float]:
    """Per-step milliseconds, ``do_bench`` style: two warm-up steps, an estimate, warm-up for
    ``warmup_ms``, then ``max(min_reps, rep_ms / estimate)`` steps timed one by one (CUDA events on
    GPU), each on a freshly drawn batch."""
    cuda = step.device.type == "cuda"

    def timed(n: int) -> List[float]:
        if cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            for s, e in zip(starts, ends):
                step.refresh()
                s.record()
                step()
                e.record()
            torch.cuda.synchronize(step.device)
            return [s.elapsed_time(e) for s, e in zip(starts, ends)]
        out = []
        for _ in range(n):
            step.refresh()
            t0 = time.perf_counter()
            step()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    timed(2)  # first calls: allocation, autotuning, compilation
    estimate = statistics.median(timed(3 if cuda else 1))
    if warmup_ms > 0:
        timed(max(0, int(warmup_ms / max(estimate, 1e-3))))
    n = int(min(max_reps, max(min_reps, rep_ms / max(estimate, 1e-3))))
    return timed(n)


def try_batch(model: nn.Module, mode: str, resolution: int, batch: int, args, device, dtype) -> Tuple[bool, float]:
    """Does a step at ``batch`` fit? Returns (fits, ms of a step after the first). Data, optimizer
    state and gradients live only inside this call, so an OOM frees everything once it returns."""
    ok, ms, step = True, float("inf"), None
    try:
        step = Step(model, mode, batch, resolution, args.num_classes, device, dtype)
        step.refresh()
        step()  # allocates optimizer state
        ms = _two_steps(step)[-1]
    except Exception as e:  # noqa: BLE001  (anything but OOM is re-raised)
        if not _is_oom(e):
            raise
        ok = False
    finally:
        step = None
        for p in model.parameters():
            p.grad = None
        free_memory(device)
    return ok, ms


def _two_steps(step: Step) -> List[float]:
    out = []
    for _ in range(2):
        step.refresh()
        if step.device.type == "cuda":
            torch.cuda.synchronize(step.device)
        t0 = time.perf_counter()
        step()
        if step.device.type == "cuda":
            torch.cuda.synchronize(step.device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def search_batch(name, kwargs, mode, resolution, args, device, dtype) -> Optional[int]:
    """Largest power-of-two batch that fits, starting from a guess scaled by the token count
    (fewer trial steps), doubling until OOM, ``--max-batch-size`` or ``--max-step-ms``, halving
    when the guess itself does not fit. None when batch 1 does not fit (or the model itself)."""
    limit = args.max_batch_size
    guess = limit * (224 / resolution) ** 2 if device.type == "cuda" else 1
    batch = max(1, min(limit, 2 ** int(math.log2(max(guess, 1)))))
    model = None
    try:
        model = build(name, resolution, kwargs, args.num_classes, device)
        fits, ms = try_batch(model, mode, resolution, batch, args, device, dtype)
        while not fits:
            if batch == 1:
                return None
            batch //= 2
            fits, ms = try_batch(model, mode, resolution, batch, args, device, dtype)
        while batch * 2 <= limit and ms < args.max_step_ms:
            fits, ms = try_batch(model, mode, resolution, batch * 2, args, device, dtype)
            if not fits:
                break  # back off to the last batch that fitted
            batch *= 2
        return batch
    except Exception as e:  # noqa: BLE001
        if not _is_oom(e):
            raise
        return None
    finally:
        model = None
        free_memory(device)


def measure(case: Case, kwargs, args, device, dtype) -> Case:
    """Time ``case`` at ``case.batch_size``; an OOM is recorded as such, not raised."""
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = step = None
    try:
        model = build(case.model, case.resolution, kwargs, args.num_classes, device)
        case.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        step = Step(model, case.mode, case.batch_size, case.resolution, args.num_classes, device, dtype,
                    compile=args.compile, cuda_graph=args.cuda_graph)
        if args.cuda_graph:
            step.capture()
        times = time_step(step, args.warmup_ms, args.rep_ms, args.min_reps)
        case.ms = statistics.median(times)
        case.reps = len(times)
        case.img_s = case.batch_size / case.ms * 1e3
        case.status = "ok"
        if device.type == "cuda":
            case.peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30
    except Exception as e:  # noqa: BLE001  (reported per case, the run goes on)
        if _is_oom(e):
            case.status, case.message = "oom", f"out of memory at batch {case.batch_size}"
        else:
            case.status, case.message = "error", f"{type(e).__name__}: {e}"
    finally:
        model = step = None  # noqa: F841
        free_memory(device, compiled=bool(args.compile))
    return case


def measure_variants(template: Case, variants: Sequence[Variant], kwargs, args, device, dtype) -> List[Case]:
    """``template`` under every variant, one case each. The variants alternate over ``args.rounds``
    rounds so that drift (clocks, heat, neighbours on the host) affects all alike; a variant's ``ms`` is
    the median of its rounds' medians. A variant whose round fails keeps that round's status and is not
    measured again; a ``template`` that already failed (batch search) is copied, not measured."""
    cases = [replace(template, variant=v.name, round_ms=[]) for v in variants]
    for _ in range(args.rounds):
        for variant, case in zip(variants, cases):
            if case.status != "pending":
                continue
            with variant.applied():
                r = measure(replace(template, round_ms=[]), kwargs, args, device, dtype)
            if r.status != "ok":
                case.status, case.message = r.status, r.message
                continue
            case.round_ms.append(r.ms)
            case.reps += r.reps
            case.params_m = r.params_m
            case.peak_gib = max(case.peak_gib or 0.0, r.peak_gib) if r.peak_gib is not None else None
    for case in cases:
        if case.status == "pending":
            case.status, case.ms = "ok", statistics.median(case.round_ms)
            case.img_s = case.batch_size / case.ms * 1e3
    return cases


# ----------------------------------------------------------------------------------------------
# the run


def ratios(cases: Sequence[Case], pairs: Sequence[Tuple[str, str]]) -> List[Dict[str, Any]]:
    """ours / baseline at the same resolution, batch and mode: speed (img/s) and peak memory."""
    index = {(c.model, c.mode, c.resolution, c.batch_size): c for c in cases if c.status == "ok"}
    out = []
    for ours, base in pairs:
        for c in cases:
            if c.model != ours or c.role != "model" or c.status != "ok":
                continue
            b = index.get((base, c.mode, c.resolution, c.batch_size))
            if b is None:
                continue
            out.append({"model": ours, "baseline": base, "mode": c.mode, "resolution": c.resolution,
                        "batch_size": c.batch_size, "speed": c.img_s / b.img_s,
                        "memory": (c.peak_gib / b.peak_gib) if c.peak_gib and b.peak_gib else None,
                        **({"variant": c.variant} if c.variant is not None else {})})
    return out


def ab_rows(cases: Sequence[Case]) -> List[Dict[str, Any]]:
    """Per case measured under variants: each variant's ms and its ratio to the first variant's
    (< 1: faster than the first)."""
    first: Dict[Tuple, Case] = {}
    out = []
    for c in cases:
        if c.variant is None:
            continue
        key = (c.model, c.mode, c.resolution, c.batch_size)
        ref = first.setdefault(key, c)  # a case's variants are appended together, the first one first
        out.append({"model": c.model, "mode": c.mode, "resolution": c.resolution, "batch_size": c.batch_size,
                    "variant": c.variant, "status": c.status, "ms": c.ms, "round_ms": c.round_ms,
                    "ratio": c.ms / ref.ms if c.ms and ref.ms else None})
    return out


def environment(device: torch.device, dtype: torch.dtype, args) -> Dict[str, Any]:
    import timm

    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "device_type": device.type, "torch": torch.__version__, "timm": timm.__version__,
           "python": platform.python_version(), "dtype": str(dtype).replace("torch.", ""),
           "compile": args.compile, "cuda_graph": args.cuda_graph,
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return env


def _fmt(v, f):
    return format(v, f) if v is not None else "-"


def _variant_width(names: Sequence[str]) -> int:
    """Width of a variant column; 0 (no column) without variants."""
    return max(9, *(len(n) + 2 for n in names)) if names else 0


def format_table(cases: Sequence[Case], rat: Sequence[Dict[str, Any]]) -> str:
    by_key = {(r["model"], r["mode"], r["resolution"], r["batch_size"], r.get("variant")): r for r in rat}
    vw = _variant_width([c.variant for c in cases if c.variant is not None])
    head = f"{'mode':<6}{'res':>6}{'batch':>7}  {'model':<28}{'variant' if vw else '':<{vw}}{'img/s':>11}" \
           f"{'ms/step':>10}{'peak GiB':>10}{'speed x':>9}{'mem x':>7}  status"
    lines = [head, "-" * len(head)]
    for c in sorted(cases, key=lambda c: (c.mode, c.resolution, c.group, c.role != "model")):
        r = by_key.get((c.model, c.mode, c.resolution, c.batch_size, c.variant)) if c.role == "model" else None
        lines.append(
            f"{c.mode:<6}{c.resolution:>6}{_fmt(c.batch_size, 'd'):>7}  {c.model:<28}{c.variant or '':<{vw}}"
            f"{_fmt(c.img_s, ',.1f'):>11}{_fmt(c.ms, '.2f'):>10}{_fmt(c.peak_gib, '.3f'):>10}"
            f"{_fmt(r and r['speed'], '.3f'):>9}{_fmt(r and r['memory'], '.2f'):>7}  "
            f"{c.status}{(' ' + c.message) if c.message else ''}")
    if rat:
        lines.append("speed x / mem x: ours / baseline at the same mode, resolution and batch "
                     "(speed > 1: ours faster; mem < 1: ours smaller)")
    return "\n".join(lines)


def format_ab(rows: Sequence[Dict[str, Any]], rounds: int) -> str:
    first = rows[0]["variant"]
    vw = _variant_width([r["variant"] for r in rows])
    head = f"{'mode':<6}{'res':>6}{'batch':>7}  {'model':<28}{'variant':<{vw}}{'ms/step':>10}{'ratio':>8}  rounds (ms)"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["mode"], r["resolution"])):  # stable: variants stay in order
        status = "" if r["status"] == "ok" else f"  {r['status']}"
        lines.append(f"{r['mode']:<6}{r['resolution']:>6}{_fmt(r['batch_size'], 'd'):>7}  {r['model']:<28}"
                     f"{r['variant']:<{vw}}{_fmt(r['ms'], '.3f'):>10}{_fmt(r['ratio'], '.3f'):>8}  "
                     f"{' '.join(f'{t:.3f}' for t in r['round_ms'])}{status}")
    lines.append(f"ms/step: median of {rounds} rounds' medians, the variants alternating; ratio: ms / {first}'s ms "
                 f"at the same case and batch (< 1: faster than {first})")
    return "\n".join(lines)


def step_tags(env: Dict[str, Any]) -> str:
    """How the steps ran, for the printed header and the plots' titles: " | compile MODE", " | CUDA graph"."""
    return (f"{' | compile ' + str(env['compile']) if env.get('compile') else ''}"
            f"{' | CUDA graph' if env.get('cuda_graph') else ''}")


def plot(cases: Sequence[Case], out_dir: Path, env: Dict[str, Any]) -> List[Path]:
    """throughput.png and memory.png: against resolution, one panel per mode, a colour per model
    pair (solid: ours, dashed: baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({c.mode for c in cases})
    names = list(dict.fromkeys(c.model for c in cases))
    colours = {}
    for c in cases:  # a model and its baseline share a colour: they are measured as a group
        colours.setdefault(c.group, f"C{len(colours) % 10}")
    res = sorted({c.resolution for c in cases})
    written = []
    for metric, ylabel, fname in (("img_s", "images / s", "throughput.png"),
                                  ("peak_gib", "peak memory (GiB)", "memory.png")):
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            plotted = False
            for name in names:
                pts = sorted((c.resolution, getattr(c, metric), c) for c in cases
                             if c.model == name and c.mode == mode and c.status == "ok"
                             and getattr(c, metric) is not None)
                if not pts:
                    continue
                role, group = pts[0][2].role, pts[0][2].group
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[group],
                        linestyle="-" if role == "model" else "--", label=name)
                plotted = True
            if plotted:
                ax.set_yscale("log")
                ax.set_xscale("log", base=2)
                ax.set_xticks(res, [str(r) for r in res])
                ax.minorticks_off()
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "no data" + (" (no peak-memory counter on CPU)" if metric == "peak_gib" else ""),
                        ha="center", transform=ax.transAxes)
            ax.set_xlabel("resolution (px)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}: {ylabel}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"{env['device']} | {env['dtype']}{step_tags(env)}", fontsize=9)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = parse_variants(args.variant)  # up front: a bad knob fails before any measurement
    try:
        device = inf.resolve_device(args.device)
        dtype = inf.resolve_dtype(args.dtype, device)
        model_kwargs = inf.parse_kwargs(args.model_kwargs)
        baseline_kwargs = inf.parse_kwargs(args.baseline_kwargs)
        import timm

        for name in [*args.models, *args.baselines]:
            if not timm.is_model(name):
                raise ValueError(f"unknown model {name!r} (timm.list_models() lists the registered ones)")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    if args.cuda_graph and (not cuda or args.compile):
        print("error: --cuda-graph needs a CUDA device and cannot be combined with --compile", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print("error: --rounds must be at least 1", file=sys.stderr)
        return 2
    resolutions = args.resolutions or (GPU_RESOLUTIONS if cuda else CPU_RESOLUTIONS)
    if len(set(resolutions)) != len(resolutions):   # a batch size per resolution: a repeat would lose one
        print(f"error: --resolutions lists a size twice ({resolutions}); run again for another batch size",
              file=sys.stderr)
        return 2
    if args.batch_size and len(args.batch_size) not in (1, len(resolutions)):
        print(f"error: --batch-size takes one value or one per resolution ({len(resolutions)})", file=sys.stderr)
        return 2
    given = dict(zip(resolutions, args.batch_size * len(resolutions) if args.batch_size and len(args.batch_size) == 1
                     else args.batch_size or []))
    args.max_batch_size = args.max_batch_size or (256 if cuda else 8)
    args.max_step_ms = args.max_step_ms if args.max_step_ms is not None else (400.0 if cuda else 2000.0)
    args.warmup_ms = args.warmup_ms if args.warmup_ms is not None else (200.0 if cuda else 0.0)
    args.rep_ms = args.rep_ms if args.rep_ms is not None else (1000.0 if cuda else 0.0)
    args.min_reps = args.min_reps if args.min_reps is not None else (10 if cuda else 3)
    if cuda:
        torch.backends.cudnn.benchmark = True

    pairs = list(zip(args.models, args.baselines))
    # groups timed at one shared batch size: a model with its baseline, or a model alone
    groups: List[List[Tuple[str, str, Dict[str, Any]]]] = [
        [(m, "model", model_kwargs), (b, "baseline", baseline_kwargs)] for m, b in pairs]
    groups += [[(m, "model", model_kwargs)] for m in args.models[len(pairs):]]
    groups += [[(b, "baseline", baseline_kwargs)] for b in args.baselines[len(pairs):]]

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(device, dtype, args)
    print(f"# {env['device']} | torch {env['torch']} | timm {env['timm']} | triton {env['triton']} | "
          f"{env['dtype']}{step_tags(env)}", flush=True)
    cases: List[Case] = []

    def save():
        doc = {"environment": env, "args": {k: v for k, v in vars(args).items()},
               "cases": [record(c) for c in cases], "ratios": ratios(cases, pairs)}
        if variants:
            doc["variants"] = [{"name": v.name, "specs": [k.spec for k in v.knobs]} for v in variants]
            doc["ab"] = ab_rows(cases)
        (out_dir / "benchmark.json").write_text(json.dumps(doc, indent=1))

    t_start = time.monotonic()
    for gi, group in enumerate(groups):
        for resolution in resolutions:
            for mode in args.modes:
                if args.time_limit_s is not None and time.monotonic() - t_start > args.time_limit_s:
                    for name, role, _ in group:
                        cases.append(Case(name, role, mode, resolution, status="skipped",
                                          message="--time-limit-s reached", group=gi))
                    continue
                failure = ""
                if resolution in given:
                    batch, source = given[resolution], "given"
                else:
                    source = "search"
                    try:
                        found = [search_batch(n, kw, mode, resolution, args, device, dtype) for n, _, kw in group]
                        batch = min((b for b in found if b), default=None)
                    except Exception as e:  # noqa: BLE001  (reported per case, the run goes on)
                        batch, failure = None, f"batch search failed: {type(e).__name__}: {e}"
                        free_memory(device)
                for name, role, kw in group:
                    case = Case(name, role, mode, resolution, batch, source, group=gi)
                    if failure:
                        case.status, case.message = "error", failure
                    elif batch is None:
                        case.status, case.message = "oom", "batch 1 does not fit"
                    if role == "model" and variants:  # variants are about our kernels: baselines once
                        done = measure_variants(case, variants, kw, args, device, dtype)
                    else:
                        done = [measure(case, kw, args, device, dtype) if case.status == "pending" else case]
                    for case in done:
                        cases.append(case)
                        peak = f", {case.peak_gib:.3f} GiB" if case.peak_gib is not None else ""
                        speed = f"{case.img_s:,.1f} img/s" if case.img_s else case.status
                        label = name if case.variant is None else f"{name} [{case.variant}]"
                        print(f"{mode:<6}{resolution:>6} bs {batch}: {label}: {speed}{peak} {case.message}".rstrip(),
                              flush=True)
                    save()

    rat = ratios(cases, pairs)
    print()
    print(format_table(cases, rat))
    ab = ab_rows(cases)
    if ab:  # none when --time-limit-s skipped every case
        print()
        print(format_ab(ab, args.rounds))
    save()
    written = [out_dir / "benchmark.json"]
    if not args.no_plot:
        first = variants[0].name if variants else None
        try:  # one line per model: with variants, the first one's
            written += plot([c for c in cases if c.variant in (None, first)], out_dir, env)
        except ImportError:
            print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
    print(f"wrote {', '.join(map(str, written))}")
    errors = [c for c in cases if c.status == "error"]
    for c in errors:
        print(f"error in {c.model} {c.mode} {c.resolution}: {c.message}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
