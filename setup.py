"""Packaging: the one place where the top-level kernels/ folder becomes llave_fast.kernels.

(Not a top-level ``kernels`` package: transformers probes for Hugging Face's ``kernels``
package by that name and would mistake ours for it.)
"""

from setuptools import setup

setup(
    packages=["llave_fast", "llave_fast.backends", "llave_fast.kernels"],
    package_dir={"llave_fast": "llave_fast", "llave_fast.kernels": "kernels"},
)
