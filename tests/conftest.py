"""Test setup: the Triton kernels run through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported, so it is set here, before any
test module imports llave_fast. On a GPU machine, run the compiled-kernel tests with
LLAVE_FAST_COMPILED=1 (the interpreter is then left off). Nothing here probes CUDA.
"""

import os

if os.environ.get("LLAVE_FAST_COMPILED", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
