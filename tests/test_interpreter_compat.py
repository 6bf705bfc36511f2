"""kernels/interpreter_compat.py: Triton < 3.7's interpreter takes a loop bound with int() of a one-element array."""
import types

import numpy as np
import pytest

from vim.kernels import interpreter_compat


class _Scope:
    """As the interpreter's _LangPatchScope: records each attribute's value before it is set, restores LIFO."""

    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def restore(self):
        while self.changes:
            obj, name, value = self.changes.pop()
            setattr(obj, name, value)


def _patch_lang_tensor(tensor, scope):   # Triton 3.6's, reduced to the line at stake
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


class _Tensor:
    def __init__(self, value):
        self.handle = types.SimpleNamespace(data=np.array([value], dtype=np.int32))

    def __index__(self):
        return -1


def test_old_interpreter_gets_the_squeeze_and_restores_after_the_launch():
    old = types.SimpleNamespace(_patch_lang_tensor=_patch_lang_tensor)
    assert interpreter_compat.install(old)
    assert not interpreter_compat.install(old)   # once
    scope = _Scope()
    old._patch_lang_tensor(_Tensor, scope)
    assert list(range(0, _Tensor(3))) == [0, 1, 2]   # NumPy >= 2.4 refuses int() of the unsqueezed array
    scope.restore()
    assert _Tensor(3).__index__() == -1


def test_current_triton_needs_nothing():
    triton = pytest.importorskip("triton")
    from triton.runtime import interpreter

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7):
        assert not interpreter_compat._needs_fix(interpreter)
