"""SmolLM2-135M (GGUF, Q4_1) scored by hpcllm against HF transformers loading
the same GGUF itself: fp32 per-token log-probabilities over 200 real documents
of mixed length plus one document longer than the window (sliding window,
HF reference computed the same way), at (dp, tp) = (1,1), (2,1), (1,2), (1,3),
(1,4) with both comm backends; and per-rank memory falling with tp.

Documents are cut to 4..12 tokens so that the eight full passes of the 135M
model fit the CI budget of two shared cores (HPCLLM_TEST_SCORE_MAX_TOKENS
raises the cap).
"""

import os

import numpy as np
import pytest
import torch

from conftest import REPO, mpirun
from corpora import mixed
from test_decoder import hf_logprobs

SCRIPT = os.path.join(REPO, "tests", "mpi_scripts", "score_docs.py")
N_DOCS = 200
MAX_TOKENS = int(os.environ.get("HPCLLM_TEST_SCORE_MAX_TOKENS", "12"))
LONG_TOKENS, WINDOW, STRIDE = 160, 64, 32
WEIGHTS_MB = 135e6 * 4 / 2**20  # fp32 weights of SmolLM2-135M


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smol_hf):
    """Token ids (HF's GGUF tokenizer) and HF's per-token log-probabilities, computed once, saved to .npz."""
    tok, hf = smol_hf
    texts = mixed(N_DOCS + 40)
    docs = [np.array(tok(t, add_special_tokens=False)["input_ids"][:4 + (i * 7) % (MAX_TOKENS - 3)], np.int64)
            for i, t in enumerate(texts[:N_DOCS])]
    long = np.concatenate([tok(t, add_special_tokens=False)["input_ids"] for t in texts[N_DOCS:]])[:LONG_TOKENS]
    assert len(long) == LONG_TOKENS
    docs.append(long.astype(np.int64))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = [hf_logprobs(hf, ids, WINDOW, STRIDE) for ids in docs]
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    np.savez(path, ids=np.concatenate(docs), offsets=np.cumsum([0] + [len(d) for d in docs]),
             lp=np.concatenate(ref), lp_offsets=np.cumsum([0] + [len(r) for r in ref]))
    return path


_RUNS = {}


def run(smol_h5, reference, tmp_path_factory, dp, tp, comms):
    """Outputs of score_docs.py at (dp, tp), run once per module."""
    key = (dp, tp, comms)
    if key not in _RUNS:
        out = tmp_path_factory.mktemp(f"dp{dp}tp{tp}") / "out.npz"
        mpirun(dp * tp, [SCRIPT, smol_h5, reference, out, tp, comms, WINDOW, STRIDE],
               python_module="mpi4py", timeout=400)
        _RUNS[key] = dict(np.load(out))
    return _RUNS[key]


@pytest.mark.parametrize("dp,tp,comms", [(1, 1, "mpi"), (2, 1, "torch"), (1, 2, "mpi,torch"),
                                         (1, 3, "mpi,torch"), (1, 4, "mpi,torch")])
def test_smollm2_matches_transformers(smol_h5, reference, tmp_path_factory, dp, tp, comms):
    ref = np.load(reference)
    got = run(smol_h5, reference, tmp_path_factory, dp, tp, comms)
    np.testing.assert_array_equal(got["lp_offsets"], ref["lp_offsets"])
    assert len(ref["lp_offsets"]) - 1 == N_DOCS + 1
    long = slice(ref["lp_offsets"][-2], ref["lp_offsets"][-1])
    assert long.stop - long.start == LONG_TOKENS - 1  # every token but the first, once
    for comm in comms.split(","):
        lp = got[f"lp0_{comm}"]
        diff = np.abs(lp - ref["lp"])
        print(f"dp={dp} tp={tp} {comm}: {len(lp)} tokens, max |logprob diff| vs HF {diff.max():.2e}")
        assert diff.max() <= 1e-3, f"{comm}: max |diff| {diff.max()} at token {diff.argmax()}"
        assert np.abs(lp[long] - ref["lp"][long]).max() <= 1e-3
        assert np.all(lp < 0) and np.all(np.isfinite(lp))


def test_memory_per_rank_falls_with_tp(smol_h5, reference, tmp_path_factory):
    rss = {tp: run(smol_h5, reference, tmp_path_factory, 1, tp, "mpi" if tp == 1 else "mpi,torch")["rss_mb0_mpi"]
           for tp in (1, 2, 3)}
    print("peak RSS per rank after loading SmolLM2 fp32 (MB):", {tp: np.round(r).tolist() for tp, r in rss.items()})
    # the split weights are ~1/tp: tp=2 saves ~W/2 per rank, tp=3 ~2W/3 (the norms are replicated)
    assert rss[2].max() < rss[1][0] - 0.35 * WEIGHTS_MB
    assert rss[3].max() < rss[1][0] - 0.5 * WEIGHTS_MB


def test_score_job_end_to_end(smol_h5, smol_hf, tmp_path):
    """`mpiexec -n 2 hpcllm score --tp 2 --token-logprobs` on real text with bad lines and a long document:
    one row per input line, statuses, and values equal to scoring HF-tokenized ids directly at tp=1."""
    import h5py

    from conftest import write_jsonl
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.world.comm import LocalComm
    from hpcllm.model.build import build_model
    from hpcllm.scoring import score_documents

    texts = [t[:80] for t in mixed(12)] + [""] + [" ".join(mixed(60)[12:])[:900]]
    path = write_jsonl(tmp_path / "in.jsonl", texts)
    with open(path, "a") as f:
        f.write("{not json\n")
    window, stride = 64, 24
    mpirun(2, ["score", "--model", smol_h5, "--input", path, "--output", tmp_path / "out", "--tp", 2,
               "--token-logprobs", "--max-length", window, "--stride", stride, "--shard-docs", 5], timeout=400)
    with h5py.File(tmp_path / "out" / "results.h5") as f:
        status, n_scored, total = f["status"][:], f["n_scored"][:], f["logprob_sum"][:]
        ppl, flat, offsets = f["perplexity"][:], f["token_logprobs"][:], f["token_offsets"][:]
        token_lp = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        assert len(offsets) == len(ppl) + 1 and offsets[-1] == len(flat)
    assert status.tolist() == [0] * 12 + [2, 0, 3]  # ok, empty, ok, bad JSON
    ids = [np.array(smol_hf[0](t)["input_ids"], np.int64) for t in texts]
    assert len(ids[-1]) > 3 * window  # several windows
    torch.set_num_threads(1)
    with Checkpoint(smol_h5) as ck:
        ref = score_documents(build_model(ck, 0, 1, LocalComm()), ids, window, stride)
    for i, lp in enumerate(ref):
        assert n_scored[i] == len(lp) == max(len(ids[i]) - 1, 0)
        # two fp32 runs (tp 2 and 1): each within ~6e-5 of a float64 forward here
        np.testing.assert_allclose(token_lp[i], lp, atol=2e-4, rtol=0)
        np.testing.assert_allclose(total[i], token_lp[i].sum(dtype=np.float64), rtol=1e-9)
        if len(lp):
            np.testing.assert_allclose(ppl[i], np.exp(-total[i] / n_scored[i]), rtol=1e-9)
    assert np.isnan(ppl[12]) and n_scored[12] == 0
    assert np.isnan(total[14]) and n_scored[14] == -1 and len(token_lp[14]) == 0


def test_score_from_token_shards_equals_raw(smol_h5, tmp_path):
    """`hpcllm tokenize` with the model's tokenizer, then `score` from the token shards: the same rows,
    statuses and log-probabilities as scoring the raw JSONL (sliding windows included)."""
    import h5py

    from conftest import write_jsonl

    texts = [t[:120] for t in mixed(10)] + [""] + [" ".join(mixed(40)[10:])[:600]]
    path = write_jsonl(tmp_path / "in.jsonl", texts)
    with open(path, "a") as f:
        f.write("{not json\n")
    mpirun(2, ["tokenize", "--model", smol_h5, "--input", path, "--output", tmp_path / "tok", "--shard-docs", 4,
               "--progress", 0])
    common = ["score", "--model", smol_h5, "--token-logprobs", "--max-length", 64, "--stride", 24, "--progress", 0]
    mpirun(2, common + ["--input", path, "--output", tmp_path / "raw"], timeout=400)
    mpirun(2, common + ["--input", tmp_path / "tok", "--output", tmp_path / "fromtok"], timeout=400)
    cols = ("status", "n_tokens", "n_scored", "logprob_sum", "perplexity", "token_logprobs", "token_offsets",
            "doc_id", "line")
    with h5py.File(tmp_path / "raw" / "results.h5") as a, h5py.File(tmp_path / "fromtok" / "results.h5") as b:
        raw, tok = ({k: f[k][:] for k in cols} for f in (a, b))
    assert raw["status"].tolist() == [0] * 10 + [2, 0, 3]
    for k in ("status", "n_tokens", "n_scored", "doc_id", "line"):
        np.testing.assert_array_equal(tok[k], raw[k], err_msg=k)
    assert raw["n_scored"][11] > 64  # the long document went through several windows
    ok = raw["n_scored"] > 0
    np.testing.assert_allclose(tok["logprob_sum"][ok], raw["logprob_sum"][ok], rtol=1e-5)
    np.testing.assert_allclose(tok["perplexity"][ok], raw["perplexity"][ok], rtol=1e-5)
    np.testing.assert_array_equal(tok["token_offsets"], raw["token_offsets"])
    np.testing.assert_allclose(tok["token_logprobs"], raw["token_logprobs"], atol=1e-4, rtol=0)


def test_windows_are_packed_without_padding(tiny_llama_h5):
    """A batch's windows of mixed lengths reach the projections and the MLP as one run of their real tokens,
    and each document's log-probabilities equal those of its windows scored one at a time."""
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.model.build import build_model
    from hpcllm.scoring import join_windows, score_documents, score_windows, window_pieces
    from hpcllm.world.comm import LocalComm

    with Checkpoint(tiny_llama_h5) as ck:
        model = build_model(ck, 0, 1, LocalComm())
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 49152, n) for n in (150, 64, 63, 58, 40, 37, 20, 9, 2, 1)]
    pieces = window_pieces([len(d) for d in docs], 64, 32)
    seen = []
    hook = model.layers[0].mlp.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    packed = score_documents(model, docs, 64, 32, batch_tokens=4096)
    hook.remove()
    assert seen == [(1, int((pieces[:, 2] - pieces[:, 1]).sum()), model.cfg["hidden"])]
    alone = join_windows(pieces, [score_windows(model, docs, p[None])[0] for p in pieces], len(docs))
    for d, a, b in zip(docs, packed, alone):
        assert a.shape == b.shape == (max(len(d) - 1, 0),)
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
