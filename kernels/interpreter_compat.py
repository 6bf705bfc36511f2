"""Triton's CPU interpreter on older Triton with newer NumPy.

The interpreter holds every scalar as a one-element array and, before Triton 3.7, gives a loop bound to ``range`` as
``int(array)``. NumPy 2.4 refuses that ("only 0-dimensional arrays can be converted to Python scalars"), so every
kernel whose loop bound depends on a program id (the chunked scans, the conv walk, the norm backward) fails in the
interpreter under, e.g., torch 2.11's Triton 3.6. Triton 3.7 squeezes the array first; ``install()`` makes the older
interpreter do the same. It changes only what the interpreter patches onto ``tl.tensor`` for the length of a launch
(and restores after it), nothing that compiled kernels use."""
from __future__ import annotations


def _needs_fix(interpreter) -> bool:
    import inspect

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "vim_index_fix", False):
        return False
    try:
        return "int(self.handle.data)" in inspect.getsource(patch)
    except (OSError, TypeError):
        return False


def install(interpreter=None) -> bool:
    """Patch the interpreter's ``tl.tensor.__index__`` where it lacks the squeeze; True if it did. ``interpreter``:
    the module to patch (``triton.runtime.interpreter``; tests pass a stand-in)."""
    if interpreter is None:
        from triton.runtime import interpreter
    if not _needs_fix(interpreter):
        return False
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # the scope restores in reverse order, so the interpreter's own value and then the class's come back
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))   # as Triton 3.7+

    patch_lang_tensor.vim_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
