"""GGUF files of the families llama.cpp writes besides llama / qwen2 / qwen3 (tests/test_gguf.py,
tests/test_qwen3.py): Phi-3 (fused attn_qkv, and ffn_up holding gate | up) and Gemma 2 (sandwich
norms stored as 1 + w, soft-caps and the sliding window in the metadata), each written from a tiny
random transformers model with llama.cpp's tensor names, then scored by hpcllm and by transformers
loading the same GGUF file itself: within 1e-4 per token. Gemma 3's GGUF is the real one
(tests/test_gemma3.py)."""

import numpy as np
import pytest
import torch

from test_gguf import add_byte_vocab, gguf_matches_transformers, llama_cpp_permute

LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
PHI3 = {**LAYER, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
        "post_attention_layernorm": "ffn_norm"}
MIXTRAL = {**LAYER, "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp"}
GEMMA = {**LAYER, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
         "post_feedforward_layernorm": "post_ffw_norm"}


def write_gguf(path, arch, hf, names, metadata, norm_offset=0.0, rope_theta=10000.0):
    """hf's weights as llama.cpp's converter names them (norm weights + ``norm_offset``: Gemma's 1 + w;
    "llama": q/k rows permuted; stacked experts as ffn_*_exps), with byte-level tokens for its
    vocabulary (transformers' model loader reads none of them)."""
    import gguf


    c = hf.config
    w = gguf.GGUFWriter(path, arch)
    for key, val in [("block_count", c.num_hidden_layers), ("context_length", c.max_position_embeddings),
                     ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                     ("head_count", c.num_attention_heads), ("head_count_kv", c.num_key_value_heads),
                     ("layer_norm_rms_eps", c.rms_norm_eps), ("rope_freq_base", rope_theta), *metadata]:
        getattr(w, f"add_{key}")(val)
    add_byte_vocab(w, [f"<extra{i}>" for i in range(c.vocab_size - 256)], eos=256)
    w.add_pad_token_id(0)   # transformers: Phi3Config's default pad id 32000 is past this vocabulary
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    norm = lambda t: (t + norm_offset).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", norm(sd["model.norm.weight"]))
    if "lm_head.weight" in sd and not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for key, t in sd.items():
        if not key.startswith("model.layers."):
            continue
        i, rest = key[len("model.layers."):].split(".", 1)
        if rest == "mlp.experts.gate_up_proj":      # transformers' stacked experts [E, gate | up, hidden]
            gate, up = np.split(t, 2, axis=1)
            w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(up))
            continue
        if rest == "mlp.experts.down_proj":
            w.add_tensor(f"blk.{i}.ffn_down_exps.weight", t)
            continue
        module = rest.rsplit(".", 1)[0]
        if module in names:
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):   # llama.cpp's rope order
                t = llama_cpp_permute(t, c.num_attention_heads if "q_proj" in module else c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{names[module]}.weight", norm(t) if "norm" in module else np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _random(cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.2)
    return hf


def test_phi3_gguf_matches_transformers(tmp_path):
    """3 heads of 64 on 1 KV head: attn_qkv rows Q | K | V and ffn_up rows gate | up, split at import."""
    from transformers import Phi3Config

    hf = _random(Phi3Config(vocab_size=300, hidden_size=192, num_attention_heads=3, num_key_value_heads=1,
                            num_hidden_layers=2, intermediate_size=96, max_position_embeddings=64,
                            sliding_window=None, tie_word_embeddings=False, pad_token_id=0))
    path = str(tmp_path / "phi3.gguf")
    write_gguf(path, "phi3", hf, PHI3, [("rope_dimension_count", 64)])

    def check(c, _):
        assert (c["family"], c["n_heads"], c["n_kv_heads"], c["head_dim"], c["ffn"]) == ("phi3", 3, 1, 64, 96)
        assert c["layer_types"] == ["full"] * 2 and not c["tie_embeddings"]
    gguf_matches_transformers(path, tmp_path, check)


def test_gemma2_gguf_matches_transformers(tmp_path):
    """Gemma 2 as llama.cpp writes it: norms as 1 + w, soft-caps 50 / 30 and a 16-token window in the
    metadata (transformers' GGUF loader keeps Gemma2Config's soft-cap defaults, which these are, and its
    query scale 1/sqrt(256): head_dim 256)."""
    from transformers import Gemma2Config

    hf = _random(Gemma2Config(vocab_size=300, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=256, num_hidden_layers=3, intermediate_size=96, max_position_embeddings=64,
                              sliding_window=16, query_pre_attn_scalar=256))
    path = str(tmp_path / "gemma2.gguf")
    write_gguf(path, "gemma2", hf, GEMMA, [("key_length", 256), ("value_length", 256), ("sliding_window", 16),
                                           ("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)],
               norm_offset=1.0)

    def check(c, _):
        assert (c["family"], c["layer_types"], c["sliding_window"]) == ("gemma2", ["sliding", "full", "sliding"], 16)
        assert (c["attn_softcap"], c["final_softcap"], c["attn_scale"], c["norm"]) == (50.0, 30.0, 1 / 16, "gemma")
    gguf_matches_transformers(path, tmp_path, check)


@pytest.mark.parametrize("arch,layers,hidden,heads,want", [("gemma2", 46, 4608, 32, 144), ("gemma2", 26, 2304, 8, 256),
                                                        ("gemma3", 62, 5376, 32, 168), ("gemma3", 18, 640, 4, 256)])
def test_gemma_query_scale_as_llama_cpp(arch, layers, hidden, heads, want):
    """Gemma's GGUFs carry no query_pre_attn_scalar: llama.cpp scales queries by 1/sqrt(hidden / heads) for
    the 27B models (144 and 168, their configs' values) and by 1/sqrt(head_dim = 256) for the others."""
    from hpcllm.checkpoint.gguf import gguf_config

    meta = {"general.architecture": arch, f"{arch}.embedding_length": hidden, f"{arch}.attention.head_count": heads,
            f"{arch}.attention.head_count_kv": heads // 2, f"{arch}.attention.key_length": 256,
            f"{arch}.block_count": layers, f"{arch}.feed_forward_length": 4 * hidden, f"{arch}.context_length": 8192,
            f"{arch}.attention.layer_norm_rms_epsilon": 1e-6, f"{arch}.attention.sliding_window": 4096,
            "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>"],
            "tokenizer.ggml.eos_token_id": 1}
    assert gguf_config(meta, [], "x.gguf")["attn_scale"] == want ** -0.5
