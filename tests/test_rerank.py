"""`hpcllm rerank` against sentence-transformers' CrossEncoder and transformers.

Pairs are tokenized token for token as HF tokenizers' ``encode(query, document)``
with longest-first truncation (WordPiece / BertProcessing, Unigram / XLM-R's
template, byte-level BPE / RobertaProcessing).  Tiny random cross-encoders (a
BERT with MiniLM's tokenizer, token types; an XLM-R with the fortunes-trained
Unigram tokenizer) score within 1e-5 of ``CrossEncoder.predict`` (its default
sigmoid for one label) at tp 1 and 2; a tiny Llama's yes/no log-odds after
a Qwen3-Reranker-shaped template equal transformers' logits, a prompt cut at
--max-length ending with the template's tail; the same pairs from Parquet.
"""

import json
import os

import h5py
import numpy as np
import pytest
import torch

import corpora
from conftest import minilm_dir, mpirun
from hpcllm.cli import run
from hpcllm.errors import HpcllmError
from hpcllm.status import Status
from test_xlmr import roberta_tokenizer_json, save_tiny, xlmr_tokenizer_json

FORTUNES = corpora.mixed(40)
PAIRS = [(FORTUNES[i][:60 + 20 * (i % 3)], FORTUNES[(7 * i + 3) % 40][:(i % 5) * 90]) for i in range(30)]


def write_pairs(path, pairs, extra=()):
    with open(path, "w", encoding="utf-8") as f:
        for i, (q, d) in enumerate(pairs):
            f.write(json.dumps({"id": f"p{i}", "query": q, "text": d}, ensure_ascii=False) + "\n")
        for line in extra:
            f.write(line + "\n")
    return str(path)


BAD_LINES = ['{"id": "no-query", "text": "a document"}', '{"id": "number", "query": 3, "text": "x"}', "{not json"]


def read(out):
    with h5py.File(os.path.join(out, "results.h5"), "r") as f:
        return {k: f[k][:] for k in ("score", "logit", "status", "n_tokens")}


@pytest.mark.parametrize("which", ["bert", "xlmr", "roberta"])
def test_pair_tokens_equal_hf_tokenizers(which):
    import tokenizers

    from hpcllm.jobs.rerank import PairTokenizer, pair_text
    from hpcllm.tokenizer import Tokenizer, pack_texts
    from hpcllm.tokenizer.template import pair_template

    if which == "bert":
        with open(os.path.join(minilm_dir(), "tokenizer.json"), encoding="utf-8") as f:
            spec = json.load(f)
        spec["truncation"] = spec["padding"] = None
    else:
        spec = xlmr_tokenizer_json() if which == "xlmr" else roberta_tokenizer_json()
    vocab = spec["model"]["vocab"]
    vocab = vocab if isinstance(vocab, dict) else {p: i for i, (p, _) in enumerate(vocab)}
    text = json.dumps(spec)
    pairs = PairTokenizer(Tokenizer.from_str(text, apply_file_settings=False), pair_template(spec, vocab, which))
    hf = tokenizers.Tokenizer.from_str(text)
    docs = [pair_text("q", "d", {"q": q, "d": d}) for q, d in PAIRS + [("", "only a document"), ("a query", "")]]
    for max_length in (None, 9, 12, 40, 77):
        if max_length is None:
            hf.no_truncation()
        else:
            hf.enable_truncation(max_length, strategy="longest_first")
        want = hf.encode_batch(PAIRS + [("", "only a document"), ("a query", "")])
        enc = pairs.encode_bytes(*pack_texts(docs), max_length=max_length)
        assert enc.to_lists() == [w.ids for w in want], max_length
        types = pairs.type_ids(enc.ids, enc.lengths())
        assert [t.tolist() for t in np.split(types, enc.offsets[1:-1])] == [w.type_ids for w in want], max_length
        cut = [len(w.overflowing) > 0 for w in want]
        assert ((enc.flags & 1) != 0).tolist() == cut


@pytest.fixture(scope="module")
def cross_encoders(tmp_path_factory):
    """{name: (checkpoint, CrossEncoder scores, logits)} of a tiny BERT and a tiny XLM-R cross-encoder."""
    import shutil

    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification

    from hpcllm.checkpoint.convert import convert

    d = tmp_path_factory.mktemp("ce")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, num_labels=1)
    BertForSequenceClassification(cfg).eval().save_pretrained(d / "bert-hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if os.path.exists(os.path.join(minilm_dir(), name)):
            shutil.copy(os.path.join(minilm_dir(), name), d / "bert-hf" / name)
    CrossEncoder(str(d / "bert-hf"), max_length=64).save(str(d / "bert"))
    xlmr = save_tiny(d / "x", "xlm-roberta", xlmr_tokenizer_json(), head="cross-encoder")
    out = {}
    for name, src in (("bert", d / "bert"), ("xlmr", xlmr)):
        ce = CrossEncoder(str(src), device="cpu")
        convert(str(src), str(d / f"{name}.h5"))
        out[name] = (str(d / f"{name}.h5"), ce.predict(PAIRS), ce.predict(PAIRS, activation_fn=torch.nn.Identity()))
    out["pairs"] = write_pairs(d / "pairs.jsonl", PAIRS, BAD_LINES)
    return out


@pytest.mark.parametrize("name", ["bert", "xlmr"])
def test_cross_encoder_matches_sentence_transformers(cross_encoders, tmp_path, name):
    """tp 1 (in this process) and tp 2 (mpiexec), statuses of bad lines."""
    h5, scores, logits = cross_encoders[name]
    args = ["rerank", "--model", h5, "--input", cross_encoders["pairs"], "--progress", 0]
    assert run([str(a) for a in args + ["--output", tmp_path / "tp1"]]) == 0
    mpirun(2, args + ["--output", tmp_path / "tp2", "--tp", 2])
    n = len(PAIRS)
    for layout in ("tp1", "tp2"):
        res = read(tmp_path / layout)
        np.testing.assert_allclose(res["score"][:n], scores, atol=1e-5, rtol=0)
        np.testing.assert_allclose(res["logit"][:n], logits, atol=1e-5, rtol=0)
        assert res["status"][n:].tolist() == [Status.MISSING_FIELD, Status.MISSING_FIELD, Status.BAD_JSON]
        assert np.isnan(res["score"][n:]).all()
        assert Status.TRUNCATED in res["status"][:n] and Status.OK in res["status"][:n]


def test_encoder_without_one_label_head_is_refused(tmp_path, tiny_bert_h5):
    src = write_pairs(tmp_path / "p.jsonl", PAIRS[:2])
    with pytest.raises(HpcllmError, match="without a one-label head"):
        run(["rerank", "--model", tiny_bert_h5, "--input", src, "--output", str(tmp_path / "o")])


def test_decoder_log_odds_equal_transformers(tiny_llama_h5, tmp_path):
    """A Qwen3-Reranker-shaped template short enough for the tiny model's context of 64."""
    import tokenizers
    from transformers import AutoModelForCausalLM

    d = os.path.dirname(tiny_llama_h5)
    tok = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    template = "<|im_start|>user\n<Query>: {query}\n<Document>: {document}<|im_end|>\n<|im_start|>assistant\n"
    pairs = [(q[:20], doc[:30]) for q, doc in PAIRS[:6]] + [("{document} in a query", "a " * 40)]  # the last: cut
    src = write_pairs(tmp_path / "p.jsonl", pairs, BAD_LINES[:1])
    assert run(["rerank", "--model", tiny_llama_h5, "--input", src, "--output", str(tmp_path / "o"),
                "--max-length", "48", "--rerank-template", template, "--progress", "0"]) == 0
    res = read(tmp_path / "o")
    yes, no = (tok.encode(t, add_special_tokens=False).ids[0] for t in ("yes", "no"))
    before, rest = template.split("{query}")
    middle, after = rest.split("{document}")
    tail = tok.encode(after, add_special_tokens=False).ids
    want, lengths = [], []
    for q, doc in pairs:
        ids = tok.encode(before + q + middle + doc + after).ids
        lengths.append(len(ids))
        if len(ids) > 48:
            ids = ids[:48 - len(tail)] + tail
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        want.append(float(logits[yes] - logits[no]))
    np.testing.assert_allclose(res["score"][:len(pairs)], want, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(res["score"], res["logit"])
    assert res["status"].tolist() == [Status.OK if n <= 48 else Status.TRUNCATED for n in lengths] + [
        Status.MISSING_FIELD]
    assert Status.OK in res["status"] and res["status"][6] == Status.TRUNCATED
    assert res["n_tokens"][:7].tolist() == [min(n, 48) for n in lengths]
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"query": [q for q, _ in pairs], "text": [doc for _, doc in pairs]})
    pq.write_table(table, tmp_path / "p.parquet")
    assert run(["rerank", "--model", tiny_llama_h5, "--input", str(tmp_path / "p.parquet"), "--output",
                str(tmp_path / "pq"), "--max-length", "48", "--rerank-template", template, "--progress", "0"]) == 0
    np.testing.assert_array_equal(read(tmp_path / "pq")["score"], res["score"][:len(pairs)])
