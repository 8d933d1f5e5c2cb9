"""A fix for triton < 3.7's interpreter under numpy >= 2.4 (only the interpreter: compiled
kernels never run this code).

The interpreter gives ``tl.tensor`` an ``__index__`` that calls ``int()`` on the value's numpy
array. A scalar there is a one-element array of shape ``(1,)``, and numpy 2.4 made ``int()`` of
such an array an error ("only 0-dimensional arrays can be converted to Python scalars"), so any
kernel that uses a scalar as a Python index (``range(0, D, BLOCK)``) fails to interpret. Triton
3.7 squeezes the array first; this does the same for older versions, leaving the rest of the
interpreter's per-call patching as it is.
"""
from __future__ import annotations

_applied = False


def _needs_fix(version: str) -> bool:
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) < (3, 7)


def apply() -> bool:
    """Wrap the interpreter's ``_patch_lang_tensor`` so ``__index__`` squeezes first; True when
    applied (now or before). Does nothing on triton >= 3.7 or an interpreter without that hook."""
    global _applied
    if _applied:
        return True
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or not _needs_fix(triton.__version__):
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # Recorded in the same scope, after the interpreter's own: restored first, in order.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    _applied = True
    return True
