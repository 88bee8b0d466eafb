"""Package discovery (the metadata lives in pyproject.toml): every package under
hpcllm/ with an __init__.py, plus hpcllm.kernels, whose folder is the top-level
kernels/ (pyproject.toml's package-dir)."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["hpcllm", "hpcllm.*"]) + ["hpcllm.kernels"])
