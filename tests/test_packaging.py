"""The package as a user installs it: a wheel built from a copy of the tree, installed into a
fresh virtual environment outside the repository, runs the default job and the README's loss
snippet from there (an editable install hides missing packages and data: the wheel does not).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # processes, ranks, wheel builds or compiles: -m 'not slow' skips them

ROOT = Path(__file__).resolve().parents[1]


def _readme_loss_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    snippet = next((b for b in blocks if "FusedHardnessLoss(" in b and "hardness_weighted_loss(" in b), None)
    assert snippet is not None, "the README's loss snippet (FusedHardnessLoss and hardness_weighted_loss) is gone"
    return snippet


# the names the README's snippet uses, made up here: 2 pairs of 16-wide embeddings and 3 negatives
_SNIPPET_INPUTS = """
import torch
torch.manual_seed(0)
q = torch.nn.functional.normalize(torch.randn(4, 16), dim=1).requires_grad_()
t = torch.nn.functional.normalize(torch.randn(4, 16), dim=1).requires_grad_()
query_emb, target_emb = q, t
hard_negs = torch.nn.functional.normalize(torch.randn(3, 16), dim=1)
tids = torch.tensor([0, 1, 2, 2, 5, 6, 7])
qids = torch.tensor([0, 1, 2, 3])
scale_param = torch.tensor(50.0, requires_grad=True)
"""

_SNIPPET_CHECK = """
assert loss.shape == (4,) and bool(torch.isfinite(loss).all()), loss
loss.sum().backward()
assert scale_param.grad is not None and q.grad is not None and t.grad is not None
import llave_fast
print("SNIPPET OK", llave_fast.__file__)
"""


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """(venv python, venv bin folder, work folder outside the tree): the wheel installed there."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "runs", "gpu_out", "build", "dist", "*.egg-info", "__pycache__", ".whl", ".pytest_cache"))
    dist = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = dist.glob("llave_fast-*.whl")
    venv = tmp / "venv"
    # the dependencies (torch, transformers, deepspeed, ...) come from this interpreter's
    # site-packages; llave_fast itself only from the wheel (checked below)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(whl)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    work = tmp / "work"
    work.mkdir()
    return whl, py, venv / "bin", work


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_wheel_holds_every_package_and_the_configs(wheel_venv):
    whl = wheel_venv[0]
    names = set(zipfile.ZipFile(whl).namelist())
    for pkg in ("llave_fast", "llave_fast/backends", "llave_fast/model", "llave_fast/data"):
        assert f"{pkg}/__init__.py" in names, f"{pkg} is missing from the wheel"
    # kernels/ and configs/ have no __init__.py (a top-level `kernels` package would shadow Hugging Face's):
    # namespace subpackages of llave_fast, their files copied in (never links)
    for mod in ("tile.py", "hardness_fwd.py", "hardness_ds.py", "hardness_stats.py"):
        assert f"llave_fast/kernels/{mod}" in names, f"llave_fast/kernels/{mod} is missing from the wheel"
    for cfg in ("tiny_cpu.json", "llave_0.5b.json", "zero3.json", "zero2.json"):
        assert f"llave_fast/configs/{cfg}" in names, f"the preset {cfg} is missing from the wheel"
    assert not any(n.startswith(("kernels/", "configs/", "tests/", "benchmarks/")) for n in names), (
        "top-level folders leaked into the wheel")


def test_wheel_runs_the_default_job_outside_the_repository(wheel_venv):
    _, py, bin_dir, work = wheel_venv
    where = subprocess.run([str(py), "-c", "import llave_fast, llave_fast.kernels, llave_fast.train as t; "
                            "print(llave_fast.__file__); print(t.CONFIG_DIR)"],
                           cwd=work, capture_output=True, text=True, env=_env(), timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    pkg_file, config_dir = where.stdout.split()[-2:]
    venv_root = str(bin_dir.parent)
    assert pkg_file.startswith(venv_root) and config_dir.startswith(venv_root), (pkg_file, config_dir)
    r = subprocess.run([str(bin_dir / "llave-fast"), "train", "--steps", "2", "--warmup-steps", "1",
                        "--output-dir", "run"],
                       cwd=work, capture_output=True, text=True, env=_env(), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (work / "run" / "eval.json").exists() and (work / "run" / "train_config.json").exists()


def test_readme_loss_snippet_runs_from_the_wheel(wheel_venv):
    _, py, bin_dir, work = wheel_venv
    code = _SNIPPET_INPUTS + _readme_loss_snippet() + _SNIPPET_CHECK
    r = subprocess.run([str(py), "-c", code], cwd=work, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SNIPPET OK" in r.stdout and str(bin_dir.parent) in r.stdout, r.stdout
