"""Packaging: packages are found, not listed, except the two source folders at the top of the tree.

``kernels/`` (the Triton sources) and ``configs/`` (the training presets and DeepSpeed configs,
JSON) live at the top of the tree *without* ``__init__.py``, and ``llave_fast/kernels`` and
``llave_fast/configs`` are relative links to them. So:

* from the repository root (``python -m llave_fast``, ``python -m pytest``: the current folder is
  first on ``sys.path``) ``import kernels`` still finds Hugging Face's ``kernels`` package, a
  transformers dependency: a regular package anywhere on ``sys.path`` beats a folder without
  ``__init__.py``, and transformers treats such a folder found alone as "not installed";
* ``llave_fast.kernels`` and ``llave_fast.configs`` are namespace subpackages of ``llave_fast``,
  found through the links in a source tree, an editable install of any mode, and the wheel
  (which holds copies of the files, never links).
"""

from setuptools import find_packages, setup

LINKED = ["llave_fast.configs", "llave_fast.kernels"]

setup(
    packages=find_packages(include=["llave_fast", "llave_fast.*"]) + LINKED,
    package_data={"llave_fast.configs": ["*.json"]},
)
