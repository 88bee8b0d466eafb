"""Qwen3 from a GGUF file (llama.cpp's "qwen3": per-head attn_q_norm / attn_k_norm, head dim from
attention.key_length, q/k rows not permuted) against HF transformers loading the same file. The HF
directory path (tp = 1..4, both backends, greedy generation) is in test_decoder / test_generate_engine."""


import numpy as np
import pytest

from test_gguf import add_byte_vocab, gguf_matches_transformers

HIDDEN, HEADS, KV, HEAD_DIM, FFN = 64, 3, 1, 128, 96  # HF's GGUF loader keeps Qwen3's default head_dim 128


@pytest.fixture(scope="module")
def qwen3_gguf(tmp_path_factory):
    import gguf


    T = gguf.GGMLQuantizationType
    rng = np.random.default_rng(3)
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-qwen3.gguf")
    w = gguf.GGUFWriter(path, "qwen3")
    for key, val in [("block_count", 2), ("context_length", 64), ("embedding_length", HIDDEN),
                     ("feed_forward_length", FFN), ("head_count", HEADS), ("head_count_kv", KV),
                     ("key_length", HEAD_DIM), ("value_length", HEAD_DIM), ("rope_freq_base", 1e6),
                     ("layer_norm_rms_eps", 1e-6)]:
        getattr(w, f"add_{key}")(val)
    tokens = add_byte_vocab(w, ["<|endoftext|>"], pre="qwen2", eos=256, add_bos=False)

    def weight(*shape, scale=0.1):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm(n):
        return (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)

    w.add_tensor("token_embd.weight", gguf.quants.quantize(weight(len(tokens), HIDDEN, scale=1.0), T.Q8_0),
                 raw_dtype=T.Q8_0)  # no output.weight: the head is tied to the embedding
    w.add_tensor("output_norm.weight", norm(HIDDEN))
    for i in range(2):
        for name, shape in [("attn_q", (HEADS * HEAD_DIM, HIDDEN)), ("attn_k", (KV * HEAD_DIM, HIDDEN)),
                            ("attn_v", (KV * HEAD_DIM, HIDDEN)), ("attn_output", (HIDDEN, HEADS * HEAD_DIM)),
                            ("ffn_gate", (FFN, HIDDEN)), ("ffn_up", (FFN, HIDDEN)), ("ffn_down", (HIDDEN, FFN))]:
            w.add_tensor(f"blk.{i}.{name}.weight", weight(*shape).astype(np.float16))
        for name, n in [("attn_norm", HIDDEN), ("ffn_norm", HIDDEN), ("attn_q_norm", HEAD_DIM),
                        ("attn_k_norm", HEAD_DIM)]:
            w.add_tensor(f"blk.{i}.{name}.weight", norm(n))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_qwen3_gguf_matches_transformers(qwen3_gguf, tmp_path):
    def check(c, hf):
        assert hf.config.model_type == "qwen3" and hf.config.head_dim == HEAD_DIM
        assert (c["n_heads"], c["n_kv_heads"], c["head_dim"], c["hidden"], c["vocab"]) == (HEADS, KV, HEAD_DIM,
                                                                                            HIDDEN, 257)
        assert c["qk_norm"] and c["tie_embeddings"] and not c["qkv_bias"] and c["rope_theta"] == 1e6
    gguf_matches_transformers(qwen3_gguf, tmp_path, check)
