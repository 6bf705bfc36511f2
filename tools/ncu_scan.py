#!/usr/bin/env python
"""Where the mixer's Triton kernels wait: an Nsight Compute reading of one bidirectional mixer step on the GPU.

    python tools/ncu_scan.py                                  # a vim_tiny layer at bs 128: forward + backward
    python tools/ncu_scan.py --forward-only --kernels _fwd_kernel --batch 256 --json ncu.json
    python tools/ncu_scan.py --forward-only --config LOOKAHEAD=1  # with a kernel knob (triton_scan.CONFIG) set

The tool runs itself under ``ncu`` (``--set full --clock-control none``: counters and source-level stall sampling,
clocks left as the machine has them), profiling one ``bimamba_v2_fn`` call under bf16 autocast (and its backward)
after a warm-up call, with x and z the strided halves of an in_proj output as the model passes them. It then reads
the report's details, raw and source pages (CSV) and prints, per kernel launch: time, registers, theoretical and
achieved occupancy, issue slots busy, eligible warps, the warps stalled per issued instruction by reason (long
scoreboard: global loads; wait: fixed-latency dependencies; short scoreboard: MUFU / shared memory; ...), the L1 and
L2 hit rates, DRAM bytes read, and the SASS instructions with the most stall samples (an instruction's samples
mostly mean it waits for an operand, e.g. the first use of a load). docs/kernels.md (session 10) reads such a report.

ncu is looked up on the PATH, then under /opt/nvidia/nsight-compute/*/ (``--ncu`` names it). It needs a GPU and a
runtime that lets it read the counters; without them the tool says so and stops.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout without install

from kernel_sass import add_layer_shape_args, layer_shape_argv  # noqa: E402  (tools/, beside this file)

DETAILS = ("Duration", "Registers Per Thread", "Theoretical Occupancy", "Achieved Occupancy", "Issue Slots Busy",
           "Active Warps Per Scheduler", "Eligible Warps Per Scheduler", "Warp Cycles Per Issued Instruction",
           "L1/TEX Hit Rate", "L2 Hit Rate", "DRAM Throughput", "Block Limit Registers", "Block Limit SM")
STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"
RAW = ("dram__bytes_read.sum", "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
       "l1tex__t_sectors_pipe_lsu_mem_global_op_ld_lookup_miss.sum", "launch__grid_size")


# --------------------------------------------------------------------------------------------
# reading ncu's CSV pages
# --------------------------------------------------------------------------------------------
def _number(s) -> float:
    """A counter as ncu prints it ("1,234.5"); 0 for an empty cell."""
    try:
        return float(str(s).replace(",", "")) if s not in (None, "") else 0.0
    except ValueError:
        return 0.0


def parse_details(text: str) -> Dict[int, dict]:
    """``ncu -i R --page details --csv``: {launch id: {"kernel": name, metric name: "value unit"}} for DETAILS."""
    out: Dict[int, dict] = {}
    for row in csv.DictReader(io.StringIO(text)):
        launch = out.setdefault(int(row["ID"]), {"kernel": row["Kernel Name"]})
        if row["Metric Name"] in DETAILS and row["Metric Name"] not in launch:
            launch[row["Metric Name"]] = f"{row['Metric Value']} {row['Metric Unit']}".strip()
    return out


def parse_raw(text: str) -> Dict[int, dict]:
    """``ncu -i R --page raw --csv`` (a header row, a units row, one row per launch): per launch id, the warps
    stalled per issued instruction by reason (reasons reaching 0.05 anywhere) and the RAW metrics."""
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 3:
        return {}
    header, units, data = rows[0], rows[1], rows[2:]
    col = {name: i for i, name in enumerate(header)}
    stall_cols = [name for name in header if name.startswith(STALL_PREFIX) and name.endswith(STALL_SUFFIX)]
    stall_cols = [c for c in stall_cols if max(_number(d[col[c]]) for d in data) >= 0.05]
    out = {}
    for d in data:
        launch = {"stalls_per_issue": {c[len(STALL_PREFIX):-len(STALL_SUFFIX)]: _number(d[col[c]])
                                       for c in stall_cols}}
        for name in RAW:
            if name in col:
                launch[name] = f"{d[col[name]]} {units[col[name]]}".strip()
        out[int(d[col["ID"]])] = launch
    return out


def parse_source(text: str, top: int = 6) -> List[List[dict]]:
    """``ncu -i R --page source --csv --print-source sass``: one block per launch, in report order, each opening
    with a ``"Kernel Name",...`` line. Per launch, the ``top`` SASS instructions by stall samples: their text,
    share of the launch's samples and long-scoreboard samples."""
    launches = []
    for block in text.split('"Kernel Name"')[1:]:
        rows = list(csv.DictReader(io.StringIO(block.split("\n", 1)[1])))

        def samples(r):
            return _number(r.get("Warp Stall Sampling (All Samples)"))
        total = sum(samples(r) for r in rows) or 1.0
        ranked = sorted(rows, key=samples, reverse=True)[:top]
        launches.append([{"sass": r["Source"].strip(), "share": round(samples(r) / total, 4),
                          "long_scoreboard_samples": _number(r.get("stall_long_sb"))} for r in ranked])
    return launches


def summarize(details: Dict[int, dict], raw: Dict[int, dict], source: List[List[dict]]) -> List[dict]:
    """One record per launch, in launch order."""
    out = []
    for i, launch_id in enumerate(sorted(details)):
        rec = {"id": launch_id, **details[launch_id], **raw.get(launch_id, {})}
        if i < len(source):
            rec["top_stalled_sass"] = source[i]
        out.append(rec)
    return out


def format_report(records: List[dict]) -> str:
    lines = []
    for r in records:
        lines.append(f"[{r['id']}] {r['kernel']}: {r.get('Duration', '?')}, {r.get('Registers Per Thread', '?')}, "
                     f"occupancy {r.get('Theoretical Occupancy', '?')} theoretical / {r.get('Achieved Occupancy', '?')}"
                     f" achieved, issue slots busy {r.get('Issue Slots Busy', '?')}, eligible warps per scheduler "
                     f"{r.get('Eligible Warps Per Scheduler', '?')}")
        stalls = sorted(((v, k) for k, v in r.get("stalls_per_issue", {}).items() if k != "selected"), reverse=True)
        lines.append("    warps stalled per issued instruction: " + ", ".join(f"{k} {v:.2f}" for v, k in stalls))
        lines.append(f"    L1 hit {r.get('L1/TEX Hit Rate', '?')}, L2 hit {r.get('L2 Hit Rate', '?')}, DRAM read "
                     f"{r.get('dram__bytes_read.sum', '?')}")
        for s in r.get("top_stalled_sass", []):
            lines.append(f"    {100 * s['share']:5.1f}%  {s['sass']}  (long scoreboard samples "
                         f"{s['long_scoreboard_samples']:.0f})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the profiled program
# --------------------------------------------------------------------------------------------
def apply_config(pairs: List[str]) -> None:
    from vim.kernels.selective_scan import triton_scan

    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in triton_scan.CONFIG:
            raise SystemExit(f"--config {pair}: {key} is not a knob of triton_scan.CONFIG "
                             f"({', '.join(sorted(triton_scan.CONFIG))})")
        if value == "None":
            triton_scan.CONFIG[key] = None
        else:   # numbers, and the few word-valued knobs (LOOKAHEAD="accumulate")
            triton_scan.CONFIG[key] = int(value) if value.lstrip("-").isdigit() else value


def run_target(args, dev: str = "cuda") -> None:
    """One warm-up mixer call (compiles the kernels), then the profiled one between cudaProfilerStart / Stop
    (``dev="cpu"`` runs the same calls through the Triton interpreter, unprofiled: the tool's test)."""
    import torch
    from benchmark_kernels import bimamba_params

    from vim.kernels import bimamba_v2_fn

    apply_config(args.config)
    E = args.dim
    torch.manual_seed(0)
    fwd, bwd = bimamba_params(E, args.dstate, args.dt_rank, dev)
    if not args.forward_only:
        for p in (*fwd, *bwd):
            p.requires_grad_()

    def step():
        xz = torch.randn(args.batch, args.length, 2 * E, device=dev, dtype=torch.bfloat16)
        xz.requires_grad_(not args.forward_only)
        x, z = xz.split([E, E], dim=-1)
        with torch.autocast(dev, dtype=torch.bfloat16), torch.set_grad_enabled(not args.forward_only):
            y = bimamba_v2_fn(x, z, fwd, bwd, backend="triton")
        if not args.forward_only:
            y.backward(torch.randn_like(y))
        return y

    step()
    if dev != "cuda":
        step()
        return
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


# --------------------------------------------------------------------------------------------
# driving ncu
# --------------------------------------------------------------------------------------------
def find_ncu(given: Optional[str]) -> Optional[str]:
    if given:
        return given
    found = shutil.which("ncu")
    if found:
        return found
    candidates = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
    return candidates[-1] if candidates else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_shape_args(p)
    p.add_argument("--forward-only", action="store_true", help="profile the forward only (no backward)")
    p.add_argument("--kernels", default="^_.*_kernel$", help="regex of kernel names to profile (default: every "
                   "Triton kernel of the mixer, all named _..._kernel; cuBLAS and PyTorch kernels are left out)")
    p.add_argument("--config", nargs="*", default=[], metavar="KNOB=VALUE", help="triton_scan.CONFIG knobs")
    p.add_argument("--top", type=int, default=6, help="SASS instructions listed per launch")
    p.add_argument("--ncu", help="path of the ncu executable")
    p.add_argument("--json", help="write the records here")
    p.add_argument("--keep-report", help="also keep the .ncu-rep here")
    p.add_argument("--target", action="store_true", help=argparse.SUPPRESS)   # the profiled process
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.target:
        run_target(args)
        return 0
    import torch

    ncu = find_ncu(args.ncu)
    if not torch.cuda.is_available() or ncu is None:
        print("error: needs a CUDA GPU and Nsight Compute's ncu (on the PATH, under /opt/nvidia/nsight-compute, or "
              "--ncu); for what the kernels compile to without a GPU, see tools/kernel_sass.py", file=sys.stderr)
        return 2
    target = [sys.executable, os.path.abspath(__file__), "--target", *layer_shape_argv(args)]
    if args.forward_only:
        target.append("--forward-only")
    if args.config:
        target += ["--config", *args.config]
    with tempfile.TemporaryDirectory() as tmp:
        rep = os.path.join(tmp, "mixer")
        prof = subprocess.run([ncu, "--profile-from-start", "off", "-k", f"regex:{args.kernels}", "--set", "full",
                               "--import-source", "no", "--clock-control", "none", "-f", "-o", rep, *target],
                              capture_output=True, text=True)
        if prof.returncode or not os.path.exists(rep + ".ncu-rep"):
            tail = (prof.stdout + prof.stderr)[-3000:]
            print(f"error: ncu failed (exit {prof.returncode}):\n{tail}", file=sys.stderr)
            return 1
        pages = {}
        for page, extra in (("details", []), ("raw", []), ("source", ["--print-source", "sass"])):
            res = subprocess.run([ncu, "-i", rep + ".ncu-rep", "--page", page, "--csv", *extra],
                                 capture_output=True, text=True)
            pages[page] = res.stdout if res.returncode == 0 else ""
        if args.keep_report:
            shutil.copy(rep + ".ncu-rep", args.keep_report)
    records = summarize(parse_details(pages["details"]), parse_raw(pages["raw"]),
                        parse_source(pages["source"], args.top))
    if not records:
        print("error: the report holds no kernel launches (did --kernels match?)", file=sys.stderr)
        return 1
    shape = (args.batch, args.length, args.dim, args.dstate)
    print(f"ncu: {ncu}; mixer (batch, L, E, N) = {shape}, bf16, "
          f"{'forward' if args.forward_only else 'forward + backward'}, config {args.config or 'defaults'}")
    print(format_report(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "forward_only": args.forward_only, "config": args.config,
                       "device": torch.cuda.get_device_name(), "launches": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
