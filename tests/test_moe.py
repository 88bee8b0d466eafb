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
