"""Interpreter-only compatibility: Triton ≤ 3.6's CPU interpreter turns scalar kernel arguments into 1-element
NumPy arrays and converts them with ``int(array)``, which NumPy ≥ 2.4 rejects ("only 0-dimensional arrays can be
converted to Python scalars"), so ``for i in range(0, n, BLOCK)`` over a runtime ``n`` fails. This patch makes
the interpreter's ``__index__`` use ``.item()``. It touches nothing when not interpreting (GPU compilation is
unaffected) and is a no-op on Triton versions without that helper.
"""

from __future__ import annotations


def apply() -> None:
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_ad_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._ad_patched = True
    interpreter._patch_lang_tensor = patched
