"""tools/trace_memory.py: live activations along CUDA's code path on the CPU, and the inference peak it guards."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tool():
    """The tool as a module. Its kernels are imported first, so that they are compiled or interpreted as this process
    says (conftest.py), not as the tool would set it, and the tool then leaves TRITON_INTERPRET alone."""
    import vim  # noqa: F401
    from vim.kernels.bimamba import triton_bimamba  # noqa: F401

    before = os.environ.get("TRITON_INTERPRET")
    spec = importlib.util.spec_from_file_location("trace_memory", os.path.join(ROOT, "tools", "trace_memory.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert os.environ.get("TRITON_INTERPRET") == before
    return mod


@pytest.fixture
def interpreted(tool):
    """trace() needs the kernels interpreted: in a process that compiled them for the GPU it refuses (tested below)."""
    if not tool.triton_scan._interpreted():
        pytest.skip("this process compiled the Triton kernels for the GPU; the tool runs them in the interpreter")


# vim_tiny's widths (the small rows keep their share of E), 2 tokens. Activations are told from weights by their first
# dimension (the batch, or batch x tokens): 3 x 2 = 6 matches no weight's (batch 2 made it 4, the conv's taps (4, E)).
SMALL = dict(batch=3, img_size=16, depth=2)


def test_inference_peak_is_under_seven_mixer_tensors(tool, interpreted):
    """Session 17 took the peak from 10.6 (B, L, E) bf16 tensors to 6.8: the stream, the norm's output, in_proj's
    output (2), both conv outputs and one delta (6.5), and a few small rows. Any tensor that starts to live
    through a mixer again shows here."""
    r = tool.trace("vim_tiny", **SMALL)
    assert r["tokens"] == 2 and r["unit_bytes"] == 3 * 2 * 384 * 2
    assert 6.5 <= r["blocks_peak_units"] < 7.0, r["peak_units_by_part"]
    assert r["peak_units_by_part"]["block 1"] == pytest.approx(r["blocks_peak_units"])   # every block alike
    assert sum(item["units"] for item in r["at_peak"]) == pytest.approx(r["peak_units"])


def test_sees_inside_the_mixer_ops(tool, interpreted, monkeypatch):
    """With the output in a fresh tensor instead of over x's half (as when a gradient is needed), the trace
    counts one (B, L, E) tensor more: it sees the tensors inside the custom op."""
    monkeypatch.setattr(tool.triton_bimamba, "_needs_grad", lambda *tensors: True)
    r = tool.trace("vim_tiny", **SMALL)
    assert 7.5 <= r["blocks_peak_units"] < 8.0, r["peak_units_by_part"]


def test_cli_writes_json(tmp_path):
    """As a script it sets TRITON_INTERPRET before triton's import, so it runs on a GPU machine too."""
    out = tmp_path / "mem.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "trace_memory.py"), "vim_tiny", "--batch", "1",
                           "--img-size", "16", "--depth", "1", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peak of live activations" in proc.stdout
    r = json.loads(out.read_text())
    assert r["batch"] == 1 and r["peak_units"] > 0 and r["at_peak"]


def test_compiled_kernels_are_a_clear_error(tool, monkeypatch):
    monkeypatch.setattr(tool.triton_scan, "_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="run `python tools/trace_memory.py` as a script"):
        tool.trace("vim_tiny", **SMALL)
