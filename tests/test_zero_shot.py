"""Zero-shot classify (hpcllm.jobs.zero_shot) against transformers on SmolLM2's real weights."""

import json

import h5py
import numpy as np
import pytest
import torch

from conftest import mpirun
from hpcllm.errors import HpcllmError

TEXTS = ["The striker scored twice in the final minutes and the crowd went wild.",
         "Preheat the oven, then fold the butter into the flour until it crumbles.",
         "A new exoplanet was found orbiting a red dwarf forty light years away."]
# single- and multi-token names (" sports" is one token, " personal finance" and " astrophysics" several)
LABELS = ["sports", "cooking recipes", "personal finance", "astrophysics"]
TEMPLATE = "Text: {text}\nTopic ({labels}):"


def hf_probs(smol_hf, prompts):
    """Per prompt: softmax over names of sum log p(name tokens | prompt), each (prompt, name) one full forward."""
    tok, hf = smol_hf
    out = []
    for prompt in prompts:
        p = tok(prompt)["input_ids"]
        lls = []
        for name in LABELS:
            whole = tok(prompt + " " + name)["input_ids"]
            n = tok(" " + name, add_special_tokens=False)["input_ids"]
            assert whole == p + n        # the tokenization rule: no merge across the space
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([whole])).logits[0].double(), -1)
            lls.append(sum(float(lp[len(p) + i - 1, t]) for i, t in enumerate(n)))
        out.append(torch.softmax(torch.tensor(lls), 0).numpy())
    return np.array(out)


def prompts():
    return [TEMPLATE.replace("{labels}", ", ".join(LABELS)).replace("{text}", t) for t in TEXTS]


@pytest.fixture(scope="module")
def reference(smol_hf):
    return hf_probs(smol_hf, prompts())


def test_label_logprobs_tp1_in_process(smol_h5, smol_hf, reference):
    """The scorer at tp 1, with a cache of few spare slots (names' pairs run in several rounds)."""
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.generate.kv_cache import KVCache
    from hpcllm.jobs.zero_shot import label_ids, label_logprobs
    from hpcllm.model.build import build_model
    from hpcllm.world.comm import LocalComm
    from hpcllm.tokenizer import Tokenizer

    with Checkpoint(smol_h5) as ck:
        model = build_model(ck, 0, 1, LocalComm())
        tok = Tokenizer.from_str(ck.tokenizer_json, apply_file_settings=False)
    names = label_ids(tok, LABELS)
    assert [n.tolist() for n in names] == [smol_hf[0](" " + x, add_special_tokens=False)["input_ids"] for x in LABELS]
    assert min(len(n) for n in names) == 1 and max(len(n) for n in names) > 1
    ids = [np.array(tok.encode(p), np.int64) for p in prompts()]
    cache = KVCache(model, len(ids) + 3, 128, torch.float32)
    scores = label_logprobs(model, cache, ids, names)
    probs = np.exp(scores - scores.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, reference, atol=1e-4)


def test_zero_shot_job_tp2_matches_transformers(smol_h5, reference, tmp_path):
    """The classify job at tp 2 (one launch): same probabilities, and the trained classifier's columns."""
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:2])
                    + "not json\n" + "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[2:]))
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    mpirun(2, ["classify", "--model", smol_h5, "--input", path, "--output", tmp_path / "out", "--tp", 2,
               "--labels-file", tmp_path / "labels.txt", "--prompt-template", TEMPLATE, "--batch-tokens", 64,
               "--progress", 0], timeout=300)
    with h5py.File(tmp_path / "out" / "results.h5", "r") as f:
        probs, ids, top = f["probs"][()], f["label_id"][()], f["top_p"][()]
        labels = [x.decode() for x in f["label"][()]]
        assert json.loads(f.attrs["class_names"]) == LABELS
        assert f["status"][2] == 3 and ids[2] == -1 and labels[2] == "" and np.isnan(probs[2]).all()
    got = np.delete(probs, 2, axis=0)
    np.testing.assert_allclose(got, reference, atol=1e-4)
    assert np.delete(labels, 2).tolist() == [LABELS[i] for i in reference.argmax(1)]
    np.testing.assert_allclose(np.delete(top, 2), reference.max(1), atol=1e-4)


def test_zero_shot_bad_options():
    from types import SimpleNamespace

    from hpcllm.jobs.zero_shot import read_labels

    for labels, where in (("a", None), ("a,a", None), (None, None), ("a,b", "x.txt")):
        with pytest.raises(HpcllmError):
            read_labels(SimpleNamespace(labels=labels, labels_file=where))
