"""Mixture-of-experts decoders against HF transformers on tiny random models: Mixtral (softmax,
top-2, renormalised), Qwen2-MoE (shared expert with its sigmoid gate, top-k not renormalised, a
dense layer from decoder_sparse_step, q/k/v bias), Qwen3-MoE (renormalised, per-head q/k norms),
OLMoE (q/k norms over whole projections, across the tp group); odd head counts, 4 and 5 experts
(uneven over tp 3), per-token log-probs at tp 1, 2, 3 over MPI and torch.distributed, greedy
generate, GGUF ``*_exps`` imports (qwen2moe, qwen3moe) against transformers loading the file,
resident expert bytes per rank, the per-expert load counters."""


import json
import os

import numpy as np
import pytest
import torch

from conftest import mpirun
from hpcllm.checkpoint.hdf5 import Checkpoint
from hpcllm.model.build import build_model
from hpcllm.scoring import score_documents
from hpcllm.world.comm import LocalComm
from test_decoder import SCRIPT, _docs, hf_logprobs, smol_tokenizer_json  # noqa: F401  (fixture)
from test_generate_engine import _engine, _hf_greedy, _prompts
from test_gguf import add_byte_vocab

ATOL = 1e-4


def _tiny_moe_models():
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(vocab_size=320, max_position_embeddings=64, num_experts_per_tok=2)
    return {
        # 5 heads / 1 KV head, 5 experts (tp 3: 2 + 2 + 1 whole experts, or 1/3 of each one's 26 columns)
        "mixtral": MixtralConfig(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, intermediate_size=26,
                                 num_local_experts=5, num_hidden_layers=3, tie_word_embeddings=False, **common),
        # 6 heads / 3 KV heads with q/k/v bias, 4 experts + a shared expert (sigmoid gate), layer 1 dense
        # (decoder_sparse_step 2... via mlp_only_layers), top-k weights not renormalised
        "qwen2_moe": Qwen2MoeConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=50,
                                    moe_intermediate_size=22, shared_expert_intermediate_size=34, num_experts=4,
                                    num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=False,
                                    tie_word_embeddings=False, **common),
        # 9 heads / 3 KV heads of head_dim 12 (!= 40 / 9), per-head q/k norms, 5 experts, renormalised, tied
        "qwen3_moe": Qwen3MoeConfig(hidden_size=40, num_attention_heads=9, num_key_value_heads=3, head_dim=12,
                                    intermediate_size=44, moe_intermediate_size=20, num_experts=5, num_hidden_layers=2,
                                    norm_topk_prob=True, tie_word_embeddings=True, **common),
        # 5 heads (MHA), q/k norms over the whole projections, 4 experts
        "olmoe": OlmoeConfig(hidden_size=40, num_attention_heads=5, num_key_value_heads=5, intermediate_size=24,
                             num_experts=4, num_hidden_layers=2, norm_topk_prob=False, pad_token_id=0,
                             eos_token_id=2, bos_token_id=1, **common),
    }


FAMILIES = list(_tiny_moe_models())


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory, smol_tokenizer_json):  # noqa: F811
    """name -> (HF model, hpcllm checkpoint path) for each tiny random MoE model."""
    from transformers import AutoModelForCausalLM

    from hpcllm.checkpoint.convert import convert

    out = {}
    for i, (name, cfg) in enumerate(_tiny_moe_models().items()):
        torch.manual_seed(100 + i)
        d = tmp_path_factory.mktemp(name)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # norms at 1 and biases at 0 matter less: move them; routers sharper
            for n, p in model.named_parameters():
                if n.endswith("bias") or "norm" in n:
                    p.add_(torch.randn_like(p) * 0.2)
                if n.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
                    p.mul_(20.0)
        model.save_pretrained(d)
        (d / "tokenizer.json").write_text(smol_tokenizer_json, encoding="utf-8")
        h5 = str(d / "model.h5")
        convert(str(d), h5)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, experts_implementation="eager").eval()
        out[name] = (hf, h5)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_moe_tp1_matches_transformers(tiny_moe, name):
    hf, h5 = tiny_moe[name]
    with Checkpoint(h5) as ck:
        model = build_model(ck, 0, 1, LocalComm())
    docs = _docs()
    ours = score_documents(model, docs, 64, 32, batch_tokens=256)
    refs = [hf_logprobs(hf, ids, 64, 32) for ids in docs]
    assert np.std(np.concatenate(refs)) > 0.1
    for lp, ref in zip(ours, refs):
        np.testing.assert_allclose(lp, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tp", [2, 3])
def test_tiny_moe_tensor_parallel_matches_transformers(tiny_moe, tmp_path, tp):
    """Every family at tp 2 and 3 (5 experts over 3 ranks; OLMoE's projection norms summed across
    ranks; Qwen2-MoE's shared expert in the same all-reduce), both comm backends, within 1e-4 of
    transformers; every tp rank of a group gives identical numbers (score_docs.py checks)."""
    docs = _docs(seed=tp)
    np.savez(tmp_path / "in.npz", ids=np.concatenate(docs), offsets=np.cumsum([0] + [len(d) for d in docs]))
    ckpts = ",".join(tiny_moe[n][1] for n in FAMILIES)
    mpirun(tp, [SCRIPT, ckpts, tmp_path / "in.npz", tmp_path / "out.npz", tp, "mpi,torch", 64, 32],
           python_module="mpi4py", timeout=240)
    got = np.load(tmp_path / "out.npz")
    for k, name in enumerate(FAMILIES):
        ref = np.concatenate([hf_logprobs(tiny_moe[name][0], ids, 64, 32) for ids in docs])
        for comm in ("mpi", "torch"):
            np.testing.assert_allclose(got[f"lp{k}_{comm}"], ref, atol=ATOL, rtol=0, err_msg=f"{name} {comm}")


# transformers' GGUF loader keeps Qwen-MoE's default expert sizes (it reads no expert_feed_forward_length)
GGUF_MOE = {"qwen2moe": dict(expert_ffn=1408, shared_ffn=5632, heads=4, kv=2, head_dim=8, qkv_bias=True),
            "qwen3moe": dict(expert_ffn=768, shared_ffn=0, heads=3, kv=1, head_dim=16, qkv_bias=False)}


def _write_moe_gguf(path, arch, n_experts=4, hidden=32, n_layers=2):
    """A tiny GGUF with llama.cpp's MoE names: ffn_gate_inp (router), ffn_{gate,up,down}_exps stacked
    [E, ...], and qwen2moe's shared expert (ffn_*_shexp, its gate ffn_gate_inp_shexp stored [hidden])."""
    import gguf


    T, p = gguf.GGMLQuantizationType, GGUF_MOE[arch]
    rng = np.random.default_rng(5)
    w = gguf.GGUFWriter(path, arch)
    for key, val in [("block_count", n_layers), ("context_length", 64), ("embedding_length", hidden),
                     ("feed_forward_length", 64), ("head_count", p["heads"]), ("head_count_kv", p["kv"]),
                     ("rope_freq_base", 1e6), ("layer_norm_rms_eps", 1e-6), ("expert_count", n_experts),
                     ("expert_used_count", 2), ("expert_feed_forward_length", p["expert_ffn"])]:
        getattr(w, f"add_{key}")(val)
    if arch == "qwen3moe":
        w.add_key_length(p["head_dim"])
        w.add_value_length(p["head_dim"])
    if p["shared_ffn"]:
        w.add_expert_shared_feed_forward_length(p["shared_ffn"])
    tokens = add_byte_vocab(w, ["<|endoftext|>"], pre="qwen2", eos=256, add_bos=False)

    def weight(*shape, scale=0.1):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    q, kv, ffn, sffn = p["heads"] * p["head_dim"], p["kv"] * p["head_dim"], p["expert_ffn"], p["shared_ffn"]
    w.add_tensor("token_embd.weight", weight(len(tokens), hidden, scale=1.0))
    w.add_tensor("output.weight", weight(len(tokens), hidden))
    w.add_tensor("output_norm.weight", 1 + weight(hidden, scale=0.2))
    for i in range(n_layers):
        tensors = {"attn_q": weight(q, hidden), "attn_k": weight(kv, hidden), "attn_v": weight(kv, hidden),
                   "attn_output": weight(hidden, q), "attn_norm": 1 + weight(hidden, scale=0.2),
                   "ffn_norm": 1 + weight(hidden, scale=0.2), "ffn_gate_inp": weight(n_experts, hidden, scale=2.0),
                   "ffn_down_exps": weight(n_experts, hidden, ffn, scale=0.05)}
        w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", gguf.quants.quantize(weight(n_experts, ffn, hidden), T.Q8_0),
                     raw_dtype=T.Q8_0)
        tensors["ffn_up_exps"] = weight(n_experts, ffn, hidden).astype(np.float16)
        if p["qkv_bias"]:
            tensors.update({"attn_q.bias": weight(q), "attn_k.bias": weight(kv), "attn_v.bias": weight(kv)})
        if arch == "qwen3moe":
            tensors.update({"attn_q_norm": 1 + weight(p["head_dim"], scale=0.2),
                            "attn_k_norm": 1 + weight(p["head_dim"], scale=0.2)})
        if sffn:
            tensors.update({"ffn_gate_shexp": weight(sffn, hidden), "ffn_up_shexp": weight(sffn, hidden),
                            "ffn_down_shexp": weight(hidden, sffn, scale=0.02), "ffn_gate_inp_shexp": weight(hidden)})
        for name, t in tensors.items():
            w.add_tensor(f"blk.{i}.{name}" + ("" if name.endswith(".bias") else ".weight"), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", list(GGUF_MOE))
def test_moe_gguf_matches_transformers(arch, tmp_path):
    from test_gguf import gguf_matches_transformers

    path = str(tmp_path / f"tiny-{arch}.gguf")
    _write_moe_gguf(path, arch)
    p = GGUF_MOE[arch]

    def check(c, hf):
        m = c["moe"]
        assert (m["n_experts"], m["top_k"], m["expert_ffn"], m["shared_ffn"]) == (4, 2, p["expert_ffn"], p["shared_ffn"])
        assert m["shared_gate"] == bool(p["shared_ffn"]) and m["norm_topk"] == (arch == "qwen3moe")
        assert hf.config.norm_topk_prob == m["norm_topk"] and m["dense_layers"] == []
        assert c["qkv_bias"] == p["qkv_bias"] and c["qk_norm"] == (arch == "qwen3moe")
    gguf_matches_transformers(path, tmp_path, check)


@pytest.mark.parametrize("name", FAMILIES)
def test_moe_greedy_equals_transformers_generate(tiny_moe, name):
    """The generation engine (chunked prefill, slots reused, decode batches of several sequences)
    gives transformers' greedy ids."""
    hf, h5 = tiny_moe[name]
    with Checkpoint(h5) as ck:
        model = build_model(ck, 0, 1, LocalComm())
    prompts = _prompts(1)
    eng = _engine(model, prompts, n_slots=3, batch_tokens=16)
    for j, p in enumerate(prompts):
        assert eng.results[j, 0][0] == _hf_greedy(hf, p, 10), (name, j)


class _Group(LocalComm):   # shapes only: no collective runs while building
    def __init__(self, size):
        self.size = size


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_resident_expert_weights_are_split(tiny_moe, name):
    """Whole experts per rank: Mixtral's 5 over tp 2 = 3 + 2, over tp 3 = 2 + 2 + 1, each rank holding
    only its experts' bytes (ceil(E / tp) / E at most, all ranks together the whole); Qwen2-MoE's
    shared expert split 1/tp by columns; the router replicated."""
    from hpcllm.model.moe import MoE, expert_bytes
    from hpcllm.model.partition import even_split

    with Checkpoint(tiny_moe[name][1]) as ck:
        n = ck.config["moe"]["n_experts"]
        whole = expert_bytes(build_model(ck, 0, 1, LocalComm()))
        for tp in (2, 3):
            ranks = [build_model(ck, r, tp, _Group(tp)) for r in range(tp)]
            sizes = [expert_bytes(m) for m in ranks]
            counts = [len(m.layers[0].mlp.experts) for m in ranks]
            assert counts == [b - a for a, b in (even_split(n, tp, r) for r in range(tp))]
            assert sum(sizes) == whole and max(sizes) <= whole * -(-n // tp) / n
            moe = [m.layers[0].mlp for m in ranks]
            assert all(isinstance(m, MoE) and m.router.weight.shape == (n, ck.config["hidden"]) for m in moe)
            assert [m.first for m in moe] == list(np.cumsum([0] + counts[:-1]))
            print(f"{name} tp={tp}: expert bytes per rank {sizes} of {whole} ({[round(s / whole, 3) for s in sizes]})")


def test_expert_load_counts_every_routed_token(tiny_moe):
    """Each MoE layer counts top_k assignments per token it ran (padding included); a rank's load is
    the part on its own experts."""
    from hpcllm.model.moe import expert_load, group_loads, rank_load

    with Checkpoint(tiny_moe["qwen2_moe"][1]) as ck:
        model = build_model(ck, 0, 1, LocalComm())
        rank1 = build_model(ck, 1, 2, _Group(2))
    x = torch.as_tensor(np.random.default_rng(0).integers(0, 320, (3, 11)))
    model(x)
    load = expert_load(model)
    assert load.shape == (2, 4) and (load.sum(axis=1) == 3 * 11 * 2).all()   # layer 1 is dense
    assert rank_load(model) == load.sum() and rank_load(rank1) == 0
    assert group_loads(model, 3) == [load[:, :2].sum(), load[:, 2].sum(), load[:, 3].sum()]


def test_score_job_reports_the_expert_load_per_rank(tiny_moe, tmp_path):
    """`hpcllm score` at tp 2 on Mixtral's 5 experts (3 + 2 per rank): each rank's row of the timings
    in results.h5 (and the time table on stderr) carries the load its own experts computed; the two
    add up to top_k assignments per forwarded token and layer (padding included)."""
    import h5py

    from conftest import mpirun, write_jsonl

    texts = ["the quick brown fox jumps over the lazy dog " * k for k in (1, 2, 3, 5)]
    inp = write_jsonl(tmp_path / "in.jsonl", texts)
    proc = mpirun(2, ["score", "--model", tiny_moe["mixtral"][1], "--input", inp, "--output", tmp_path / "out",
                      "--tp", 2, "--progress", 0])
    with h5py.File(tmp_path / "out" / "results.h5", "r") as f:
        rows = json.loads(f.attrs["timings"])
        n_tokens = int(f["n_tokens"][()].sum())
    with Checkpoint(tiny_moe["mixtral"][1]) as ck:
        top_k, layers = ck.config["moe"]["top_k"], ck.config["n_layers"]
    load = [r["expert_tokens"] for r in sorted(rows, key=lambda r: r["tp_rank"])]
    assert all(n > 0 for n in load) and sum(load) >= top_k * layers * n_tokens
    assert "expert load" in proc.stderr


def test_bfloat16_scores_match_float32(tiny_moe):
    """Mixtral's experts in bf16 (router, grouped tokens, packed expert weights): near fp32's."""
    from hpcllm.scoring import score_documents

    docs = [np.random.default_rng(1).integers(0, 320, n) for n in (5, 30, 60)]
    with Checkpoint(tiny_moe["mixtral"][1]) as ck:
        ref = np.concatenate(score_documents(build_model(ck, 0, 1, LocalComm(), torch.float32), docs, 64, 32))
        got = np.concatenate(score_documents(build_model(ck, 0, 1, LocalComm(), torch.bfloat16), docs, 64, 32))
    assert np.abs(got - ref).max() < 0.1 and abs(got.mean() - ref.mean()) < 0.01 and np.abs(got - ref).max() > 0


def test_mixtral_gguf_equals_the_hf_model(tiny_moe, tmp_path):
    """llama.cpp writes Mixtral as a "llama" GGUF with experts (ffn_gate_inp, ffn_*_exps; q/k rows
    permuted): imported as Mixtral (softmax, top 2, renormalised), it scores as transformers scores
    the HF model it was written from (transformers' GGUF loader reads no Mixtral)."""
    from test_gguf_families import MIXTRAL, write_gguf

    from hpcllm.checkpoint.convert import convert
    from hpcllm.scoring import score_documents

    hf = tiny_moe["mixtral"][0]
    c = hf.config
    path = str(tmp_path / "mixtral.gguf")
    write_gguf(path, "llama", hf, MIXTRAL, [("expert_count", c.num_local_experts),
                                            ("expert_used_count", c.num_experts_per_tok)], rope_theta=c.rope_parameters["rope_theta"])
    convert(path, str(tmp_path / "m.h5"))
    docs = _docs(seed=4)[:6]
    with Checkpoint(str(tmp_path / "m.h5")) as ck:
        assert ck.config["family"] == "mixtral" and ck.config["moe"]["norm_topk"]
        assert (ck.config["moe"]["n_experts"], ck.config["moe"]["top_k"]) == (c.num_local_experts, 2)
        got = np.concatenate(score_documents(build_model(ck, 0, 1, LocalComm()), docs, 64, 32))
    ref = np.concatenate([hf_logprobs(hf, ids, 64, 32) for ids in docs])
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("unit", ["experts", "expert_ffn"])
def test_both_expert_splits_equal_transformers(tiny_moe, tmp_path, monkeypatch, unit):
    """Both ways of splitting experts (MOE_UNIT: whole experts per rank, the default, measured faster by
    bench/moe_split.py; or 1/tp of every expert's columns) give transformers' log-probs at tp 2: two
    ranks as threads summing through a shared buffer, Mixtral's 5 experts 3 + 2 or 13 + 13 columns each."""
    import threading

    from test_generate_engine import _ThreadComm

    from hpcllm.checkpoint.convert import convert
    from hpcllm.model import architectures
    from hpcllm.model.partition import col, row
    from hpcllm.scoring import score_documents

    for w in ("gate", "up", "down"):
        monkeypatch.setitem(architectures.LLAMA_PLAN, f"layers.*.mlp.{w}_exps", (row if w == "down" else col)(unit))
    hf, h5 = tiny_moe["mixtral"]
    convert(os.path.dirname(h5), str(tmp_path / "m.h5"))
    docs = _docs(seed=6)[:6]
    shared = {"barrier": threading.Barrier(2), "slots": [None, None], "largest": 0}
    got, held = [None, None], [None, None]

    def rank(r):
        with Checkpoint(str(tmp_path / "m.h5")) as ck:
            model = build_model(ck, r, 2, _ThreadComm(r, shared))
        held[r] = len(model.layers[0].mlp.experts)
        got[r] = np.concatenate(score_documents(model, docs, 64, 32))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert held == ([3, 2] if unit == "experts" else [5, 5])
    ref = np.concatenate([hf_logprobs(hf, ids, 64, 32) for ids in docs])
    for lp in got:
        np.testing.assert_allclose(lp, ref, atol=1e-4, rtol=0)
