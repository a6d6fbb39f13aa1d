"""The environment the package meets: no folder of this tree shadows an installed distribution from
the repository root, Hugging Face's ``kernels`` is the one transformers gets, two models train in
one process, and the installed dependencies are the tested set of constraints.txt."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# run with `python -c` from a folder: that folder is first on sys.path, as for `python -m llave_fast`
# from the repository root and for `python -m pytest` (pytest's rootdir)
_SHADOW_CHECK = textwrap.dedent("""
    import importlib.metadata as md, importlib.util, json, os, sys
    root = os.path.realpath(os.getcwd())
    # an environment inside the tree (.venv/) holds installed packages, not folders of the tree
    prefixes = {os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    ours = {"llave-fast", "llave_fast"}
    found = []
    for name, dists in sorted(md.packages_distributions().items()):
        if not name.isidentifier() or ours & {d.lower() for d in dists}:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        places = [spec.origin] if spec.origin else list(spec.submodule_search_locations or [])
        inside = [p for p in places if p and os.path.realpath(p).startswith(root + os.sep)
                  and not any(os.path.realpath(p).startswith(x) for x in prefixes)]
        if inside:
            found.append({"name": name, "distributions": dists, "resolves_to": inside})
    print(json.dumps(found))
""")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _shadowed(cwd: Path) -> list[dict]:
    r = subprocess.run([sys.executable, "-c", _SHADOW_CHECK], cwd=cwd, capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.env
def test_no_folder_of_the_tree_shadows_an_installed_distribution():
    """From the repository root, every installed distribution's top-level import name resolves outside
    the repository (a folder without __init__.py yields to an installed regular package)."""
    found = _shadowed(ROOT)
    assert not found, ("from the repository root these installed packages resolve to folders of this tree, "
                       f"which shadow them: {found}")


def test_the_shadow_check_finds_a_shadowing_package(tmp_path):
    """The check above can fail: a regular package named like an installed distribution (pytest's
    ``_pytest``) in the current folder is reported."""
    (tmp_path / "_pytest").mkdir()
    (tmp_path / "_pytest" / "__init__.py").write_text("")
    found = _shadowed(tmp_path)
    assert [f["name"] for f in found] == ["_pytest"], found


def test_only_llave_fast_is_a_regular_package_at_the_root():
    """A generic top-level name (kernels, configs, tests, ...) with an __init__.py would shadow any
    distribution of that name installed later: only the package itself has one."""
    regular = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert regular == ["llave_fast"], regular
    for name in ("kernels", "configs"):  # installed as llave_fast.<name> through links to these folders
        link = ROOT / "llave_fast" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), link


_KERNELS_CHECK = textwrap.dedent("""
    import importlib.metadata as md, json, os, sys
    root = os.path.realpath(os.getcwd())
    import transformers
    from transformers import LlavaOnevisionModel  # the modeling stack transformers imports kernels from
    from transformers.utils.import_utils import is_kernels_available
    import llave_fast.kernels.hardness_fwd as ours
    from llave_fast.model import build_tiny_model
    build_tiny_model(0)
    try:
        hf = md.version("kernels")
    except md.PackageNotFoundError:
        hf = None
    if hf is not None:
        import kernels
    loaded = {n: getattr(m, "__file__", None) or list(getattr(m, "__path__", []))
              for n, m in list(sys.modules.items()) if n == "kernels" or n.startswith("kernels.")}
    print(json.dumps({"hf_version": hf, "transformers": transformers.__version__, "loaded": loaded,
                      "ours": os.path.realpath(ours.__file__), "available": is_kernels_available()}))
""")


@pytest.mark.env
@pytest.mark.slow
def test_hugging_face_kernels_is_the_one_imported_from_the_repository_root():
    """From the repository root, ``import kernels`` gives Hugging Face's package where it is installed
    (transformers >= 5.2x depends on it) and transformers imports cleanly; where it is not installed
    (the lent GPU machines: transformers 5.17), nothing of our kernels/ folder is loaded as ``kernels``
    and transformers sees no hub kernels. Our kernels are ``llave_fast.kernels`` either way."""
    r = subprocess.run([sys.executable, "-c", _KERNELS_CHECK], cwd=ROOT, capture_output=True, text=True,
                       env=_env(), timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    root = os.path.realpath(ROOT)
    assert got["ours"] == os.path.join(root, "kernels", "hardness_fwd.py"), got
    installed = tuple(os.path.realpath(x) + os.sep for x in (sys.prefix, sys.base_prefix))  # a .venv in the tree

    def in_tree(path):
        path = os.path.realpath(path)
        return path.startswith(root + os.sep) and not path.startswith(installed)

    ours_loaded = {n: p for n, p in got["loaded"].items() if any(in_tree(x) for x in ([p] if isinstance(p, str) else p))}
    if got["hf_version"] is not None:
        assert not ours_loaded and isinstance(got["loaded"].get("kernels"), str), got
        assert not in_tree(got["loaded"]["kernels"]), got
    else:
        # transformers may import the folder as an empty namespace while probing (no code of ours runs
        # and it concludes "not installed"); no module of the folder may load under that name
        assert set(ours_loaded) <= {"kernels"} and not got["available"], got


@pytest.mark.slow
def test_two_models_build_and_train_in_one_process(tmp_path):
    """Two runs of train() in one fresh interpreter (as ablate, notebooks and tests do): the second
    model keeps transformers' hub-kernel layer attributes (the modeling modules are imported before
    DeepSpeed's zero.Init, which would otherwise restore the classes' undecorated __init__)."""
    code = textwrap.dedent(f"""
        import json
        from llave_fast.train import TrainConfig, train
        out = []
        for i in range(2):
            cfg = TrainConfig.from_json("tiny_cpu.json")
            cfg.steps, cfg.warmup_steps, cfg.num_train, cfg.num_eval = 2, 1, 256, 32
            cfg.num_workers, cfg.output_dir, cfg.seed = 0, {str(tmp_path)!r} + f"/run{{i}}", i
            r = train(cfg)
            out.append(r["p_at_1_after"] if "p_at_1_after" in r else r.get("p_at_1"))
        print("TWO RUNS", json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env=_env(), timeout=900)
    assert r.returncode == 0 and "TWO RUNS" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    for i in range(2):
        assert (tmp_path / f"run{i}" / "eval.json").exists()


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            assert m, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[m.group(1)] = m.group(2)
    return pins


def test_constraints_pin_the_training_stack():
    pins = _constraints()
    for name in ("transformers", "deepspeed", "accelerate", "kernels", "huggingface_hub", "pytest"):
        assert name in pins, f"constraints.txt does not pin {name}"
    assert not {"torch", "triton"} & set(pins), "torch and triton are the machine's own (see the file's header)"


def test_installed_dependencies_are_the_tested_set():
    """A guard against drift: where a package of constraints.txt is installed at another version, say
    which (setup.sh installs the tested set; LLAVE_FAST_LATEST=1 asks for the newest on purpose)."""
    if os.environ.get("LLAVE_FAST_LATEST") == "1":
        pytest.skip("LLAVE_FAST_LATEST is set: the newest releases were asked for, not the tested set")
    import torch

    if torch.version.cuda is not None:
        pytest.skip("a machine with its own CUDA build of torch keeps its own stack (the lent GPU machines)")
    differ = []
    for name, want in _constraints().items():
        try:
            # the one imports find (first on sys.path): setuptools puts its _vendor folder, with older
            # copies of packaging and others, on sys.path once it is imported
            have = md.version(name)
        except md.PackageNotFoundError:
            continue  # not needed here (an optional extra, or not on this platform)
        if have != want:
            differ.append(f"{name} {have} (tested: {want})")
    assert not differ, ("installed versions differ from the tested set of constraints.txt: " + "; ".join(differ)
                        + ". Run `bash scripts/setup.sh`, or update the file (scripts/update-constraints.sh) "
                          "after the tests pass on the new versions")


@pytest.mark.slow
def test_a_broken_transformers_stops_the_session_with_one_message(tmp_path):
    """The session guard (conftest.py): when an installed transformers cannot be imported, no test runs
    and one message names the error and the versions (instead of dozens of unrelated errors)."""
    fake = tmp_path / "shadow" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"cannot import name 'CUDAProperties' from 'kernels'\")\n")
    env = dict(_env(), PYTHONPATH=str(tmp_path / "shadow"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_environment.py::test_constraints_pin_the_training_stack"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 3, out[-3000:]
    assert "`import transformers` fails in this environment" in out and "CUDAProperties" in out, out[-3000:]
    assert f"transformers {md.version('transformers')}" in out and "no test was run" in out, out[-3000:]


@pytest.mark.slow
def test_a_clashing_triton_interpreter_stops_the_session_with_one_message(tmp_path):
    """The session guard: under the interpreter (the CPU suite), triton < 3.7 with numpy >= 2.4 stops the
    session with one message naming both versions and the fix, instead of every kernel test failing
    inside the interpreter with a numpy TypeError. The versions are faked at start-up (sitecustomize)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import numpy, triton\nnumpy.__version__ = '2.4.6'\n"
                                           "triton.__version__ = '3.6.0'\n")
    env = dict(_env(), PYTHONPATH=str(site), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_environment.py::test_constraints_pin_the_training_stack"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 3, out[-3000:]
    assert "no test was run" in out and "triton 3.6.0" in out and "numpy 2.4.6" in out, out[-3000:]
    assert "numpy<2.4 or triton>=3.7" in out, out[-3000:]
