"""XLM-RoBERTa and RoBERTa in the encoder family against sentence-transformers.

Tiny random models built with transformers and saved as sentence-transformers
models (modules.json, Pooling, Normalize): an XLM-R with the Unigram tokenizer
test_tokenizer_unigram trains on the fortunes (XLM-R's normalizer shape, its
pair template), mean pooling, at tp 1 (in process), 2 and 3 (`hpcllm embed`);
a RoBERTa with a byte-level BPE trained here, CLS pooling, at tp 1.  Texts
hold a literal "<pad>" (HF gives the pad token the pad position).
"""

import functools
import json
import os

import h5py
import numpy as np
import pytest
import torch

import corpora
from conftest import mpirun, write_jsonl

MARK = "\u2581"
TEXTS = corpora.mixed(60) + ["<pad> between <pad> pads", "short", "x " * 100]


def xlmr_tokenizer_json() -> dict:
    """The fortunes-trained Unigram tokenizer in XLM-R's shape: Precompiled + collapse normalizer,
    Metaspace, <s> A </s> and the pair template <s> A </s> </s> B </s>."""
    import test_tokenizer_unigram as tu

    d = tu._variant(tu.xlmr_style_json(), "xlmr-hub")

    def special(name):
        return {"SpecialToken": {"id": name, "type_id": 0}}

    def seq(name):
        return {"Sequence": {"id": name, "type_id": 0}}
    d["post_processor"] = dict(d["post_processor"], pair=[special("<s>"), seq("A"), special("</s>"),
                                                         special("</s>"), seq("B"), special("</s>")])
    return d


@functools.lru_cache(maxsize=1)
def roberta_tokenizer_json() -> dict:
    """A byte-level BPE trained on the fortunes, RoBERTa's specials and post-processor (once per process:
    callers must not change it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpora.mixed(600), trainer=trainer)
    tk.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return json.loads(tk.to_str())


TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=64)


def save_tiny(d, kind: str, tokenizer: dict, head: str = None, pooling: str = "mean", normalize=True, dims=TINY,
              positions=64):
    """A random (XLM-)RoBERTa ('xlm-roberta' | 'roberta') of ``dims`` and ``positions`` tokens at ``d``: a
    sentence-transformers model, or with ``head="cross-encoder"`` a one-label sequence classifier saved by
    CrossEncoder. -> its directory"""
    from sentence_transformers import CrossEncoder, SentenceTransformer, models
    from transformers import (PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification,
                              RobertaModel, XLMRobertaConfig, XLMRobertaForSequenceClassification,
                              XLMRobertaModel)

    torch.manual_seed(0)
    config, model, classifier = {
        "xlm-roberta": (XLMRobertaConfig, XLMRobertaModel, XLMRobertaForSequenceClassification),
        "roberta": (RobertaConfig, RobertaModel, RobertaForSequenceClassification)}[kind]
    vocab = tokenizer["model"]["vocab"]
    cfg = config(vocab_size=len(vocab), max_position_embeddings=positions + 2, pad_token_id=1, bos_token_id=0,
                 eos_token_id=2, type_vocab_size=1, num_labels=1, **dims)
    hf = d / "hf"
    (model(cfg, add_pooling_layer=False) if head is None else classifier(cfg)).eval().save_pretrained(hf)
    (hf / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                            cls_token="<s>", sep_token="</s>", pad_token="<pad>", unk_token="<unk>",
                            model_max_length=positions).save_pretrained(hf)
    out = d / "st"
    if head is not None:
        CrossEncoder(str(hf)).save(str(out))
    else:
        mods = [models.Transformer(str(hf)), models.Pooling(dims["hidden_size"], pooling)] + (
            [models.Normalize()] if normalize else [])
        SentenceTransformer(modules=mods).save(str(out))
    return out


def convert_to(src, dst) -> str:
    from hpcllm.checkpoint.convert import convert

    convert(str(src), str(dst))
    return str(dst)


@pytest.fixture(scope="module")
def xlmr(tmp_path_factory):
    """(checkpoint, corpus, sentence-transformers' embeddings, HF directory) of the tiny XLM-R."""
    from sentence_transformers import SentenceTransformer

    d = tmp_path_factory.mktemp("xlmr")
    st = save_tiny(d, "xlm-roberta", xlmr_tokenizer_json())
    ref = SentenceTransformer(str(st), device="cpu").encode(TEXTS)
    return convert_to(st, d / "xlmr.h5"), write_jsonl(d / "c.jsonl", TEXTS), ref, st


def tp1_embeddings(h5):
    """The checkpoint's model at tp 1 on TEXTS tokenized by hpcllm (ids and vectors)."""
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.model.build import build_model
    from hpcllm.tokenizer import Tokenizer
    from hpcllm.world.comm import LocalComm

    with Checkpoint(h5) as ck:
        model = build_model(ck, 0, 1, LocalComm(), torch.float32)
        tok = Tokenizer.from_str(ck.tokenizer_json, apply_file_settings=False)
        max_length = ck.config["max_length"]
    enc = tok.encode_batch(TEXTS, max_length=max_length)
    vec = model(torch.from_numpy(enc.ids.astype(np.int64)), torch.from_numpy(enc.lengths()))
    return enc, vec.numpy()


def cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_config_records_the_position_offset(xlmr):
    from hpcllm.checkpoint.hdf5 import Checkpoint

    with Checkpoint(xlmr[0]) as ck:
        c = ck.config
    # 66 position rows, the first two (pad + 1) never used by a token: 64 positions; one token type
    assert (c["position_offset"], c["max_positions"], c["max_length"], c["type_vocab"]) == (2, 64, 64, 1)
    assert (c["pooling"], bool(c["normalize"])) == ("mean", True)


def test_xlmr_tp1_tokens_and_embeddings(xlmr):
    from transformers import AutoTokenizer

    h5, _, ref, st = xlmr
    enc, got = tp1_embeddings(h5)
    hf = AutoTokenizer.from_pretrained(str(st))(TEXTS, truncation=True, max_length=64)["input_ids"]
    assert enc.to_lists() == hf
    assert cosine(got, ref).min() >= 0.99999


@pytest.mark.parametrize("tp", [2, 3])
def test_xlmr_embed_at_tp(xlmr, tmp_path, tp):
    h5, corpus, ref, _ = xlmr
    mpirun(tp, ["embed", "--model", h5, "--input", corpus, "--output", tmp_path / "out", "--tp", tp, "--progress", 0])
    with h5py.File(os.path.join(tmp_path / "out", "results.h5"), "r") as f:
        got = f["embedding"][:]
    cos = cosine(got, ref)
    assert cos.min() >= 0.99999, f"worst document {cos.argmin()}: cosine {cos.min()}"


def test_roberta_bpe_cls_pooling(tmp_path):
    from sentence_transformers import SentenceTransformer

    st = save_tiny(tmp_path, "roberta", roberta_tokenizer_json(), pooling="cls", normalize=False)
    ref = SentenceTransformer(str(st), device="cpu").encode(TEXTS)
    _, got = tp1_embeddings(convert_to(st, tmp_path / "roberta.h5"))
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    assert cosine(got, ref).min() >= 0.99999
