"""Triton kernels in tests: compiled on a GPU when there is one, else run by Triton's CPU interpreter.

Triton decides interpreted vs compiled when a `@triton.jit` decorator runs (its own helpers at `import triton`, ours
when a kernel module is imported) and also reads TRITON_INTERPRET while running kernels. So the kernel test modules
import the kernels through `import_kernels` (TRITON_INTERPRET=1 set around the import; a module that someone already
imported compiled is reloaded) and run their tests inside `interpreter()`; in between and afterwards the variable is
restored, so other test modules and the block's routing (`kernels.use_triton` reads it per call) never see it.
"""
import contextlib
import importlib
import os
import sys

import torch

import deltaconv_core

# The package under its real name: under the pack loader `deltaconv_core` aliases `<pack>.deltaconv_core`, and the
# block uses that copy; importing `deltaconv_core.kernels` would make a second one.
kernels = importlib.import_module(deltaconv_core.__name__ + ".kernels")
ON_GPU = torch.cuda.is_available() and not kernels.interpreter_mode()
DEVICE = "cuda" if ON_GPU else "cpu"


@contextlib.contextmanager
def interpreter():
    """TRITON_INTERPRET=1 inside, the previous value (or none) restored after; a no-op when testing on the GPU."""
    previous = os.environ.get("TRITON_INTERPRET")
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def import_kernels(*modules: str):
    """The kernel modules (names inside deltaconv_core.kernels), decorated for the interpreter unless on a GPU."""
    loaded = []
    with interpreter():
        import triton  # noqa: F401  (first import of triton in the process, normally: its helpers get interpreted too)

        for module in modules:
            name = f"{kernels.__name__}.{module}"
            if name in sys.modules and not ON_GPU:  # decorated compiled by someone else: redo it interpreted
                loaded.append(importlib.reload(sys.modules[name]))
            else:
                loaded.append(importlib.import_module(name))
    return loaded
