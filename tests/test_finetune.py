"""`hpcllm train-classifier --finetune`: the encoder trained with its head, data-parallel.

A random 2-layer BERT (tiny_bert_h5) on the six fortune topics of test_classify: the same result at 1 and
2 ranks (and with the embed phase at tp 2), a stopped run resumed bit for bit, the fine-tuned classifier
classifying alike at tp 1 and 2 and equal to its encoder + head computed directly; MiniLM fine-tuned on
the same rows beats the head on frozen MiniLM embeddings.
"""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import MPI_TIMEOUT, REPO, mpirun
from test_classify import read_clf, train_at_layouts
from hpcllm.signals import EXIT_REQUEUE

FT = ["--finetune", 8, "--finetune-batch", 4, "--finetune-lr", 1e-3, "--finetune-head-lr", 1e-2, "--validation", 0.2, "--max-length", 48,
      "--progress", 0]
LAYOUTS = [(1, 1), (2, 1), (2, 2)]   # (world, tp) of the runs; fine-tuning is data-parallel over every rank


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from test_classify import write_corpus

    return write_corpus(tmp_path_factory.mktemp("finetune"))


@pytest.fixture(scope="module")
def tuned(corpus, tiny_bert_h5):
    """{(world, tp): output dir} of train-classifier --finetune at each layout."""
    return train_at_layouts(corpus, tiny_bert_h5, LAYOUTS, "ft", FT)


def tensors(path):
    from hpcllm.checkpoint.hdf5 import Checkpoint

    with Checkpoint(str(path)) as ck:
        return {n: ck.read(n, lambda shape: tuple(slice(None) for _ in shape)) for n in ck.names}


def test_finetuned_encoder_and_head_are_the_same_at_every_world_size(tuned, tiny_bert_h5):
    ref = read_clf(tuned[1, 1])
    tuned_ref, base = tensors(tuned[1, 1] / "encoder.h5"), tensors(tiny_bert_h5)
    ft = ref.provenance["finetune"]
    assert [e["epoch"] for e in ft["history"]] == list(range(1, 9))
    losses = [e["train_loss"] for e in ft["history"]]
    assert losses[-1] < 0.75 * losses[0], losses             # it learned (a random encoder, 144 rows)
    assert ref.encoder.path == os.path.abspath(tuned[1, 1] / "encoder.h5")
    assert sorted(tuned_ref) == sorted(base)
    moved = [n for n in base if not np.array_equal(base[n], tuned_ref[n])]
    assert "embed.tokens.weight" not in moved and len(moved) == len(base) - 1   # all but the frozen one
    shown = subprocess.run([sys.executable, "-m", "hpcllm", "inspect", str(tuned[1, 1] / "classifier.h5")],
                           capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert f"fine-tuned from {os.path.abspath(tiny_bert_h5)}: 8 epochs" in shown, shown
    for layout in LAYOUTS[1:]:
        other = read_clf(tuned[layout])
        hist = other.provenance["finetune"]["history"]
        np.testing.assert_allclose([e["train_loss"] for e in hist], losses, rtol=1e-4)
        assert [e["val_accuracy"] for e in hist] == [e["val_accuracy"] for e in ft["history"]]
        got = tensors(tuned[layout] / "encoder.h5")
        for n in base:
            np.testing.assert_allclose(got[n], tuned_ref[n], atol=2e-4, err_msg=n)
        for (name, a), b in zip(ref.head.state_dict().items(), other.head.state_dict().values()):
            np.testing.assert_allclose(b.numpy(), a.numpy(), atol=2e-4, err_msg=name)


def test_stopped_finetuning_resumes_to_the_same_bits(corpus, tuned, tiny_bert_h5):
    import psutil

    d, path, _ = corpus
    out = d / "ft-stopped"
    cmd = ["mpiexec", "-n", "2", sys.executable, "-m", "hpcllm", "train-classifier", "--model", tiny_bert_h5,
           "--input", path, "--output", str(out), *map(str, FT)]
    env = dict(os.environ, MPIEXEC_TIMEOUT=str(MPI_TIMEOUT))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + MPI_TIMEOUT
        while not (out / "finetune-state.pt").exists():      # written after the first epoch
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if str(out) in " ".join(p.cmdline())
                 and "hpcllm" in p.cmdline()]
        os.kill(ranks[-1].pid, signal.SIGUSR1)
        _, err = proc.communicate(timeout=MPI_TIMEOUT + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_REQUEUE, err[-4000:]
    assert not (out / "classifier.h5").exists()
    import torch

    state = torch.load(out / "finetune-state.pt", weights_only=False)
    assert 1 <= state["epoch"] < 8, state["epoch"]
    rerun = mpirun(2, ["train-classifier", "--model", tiny_bert_h5, "--input", path, "--output", out, *FT])
    assert f"fine-tuning resumes at epoch {state['epoch'] + 1}" in rerun.stderr
    ref = tuned[2, 1]
    for n, a in tensors(ref / "encoder.h5").items():
        assert np.array_equal(tensors(out / "encoder.h5")[n], a), n
    a, b = read_clf(ref), read_clf(out)
    assert a.content_hash == b.content_hash
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in a.provenance["finetune"]["history"]]
    assert [{k: v for k, v in e.items() if k != "seconds"} for e in b.provenance["finetune"]["history"]] == strip


def test_finetuned_classifier_classifies_alike_at_tp_2_and_as_computed_directly(corpus, tuned):
    import torch

    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.model.build import build_model
    from hpcllm.tokenizer import Tokenizer
    from hpcllm.world.comm import LocalComm

    d = corpus[0]
    clf = tuned[1, 1] / "classifier.h5"
    got = {}
    for world, tp in ((1, 1), (2, 2)):
        preds = d / f"ft-preds-{world}-{tp}"
        mpirun(world, ["classify", "--model", clf, "--input", d / "predict.jsonl", "--output", preds, "--tp", tp,
                       "--max-length", 48, "--progress", 0])
        with h5py.File(preds / "results.h5", "r") as f:
            got[world, tp] = f["probs"][()], f["label"][()], f["status"][()]
    p1, labels, status = got[1, 1]
    np.testing.assert_allclose(got[2, 2][0], p1, atol=1e-5)
    assert (got[2, 2][1] == labels).all()
    rows = [line for line in (d / "predict.jsonl").read_text(encoding="utf-8").splitlines()]
    import json

    texts = [json.loads(r)["text"] for r in rows[:10]]
    with Checkpoint(str(tuned[1, 1] / "encoder.h5")) as ck:
        model = build_model(ck, 0, 1, LocalComm())
        tok = Tokenizer.from_str(ck.tokenizer_json, apply_file_settings=False)
        head = read_clf(tuned[1, 1]).head
        for i, t in enumerate(texts):
            ids = np.array(tok.encode(t, max_length=48), np.int64)
            with torch.no_grad():
                p = torch.softmax(head(model(torch.from_numpy(ids), torch.tensor([len(ids)]))), -1).numpy()[0]
            np.testing.assert_allclose(p1[i], p, atol=1e-5)


def test_minilm_gradients_equal_transformers(minilm_h5):
    """The training path (dense weights, packed documents, fused Q|K|V, mean pooling, L2 norm, standardised
    head) against HF's BertModel on the same weights: the same loss and the same gradient for every
    parameter that trains."""
    import torch
    from transformers import AutoModel

    from conftest import minilm_dir
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.checkpoint.hf_bert import _rename
    from hpcllm.model.build import build_model
    from hpcllm.tokenizer import Tokenizer
    from hpcllm.train.finetune import TokenizedRows, encoder_tensors, trainable
    from hpcllm.train.heads import LinearHead
    from hpcllm.world.comm import LocalComm
    from test_classify import topic_rows

    rows = topic_rows()[::37][:6]
    y = torch.tensor([hash(r[2]) % 4 for r in rows])
    torch.manual_seed(0)
    head = LinearHead(384, 4)
    torch.nn.init.normal_(head.linear.weight, std=0.5)
    head.set_standardisation(np.random.default_rng(0).normal(0, 0.01, 384), np.full(384, 0.05))
    with Checkpoint(minilm_h5) as ck:
        model = build_model(ck, 0, 1, LocalComm(), pack=False)
        tok = Tokenizer.from_str(ck.tokenizer_json, apply_file_settings=False)
        docs = TokenizedRows([np.array(tok.encode(r[1], max_length=128), np.int64) for r in rows])
        params = dict(trainable(model, head))
        for p in params.values():
            p.requires_grad_(True)
        members, ids, lengths = next(docs.batches(np.arange(len(rows)), 1 << 30))
        loss = torch.nn.functional.cross_entropy(head(model.encode(ids, lengths)), y[members], reduction="sum")
        loss.backward()
        ours = encoder_tensors(model, ck, {n: p.grad for n, p in params.items() if not n.startswith("head.")})
    hf = AutoModel.from_pretrained(minilm_dir()).eval()       # eval: no dropout, as hpcllm trains
    hf_head = LinearHead(384, 4)
    hf_head.load_state_dict(head.state_dict())
    width = max(len(d) for d in docs.ids)
    input_ids = torch.tensor([list(d) + [0] * (width - len(d)) for d in docs.ids])
    mask = (torch.arange(width)[None] < torch.tensor([len(d) for d in docs.ids])[:, None]).long()
    h = hf(input_ids=input_ids, attention_mask=mask).last_hidden_state
    pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    hf_loss = torch.nn.functional.cross_entropy(hf_head(torch.nn.functional.normalize(pooled, dim=-1)), y,
                                                reduction="sum")
    hf_loss.backward()
    loss, hf_loss = float(loss.detach()), float(hf_loss.detach())
    assert abs(loss - hf_loss) < 1e-4 * hf_loss, (loss, hf_loss)
    compared = 0
    for name, p in hf.named_parameters():
        if "word_embeddings" in name or _rename(name) is None:     # frozen in hpcllm; HF's pooler (unused)
            continue
        got, want = ours[_rename(name)], p.grad.numpy()
        np.testing.assert_allclose(got, want, atol=1e-5 + 1e-3 * np.abs(want).max(), err_msg=name)
        compared += 1
    assert compared == len(ours) - 1, (compared, len(ours))     # every tensor but the token embeddings
    np.testing.assert_allclose(head.linear.weight.grad.numpy(), hf_head.linear.weight.grad.numpy(), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("bad", [["--finetune", -1], ["--finetune", 2, "--finetune-batch", 0],
                                 ["--finetune", 2, "--finetune-lr", 0]])
def test_bad_finetune_options_are_a_one_line_error_on_every_rank(corpus, tiny_bert_h5, tmp_path, bad):
    proc = mpirun(2, ["train-classifier", "--model", tiny_bert_h5, "--input", corpus[1], "--output", tmp_path / "o",
                      *bad], check=False, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "--finetune" in line and "must be" in line]
    assert len(errors) >= 1 and not (tmp_path / "o" / "classifier.h5").exists(), proc.stderr[-3000:]
