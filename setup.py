"""Packaging: packages are found, not listed; two folders at the top of the tree are mapped in.

* ``kernels/`` becomes ``llave_fast.kernels`` (not a top-level ``kernels`` package:
  transformers probes for Hugging Face's ``kernels`` package by that name and would
  mistake ours for it);
* ``configs/`` (the training presets and DeepSpeed configs, JSON) becomes
  ``llave_fast.configs`` with its JSON files as package data, so a wheel installed outside
  the repository finds its presets (``llave_fast.train.CONFIG_DIR``).
"""

from setuptools import find_packages, setup

MAPPED = {"llave_fast.kernels": "kernels", "llave_fast.configs": "configs"}

setup(
    packages=find_packages(include=["llave_fast", "llave_fast.*"]) + sorted(MAPPED),
    package_dir=MAPPED,
    package_data={"llave_fast.configs": ["*.json"]},
)
