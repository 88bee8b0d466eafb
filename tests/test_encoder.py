"""The BERT encoder against HF transformers, single rank and tensor parallel."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import MPI_TIMEOUT, REPO
from hpcllm.model.partition import Partition

SCRIPT = os.path.join(REPO, "tests", "mpi_scripts", "encoder_forward.py")


@pytest.mark.parametrize("n_heads,n_kv,tp", [(12, 12, 5), (9, 3, 2), (9, 3, 4), (9, 3, 9), (8, 2, 3), (5, 5, 4), (4, 1, 3)])
def test_partition_covers_every_head_once(n_heads, n_kv, tp):
    parts = [Partition(r, tp, n_heads, n_kv, 8, 100, 1000) for r in range(tp)]
    heads = [h for p in parts for h in range(*p.q_heads)]
    assert heads == list(range(n_heads))
    group = n_heads // n_kv
    for p in parts:
        k0, k1 = p.kv_heads
        q0, q1 = p.q_heads
        assert q1 > q0, "every rank owns at least one query head"
        # the rank's KV heads are exactly those its query heads use
        assert (k0, k1) == (q0 // group, (q1 - 1) // group + 1)
    ffn = [i for p in parts for i in range(*p.range("ffn"))]
    vocab = [i for p in parts for i in range(*p.range("vocab"))]
    assert ffn == list(range(100)) and vocab == list(range(1000))


def test_tp_larger_than_heads_is_refused():
    from hpcllm.errors import HpcllmError

    with pytest.raises(HpcllmError, match="exceeds the model's 4 attention heads"):
        Partition(0, 5, 4, 4, 8, 16, 100)


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir, tiny_bert_h5):
    """Random inputs and HF's mean-pooled outputs for the tiny BERT."""
    from transformers import BertModel

    d = tiny_bert_dir.parent
    model = BertModel.from_pretrained(tiny_bert_dir, add_pooling_layer=False).eval()
    rng = np.random.default_rng(0)
    lens = rng.integers(2, 40, size=7)
    ids = np.zeros((7, 40), np.int64)
    mask = np.zeros((7, 40), np.int64)
    for i, n in enumerate(lens):
        ids[i, :n] = rng.integers(1, 30522, size=n)
        mask[i, :n] = 1
    np.savez(d / "in.npz", ids=ids, mask=mask)
    with torch.no_grad():
        h = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    m = torch.from_numpy(mask).unsqueeze(-1).float()
    ref = ((h * m).sum(1) / m.sum(1)).numpy()
    return d, ref


@pytest.mark.parametrize("tp,backend", [(1, "mpi"), (2, "mpi"), (3, "mpi"), (4, "mpi"), (3, "torch"), (5, "mpi")])
def test_tiny_bert_matches_transformers(tiny_bert, tp, backend):
    d, ref = tiny_bert
    out = d / f"out-{tp}-{backend}.npz"
    subprocess.run(["mpiexec", "-n", str(tp), sys.executable, SCRIPT, d / "tiny.h5", d / "in.npz", out, backend],
                   check=True, timeout=MPI_TIMEOUT, env=dict(os.environ, MPIEXEC_TIMEOUT=str(MPI_TIMEOUT)))
    res = np.load(out)
    np.testing.assert_allclose(res["out"], ref, atol=2e-5, rtol=1e-4)
    # vocab-parallel embedding: 1 all-reduce, then exactly 2 per layer
    assert int(res["comm_calls"]) == (0 if tp == 1 else 1 + 2 * 2)


def test_checkpoint_records_splits(tiny_bert):
    import h5py

    d, _ = tiny_bert
    with h5py.File(d / "tiny.h5") as f:
        assert f.attrs["architecture"] == "bert"
        cfg = json.loads(f.attrs["config"])
        assert (cfg["n_heads"], cfg["hidden"], cfg["pooling"], cfg["normalize"]) == (5, 60, "mean", False)
        assert f["tensors/layers.0.q.weight"].attrs["split"] == "col"
        assert f["tensors/layers.0.o.weight"].attrs["split"] == "row"
        assert f["tensors/embed.tokens.weight"].attrs["split"] == "vocab"
        assert f["tensors/layers.1.attn_norm.weight"].attrs["split"] == "replicate"
        assert f["tensors/layers.0.q.weight"].shape == (60, 60)
