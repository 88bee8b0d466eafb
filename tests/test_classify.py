"""`hpcllm train-classifier` and `hpcllm classify` end to end on real text (fortune files as topics),
HF BertForSequenceClassification against `transformers`, sharded checkpoints, resume and inspect."""

import json
import os
import shutil

import h5py
import numpy as np
import pytest

from conftest import minilm_dir, mpirun
from hpcllm.errors import HpcllmError
from hpcllm.status import Status

FORTUNES = "/usr/share/games/fortunes"
TOPICS = ["computers", "food", "law", "medicine", "sports", "science"]
PER_TOPIC = 30
# trained at these layouts (world, tp); the first is the reference
LAYOUTS = [(1, 1), (2, 2)]   # 2 ranks train with the rows split over both; tp=2 writes a sharded classifier


def topic_rows():
    """(id, text, topic) of the first PER_TOPIC fortunes of each topic file, topic order."""
    rows = []
    for topic in TOPICS:
        with open(os.path.join(FORTUNES, topic), encoding="utf-8", errors="replace") as f:
            chunks = [c.strip("%\n") for c in f.read().split("\n%\n")]
        rows += [(f"{topic}/{i}", c, topic) for i, c in enumerate([c for c in chunks if c][:PER_TOPIC])]
    return rows


SPECIAL = [  # rows that never train: what the job counts as skipped, and their statuses in classify
    ("{not json", Status.BAD_JSON),
    (json.dumps({"id": "u1", "text": "a fortune without a label"}), Status.OK),
    (json.dumps({"id": "u2", "text": "null label", "label": None}), Status.OK),
    (json.dumps({"id": "e1", "text": "", "label": "food"}), Status.EMPTY),
    (json.dumps({"id": "m1", "label": "law"}), Status.MISSING_FIELD),
]
N_PREDICT = 60   # labelled rows classify runs on (plus SPECIAL)
CLASSIFY_LAYOUTS = [(2, 2), (3, 3), (2, 1)]   # (world, tp) classify runs at besides one rank


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """train.jsonl (every topic row, shuffled, then SPECIAL) and predict.jsonl (N_PREDICT of them, then SPECIAL)."""
    return write_corpus(tmp_path_factory.mktemp("classify"))


def write_corpus(d):
    """The corpus fixture's files in the folder ``d``: (d, path of train.jsonl, rows)."""
    missing = [t for t in TOPICS if not os.path.exists(os.path.join(FORTUNES, t))]
    assert not missing, f"{FORTUNES}: no {missing}; install Debian's fortunes package (tests/run.sh does)"
    rows = topic_rows()
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]    # topics interleaved in shards
    lines = [json.dumps({"id": i, "text": t, "label": c}, ensure_ascii=False) for i, t, c in rows]
    special = [line for line, _ in SPECIAL]
    (d / "train.jsonl").write_text("\n".join(lines + special) + "\n", encoding="utf-8")
    (d / "predict.jsonl").write_text("\n".join(lines[:N_PREDICT] + special) + "\n", encoding="utf-8")
    return d, str(d / "train.jsonl"), rows


@pytest.fixture(scope="module")
def trained(corpus, minilm_h5):
    """classifier.h5 trained at every layout of LAYOUTS: {(world, tp): output dir}."""
    return train_at_layouts(corpus, minilm_h5, LAYOUTS, "clf", ["--validation", 0.2, "--max-length", 128,
                                                               "--progress", 0, "--chunk-mb", 0])


def train_at_layouts(corpus, model, layouts, prefix, args):
    """train-classifier on the corpus fixture's train.jsonl at each (world, tp): {(world, tp): output dir}."""
    d, path, _ = corpus
    out = {}
    for world, tp in layouts:
        out[world, tp] = d / f"{prefix}-{world}-{tp}"
        mpirun(world, ["train-classifier", "--model", model, "--input", path, "--output", out[world, tp],
                       "--tp", tp, *args])
    return out


def read_clf(out):
    from hpcllm.train.checkpoint import read_classifier

    return read_classifier(os.path.join(out, "classifier.h5"))


def test_trained_at_every_layout_with_validation_metrics(trained, corpus):
    from hpcllm.train.heads import predict_proba

    _, _, rows = corpus
    ref = read_clf(trained[LAYOUTS[0]])
    assert ref.class_names == sorted(TOPICS)
    p = ref.provenance
    assert p["data"]["skipped"] == {"bad_json": 1, "missing_field": 1, "empty": 1, "unlabelled": 2}
    assert p["data"]["n_train"] + p["data"]["n_validation"] == len(rows)
    val = p["scores"]["validation"]
    assert val["n"] == p["data"]["n_validation"] == round(0.2 * PER_TOPIC) * len(TOPICS)   # stratified
    assert np.array(val["confusion"]).sum() == val["n"] and 0 <= val["macro_f1"] <= 1
    assert val["accuracy"] > 2.5 / len(TOPICS), val          # far above the majority class (1/6)
    X = np.random.default_rng(1).normal(size=(50, 384)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    for layout in LAYOUTS[1:]:
        other = read_clf(trained[layout])
        assert other.provenance["data"]["fingerprint"] == p["data"]["fingerprint"]     # same data, same split
        assert other.provenance["scores"]["validation"]["n"] == val["n"]
        np.testing.assert_allclose(predict_proba(other.head, X), predict_proba(ref.head, X), atol=1e-4)
    print(f"\nfortunes, {len(TOPICS)} topics x {PER_TOPIC}: validation accuracy {val['accuracy']:.3f}, "
          f"macro-F1 {val['macro_f1']:.3f} ({val['n']} rows)")


def test_beats_tfidf_logistic_regression_on_the_same_split(trained, corpus):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from hpcllm.train.labels import encode_labels
    from hpcllm.train.split import validation_mask

    _, _, rows = corpus
    labels = encode_labels([r[2] for r in rows])
    val = validation_mask([r[0] for r in rows], labels.ids, 0.2, seed=0)
    texts = np.array([r[1] for r in rows], dtype=object)
    tfidf = TfidfVectorizer(sublinear_tf=True).fit(texts[~val])
    lr = LogisticRegression(max_iter=2000).fit(tfidf.transform(texts[~val]), labels.ids[~val])
    baseline = float((lr.predict(tfidf.transform(texts[val])) == labels.ids[val]).mean())
    ours = read_clf(trained[LAYOUTS[0]]).provenance["scores"]["validation"]["accuracy"]
    print(f"\nvalidation accuracy: MiniLM + hpcllm head {ours:.3f}, TF-IDF + sklearn LR {baseline:.3f}")
    assert ours > baseline


@pytest.fixture(scope="module")
def classified(trained, corpus):
    """classify with the 1-rank classifier at (world, tp) = (1, 1), (2, 2), (3, 3) and (2, 1) (dp = 2):
    {(world, tp): results}."""
    d = corpus[0]
    path = d / "predict.jsonl"
    clf = os.path.join(trained[LAYOUTS[0]], "classifier.h5")
    out = {}
    for world, tp in [(1, 1)] + CLASSIFY_LAYOUTS:
        preds = d / f"preds-{world}-{tp}"
        mpirun(world, ["classify", "--model", clf, "--input", path, "--output", preds, "--tp", tp, "--progress", 0])
        with h5py.File(preds / "results.h5", "r") as f:
            out[world, tp] = {k: f[k][()] for k in f}, dict(f.attrs), f["probs"].attrs["names"]
    return out


def minilm_embeddings(texts):
    """all-MiniLM-L6-v2 by `transformers` directly: mean pooling over the mask, L2-normalised, 256 tokens."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(minilm_dir()), AutoModel.from_pretrained(minilm_dir()).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_classify_equals_encoder_plus_head_computed_directly(classified, trained, corpus):
    import torch

    rows, n = corpus[2][:N_PREDICT], N_PREDICT
    res, attrs, names = classified[1, 1]
    clf = read_clf(trained[LAYOUTS[0]])
    assert json.loads(names) == json.loads(attrs["class_names"]) == clf.class_names
    assert res["probs"].shape == (n + len(SPECIAL), len(TOPICS)) and res["probs"].dtype == np.float32
    with torch.no_grad():
        direct = torch.softmax(clf.head(minilm_embeddings([r[1] for r in rows])), dim=1).numpy()
    np.testing.assert_allclose(res["probs"][:n], direct, atol=1e-4)
    np.testing.assert_array_equal(res["label_id"][:n], direct.argmax(1))
    labels = [b.decode() if isinstance(b, bytes) else b for b in res["label"]]
    assert labels[:n] == [clf.class_names[i] for i in res["label_id"][:n]]
    np.testing.assert_allclose(res["top_p"][:n], res["probs"][:n].max(1))
    assert list(res["status"][n:]) == [status for _, status in SPECIAL]
    bad = np.array([0, 4]) + n      # the bad line and the row without text: no label, fill values
    assert (res["label_id"][bad] == -1).all() and np.isnan(res["probs"][bad]).all() and np.isnan(res["top_p"][bad]).all()
    assert labels[n] == labels[n + 4] == ""


@pytest.mark.parametrize("world,tp", CLASSIFY_LAYOUTS)
def test_classify_at_other_layouts_equals_one_rank(classified, world, tp):
    """The classifier trained at tp = 1 gives the same labels (probabilities within 1e-5) at tp = 2, 3
    (MiniLM's 12 heads split 6 + 6, 4 + 4 + 4) and at dp = 2."""
    ref, (other, attrs, _) = classified[1, 1][0], classified[world, tp]
    np.testing.assert_array_equal(other["label_id"], ref["label_id"])
    np.testing.assert_array_equal(other["label"], ref["label"])
    np.testing.assert_allclose(other["probs"], ref["probs"], atol=1e-5)
    assert json.loads(attrs["world"])["tp"] == tp and json.loads(attrs["world"])["dp"] == world // tp


def test_embedding_phase_resumes_from_its_shards(trained, corpus, minilm_h5):
    """A run that lost two shards (their chunk files) and its classifier redoes only those, then trains the
    same head (reading the other shards' embeddings from their chunks)."""
    d, path, _ = corpus
    src = trained[LAYOUTS[0]]
    out = d / "resumed"
    shutil.copytree(src, out)
    os.remove(out / "classifier.h5")
    shards = sorted(os.listdir(out / "chunks"))        # --chunk-mb 0: a chunk per shard
    for name in shards[:2]:
        os.remove(out / "chunks" / name)
    proc = mpirun(1, ["train-classifier", "--model", minilm_h5, "--input", path, "--output", out,
                      "--validation", 0.2, "--max-length", 128, "--progress", 0])
    assert f"{len(shards)} shards ({len(shards) - 2} already done)" in proc.stderr + proc.stdout
    a, b = read_clf(src), read_clf(out)
    assert a.content_hash == b.content_hash          # same world size: the same bits


def test_trains_from_token_shards_as_from_text(trained, corpus, minilm_h5, tmp_path):
    """`hpcllm tokenize` first, then train-classifier on the token directory: the labels come from the
    raw lines the shards name, and the classifier equals the one trained on the text."""
    from hpcllm.train.heads import predict_proba

    _, path, _ = corpus
    mpirun(2, ["tokenize", "--model", minilm_h5, "--input", path, "--output", tmp_path / "tok", "--max-length", 128,
               "--shard-docs", 50, "--progress", 0])
    mpirun(1, ["train-classifier", "--model", minilm_h5, "--input", tmp_path / "tok", "--output", tmp_path / "clf",
               "--validation", 0.2, "--max-length", 128, "--progress", 0])
    ref, got = read_clf(trained[LAYOUTS[0]]), read_clf(tmp_path / "clf")
    assert got.class_names == ref.class_names
    assert got.provenance["data"]["skipped"] == ref.provenance["data"]["skipped"]
    assert got.provenance["data"]["fingerprint"] == ref.provenance["data"]["fingerprint"]
    a, b = got.provenance["scores"]["validation"], ref.provenance["scores"]["validation"]
    assert a["confusion"] == b["confusion"] and a["accuracy"] == pytest.approx(b["accuracy"])
    X = np.random.default_rng(2).normal(size=(50, 384)).astype(np.float32)
    np.testing.assert_allclose(predict_proba(got.head, X), predict_proba(ref.head, X), atol=1e-4)


def test_sharded_classifier_missing_or_changed_shard_is_a_one_line_error(trained, tmp_path):
    from hpcllm.inspect import inspect_file
    from hpcllm.train.checkpoint import read_classifier

    src = trained[2, 2]
    assert sorted(os.listdir(src / "classifier.h5.shards")) == ["rank-00000.h5", "rank-00001.h5"]
    text = inspect_file(str(src / "classifier.h5"))
    assert "hpcllm classifier" in text and "2 shard files" in text and "validation: accuracy" in text
    assert all(t in text for t in TOPICS)
    for damage in ("remove", "truncate", "rewrite"):
        out = tmp_path / damage
        shutil.copytree(src, out)
        shard = out / "classifier.h5.shards" / "rank-00001.h5"
        if damage == "remove":
            os.remove(shard)
        elif damage == "truncate":
            os.truncate(shard, os.path.getsize(shard) // 2)
        else:
            shutil.copy(out / "classifier.h5.shards" / "rank-00000.h5", shard)
        with pytest.raises(HpcllmError, match="shard file .*rank-00001.h5") as err:
            read_classifier(str(out / "classifier.h5"))
        assert "\n" not in str(err.value)


def test_sharded_convert_loads_at_every_tp(tiny_bert_dir, tmp_path):
    """`mpiexec -n 3 hpcllm convert`: one file per rank + master; equal hyperslabs at tp 1..4, same hash."""
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.checkpoint.convert import convert
    from hpcllm.model.architectures import plan_for
    from hpcllm.model.partition import partition_for, tensor_split

    plain = str(tmp_path / "plain.h5")
    convert(str(tiny_bert_dir), plain)
    proc = mpirun(3, ["convert", tiny_bert_dir, tmp_path / "sharded.h5"])
    assert "3 shard files" in proc.stdout
    assert len(os.listdir(tmp_path / "sharded.h5.shards")) == 3
    with Checkpoint(plain) as a, Checkpoint(str(tmp_path / "sharded.h5")) as b:
        assert a.content_hash == b.content_hash and a.names == b.names
        assert b.file["tensors/layers.0.q.weight"].is_virtual
        for tp in (1, 2, 3, 4):
            for rank in range(tp):
                part = partition_for(a.config, rank, tp)
                for name in a.names:
                    split = tensor_split(plan_for("bert"), name)
                    cut = lambda shape, s=split: part.slice(s, shape)     # noqa: E731
                    np.testing.assert_array_equal(a.read(name, cut), b.read(name, cut))
    os.remove(tmp_path / "sharded.h5.shards" / "rank-00002.h5")
    with pytest.raises(HpcllmError, match="rank-00002.h5 is missing"):
        Checkpoint(str(tmp_path / "sharded.h5"))


@pytest.fixture(scope="module")
def tiny_seq_cls(tmp_path_factory):
    """A random 2-layer BertForSequenceClassification with 3 named labels, saved by HF."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("seqcls") / "hf"
    cfg = BertConfig(vocab_size=30522, hidden_size=60, num_hidden_layers=2, num_attention_heads=5,
                     intermediate_size=90, max_position_embeddings=64, num_labels=3,
                     id2label={0: "négatif", 1: "neutre", 2: "positif"},
                     label2id={"négatif": 0, "neutre": 1, "positif": 2})
    BertForSequenceClassification(cfg).eval().save_pretrained(d)
    shutil.copy(os.path.join(minilm_dir(), "tokenizer.json"), d / "tokenizer.json")
    return d


def test_hf_sequence_classifier_equals_transformers(tiny_seq_cls, corpus, tmp_path):
    """`convert` of a BertForSequenceClassification, then `classify` at dp = 2: probabilities within 1e-5."""
    import torch
    from tokenizers import Tokenizer
    from transformers import BertForSequenceClassification

    from hpcllm.checkpoint.convert import convert

    texts = [r[1] for r in corpus[2] if len(r[1]) < 120][:40]
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ckpt = str(tmp_path / "seqcls.h5")
    convert(str(tiny_seq_cls), ckpt)
    mpirun(2, ["classify", "--model", ckpt, "--input", path, "--output", tmp_path / "out", "--shard-docs", 10,
               "--progress", 0])      # dp = 2: each group classifies its own shards
    with h5py.File(tmp_path / "out" / "results.h5", "r") as f:
        probs, label = f["probs"][()], [x.decode() for x in f["label"][()]]
        assert json.loads(f.attrs["class_names"]) == ["négatif", "neutre", "positif"]
    tok = Tokenizer.from_file(str(tiny_seq_cls / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    model = BertForSequenceClassification.from_pretrained(tiny_seq_cls).eval()
    with torch.no_grad():
        ref = np.concatenate([torch.softmax(model(torch.tensor([tok.encode(t).ids])).logits, -1).numpy()
                              for t in texts])
    np.testing.assert_allclose(probs, ref, atol=1e-5)
    assert label == [model.config.id2label[i] for i in ref.argmax(1)]
