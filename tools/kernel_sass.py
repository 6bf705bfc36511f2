#!/usr/bin/env python
"""What the mixer's Triton kernels compile to for a GPU, on a machine without one: registers, spills, the grid in
waves of resident programs, and the main loop's SASS (instruction mix; MUFU, load, shuffle and atomic counts; a
single-warp issue estimate) of every kernel that one bidirectional mixer forward and backward launches at a given
shape; for the scans, the issue floor (``issue_floor_us``: the loop at one warp instruction a clock per scheduler,
every warp of the grid) and its sum over the layer's launches; and how far ahead of its first use the loop issues
each global load (``load_use_min`` / ``load_use_median``, in instructions; every load's in the JSON).

    python tools/kernel_sass.py                                    # a vim_tiny layer at bs 128, sm_90
    python tools/kernel_sass.py --batch 256 --dim 768 --json sass.json
    python tools/kernel_sass.py --kernels _fwd_kernel --dump sass/  # also write each kernel's SASS and TTGIR
    python tools/kernel_sass.py --set "vim.kernels.selective_scan.triton_scan.CONFIG[LOOKAHEAD]=1"  # a knob set

How the launches are found: the mixer runs on CPU tensors under the Triton interpreter with every kernel
call intercepted (nothing executes) and the GPU-only paths (inline PTX, L1 prefetch) switched on as on
CUDA. Each launch's arguments are specialised as Triton's launcher does it (ints equal to 1 become
constants, ints and pointers divisible by 16 are marked), and in a second process, where the kernels are
ordinary ``@triton.jit`` functions, they are compiled with ``triton.compile`` for the target. ptxas,
cuobjdump and nvdisasm come with Triton's wheel.

"Issue estimate" is a model, not a measurement: one warp alone, in-order issue, a register scoreboard with
nominal sm_90 latencies (LDG_LATENCY for loads hitting L1, 20 cycles for MUFU, 4 for the FMA pipe, 25 for
shuffles) and 8 cycles of MUFU pipe per warp instruction. docs/kernels.md (session 9) compares it with
the measured forward.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without install
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # tools/, for its shared modules

from knobs import add_set_option, resolve_knob  # noqa: E402

LDG_LATENCY = 35
LATENCY = {"LDG": LDG_LATENCY, "MUFU": 20, "SHFL": 25, "F2FP": 6, "I2F": 6, "F2I": 6, "LDC": 10, "LDS": 25,
           "LDL": 35}
NO_RESULT = ("STG", "STL", "STS", "CCTL", "BRA", "BAR", "NOP", "RED", "EXIT")
# triton_scan's launch rules that pick a register cap, a layout or a chunk count by wave count on a CUDA device (the
# capture runs on the CPU)
WAVE_RULES = ("_forward_wave_cap", "_forward_wide", "_reverse_walk_maxnreg", "_forward_walk_maxnreg", "_chunk_target")
MUFU_PIPE_CYCLES = 8   # a warp's MUFU instruction on one SM sub-partition (16 results per clock per SM)


# --------------------------------------------------------------------------------------------
# step 1 (under TRITON_INTERPRET=1): record the launches
# --------------------------------------------------------------------------------------------
def _capture(batch: int, L: int, E: int, N: int, rank: int, backward: bool, sms: int = 132) -> List[dict]:
    import torch
    import triton.language as tl
    import triton.runtime.interpreter as interp
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    records: List[dict] = []

    def plain(value):
        """The JSON form of an argument: numbers as they are, tensors as None, tuples as lists."""
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value if isinstance(value, (bool, int, float, str, type(None))) else None

    def record(self, *args, grid, warmup=False, **kwargs):
        """Instead of running: each parameter's value and its launcher specialisation (type, attribute)."""
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        spec = []
        for name, p in params.items():
            value = bound.get(name, p.default)
            if p.annotation is tl.constexpr or "constexpr" in str(p.annotation):
                spec.append([name, "constexpr", None, plain(value)])
            else:
                kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
                spec.append([name, kind, attr, plain(value)])
        options = {k: v for k, v in kwargs.items() if k not in params}
        if callable(grid):   # a grid function takes the launch's arguments, constexprs included
            grid = grid({**{n: v for n, _, _, v in spec}, **bound})
        grid = [int(g) for g in (grid if isinstance(grid, (tuple, list)) else (grid,))]
        records.append(dict(module=self.fn.__module__, name=self.fn.__name__, args=spec, options=options,
                            grid=grid))

    interp.InterpretedFunction.run = record

    from benchmark_kernels import bimamba_params
    from vim.kernels.bimamba.triton_bimamba import bimamba_v2_triton
    from vim.kernels.selective_scan import triton_scan

    triton_scan._use_asm = lambda t: True   # the CUDA flags: inline PTX and prefetch on
    triton_scan._interpreted = lambda: False   # and what compiled launches take (the dt kernel's tensor-core dot)
    # the register caps chosen by wave count, as on a GPU with `sms` SMs (on CPU tensors they never apply)
    gpu = torch.device("cuda", 0)
    triton_scan.sm_count = lambda device: sms
    for name in WAVE_RULES:   # each takes the device as its last argument
        rule = getattr(triton_scan, name)
        setattr(triton_scan, name, lambda *args, rule=rule: rule(*args[:-1], gpu))

    fwd, bwd = bimamba_params(E, N, rank, "cpu")
    for p in (*fwd, *bwd):
        p.requires_grad_(backward)
    xz = torch.randn(batch, L, 2 * E, dtype=torch.bfloat16, requires_grad=backward)
    x, z = xz.chunk(2, dim=-1)   # in_proj's halves, as the model passes them
    y = bimamba_v2_triton(x, z, fwd, bwd)
    if backward:
        y.float().sum().backward()
    return records


# --------------------------------------------------------------------------------------------
# step 2: compile and read the SASS
# --------------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_launch(rec: dict, arch: int):
    """The launch's kernel compiled for sm_<arch>: (its SASS, {registers, stack, shared, local}, its TTGIR: Triton's
    GPU IR, where the layouts and their conversions through shared memory show)."""
    import triton
    from triton._utils import find_paths_if, get_iterable_path
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    def tuples(x):
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    fn = getattr(importlib.import_module(rec["module"]), rec["name"])
    fn = getattr(fn, "jit_fn", fn)   # the JIT function under kernels.launch's cached launcher
    # as the launcher packs them (triton.runtime.jit.JITFunction._pack_args)
    names = [a[0] for a in rec["args"]]
    sigvals = [tuples(a[1]) for a in rec["args"]]
    attrvals = [tuples(a[2]) for a in rec["args"]]
    values = [tuples(a[3]) for a in rec["args"]]
    signature = dict(zip(names, sigvals))
    constexprs = {path: get_iterable_path(values, path)
                  for path in find_paths_if(sigvals, lambda _, v: v == "constexpr")}
    attrs = {path: BaseBackend.parse_attr(get_iterable_path(attrvals, path))
             for path in find_paths_if(attrvals, lambda _, v: isinstance(v, str))}
    options = {k: v for k, v in rec["options"].items() if k in ("num_warps", "num_stages", "maxnreg")}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    cubin = compiled.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    regs = dict(zip(("registers", "stack", "shared_bytes", "local"), map(int, usage.groups()))) if usage else {}
    return sass, regs, compiled.asm.get("ttgir", "")


def _instructions(lines: List[str]) -> List[Tuple[str, List[str], List[str]]]:
    """(opcode, written registers, read registers) of each SASS instruction line, predicates dropped."""
    out = []
    for line in lines:
        if "/*" not in line or "*/" not in line:
            continue
        ins = line.split("*/", 1)[1].strip().rstrip(";").strip()
        if not ins or ins.startswith("."):
            continue
        ins = re.sub(r"^@!?U?P\w+\s+", "", ins)
        op, _, rest = ins.partition(" ")
        regs = re.findall(r"\b(R\d+|P\d)\b", rest)
        operands = rest.split(",")
        if op.startswith(NO_RESULT) or op.startswith("ST"):   # stores, branches, barriers: nothing written
            dst, src = [], regs
        else:
            dst = re.findall(r"\b(R\d+|P\d)\b", operands[0])
            src = re.findall(r"\b(R\d+|P\d)\b", ",".join(operands[1:]))
        width = 4 if ".128" in op else 2 if ".64" in op else 1
        if width > 1:   # vector results: the registers after the named one
            dst = [f"R{int(r[1:]) + k}" for r in dst if r.startswith("R") for k in range(width)]
        if ".64" in rest:   # 64-bit addresses read a register pair
            src = src + [f"R{int(r[1:]) + 1}" for r in src if r.startswith("R")]
        out.append((op, dst, src))
    return out


def main_loop(sass: str) -> Optional[List[str]]:
    """The SASS lines of the kernel's largest loop (a backward branch to a label), or None."""
    lines = sass.splitlines()
    best = None
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if not m:
            continue
        start = next((k for k, ln in enumerate(lines) if ln.startswith(m.group(1) + ":")), None)
        # start < i - 1: not the one-instruction self-branch every kernel ends with
        if start is not None and start < i - 1 and (best is None or i - start > best[1] - best[0]):
            best = (start, i)
    return lines[best[0]:best[1] + 1] if best else None


def _latency(op: str) -> int:
    base = op.split(".")[0]
    if op.startswith(NO_RESULT):
        return 0
    return LATENCY.get(base, 4)


def issue_estimate(body, iterations: int = 6) -> int:
    """Cycles per loop iteration of one warp alone (see the module docstring), in the steady state."""
    ready: Dict[str, int] = {}
    t = mufu_free = 0
    starts = []
    for _ in range(iterations):
        starts.append(t)
        for op, dst, src in body:
            ti = max([t + 1] + [ready.get(r, 0) for r in src])
            if op.startswith("MUFU"):
                ti = max(ti, mufu_free)
                mufu_free = ti + MUFU_PIPE_CYCLES
            t = ti
            for r in dst:
                ready[r] = ti + _latency(op)
    return starts[-1] - starts[-2]


def load_use_distances(body) -> List[int]:
    """For each global load (``LDG``) of a loop body, the instructions issued after it until the first one that reads
    a register it writes, wrapping into the next iteration (a load for the next token). Short distances leave a warp
    waiting on L1 / L2 latency unless other warps cover it: in session 30 the forward's accumulating launch ran
    slower with 4% more instructions, its C loads 5-17 instructions ahead of their use rather than 14-34
    (docs/kernels.md, v40)."""
    out = []
    n = len(body)
    for i, (op, dst, _) in enumerate(body):
        if not op.startswith("LDG") or not dst:
            continue
        written = set(dst)
        for k in range(1, n + 1):
            if written & set(body[(i + k) % n][2]):
                out.append(k)
                break
    return out


def waves(grid: List[int], usage: dict, num_warps: int, sms: int) -> dict:
    """How many programs of the launch an SM holds at once (by registers, warps, shared memory and sm_90's limits),
    and the grid in waves of that many on `sms` SMs: 1.1 means a second wave a tenth full, which takes about as
    long as a full one where each program walks a whole sequence."""
    from vim.kernels.host_math import programs_per_sm

    programs = math.prod(grid)
    per_sm = programs_per_sm(usage.get("registers") or 1, num_warps, usage.get("shared_bytes") or 0)
    return dict(programs=programs, per_sm=per_sm, waves=round(programs / max(per_sm * sms, 1), 2))


def issue_floor_us(programs: int, num_warps: int, tokens: int, unroll: int, loop_instructions: int, sms: int,
                   clock_ghz: float) -> float:
    """Microseconds the launch's main loop takes at one warp instruction a clock on each of an SM's 4 schedulers: every
    warp of every program issues ``loop_instructions`` per iteration, ``tokens / unroll`` iterations (a program
    walks one chunk of ``tokens``). A floor of the compiled code, not of the arithmetic: docs/benchmarks.md, "Issue
    floors of the scan kernels"."""
    warp_instructions = programs * num_warps * math.ceil(tokens / unroll) * loop_instructions
    return warp_instructions / (sms * 4 * clock_ghz * 1e3)


def summarize(sass: str) -> dict:
    loop = main_loop(sass)
    total = len(_instructions(sass.splitlines()))
    if loop is None:
        return dict(instructions=total)
    body = _instructions(loop)
    ops = collections.Counter(op for op, _, _ in body)

    def count(*prefixes):
        return sum(n for op, n in ops.items() if op.startswith(prefixes))

    distances = sorted(load_use_distances(body))
    return dict(instructions=total, loop_instructions=len(body), mufu=count("MUFU"), loads=count("LDG", "LDL"),
                stores=count("STG", "STL"), spill_ops=count("LDL", "STL"), shuffles=count("SHFL"),
                atomics=count("ATOMG", "RED"),
                shared_ops=count("LDS", "STS", "STSM", "BAR"), loop_cycles_one_warp=issue_estimate(body),
                load_use_min=distances[0] if distances else None,
                load_use_median=distances[len(distances) // 2] if distances else None,
                load_use=distances)


# --------------------------------------------------------------------------------------------
LAYER_SHAPE = (("batch", 128, None), ("length", 197, "tokens (197: 224 px with a class token)"),
               ("dim", 384, "mixer channels E (2 x embed_dim)"), ("dstate", 16, None), ("dt_rank", 12, None))


def add_layer_shape_args(p: argparse.ArgumentParser) -> None:
    """The mixer layer a tool looks at (default: a vim_tiny layer at batch 128); tools/ncu_scan.py takes the same."""
    for name, default, help_text in LAYER_SHAPE:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default, help=help_text)


def layer_shape_argv(args) -> List[str]:
    """The parsed layer shape as command-line arguments again, for the tool's child process."""
    return [a for name, _, _ in LAYER_SHAPE for a in ("--" + name.replace("_", "-"), str(getattr(args, name)))]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_shape_args(p)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--sms", type=int, default=132,
                   help="SM count for the launch rules that pick a register cap by wave count (H100 / H200: 132)")
    p.add_argument("--clock-ghz", type=float, default=1.98,
                   help="SM clock for the issue floor column (H100 / H200 SXM boost: 1.98)")
    p.add_argument("--kernels", nargs="*", help="only these kernel names")
    p.add_argument("--dump", help="write each kernel's SASS (.sass) and Triton GPU IR (.ttgir) into this folder")
    p.add_argument("--json", help="write the table as JSON")
    add_set_option(p, "the launches")
    p.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def capture_launches(args) -> List[dict]:
    """Step 1 in a child process with the interpreter on (it must be set before triton is imported)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--capture", *layer_shape_argv(args)]
    if args.forward_only:
        cmd.append("--forward-only")
    cmd += ["--sms", str(args.sms)]
    for spec in args.set:
        cmd += ["--set", spec]
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"recording the launches failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    knobs = [resolve_knob(spec, "--set") for spec in args.set]   # a misspelt knob stops here, in either process
    if args.capture:
        for knob in knobs:
            knob.set(knob.value)
        recs = _capture(args.batch, args.length, args.dim, args.dstate, args.dt_rank, not args.forward_only,
                        args.sms)
        print(json.dumps(recs))
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: run without TRITON_INTERPRET (the kernels are compiled, not interpreted)", file=sys.stderr)
        return 2
    seen, rows = {}, []
    for rec in capture_launches(args):
        if args.kernels and rec["name"] not in args.kernels:
            continue
        key = json.dumps([rec["name"], rec["args"], rec["options"]], sort_keys=True, default=str)
        if key in seen:   # the same launch again (one compile): counted in the layer's issue floor
            seen[key]["launches"] += 1
            continue
        flags = {n: v for n, kind, _, v in rec["args"] if kind == "constexpr" and n.isupper()}
        row = dict(kernel=rec["name"], flags=flags, options=rec["options"], launches=1)
        seen[key] = row
        try:
            sass, usage, ttgir = compile_launch(rec, args.arch)
        except Exception as e:   # report and go on: one kernel's failure should not hide the others
            # Triton's CompilationError quotes the kernel's source first; the cause is its last line
            lines = str(e).strip().splitlines() or [""]
            row["error"] = f"{type(e).__name__}: {lines[-1][:300]}"
            rows.append(row)
            continue
        row.update(usage)
        row.update(summarize(sass))
        row.update(waves(rec["grid"], usage, rec["options"].get("num_warps", 4), args.sms))
        tokens = next((v for n, _, _, v in rec["args"] if n == "T"), None)   # a token loop's chunk (the scans)
        if "loop_instructions" in row and tokens and flags.get("UNROLL"):
            row["issue_floor_us"] = round(issue_floor_us(row["programs"], rec["options"].get("num_warps", 4), tokens,
                                                         flags["UNROLL"], row["loop_instructions"], args.sms,
                                                         args.clock_ghz), 2)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            stem = os.path.join(args.dump, f"{len(rows):02d}_{rec['name']}")
            with open(stem + ".sass", "w") as f:
                f.write(sass)
            with open(stem + ".ttgir", "w") as f:
                f.write(ttgir)
        rows.append(row)
    # stack: bytes per thread of the stack frame, where ptxas spills registers (cuobjdump's LOCAL stays 0 for spills);
    # spill_ops: the loop's LDL / STL, also counted in loads / stores
    cols = ["kernel", "registers", "stack", "local", "shared_bytes", "programs", "per_sm", "waves", "loop_instructions",
            "mufu", "loads", "stores", "spill_ops", "shuffles", "atomics", "shared_ops", "loop_cycles_one_warp",
            "load_use_min", "load_use_median", "issue_floor_us"]
    print(f"sm_{args.arch}, (batch, L, E, N) = ({args.batch}, {args.length}, {args.dim}, {args.dstate}); "
          f"loop = the kernel's largest loop, counts per iteration" + "".join(f"; {k.spec}" for k in knobs))
    print(" | ".join(cols))
    for row in rows:
        if "error" in row:
            print(f"{row['kernel']} | not compiled: {row['error']}")
        else:
            again = f" (x{row['launches']})" if row["launches"] > 1 else ""
            print(" | ".join(str(row.get(c, "-")) for c in cols) + again)
    per_kernel = collections.Counter()
    for r in rows:
        if "issue_floor_us" in r:
            per_kernel[r["kernel"]] += r["launches"] * r["issue_floor_us"]
    if per_kernel:
        print(f"issue floor of one layer's scan loops at {args.clock_ghz} GHz on {args.sms} SMs: "
              + ", ".join(f"{k} {v:.1f} us" for k, v in per_kernel.items())
              + f"; all {sum(per_kernel.values()):.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, shape=[args.batch, args.length, args.dim, args.dstate], set=args.set,
                           kernels=rows), f, indent=1)
    return 0 if rows and not all("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
