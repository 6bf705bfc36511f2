"""tools/kernel_sass.py on a machine without a GPU: the mixer's forward launches are recorded under the
interpreter, compiled for sm_90 with the launcher's specialisation, and their loops read from the SASS."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tool_loading import load_tool

ROOT = Path(__file__).resolve().parents[1]


def run_tool(*args, timeout=600):
    """tools/kernel_sass.py in a child process that compiles (the interpreter's variable removed); checks it ran."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "kernel_sass.py"), *args],
                         capture_output=True, text=True, env=env, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]


def compiled_rows(tmp_path, *args, timeout=600):
    """The tool's JSON rows (one per recorded launch) for these arguments."""
    out = tmp_path / "sass.json"
    run_tool(*args, "--json", str(out), timeout=timeout)
    return json.loads(out.read_text())["kernels"]


def test_forward_scan_compiles_for_sm90_and_reports_its_loop(tmp_path):
    rows = compiled_rows(tmp_path, "--forward-only", "--kernels", "_fwd_kernel", "--batch", "2", "--length", "9",
                         "--dim", "32")
    # both directions (the second one accumulating into the first one's output)
    assert [r["flags"]["REVERSE"] for r in rows] == [False, True]
    assert [r["flags"]["ACCUM"] for r in rows] == [False, True]
    for r in rows:
        assert "error" not in r, r
        assert r["flags"]["ASM"] and r["flags"]["ROW_ASM"]                      # the CUDA code paths
        assert 0 < r["registers"] <= 255 and r["local"] == 0 and r["stack"] == 0 and r["spill_ops"] == 0
        assert r["loop_instructions"] > 50 and r["mufu"] >= 16 and r["loads"] > 0
        assert r["loop_cycles_one_warp"] >= r["loop_instructions"]
        assert 0 < r["load_use_min"] <= r["load_use_median"] < r["loop_instructions"]
        assert len(r["load_use"]) == r["loads"] - r["spill_ops"]     # every global load of the loop is read in it
        # the grid (2 rows x 2 blocks of 16 channels, one chunk) in waves of resident one-warp programs on 132 SMs
        assert r["programs"] == 4 and r["per_sm"] == (28 if r["registers"] > 64 else 32)
        assert r["waves"] == round(4 / (r["per_sm"] * 132), 2)
        # 4 one-warp programs, 5 iterations of 2 tokens each (9 tokens), one warp instruction a clock per scheduler
        assert r["launches"] == 1
        assert r["issue_floor_us"] == round(4 * 5 * r["loop_instructions"] / (132 * 4 * 1.98e3), 2)


def test_every_mixer_kernel_compiles_for_sm90(tmp_path):
    """What the interpreter cannot catch (a kernel reading a module global that is not a constexpr, a construct only
    the compiler rejects): every launch of one mixer forward and backward, compiled for sm_90, with no spills."""
    rows = compiled_rows(tmp_path, "--batch", "2", "--length", "9", "--dim", "32", timeout=900)
    names = {r["kernel"] for r in rows}
    assert {"_conv_silu_pair_walk_kernel", "_derive_kernel", "_dt_softplus_kernel", "_fwd_kernel",
            "_bwd_forward_walk_kernel", "_bwd_reverse_walk_kernel", "_conv_silu_bwd_kernel"} <= names, names
    for r in rows:
        assert "error" not in r, (r["kernel"], r["error"][:2000])
        assert 0 < r["registers"] <= 255 and r["local"] == 0 and r["stack"] == 0, (r["kernel"], r["stack"])


def test_issue_estimate_follows_dependencies():
    tool = load_tool("kernel_sass")
    independent = [("FFMA", ["R1"], ["R2"]), ("FFMA", ["R3"], ["R4"])]
    chained = [("FFMA", ["R1"], ["R2"]), ("FFMA", ["R3"], ["R1"])]
    assert tool.issue_estimate(chained) > tool.issue_estimate(independent)
    mufus = [("MUFU.EX2", ["R1"], ["R2"]), ("MUFU.EX2", ["R3"], ["R4"])]
    assert tool.issue_estimate(mufus) >= 2 * tool.MUFU_PIPE_CYCLES


def test_load_use_distances_count_to_the_first_reader_across_iterations():
    tool = load_tool("kernel_sass")
    body = [("LDG.E.128", ["R4", "R5", "R6", "R7"], ["R2", "R3"]),   # read 2 on: its third register
            ("FADD", ["R8"], ["R9"]),
            ("FMUL", ["R10"], ["R6"]),
            ("LDG.E", ["R12"], ["R2", "R3"]),                         # read at the loop's top: the next iteration
            ("FFMA", ["R9"], ["R8", "R10"]),
            ("STG.E", [], ["R2", "R3", "R9"])]
    body.insert(0, ("IMAD", ["R11"], ["R12"]))
    assert tool.load_use_distances(body) == [2, 3]
    assert tool.load_use_distances([("FADD", ["R1"], ["R1"])]) == []


def test_issue_floor_counts_every_warp_of_every_program():
    tool = load_tool("kernel_sass")
    # vim_tiny's forward at bs 256: 3,072 one-warp programs, 99 iterations of 2 tokens, 266 instructions each
    assert abs(tool.issue_floor_us(3072, 1, 197, 2, 266, 132, 1.98) - 77.38) < 0.01
    assert tool.issue_floor_us(768, 4, 197, 2, 266, 132, 1.98) == tool.issue_floor_us(3072, 1, 197, 2, 266, 132, 1.98)
    assert tool.issue_floor_us(1, 1, 9, 2, 100, 1, 1.0) == 5 * 100 / 4e3   # 9 tokens: 5 iterations


def test_waves_count_resident_programs():
    """Residency by registers (allocated per warp in units of 256), warps, the 32-program limit and shared memory."""
    tool = load_tool("kernel_sass")
    assert tool.waves([24, 1, 256], {"registers": 66}, 1, 132) == dict(programs=6144, per_sm=28, waves=1.66)
    assert tool.waves([3840], {"registers": 64}, 1, 132)["per_sm"] == 32                 # the 32-program limit
    assert tool.waves([12, 1, 256], {"registers": 168}, 1, 132)["per_sm"] == 12
    assert tool.waves([100], {"registers": 32, "shared_bytes": 100 * 1024}, 4, 132)["per_sm"] == 2


def test_layer_shape_round_trips_to_the_child_process():
    tool = load_tool("kernel_sass")
    args = tool.parse_args(["--batch", "3", "--dt-rank", "5"])
    again = tool.parse_args(tool.layer_shape_argv(args))
    assert [(again.batch, again.length, again.dim, again.dstate, again.dt_rank)] == [(3, 197, 384, 16, 5)]


def test_set_knobs_reach_the_recorded_launches(monkeypatch, capsys):
    """--set: a kernel knob set in the process that records the launches (the forward's group lookahead on every
    launch, where the default has it on the accumulating one only); a misspelt knob stops the tool first."""
    tool = load_tool("kernel_sass")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # the recording child sets it itself
    shape = ["--forward-only", "--batch", "2", "--length", "9", "--dim", "32"]
    args = tool.parse_args(shape + ["--set", "vim.kernels.selective_scan.triton_scan.CONFIG[LOOKAHEAD]=1"])
    recs = [r for r in tool.capture_launches(args) if r["name"] == "_fwd_kernel"]
    flags = [{n: v for n, kind, _, v in r["args"] if kind == "constexpr"} for r in recs]
    assert [(f["REVERSE"], f["LOOKAHEAD"]) for f in flags] == [(False, True), (True, True)]   # default: first False
    with pytest.raises(SystemExit, match="has no attribute 'NO_SUCH_KNOB'"):
        tool.main(shape + ["--set", "vim.kernels.bimamba.conv.NO_SUCH_KNOB=1"])


def test_wave_caps_are_recorded_as_on_a_gpu(monkeypatch):
    """The launch rules that pick a register cap by wave count act as on a GPU with --sms SMs, although the
    recording runs on CPU tensors: 32 one-warp programs on one SM are one wave at 64 registers and two at 72, so
    the forward's launches take the cap and the accumulating one goes without its lookahead."""
    tool = load_tool("kernel_sass")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    shape = ["--forward-only", "--batch", "2", "--length", "9", "--dim", "256"]   # 2 x 16 blocks of 16 channels
    for sms, cap in ((1, 64), (2, None)):
        recs = [r for r in tool.capture_launches(tool.parse_args(shape + ["--sms", str(sms)]))
                if r["name"] == "_fwd_kernel"]
        flags = [{n: v for n, kind, _, v in r["args"] if kind == "constexpr"} for r in recs]
        assert [r["options"].get("maxnreg") for r in recs] == [cap, cap]
        assert [f["LOOKAHEAD"] for f in flags] == [False, cap is None]


def test_dt_kernel_widens_bc_without_a_layout_conversion(tmp_path):
    """The B / C widening in dt_proj's launch loads bf16 and stores float32 in one layout (``WIDEN_VEC``): with the
    compiler's own vector width (8 bf16 against 4 float32) the tile crossed shared memory between the two, and the
    kernel took 102 registers instead of 92 at vim_tiny's shape (4 programs an SM instead of 5). Left are the
    conversions into and out of the tensor-core layout (the bias vector, the output tile)."""
    run_tool("--batch", "2", "--length", "9", "--dim", "384", "--kernels", "_dt_softplus_kernel",
             "--dump", str(tmp_path))
    ttgir = next(tmp_path.glob("*_dt_softplus_kernel.ttgir")).read_text()
    converts = [line for line in ttgir.splitlines() if "ttg.convert_layout" in line]
    assert len(converts) == 2 and all("#mma" in line for line in converts), converts


def test_walks_channel_sums_as_quads_take_fewer_shuffles(tmp_path):
    """BC_PARTS=8 with BC_QUADS, the defaults (docs/kernels.md, v34 and v37): each backward walk sums a token's dB /
    dC over 4 of its 32 channels as a reduce-scatter that leaves each lane 4 adjacent states, 8 + 4 shuffles a token,
    so the 2 tokens of a loop iteration take 24 shuffles (the parts' butterflies took 64, one sum over the block 160)
    and 2 vector atomics, with no shared memory in the loop; compiled for sm_90 with no spills, in both scan orders."""
    rows = compiled_rows(tmp_path, "--batch", "2", "--length", "9", "--dim", "32", "--kernels",
                         "_bwd_forward_walk_kernel", "_bwd_reverse_walk_kernel", timeout=900)
    assert len(rows) == 4 and {r["flags"]["BC_PARTS"] for r in rows} == {8} and all(r["flags"]["QUADS"] for r in rows)
    for r in rows:
        assert "error" not in r, (r["kernel"], r["error"][:2000])
        assert r["stack"] == 0 and r["spill_ops"] == 0 and r["shuffles"] == 24, (r["kernel"], r["stack"], r["shuffles"])
        assert r["atomics"] == 2 and r["shared_ops"] == 0, (r["kernel"], r["atomics"], r["shared_ops"])
