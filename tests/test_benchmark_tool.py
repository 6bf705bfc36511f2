"""tools/benchmark.py on the CPU: a tiny end-to-end run (JSON, table, PNGs, no mmengine import) and
the batch-size search backing off from out-of-memory."""
import json
import subprocess
import sys
from pathlib import Path

import torch
from tool_loading import load_tool

ROOT = Path(__file__).resolve().parents[1]

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


def test_kernel_benchmark_conv_rows_run_on_cpu():
    """tools/benchmark_kernels.py's conv backward rows (pair kernel vs PyTorch autograd) at a tiny CPU shape."""
    bk = load_tool("benchmark_kernels")
    res = bk.time_conv_backward(2, 9, 8, "cpu", False, torch.float32)
    assert set(res) == {"triton_pair", "reference"}
    for r in res.values():
        assert r["ms"] > 0 and r["gpu_ms"] is None and r["GBps_gpu_time"] is None
    assert bk.conv_backward_bytes(2, 9, 8, 2) == 6 * 2 * 9 * 8 * 2


def test_kernel_benchmark_dt_rows_run_on_cpu():
    """tools/benchmark_kernels.py's dt_proj + softplus rows (the mixer's delta kernel vs the bare GEMM) on the CPU."""
    bk = load_tool("benchmark_kernels")
    res = bk.time_dt_softplus(48, 24, 12, "cpu", False, torch.float32)
    assert res["dt_softplus"]["ms"] > 0 and res["linear"]["ms"] > 0 and res["dt_softplus"]["gpu_ms"] is None
    assert res["floor_bytes"] == 48 * 12 * 4 + 48 * 24 * 4
