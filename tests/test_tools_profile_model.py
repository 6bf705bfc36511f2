"""tools/profile_model.py's command line on a machine without a GPU: its knobs are checked before it says so."""
import pytest
import torch

from tool_loading import load_tool
from vim.kernels.selective_scan import triton_scan

profile_model = load_tool("profile_model")
KNOB = "vim.kernels.selective_scan.triton_scan.CONFIG"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the tool would profile")
def test_knobs_checked_and_left_alone_without_a_gpu(capsys):
    with pytest.raises(SystemExit, match="NO_SUCH_KNOB"):
        profile_model.main(["vim_tiny", "--set", f"{KNOB}[NO_SUCH_KNOB]=1"])
    before = dict(triton_scan.CONFIG)
    assert profile_model.main(["vim_tiny", "--set", f"{KNOB}[BC_PAIR_SPLIT]=False"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert triton_scan.CONFIG == before
