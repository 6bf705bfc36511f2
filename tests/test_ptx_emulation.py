"""The inline-PTX emulation the interpreter tests run the kernels' GPU paths with (``ptx_emulation.py``)."""
import pytest

import ptx_emulation


def test_element_copies_follow_the_threads():
    """A tensor smaller than the program is held by several threads each: 8 rows in one warp four times, 32 rows in
    two warps twice, 32 rows in one warp once."""
    assert ptx_emulation._copies((8,), 1) == 4
    assert ptx_emulation._copies((32,), 2) == 2
    assert ptx_emulation._copies((32,), 1) == 1
    assert ptx_emulation._copies((64, 16), 4) == 1


def test_unknown_ptx_is_refused():
    with pytest.raises(NotImplementedError, match="no emulation of this inline PTX"):
        ptx_emulation._emulate("mov.u32 $0, %laneid;", "=r", [], [None], True, 1, {}, {"num_warps": 1})
