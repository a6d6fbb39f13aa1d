"""Test setup: the Triton kernels run through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported, so it is set here, before any
test module imports llave_fast. On a GPU machine, run the compiled-kernel tests with
LLAVE_FAST_COMPILED=1 (the interpreter is then left off). Nothing here probes CUDA.
"""

import os

import pytest

if os.environ.get("LLAVE_FAST_COMPILED", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _import_guard() -> str | None:
    """Why the training stack cannot be imported here (None when it can): one clear message, with
    the package versions, instead of dozens of unrelated test errors after an upstream release."""
    import importlib
    import importlib.metadata as md

    for name in ("transformers", "deepspeed"):
        try:
            md.version(name)
        except md.PackageNotFoundError:
            continue  # not installed at all: the tests that need it say so themselves
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure here is the message
            versions = []
            for dist in ("torch", "triton", "transformers", "kernels", "deepspeed", "accelerate", "huggingface_hub"):
                try:
                    versions.append(f"{dist} {md.version(dist)}")
                except md.PackageNotFoundError:
                    versions.append(f"{dist} (not installed)")
            return (f"`import {name}` fails in this environment: {type(exc).__name__}: {exc}\n"
                    f"installed: {', '.join(versions)}\n"
                    "`bash scripts/setup.sh` installs the tested versions of constraints.txt; "
                    "tests/test_environment.py says which installed versions differ from them")
    return None


def _interpreter_guard() -> str | None:
    """Why the kernels cannot run under the Triton interpreter here (None when they can, or when the
    interpreter is off: compiled runs on a GPU), e.g. triton < 3.7 with numpy >= 2.4."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return None
    from llave_fast.backends.triton_backend import interpreter_clash

    return interpreter_clash() or None


def pytest_sessionstart(session):
    import pytest

    if os.environ.get("PYTEST_XDIST_WORKER"):  # the controller checked already
        return
    why = _import_guard() or _interpreter_guard()
    if why is not None:
        pytest.exit("the test environment is broken, no test was run:\n" + why, returncode=3)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: on a shared, loaded 2-core machine
    one thread is several times faster than two (use: pytestmark = pytest.mark.usefixtures("one_thread"))."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def seed(request):
    """The test's own seed (``_helpers.seed_for`` of its node id): fresh inputs per test,
    reproducible, and printed in every mismatch report."""
    from _helpers import seed_for

    return seed_for(request.node.nodeid)


@pytest.fixture
def gen(seed):
    """A CPU ``torch.Generator`` seeded with ``seed``: the loss tests draw every input from it
    (``make_case`` moves a case to another device after drawing, so GPU tests use it too)."""
    import torch

    return torch.Generator().manual_seed(seed)
