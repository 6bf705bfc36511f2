"""tools/ncu_scan.py: its reading of ncu's CSV pages (fixtures cut from session 10's H200 report of the forward
scan, docs/kernels.md), its knob handling, and its refusal without a GPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tool_loading import load_tool

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "ncu"


@pytest.fixture(scope="module")
def tool():
    return load_tool("ncu_scan")


def test_reads_details_raw_and_source_pages(tool):
    details = tool.parse_details((DATA / "details.csv").read_text())
    raw = tool.parse_raw((DATA / "raw.csv").read_text())
    source = tool.parse_source((DATA / "source.csv").read_text(), top=3)
    assert sorted(details) == [0, 2] and sorted(raw) == [0, 2] and len(source) == 2
    assert details[0]["kernel"] == "_fwd_kernel"
    assert details[0]["Duration"] == "113.44 us" and details[2]["Registers Per Thread"] == "68 register/thread"
    stalls = raw[0]["stalls_per_issue"]
    assert stalls["long_scoreboard"] == pytest.approx(3.834356) and stalls["wait"] == pytest.approx(1.81239)
    assert raw[0]["dram__bytes_read.sum"] == "61.366528 Mbyte"
    # the instruction that waits most is the first use of a 16-bit load (its bf16 -> float32 shift)
    first = source[0][0]
    assert first["sass"].startswith("SHF.L.U32") and first["long_scoreboard_samples"] == 2391
    assert [s["share"] for s in source[0]] == sorted((s["share"] for s in source[0]), reverse=True)

    records = tool.summarize(details, raw, source)
    assert [r["id"] for r in records] == [0, 2] and records[1]["top_stalled_sass"] == source[1]
    text = tool.format_report(records)
    assert "long_scoreboard 3.83" in text and "_fwd_kernel" in text
    assert re.search(r"(?<!not_)selected", text) is None   # "selected" is the issuing warp itself, not a stall


def test_stall_reasons_below_the_threshold_are_left_out(tool):
    header = '"ID","Kernel Name","smsp__average_warps_issue_stalled_a_per_issue_active.ratio",' \
             '"smsp__average_warps_issue_stalled_b_per_issue_active.ratio"\n'
    text = header + '"","","",""\n"0","k","1.5","0.01"\n"1","k","0.2","0.04"\n'
    raw = tool.parse_raw(text)
    assert raw[0]["stalls_per_issue"] == {"a": 1.5} and raw[1]["stalls_per_issue"] == {"a": 0.2}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU twin of the profiled step")
def test_profiled_step_runs(tool, monkeypatch):
    """The step the tool profiles (a mixer forward and backward under bf16 autocast, with a knob set) runs; on
    the CPU through the Triton interpreter, at a small shape."""
    from vim.kernels.selective_scan import triton_scan

    monkeypatch.setattr(triton_scan, "CONFIG", dict(triton_scan.CONFIG))
    args = tool.parse_args(["--batch", "1", "--length", "5", "--dim", "16", "--dstate", "4", "--dt-rank", "2",
                            "--config", "LOOKAHEAD=1"])
    tool.run_target(args, dev="cpu")
    assert triton_scan.CONFIG["LOOKAHEAD"] == 1


def test_unknown_knob_is_refused(tool):
    with pytest.raises(SystemExit, match="not a knob"):
        tool.apply_config(["NO_SUCH_KNOB=1"])


def test_knob_values(tool, monkeypatch):
    """Numbers become ints, None stays None and word-valued knobs keep their word."""
    from vim.kernels.selective_scan import triton_scan

    monkeypatch.setattr(triton_scan, "CONFIG", dict(triton_scan.CONFIG))
    tool.apply_config(["LOOKAHEAD=accumulate", "PREFETCH=0", "MAXNREG_REV=None"])
    assert triton_scan.CONFIG["LOOKAHEAD"] == "accumulate"
    assert triton_scan.CONFIG["PREFETCH"] == 0 and triton_scan.CONFIG["MAXNREG_REV"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the tool would run ncu")
def test_without_a_gpu_it_says_what_it_needs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "ncu_scan.py"), "--forward-only"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and "needs a CUDA GPU" in run.stderr and "kernel_sass" in run.stderr
