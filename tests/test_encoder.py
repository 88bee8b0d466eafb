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
from hpcllm.world.comm import LocalComm

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


def _tp1_encoder(h5, dtype):
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.model.build import build_model
    from hpcllm.world.comm import LocalComm

    with Checkpoint(h5) as ck:
        return build_model(ck, 0, 1, LocalComm(), dtype)


def _packed_inputs(seed=3):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 40, size=9)
    return torch.from_numpy(rng.integers(1, 30522, size=int(lens.sum()))), torch.from_numpy(lens)


def test_linear_gelu_fallback_equals_fused(monkeypatch):
    """The two-op path (no oneDNN) and oneDNN's fused epilogue compute the same exact GELU."""
    from hpcllm.model import layers

    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 96).requires_grad_(False)
    x = torch.randn(37, 48)
    ref = torch.nn.functional.gelu(x.double() @ lin.weight.double().T + lin.bias.double())
    fused = layers.linear_gelu(x, lin)
    monkeypatch.setattr(layers, "ONEDNN", False)
    fallback = layers.linear_gelu(x, lin)
    np.testing.assert_allclose(fallback.double(), ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(fused.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("onednn", [False, True])
def test_bfloat16_matches_float32(tiny_bert_h5, monkeypatch, onednn):
    """bf16 through the oneDNN linear+GELU when this torch has it, and through the plain fallback always."""
    from hpcllm.model import layers

    if onednn and not (layers.ONEDNN and layers._fused_runs(torch.bfloat16)):
        pytest.skip("this CPU / torch build has no oneDNN bf16 linear+pointwise (needs AVX-512); "
                    "the fallback case still runs, and linear_gelu takes it here")
    monkeypatch.setattr(layers, "ONEDNN", onednn)
    ids, lens = _packed_inputs()
    ref = _tp1_encoder(tiny_bert_h5, torch.float32)(ids, lens).numpy()
    got = _tp1_encoder(tiny_bert_h5, torch.bfloat16)(ids, lens)
    assert got.dtype == torch.float32  # pooled in float32
    assert np.abs(got.numpy() - ref).max() < 0.05 * np.abs(ref).max()  # bf16: ~3 significant digits
    cos = (got.numpy() * ref).sum(1) / np.linalg.norm(got.numpy(), axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999


def test_fallback_path_equals_fused_path_fp32(tiny_bert_h5, monkeypatch):
    from hpcllm.model import layers

    ids, lens = _packed_inputs(seed=4)
    fused = _tp1_encoder(tiny_bert_h5, torch.float32)(ids, lens).numpy()
    monkeypatch.setattr(layers, "ONEDNN", False)
    plain = _tp1_encoder(tiny_bert_h5, torch.float32)(ids, lens).numpy()
    np.testing.assert_allclose(plain, fused, atol=2e-6, rtol=1e-5)


def test_split_attributes_are_checked_on_load(tiny_bert_h5, tmp_path):
    """A checkpoint whose stored split disagrees with the plan is refused, naming the file and the tensor."""
    import shutil

    import h5py

    from hpcllm.errors import HpcllmError

    bad = tmp_path / "resplit.h5"
    shutil.copy(tiny_bert_h5, bad)
    with h5py.File(bad, "r+") as f:
        f["tensors/layers.1.o.weight"].attrs.update({"split": "col", "axis": 0})
    with pytest.raises(HpcllmError) as err:
        _tp1_encoder(str(bad), torch.float32)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and "layers.1.o.weight" in msg and "row/q/1" in msg


def test_plan_makes_the_layers(tiny_bert_h5):
    """parallelize: linears become column / row parallel as the plan says, heads become local (5 heads, tp=2: 3 + 2)."""
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.model.build import build_model
    from hpcllm.model.parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    class TwoRanks(LocalComm):  # the layers' shapes only: no collective runs here
        size = 2

    with Checkpoint(tiny_bert_h5) as ck:
        for rank, heads in [(0, 3), (1, 2)]:
            m = build_model(ck, rank, 2, TwoRanks())
            layer = m.layers[0]
            assert (layer.n_heads, layer.n_kv_heads) == (heads, heads)
            assert isinstance(layer.up, ColumnParallelLinear) and layer.up.weight.shape == (45, 60)
            assert isinstance(layer.o, RowParallelLinear) and layer.o.weight.shape == (60, heads * 12)
            assert isinstance(layer.down, RowParallelLinear) and layer.down.comm is m.comm
            assert layer.qkv.weight.shape == (3 * heads * 12, 60)  # fused after load
            assert isinstance(m.embed.tokens, VocabParallelEmbedding)
            assert m.embed.tokens.start == (0 if rank == 0 else 15261)
            assert not isinstance(m.embed.positions, VocabParallelEmbedding)  # replicated


def test_require_family(tiny_bert_h5):
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.errors import HpcllmError
    from hpcllm.model.architectures import require_family

    with Checkpoint(tiny_bert_h5) as ck:
        assert require_family(ck, "encoder", "embed").name == "bert"
        with pytest.raises(HpcllmError, match=f"^score: {ck.path} is a bert model; score needs a decoder \\(llama\\)$"):
            require_family(ck, "decoder", "score")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (32, 48), (3, 50, 48)])
def test_packed_linear_equals_f_linear(shape, dtype):
    """A weight packed for oneDNN gives F.linear's result (float rounding apart) for any row count and
    for 3-d inputs, with and without bias; bf16 packs only on a CPU with native bf16, and where a
    dtype does not pack, packing is a no-op."""
    from hpcllm.model.layers import _packs, linear, pack_weight

    g = torch.Generator().manual_seed(0)
    w, b, x = (torch.randn(s, generator=g).to(dtype) for s in ((96, 48), (96,), shape))
    packed = pack_weight(w)
    assert packed.is_mkldnn == _packs(dtype)
    if dtype == torch.bfloat16 and _packs(dtype):
        assert torch.ops.mkldnn._is_mkldnn_bf16_supported()
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=1e-2)
    for bias in (None, b):
        want = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
        got = linear(x, packed, bias)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)


def test_built_encoder_holds_packed_weights(tiny_bert_h5):
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.model.build import build_model
    from hpcllm.model.layers import _packs
    from hpcllm.world.comm import LocalComm

    with Checkpoint(tiny_bert_h5) as ck:
        model = build_model(ck, 0, 1, LocalComm())
    layer = model.layers[0]
    assert all(m.weight.is_mkldnn == _packs() for m in (layer.qkv, layer.o, layer.up, layer.down))
