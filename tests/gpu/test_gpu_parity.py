"""The parity checks on a GPU: every tiny decoder family of tests/test_decoder.py (its ``tiny`` fixture,
built from ``_tiny_models``: a family added there is checked here too) and a tiny BERT encoder,
built on ``--device cuda`` over ``--comm torch`` (NCCL) at tp 1 and 2, against transformers in fp32
on the CPU:

* fp32: per-token log-probs within 1e-4 (decoders), embeddings within 1e-4 (encoder);
* bf16: within bf16's rounding of the same fp32 reference (8 bits of mantissa: log-probs within
  0.1, their mean within 0.01; embeddings' cosine > 0.999);
* ``hpcllm generate --device cuda --comm torch`` (greedy, tp 1 and 2) writes the same ids as on the CPU.

tp = 2 over NCCL needs two GPUs (NCCL refuses two ranks on one device); on a one-GPU machine tp = 2
runs over ``--comm mpi`` instead (both ranks on the one GPU, the all-reduces through host memory).

Device: ``HPCLLM_TEST_DEVICE`` (default ``cuda``); without a CUDA device the module is skipped ("no
CUDA device"). ``HPCLLM_TEST_DEVICE=cpu`` runs the same checks on the CPU over gloo (what CI's
CPU tests already cover; a check of this module's own code). ``tests/gpu/run.sh`` runs it on a
lent GPU machine. Tokenizers are made here (byte-level BPE and WordPiece trained by ``tokenizers``
on a few lines): the tests need no model package, which the GPU machine does not have.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: conftest, test_decoder

from conftest import mpirun  # noqa: E402
from hpcllm.checkpoint.hdf5 import Checkpoint  # noqa: E402
from test_decoder import _docs, _tiny_models, hf_logprobs, tiny  # noqa: E402,F401  (tiny: the fixture)

DEVICE = os.environ.get("HPCLLM_TEST_DEVICE", "cuda")
CUDA = DEVICE.startswith("cuda")
GPUS = torch.cuda.device_count() if CUDA else 0
pytestmark = pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="no CUDA device")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parity_ranks.py")
FAMILIES = list(_tiny_models())
# (tp, comm): NCCL at tp 2 only with a GPU per rank
LAYOUTS = [(1, "torch"), (2, "torch" if GPUS >= 2 or not CUDA else "mpi")]
TEXT = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé ✓ 東京, 1 2 3 4", "hello world, hello GPU",
        "def add(a, b):\n    return a + b", "Why is the sky blue?"]


def _train(kind, vocab_size):
    from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer() if kind == "bpe" else BertWordPieceTokenizer()
    tok.train_from_iterator(TEXT * 4, vocab_size=vocab_size, min_frequency=1, show_progress=False)
    return tok._tokenizer.to_str()


@pytest.fixture(scope="module")
def smol_tokenizer_json():
    """Overrides test_decoder's (SmolLM2's, from its 94 MB package) for ``tiny``: a byte-level BPE of
    300 ids, inside every tiny family's vocabulary of 320."""
    return _train("bpe", 300)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(HF BertModel, checkpoint) of a random 2-layer BERT, 5 heads, vocabulary 320, own WordPiece."""
    from transformers import BertConfig, BertModel

    from hpcllm.checkpoint.convert import convert

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpubert")
    cfg = BertConfig(vocab_size=320, hidden_size=60, num_hidden_layers=2, num_attention_heads=5,
                     intermediate_size=90, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(d)
    (d / "tokenizer.json").write_text(_train("wordpiece", 300), encoding="utf-8")
    convert(str(d), str(d / "model.h5"))
    return BertModel.from_pretrained(d, add_pooling_layer=False).eval(), str(d / "model.h5")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny, bert):
    """IN.npz for parity_ranks.py, and the fp32 references: per family its flat log-probs, and the
    encoder's mean-pooled embeddings."""
    d = tmp_path_factory.mktemp("gpuin")
    docs = _docs(seed=3)
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 40, size=7)
    bert_ids = rng.integers(1, 320, size=int(lengths.sum()))
    np.savez(d / "in.npz", ids=np.concatenate(docs), offsets=np.cumsum([0] + [len(x) for x in docs]),
             bert_ids=bert_ids, bert_lengths=lengths)
    refs = {}
    for name in FAMILIES:
        hf, h5 = tiny[name]
        with Checkpoint(h5) as ck:
            window = ck.config["max_positions"]     # a Mistral window caps the context (parity_ranks.py too)
        refs[name] = np.concatenate([hf_logprobs(hf, ids, window, window // 2) for ids in docs])
    ids = np.zeros((len(lengths), lengths.max()), np.int64)
    mask = np.arange(lengths.max())[None] < lengths[:, None]
    ids[mask] = bert_ids
    with torch.no_grad():
        h = bert[0](input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64)))
    m = torch.from_numpy(mask).unsqueeze(-1).float()
    refs["bert"] = ((h.last_hidden_state * m).sum(1) / m.sum(1)).numpy()
    return d / "in.npz", refs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tp,comm", LAYOUTS)
def test_every_family_matches_transformers_on_the_device(tiny, bert, inputs, tmp_path, tp, comm, dtype):
    in_path, refs = inputs
    names = FAMILIES + ["bert"]
    ckpts = [tiny[n][1] for n in FAMILIES] + [bert[1]]
    mpirun(tp, [SCRIPT, DEVICE, comm, dtype, in_path, tmp_path / "out.npz", *ckpts], python_module="mpi4py",
           timeout=300)
    got = np.load(tmp_path / "out.npz")
    for k, name in enumerate(names):
        assert str(got[f"device{k}"]).startswith(DEVICE), (name, str(got[f"device{k}"]))
        out, ref = got[f"out{k}"], refs[name]
        assert out.shape == ref.shape, name
        where = f"{name} tp={tp} {comm} {dtype} on {DEVICE}"
        if dtype == "float32":
            np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0, err_msg=where)
        elif name == "bert":
            cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
            assert cos.min() > 0.999, (where, cos)
        else:
            assert np.abs(out - ref).max() < 0.1 and abs(out.mean() - ref.mean()) < 0.01, where


@pytest.mark.parametrize("tp,comm", LAYOUTS)
def test_greedy_generate_on_the_device_equals_the_cpu(tiny, tmp_path, tp, comm):
    import h5py

    h5 = tiny[FAMILIES[0]][1]
    inp = tmp_path / "p.jsonl"
    inp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXT), encoding="utf-8")
    ids = []
    for device, c in [(DEVICE, comm), ("cpu", "mpi")]:
        out = tmp_path / f"out-{len(ids)}"
        mpirun(tp, ["generate", "--model", h5, "--input", inp, "--output", out, "--tp", tp, "--comm", c,
                    "--device", device, "--temperature", 0, "--max-new-tokens", 8, "--ignore-eos",
                    "--progress", 0], timeout=300)
        with h5py.File(out / "results.h5", "r") as f:
            assert (f["status"][()] == 0).all() and (f["n_generated"][()] == 8).all()
            ids.append(f["output_ids"][()])
    assert np.array_equal(*ids)
