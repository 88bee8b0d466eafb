"""GGUF import: every weight type the gguf package dequantises, llama.cpp's q/k
row permutation undone, config from metadata; checked against HF transformers
loading the same GGUF file itself."""

import os

import gguf
import numpy as np
import pytest
import torch

from test_decoder import GGUF_PATH, hf_logprobs

T = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV, FFN = 256, 4, 2, 512  # rows of 256: the K-quants' block size

# Per layer, the type of each weight: all eight quantised / float types appear at least once.
LAYER_TYPES = [
    {"attn_q": T.Q4_K, "attn_k": T.Q6_K, "attn_v": T.Q5_K, "attn_output": T.Q2_K, "ffn_gate": T.Q3_K,
     "ffn_up": T.Q8_0, "ffn_down": T.Q4_0},
    {"attn_q": T.Q4_1, "attn_k": T.F16, "attn_v": T.BF16, "attn_output": T.Q5_0, "ffn_gate": T.Q5_1,
     "ffn_up": T.F32, "ffn_down": T.Q8_0},
]
# byte offsets of the float16 super-block scales (d, dmin) in ggml's K-quant blocks
K_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def add_byte_vocab(w, special, pre="gpt2", eos=None, bos=None, add_bos=None):
    """Byte-level BPE metadata on GGUFWriter ``w``: the 256 byte tokens, then the ``special`` (control)
    tokens, no merges; returns the token list."""
    from hpcllm.tokenizer.byte_level import BYTE_CHARS

    tokens = [BYTE_CHARS[b] for b in range(256)] + list(special)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * len(special))
    w.add_token_merges([])
    for value, add in ((bos, w.add_bos_token_id), (eos, w.add_eos_token_id), (add_bos, w.add_add_bos_token)):
        if value is not None:
            add(value)
    return tokens


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (interleave the two rotary halves)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    from hpcllm.checkpoint.gguf import unpermute_rows

    rng = np.random.default_rng(0)
    for heads, d in [(9, 64), (3, 64), (4, 8), (1, 2)]:
        w = rng.standard_normal((heads * d, 7)).astype(np.float32)
        assert np.array_equal(unpermute_rows(llama_cpp_permute(w, heads), heads), w)
        b = rng.standard_normal(heads * d).astype(np.float32)
        assert np.array_equal(unpermute_rows(llama_cpp_permute(b, heads), heads), b)


def _encode(rng, shape, qtype):
    """GGUF payload of a random [out, in] weight in ``qtype`` (K-quants: random blocks with sane scales)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import quantize

    if qtype in K_SCALES:
        block, size = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
        for off in K_SCALES[qtype]:
            raw[:, :, off:off + 2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
        return raw.reshape(shape[0], -1)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    return w if qtype == T.F32 else quantize(w, qtype)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_gguf(request, tmp_path_factory):
    """A 2-layer GGUF with byte-level BPE tokenizer metadata. "llama": q/k rows permuted as llama.cpp
    does; "qwen2": not permuted (NEOX rope in llama.cpp), with q/k/v biases."""
    import gguf


    arch = request.param
    rng = np.random.default_rng(1)
    path = str(tmp_path_factory.mktemp("gguf") / f"tiny-{arch}.gguf")
    w = gguf.GGUFWriter(path, arch)
    for key, val in [("block_count", 2), ("context_length", 64), ("embedding_length", HIDDEN),
                     ("feed_forward_length", FFN), ("head_count", HEADS), ("head_count_kv", KV),
                     ("rope_freq_base", 50000.0), ("layer_norm_rms_eps", 1e-5)]:
        getattr(w, f"add_{key}")(val)
    tokens = add_byte_vocab(w, ["<s>", "</s>"], bos=256, eos=257, add_bos=True)
    vocab = len(tokens)
    w.add_tensor("token_embd.weight", _encode(rng, (vocab, HIDDEN), T.Q8_0), raw_dtype=T.Q8_0)
    w.add_tensor("output.weight", _encode(rng, (vocab, HIDDEN), T.Q6_K), raw_dtype=T.Q6_K)
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    for i, types in enumerate(LAYER_TYPES):
        for name, shape in [("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (KV * 64, HIDDEN)), ("attn_v", (KV * 64, HIDDEN)),
                            ("attn_output", (HIDDEN, HIDDEN)), ("ffn_gate", (FFN, HIDDEN)), ("ffn_up", (FFN, HIDDEN)),
                            ("ffn_down", (HIDDEN, FFN))]:
            data = _encode(rng, shape, types[name])
            if arch == "llama" and name in ("attn_q", "attn_k"):  # quantised rows permute like logical rows
                data = llama_cpp_permute(data, HEADS if name == "attn_q" else KV)
            w.add_tensor(f"blk.{i}.{name}.weight", data, raw_dtype=None if types[name] == T.F32 else types[name])
            if arch == "qwen2" and name in ("attn_q", "attn_k", "attn_v"):
                w.add_tensor(f"blk.{i}.{name}.bias", (0.3 * rng.standard_normal(shape[0])).astype(np.float32))
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_matches_transformers(path, tmp_path, check_config):
    """Convert a GGUF, check its config (``check_config(config, hf_model)``), then score random
    documents with hpcllm and with transformers loading the same file: within 1e-4 per token."""
    from transformers import AutoModelForCausalLM

    from hpcllm.checkpoint.convert import convert
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.model.build import build_model
    from hpcllm.scoring import score_documents
    from hpcllm.world.comm import LocalComm

    h5 = str(tmp_path / "tiny.h5")
    convert(path, h5)
    where, name = os.path.split(path)
    hf = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32).eval()
    with Checkpoint(h5) as ck:
        check_config(ck.config, hf)
        model = build_model(ck, 0, 1, LocalComm())
        vocab = ck.config["vocab"]
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, vocab, size=n) for n in (2, 9, 40, 64, 100)]
    ours = score_documents(model, docs, 64, 32)
    refs = [hf_logprobs(hf, ids, 64, 32) for ids in docs]
    assert np.std(np.concatenate(refs)) > 0.1  # the weights matter
    for lp, ref in zip(ours, refs):
        np.testing.assert_allclose(lp, ref, atol=1e-4, rtol=0)


def test_tiny_gguf_all_types_match_transformers(tiny_gguf, tmp_path):
    def check(c, hf):
        assert (c["n_heads"], c["n_kv_heads"], c["head_dim"], c["ffn"], c["vocab"]) == (HEADS, KV, 64, FFN, 258)
        assert c["add_bos"] and c["bos_id"] == 256 and not c["tie_embeddings"] and c["rope_theta"] == 50000.0
        assert c["qkv_bias"] == ("qwen2" in tiny_gguf) and not c["o_bias"]
    gguf_matches_transformers(tiny_gguf, tmp_path, check)


def test_header_reader_equals_gguf_reader():
    """read_gguf (the header parsed directly, data memory-mapped) gives what gguf.GGUFReader gives:
    every metadata value, and every tensor's name, shape, type and bytes."""
    from gguf import GGUFReader

    from hpcllm.checkpoint.gguf import read_gguf

    meta, tensors = read_gguf(GGUF_PATH)
    ref = GGUFReader(GGUF_PATH)
    assert set(meta) == set(ref.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, value in meta.items():
        want = ref.fields[key].contents()
        want = want.tolist() if isinstance(want, np.ndarray) else want
        assert value == want or (isinstance(value, float) and np.float32(value) == np.float32(want)), key
    assert [(t.name, t.shape, t.qtype) for t in tensors] == \
        [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in ref.tensors]
    for t, r in zip(tensors, ref.tensors):
        assert t.data.tobytes() == np.asarray(r.data).tobytes(), t.name


def test_smollm2_metadata():
    from hpcllm.checkpoint.gguf import gguf_config, read_gguf

    c = gguf_config(*read_gguf(GGUF_PATH), GGUF_PATH)
    assert (c["n_layers"], c["hidden"], c["n_heads"], c["n_kv_heads"], c["head_dim"]) == (30, 576, 9, 3, 64)
    assert (c["vocab"], c["ffn"], c["rope_theta"], c["max_positions"]) == (49152, 1536, 100000.0, 8192)
    assert c["tie_embeddings"] and not c["add_bos"] and not c["qkv_bias"]  # tokenizer.ggml.add_bos_token = false


def test_not_a_gguf_file_is_one_line_error(tmp_path):
    from hpcllm.checkpoint.convert import convert
    from hpcllm.errors import HpcllmError

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(HpcllmError, match="x.gguf"):
        convert(str(bad), str(tmp_path / "x.h5"))


def test_llama31_rope_freqs_equal_transformers_llama3_scaling(tmp_path):
    """A Llama-3.1-style GGUF: llama.cpp's converter writes the llama3 rope_scaling as per-dimension
    factors (``rope_freqs.weight``: unscaled / scaled inverse frequency). The tiny HF Llama with llama3
    scaling, written as such a GGUF (q/k rows permuted as llama.cpp does), scores as transformers
    scores the HF model; the same GGUF without rope_freqs does not."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hpcllm.checkpoint.convert import convert
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.model.build import build_model
    from hpcllm.model.decoder import rope_frequencies
    from hpcllm.scoring import score_documents
    from hpcllm.world.comm import LocalComm

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=258, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, intermediate_size=96, max_position_embeddings=64,
                      rope_parameters={**rope, "rope_theta": 500000.0}, tie_word_embeddings=False)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():          # sharp attention, so that positions (and their RoPE) matter
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    factors = (rope_frequencies(16, 500000.0, None) / rope_frequencies(16, 500000.0, rope)).numpy()
    assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).any()  # all 3 bands
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    paths = {}
    for with_freqs in (True, False):
        path = str(tmp_path / f"llama31-{with_freqs}.gguf")
        w = gguf.GGUFWriter(path, "llama")
        for key, val in [("block_count", 2), ("context_length", 64), ("embedding_length", 64),
                         ("feed_forward_length", 96), ("head_count", 4), ("head_count_kv", 2),
                         ("rope_freq_base", 500000.0), ("layer_norm_rms_eps", cfg.rms_norm_eps)]:
            getattr(w, f"add_{key}")(val)
        add_byte_vocab(w, ["<s>", "</s>"], pre="llama-bpe", eos=257)
        w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
        w.add_tensor("output.weight", sd["lm_head.weight"])
        w.add_tensor("output_norm.weight", sd["model.norm.weight"] + 0.1)
        if with_freqs:
            w.add_tensor("rope_freqs.weight", factors.astype(np.float32))
        for i in range(2):
            for src, dst in names.items():
                t = sd[f"model.layers.{i}.{src}.weight"]
                if dst in ("attn_q", "attn_k"):
                    t = llama_cpp_permute(t, 4 if dst == "attn_q" else 2)
                w.add_tensor(f"blk.{i}.{dst}.weight", np.ascontiguousarray(t))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths[with_freqs] = path
    with torch.no_grad():
        hf.model.norm.weight.add_(0.1)
    docs = [np.random.default_rng(5).integers(0, 258, size=n) for n in (40, 64)]
    refs = np.concatenate([hf_logprobs(hf, ids, 64, 32) for ids in docs])
    got = {}
    for with_freqs, path in paths.items():
        convert(path, str(tmp_path / f"{with_freqs}.h5"))
        with Checkpoint(str(tmp_path / f"{with_freqs}.h5")) as ck:
            kind = (ck.config["rope_scaling"] or {}).get("rope_type")
            assert kind == ("freq_factors" if with_freqs else None)
            got[with_freqs] = np.concatenate(score_documents(build_model(ck, 0, 1, LocalComm()), docs, 64, 32))
    np.testing.assert_allclose(got[True], refs, atol=1e-4, rtol=0)
    assert np.abs(got[False] - refs).max() > 1e-2
