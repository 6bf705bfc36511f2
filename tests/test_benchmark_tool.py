"""tools/benchmark.py on the CPU: a tiny end-to-end run (JSON, table, PNGs, no mmengine import) and
the batch-size search backing off from out-of-memory, and ``--variant`` A/B runs."""
import json
import re
import statistics
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tool_loading import load_tool
from vim.kernels.selective_scan import triton_scan

ROOT = Path(__file__).resolve().parents[1]

# the kernel benchmark's rows on CPU tensors run the Triton kernels through the interpreter, which the tests set
# only where no GPU is present (conftest.py); on a GPU machine the kernels are compiled for CUDA tensors alone
interpreted = pytest.mark.skipif(not triton_scan._interpreted(),
                                 reason="Triton kernels take CPU tensors in the interpreter only")

# Runs the tool as a script with mmengine made unimportable: the GPU machine has no mmengine, so
# neither the tools nor what they import may need it.
DRIVER = """
import runpy, sys
sys.modules["mmengine"] = None
root = sys.argv.pop(1)
for tool in ("extract_features", "predict"):
    runpy.run_path(f"{root}/tools/{tool}.py", run_name="not_main")
sys.argv[0] = f"{root}/tools/benchmark.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cpu_smoke_run_writes_json_and_plots(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-c", DRIVER, str(ROOT), "--device", "cpu",
           "--models", "vim_tiny", "--baselines", "deit_tiny_patch16_224", "--resolutions", "32",
           "--batch-size", "2", "--modes", "infer", "train",
           "--model-kwargs", "depth=2", "embed_dim=64", "--baseline-kwargs", "depth=2", "embed_dim=64",
           "num_heads=2", "--out-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((out / "benchmark.json").read_text())
    cases = doc["cases"]
    assert {(c["model"], c["mode"]) for c in cases} == {
        (m, mode) for m in ("vim_tiny", "deit_tiny_patch16_224") for mode in ("infer", "train")}
    for c in cases:
        assert c["status"] == "ok" and c["batch_size"] == 2 and c["resolution"] == 32
        assert c["img_s"] > 0 and c["ms"] > 0 and c["reps"] >= 3
        assert c["peak_gib"] is None  # no allocator counter on CPU
    assert sorted(r["mode"] for r in doc["ratios"]) == ["infer", "train"]
    for r in doc["ratios"]:
        vim_case = next(c for c in cases if c["model"] == "vim_tiny" and c["mode"] == r["mode"])
        deit_case = next(c for c in cases if c["model"] != "vim_tiny" and c["mode"] == r["mode"])
        assert abs(r["speed"] - vim_case["img_s"] / deit_case["img_s"]) < 1e-9
    assert doc["environment"]["device_type"] == "cpu" and doc["environment"]["dtype"] == "float32"
    for png in ("throughput.png", "memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speed x" in proc.stdout and "vim_tiny" in proc.stdout


def test_batch_search_backs_off_from_oom(tmp_path, monkeypatch, capsys):
    bench = load_tool("benchmark")
    real_call = bench.Step.__call__

    def fake_oom_above_2(self):
        if self.x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB (simulated)")
        return real_call(self)

    monkeypatch.setattr(bench.Step, "__call__", fake_oom_above_2)
    kw = ["--model-kwargs", "depth=1", "embed_dim=32", "num_heads=2", "--device", "cpu", "--no-plot",
          "--resolutions", "32", "--modes", "train", "--models", "deit_tiny_patch16_224", "--baselines"]
    # search: 1 -> 2 -> 4 (OOM) -> back to 2
    rc = bench.main([*kw, "--max-batch-size", "8", "--out-dir", str(tmp_path / "a")])
    assert rc == 0, capsys.readouterr().err
    (case,) = json.loads((tmp_path / "a" / "benchmark.json").read_text())["cases"]
    assert case["status"] == "ok" and case["batch_size"] == 2 and case["batch_source"] == "search"
    # a given batch that does not fit is recorded as OOM, and the run still succeeds
    rc = bench.main([*kw, "--batch-size", "4", "--out-dir", str(tmp_path / "b")])
    assert rc == 0
    (case,) = json.loads((tmp_path / "b" / "benchmark.json").read_text())["cases"]
    assert case["status"] == "oom" and case["img_s"] is None and "batch 4" in case["message"]
    assert "oom" in capsys.readouterr().out


def test_cuda_graph_needs_a_gpu_and_no_compile(tmp_path, capsys):
    bench = load_tool("benchmark")
    rc = bench.main(["--device", "cpu", "--cuda-graph", "--models", "deit_tiny_patch16_224", "--baselines",
                     "--resolutions", "32", "--out-dir", str(tmp_path)])
    assert rc == 2 and "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_repeated_resolution_is_refused(tmp_path, capsys):
    """A batch size is given per resolution, so a repeated size would silently lose one of them."""
    bench = load_tool("benchmark")
    rc = bench.main(["--device", "cpu", "--resolutions", "32", "32", "--batch-size", "2", "1",
                     "--out-dir", str(tmp_path)])
    assert rc == 2 and "lists a size twice" in capsys.readouterr().err


@interpreted
def test_kernel_benchmark_conv_rows_run_on_cpu():
    """tools/benchmark_kernels.py's conv backward rows (pair kernel vs PyTorch autograd) at a tiny CPU shape."""
    bk = load_tool("benchmark_kernels")
    res = bk.time_conv_backward(2, 9, 8, "cpu", False, torch.float32)
    assert set(res) == {"triton_pair", "reference"}
    for r in res.values():
        assert r["ms"] > 0 and r["gpu_ms"] is None and r["GBps_gpu_time"] is None
    assert bk.conv_backward_bytes(2, 9, 8, 2) == 6 * 2 * 9 * 8 * 2


@interpreted
def test_kernel_benchmark_dt_rows_run_on_cpu():
    """tools/benchmark_kernels.py's dt_proj + softplus rows (the mixer's delta kernel vs the bare GEMM) on the CPU."""
    bk = load_tool("benchmark_kernels")
    res = bk.time_dt_softplus(48, 24, 12, "cpu", False, torch.float32)
    assert res["dt_softplus"]["ms"] > 0 and res["linear"]["ms"] > 0 and res["dt_softplus"]["gpu_ms"] is None
    assert res["dt_softplus_widen"]["ms"] > 0 and res["floor_bytes_widen"] == res["floor_bytes"] + 48 * 32 * 8
    assert res["floor_bytes"] == 48 * 12 * 4 + 48 * 24 * 4


def test_kernel_benchmark_wave_rows_restore_the_knob():
    """The waves sweep's rows (GPU time is None on the CPU) carry program counts and leave the knob as it was."""
    bk = load_tool("benchmark_kernels")
    before = bk.triton_scan.CONFIG["MAXNREG_FWD_WAVE"]
    res = bk.time_forward_waves([2, 3], None, "cpu", False, torch.float32, E=40, L=5, N=4)
    assert [r["programs"] for r in res.values()] == [6, 9] and res["(2, 40, 5, 4)"]["gpu_fwd_ms"] is None
    assert bk.triton_scan.CONFIG["MAXNREG_FWD_WAVE"] == before


def test_kernel_benchmark_sweep_groups(capsys):
    """--sweep takes the groups to sweep (none named: all); an unknown group stops the run before it measures."""
    bk = load_tool("benchmark_kernels")
    with pytest.raises(SystemExit):
        bk.main(["--out", "unused.json", "--sweep", "conv", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    assert bk.SWEEP_GROUPS == ["fwd", "bwd", "chunk", "conv", "dt", "waves"]


# --variant: knobs set per measurement


@pytest.fixture
def knobs(monkeypatch, tmp_path):
    """A fake knob module, and one on the path whose import fails on a missing dependency."""
    mod = types.ModuleType("fake_knobs")
    mod.FLAG, mod.CONFIG, mod.NS = True, {"LOOKAHEAD": "accumulate", "BLOCK": 16}, types.SimpleNamespace(depth=1)
    monkeypatch.setitem(sys.modules, "fake_knobs", mod)
    (tmp_path / "broken_knobs.py").write_text("import no_such_dependency_xyz\nFLAG = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return mod


def test_variant_specs_parse(knobs):
    bench = load_tool("benchmark")
    (v,) = bench.parse_variants(["a:fake_knobs.FLAG=False,fake_knobs.CONFIG[LOOKAHEAD]=0,fake_knobs.CONFIG['BLOCK']=32,"
                                 "fake_knobs.NS.depth=(1, 2),fake_knobs.FLAG=hello world"])
    assert v.name == "a"
    assert [(k.owner, k.key, k.value, k.item) for k in v.knobs] == [
        (knobs, "FLAG", False, False), (knobs.CONFIG, "LOOKAHEAD", 0, True), (knobs.CONFIG, "BLOCK", 32, True),
        (knobs.NS, "depth", (1, 2), False), (knobs, "FLAG", "hello world", False)]
    base, real = bench.parse_variants(["base:", "r:vim.kernels.selective_scan.triton_scan.CONFIG[LOOKAHEAD]=None"])
    assert base.knobs == [] and real.knobs[0].owner is triton_scan.CONFIG and real.knobs[0].value is None


@pytest.mark.parametrize("text, message", [
    ("v:no_such_module_xyz.FLAG=1", "no importable module in 'no_such_module_xyz.FLAG'"),
    ("v:broken_knobs.FLAG=1", "importing broken_knobs failed: No module named 'no_such_dependency_xyz'"),
    ("v:fake_knobs.MISSING=1", "fake_knobs has no attribute 'MISSING'"),
    ("v:fake_knobs.NS.width=1", "fake_knobs.NS has no attribute 'width'"),
    ("v:fake_knobs.CONFIG[NOPE]=1", "'NOPE' is not a key of fake_knobs.CONFIG (LOOKAHEAD, BLOCK)"),
    ("v:fake_knobs.FLAG[0]=1", "fake_knobs.FLAG is a bool, not a dict"),
    ("v:fake_knobs.FLAG", "'fake_knobs.FLAG': expected dotted.module.ATTR=VALUE"),
    ("fake_knobs.FLAG=1", "'fake_knobs.FLAG=1': expected NAME:SPEC"),
])
def test_variant_spec_errors(knobs, text, message):
    bench = load_tool("benchmark")
    with pytest.raises(SystemExit, match=re.escape(message)):
        bench.parse_variants([text])
    assert knobs.FLAG is True and "NOPE" not in knobs.CONFIG and not hasattr(knobs, "MISSING")


def test_variant_names_are_unique(knobs):
    with pytest.raises(SystemExit, match="variant 'a' given twice"):
        load_tool("benchmark").parse_variants(["a:", "a:fake_knobs.FLAG=0"])


def test_variants_alternate_with_knobs_set_and_restored(knobs, monkeypatch):
    bench = load_tool("benchmark")
    variants = bench.parse_variants(["off:fake_knobs.FLAG=False,fake_knobs.CONFIG[BLOCK]=8", "base:"])
    seen = []

    def fake_measure(case, *_):
        seen.append((knobs.FLAG, knobs.CONFIG["BLOCK"]))
        case.status, case.ms, case.reps = "ok", 2.0 + len(seen), 3
        return case

    monkeypatch.setattr(bench, "measure", fake_measure)
    template = bench.Case("m", "model", "infer", 32, batch_size=4)
    off, base = bench.measure_variants(template, variants, {}, types.SimpleNamespace(rounds=2), None, None)
    assert seen == [(False, 8), (True, 16), (False, 8), (True, 16)]
    assert knobs.FLAG is True and knobs.CONFIG["BLOCK"] == 16
    assert off.round_ms == [3.0, 5.0] and off.ms == 4.0 and off.reps == 6 and off.img_s == 4 / 4.0 * 1e3
    assert base.round_ms == [4.0, 6.0] and base.status == "ok" and template.round_ms == []

    def failing_measure(case, *_):
        assert knobs.FLAG is False
        raise KeyboardInterrupt  # measure() reports its own errors: only an interrupt gets out

    monkeypatch.setattr(bench, "measure", failing_measure)
    with pytest.raises(KeyboardInterrupt):
        bench.measure_variants(template, variants, {}, types.SimpleNamespace(rounds=1), None, None)
    assert knobs.FLAG is True and knobs.CONFIG["BLOCK"] == 16


def test_variant_cpu_run_records_rounds_and_ratios(tmp_path, monkeypatch, capsys):
    """Two variants of a real kernel knob on a tiny vim: both measured at the one batch, alternating, the
    knob set inside each measurement and back to its default after; the baseline measured once."""
    bench = load_tool("benchmark")
    from vim.kernels.bimamba import triton_bimamba

    default, seen, searched = triton_bimamba.PAIR_CONV, [], []
    real_time_step, real_search = bench.time_step, bench.search_batch

    def spy(step, *a, **k):
        seen.append(triton_bimamba.PAIR_CONV)
        return real_time_step(step, *a, **k)

    def search_spy(name, *a, **k):
        searched.append((name, triton_bimamba.PAIR_CONV))
        return real_search(name, *a, **k)

    monkeypatch.setattr(bench, "time_step", spy)
    monkeypatch.setattr(bench, "search_batch", search_spy)
    knob = "vim.kernels.bimamba.triton_bimamba.PAIR_CONV"
    rc = bench.main(["--device", "cpu", "--models", "vim_tiny", "--baselines", "deit_tiny_patch16_224",
                     "--resolutions", "32", "--modes", "infer", "--max-batch-size", "1", "--min-reps", "1",
                     "--model-kwargs", "depth=1", "embed_dim=32", "--baseline-kwargs", "depth=1", "embed_dim=32",
                     "num_heads=2", "--variant", f"two_launches:{knob}=False", "--variant", f"pair:{knob}=True",
                     "--no-plot", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert seen == [False, True, False, True, default] and triton_bimamba.PAIR_CONV is default  # last: the baseline
    assert searched == [("vim_tiny", default), ("deit_tiny_patch16_224", default)]  # once, with the defaults
    doc = json.loads((tmp_path / "benchmark.json").read_text())
    assert doc["variants"] == [{"name": "two_launches", "specs": [f"{knob}=False"]},
                               {"name": "pair", "specs": [f"{knob}=True"]}]
    assert doc["args"]["rounds"] == 2
    vims = [c for c in doc["cases"] if c["model"] == "vim_tiny"]
    (deit,) = [c for c in doc["cases"] if c["model"] != "vim_tiny"]
    assert [c["variant"] for c in vims] == ["two_launches", "pair"] and "variant" not in deit
    for c in vims:
        assert c["status"] == "ok" and len(c["round_ms"]) == 2 and c["batch_size"] == deit["batch_size"] == 1
        assert c["ms"] == statistics.median(c["round_ms"]) and c["batch_source"] == "search"
    first, second = doc["ab"]
    assert first["variant"] == "two_launches" and first["ratio"] == 1.0
    assert abs(second["ratio"] - vims[1]["ms"] / vims[0]["ms"]) < 1e-12 and second["round_ms"] == vims[1]["round_ms"]
    assert [r["variant"] for r in doc["ratios"]] == ["two_launches", "pair"]
    assert "ratio: ms / two_launches's ms" in out and "pair" in out.split("rounds (ms)")[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_repeated_cuda_graph_cases_report_the_same_peak():
    """The same captured case measured three times reports the same peak memory: nothing a case leaves behind (such
    as cuBLAS's per-stream workspace of its capture stream) is counted in the next case's peak."""
    bench = load_tool("benchmark")
    args = bench.parse_args(["--models", "deit_tiny_patch16_224", "--baselines", "--modes", "train",
                             "--resolutions", "64", "--batch-size", "4", "--cuda-graph"])
    args.warmup_ms, args.rep_ms, args.min_reps = 10, 10, 3
    device = torch.device("cuda")
    peaks = []
    for _ in range(3):
        case = bench.Case(model="deit_tiny_patch16_224", role="model", mode="train", resolution=64, batch_size=4)
        bench.measure(case, {}, args, device, torch.bfloat16)
        assert case.status == "ok", case.message
        peaks.append(case.peak_gib)
    assert max(peaks) - min(peaks) < 1 / 1024, peaks   # within 1 MiB


def test_compile_takes_a_mode_and_marks_cuda_graph_steps():
    """``--compile`` alone is torch.compile's default mode; ``--compile reduce-overhead`` (CUDA-graph trees) has each
    step marked as a new one, which lets a training step replay into the previous step's graph outputs."""
    bench = load_tool("benchmark")
    assert bench.parse_args(["--compile"]).compile == "default"
    assert bench.parse_args(["--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert bench.parse_args([]).compile is None
    model = torch.nn.Linear(4, 2)
    model.pretrained_cfg = {"input_size": (3, 8, 8)}
    marks = {mode: bench.Step(model, "infer", 1, 8, 2, torch.device("cpu"), torch.float32, compile=mode).mark_steps
             for mode in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")}
    assert marks == {None: False, "default": False, "reduce-overhead": True, "max-autotune": True,
                     "max-autotune-no-cudagraphs": False}
