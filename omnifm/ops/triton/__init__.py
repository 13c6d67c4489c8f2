"""Triton kernels of omnifm. Imported lazily by the ops, so omnifm works without
Triton. On a machine without a GPU they run under TRITON_INTERPRET=1 (set it before
triton is first imported)."""
import importlib.util
import os


def _squeeze_interpreter_index():
    """Triton 3.6's interpreter holds a scalar (a program id, an int argument) as a
    1-element array and turns it into a Python int, as every runtime-bounded range()
    needs, with int(array): NumPy >= 2.4 rejects that ("only 0-dimensional arrays can
    be converted to Python scalars", triton-lang/triton#9171). Apply upstream's fix,
    int(array.squeeze()), which is what later Triton does; compiled kernels never
    reach this code."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    _squeeze_interpreter_index()
