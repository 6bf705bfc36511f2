"""tools/trace_memory.py: live activations along CUDA's code path on the CPU, and the inference peak it guards."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("trace_memory", os.path.join(ROOT, "tools", "trace_memory.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# vim_tiny's widths (the small rows keep their share of E), 2 tokens. Activations are told from weights by their first
# dimension (the batch, or batch x tokens): 3 x 2 = 6 matches no weight's (batch 2 made it 4, the conv's taps (4, E)).
SMALL = dict(batch=3, img_size=16, depth=2)


def test_inference_peak_is_under_seven_mixer_tensors(tool):
    """Session 17 took the peak from 10.6 (B, L, E) bf16 tensors to 6.8: the stream, the norm's output, in_proj's
    output (2), both conv outputs and one delta (6.5), and a few small rows. Any tensor that starts to live
    through a mixer again shows here."""
    r = tool.trace("vim_tiny", **SMALL)
    assert r["tokens"] == 2 and r["unit_bytes"] == 3 * 2 * 384 * 2
    assert 6.5 <= r["blocks_peak_units"] < 7.0, r["peak_units_by_part"]
    assert r["peak_units_by_part"]["block 1"] == pytest.approx(r["blocks_peak_units"])   # every block alike
    assert sum(item["units"] for item in r["at_peak"]) == pytest.approx(r["peak_units"])


def test_sees_inside_the_mixer_ops(tool, monkeypatch):
    """With the output in a fresh tensor instead of over x's half (as when a gradient is needed), the trace
    counts one (B, L, E) tensor more: it sees the tensors inside the custom op."""
    monkeypatch.setattr(tool.triton_bimamba, "_needs_grad", lambda *tensors: True)
    r = tool.trace("vim_tiny", **SMALL)
    assert 7.5 <= r["blocks_peak_units"] < 8.0, r["peak_units_by_part"]


def test_cli_writes_json(tool, tmp_path, capsys):
    out = tmp_path / "mem.json"
    tool.main(["vim_tiny", "--batch", "1", "--img-size", "16", "--depth", "1", "--json", str(out)])
    assert "peak of live activations" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["batch"] == 1 and r["peak_units"] > 0 and r["at_peak"]
