"""Benchmark (issue 11): text classification end to end on Debian's fortune files as topics.

    python bench/classify_pipeline.py [--ranks 2] [--per-class 440] [--classes 20] [--skip spark,st]

The task: the ``classes`` largest English fortune files of the ``fortunes``
package (people, definitions, computers, politics, science, ...), at most
``per-class`` fortunes each (20 x 440: about 8,800 documents), one class per
file; a seeded stratified 80/20 split by document id
(``hpcllm.train.split.validation_mask``, seed 0), the same rows for every
pipeline.  Each pipeline is whole processes on the same cores, timed from
launch to predictions written (imports, JVM / model loading included):

(a) the founding example: pyspark ``local[R]``, Tokenizer -> HashingTF -> IDF ->
    LogisticRegression (needs ``pip install pyspark`` and Java 17+);
(b) sentence-transformers all-MiniLM-L6-v2 embeddings (torch threads = R) +
    scikit-learn LogisticRegression (multinomial L-BFGS);
(c) ``mpiexec -n R hpcllm train-classifier`` (linear head, 10% of the training
    rows held out for early stopping) then ``mpiexec -n R hpcllm classify`` on the
    test rows, one thread per rank; (c') the same with ``--head mlp``, rerun on
    the output of (c), so only the head is retrained (the embeddings resume);
(c'') with ``--finetune N``: ``train-classifier --finetune N`` (encoder and head
    trained together, data-parallel) from scratch, then classify; and (d) the
    peer for that: HF's MiniLM fine-tuned N epochs in PyTorch (torch threads = R;
    bench/classify_accuracy.py's loop), the test rows predicted after it.

The MiniLM checkpoint is converted once beforehand (``hpcllm convert``,
timed and printed separately).  Prints accuracy, macro-F1 and seconds of each,
and the ratio of (b)'s time to (c)'s.
"""

import argparse
import glob
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)   # bench/common.py, also under PYTHONSAFEPATH=1

import numpy as np  # noqa: E402

import common  # noqa: E402
from common import REPO, minilm_dir  # noqa: E402

FORTUNES = "/usr/share/games/fortunes"
NOT_ENGLISH = ("chinese", "tang300", "song100")


def fortune_files(n_classes: int) -> list:
    """The n largest English fortune files (by fortunes), largest first."""
    files = [p for p in glob.glob(f"{FORTUNES}/*") if os.path.isfile(p) and not os.path.islink(p)
             and not p.endswith(".dat") and os.path.basename(p) not in NOT_ENGLISH]
    texts = {os.path.basename(p): _fortunes(p) for p in files}
    return sorted(texts.items(), key=lambda kv: -len(kv[1]))[:n_classes]


def _fortunes(path: str) -> list:
    with open(path, "rb") as f:
        raw = f.read().decode("utf-8", errors="replace")
    return [c.strip("%\n") for c in raw.split("\n%\n") if c.strip("%\n").strip()]


def build_task(d: str, n_classes: int, per_class: int) -> dict:
    """train.jsonl / test.jsonl (id, text, label) in d; returns counts."""
    from hpcllm.train.labels import encode_labels
    from hpcllm.train.split import validation_mask

    rows = [(f"{name}/{i}", text, name) for name, texts in fortune_files(n_classes)
            for i, text in enumerate(texts[:per_class])]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    ids = encode_labels([r[2] for r in rows]).ids
    test = validation_mask([r[0] for r in rows], ids, 0.2, seed=0)
    for name, keep in (("train", ~test), ("test", test)):
        with open(os.path.join(d, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for r, k in zip(rows, keep):
                if k:
                    f.write(json.dumps({"id": r[0], "text": r[1], "label": r[2]}, ensure_ascii=False) + "\n")
    counts = np.bincount(ids, minlength=n_classes)
    return {"docs": len(rows), "classes": n_classes, "train": int((~test).sum()), "test": int(test.sum()),
            "majority": float(counts.max() / counts.sum())}


def read_jsonl(path: str) -> tuple:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def scores(y_true, y_pred) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro"))}


# --------------------------------------------------------------------------- the pipelines (workers)

def st_sklearn(d: str, threads: int) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    torch.set_num_threads(threads)
    model = SentenceTransformer(minilm_dir(), device="cpu")
    x_train, y_train = read_jsonl(os.path.join(d, "train.jsonl"))
    x_test, y_test = read_jsonl(os.path.join(d, "test.jsonl"))
    lr = LogisticRegression(max_iter=1000).fit(model.encode(x_train, batch_size=64), y_train)
    return scores(y_test, lr.predict(model.encode(x_test, batch_size=64)))


def hf_finetune(d: str, threads: int, epochs: int) -> dict:
    """HF's MiniLM fine-tuned in PyTorch (bench/classify_accuracy.py's loop: mean pooling + linear head,
    AdamW 1e-4, batch 32, 128 tokens, dropout on), the test rows predicted after the last epoch."""
    import classify_accuracy as module

    x_train, y_train = read_jsonl(os.path.join(d, "train.jsonl"))
    x_test, y_test = read_jsonl(os.path.join(d, "test.jsonl"))
    for _, _, result in module.finetune(x_train, np.array(y_train), x_test, np.array(y_test), scores, epochs, 128,
                                        threads):
        pass
    return result


def spark(d: str, threads: int) -> dict:
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import IDF, HashingTF, StringIndexer, Tokenizer
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master(f"local[{threads}]").appName("fortunes")
               .config("spark.ui.enabled", "false").config("spark.driver.memory", "2g").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    train = session.read.json(os.path.join(d, "train.jsonl"))
    test = session.read.json(os.path.join(d, "test.jsonl"))
    pipeline = Pipeline(stages=[StringIndexer(inputCol="label", outputCol="y"),
                                Tokenizer(inputCol="text", outputCol="words"),
                                HashingTF(inputCol="words", outputCol="tf", numFeatures=1 << 18),
                                IDF(inputCol="tf", outputCol="features"),
                                LogisticRegression(featuresCol="features", labelCol="y", maxIter=100)])
    model = pipeline.fit(train)
    names = model.stages[0].labels
    pred = model.transform(test).select("label", "prediction").collect()
    session.stop()
    return scores([r["label"] for r in pred], [names[int(r["prediction"])] for r in pred])


# --------------------------------------------------------------------------- timing whole processes

def timed(cmd: list, env=None) -> tuple:
    return common.timed(cmd, env, cwd=REPO)


def worker_result(name: str, d: str, ranks: int, epochs: int = 0) -> dict:
    seconds, proc = timed([sys.executable, __file__, "--worker", name, d, "--ranks", str(ranks),
                           "--finetune", str(epochs)])
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), seconds=seconds)


def hpcllm_pipeline(d: str, ckpt: str, ranks: int, head: str, out: str, extra=()) -> dict:
    mpi = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "hpcllm"]
    t_train, proc = timed(mpi + ["train-classifier", "--model", ckpt, "--input", os.path.join(d, "train.jsonl"),
                                 "--output", out, "--head", head, "--validation", "0.1", "--progress", "0",
                                 *map(str, extra)])
    preds = f"{out}-{head}-preds"
    t_classify, _ = timed(mpi + ["classify", "--model", os.path.join(out, "classifier.h5"), "--input",
                                 os.path.join(d, "test.jsonl"), "--output", preds, "--progress", "0"])
    import h5py

    with h5py.File(os.path.join(preds, "results.h5"), "r") as f:
        predicted = [x.decode() for x in f["label"][()]]
    _, y_test = read_jsonl(os.path.join(d, "test.jsonl"))
    summary = [line for line in proc.stderr.splitlines()
               if any(k in line for k in ("validation:", "train-classifier: wrote", "fine-tun"))]
    return dict(scores(y_test, predicted), seconds=t_train + t_classify, train_s=t_train, classify_s=t_classify,
                log=summary)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=440)
    p.add_argument("--skip", default="", help="comma list of: spark, st, mlp, linear, hf-finetune")
    p.add_argument("--finetune", type=int, default=0, metavar="EPOCHS",
                   help="also (c'') train-classifier --finetune EPOCHS (a fresh run: embedding phase included)")
    p.add_argument("--worker", nargs=2, metavar=("PIPELINE", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        name, d = args.worker
        if name == "hf-finetune":
            print(json.dumps(hf_finetune(d, args.ranks, args.finetune)))
        else:
            print(json.dumps({"st": st_sklearn, "spark": spark}[name](d, args.ranks)))
        return
    skip = set(filter(None, args.skip.split(",")))
    d = tempfile.mkdtemp(prefix="bench-classify-")
    task = build_task(d, args.classes, args.per_class)
    print(f"task: {json.dumps(task)}  (files in {d})", flush=True)
    ckpt = os.path.join(d, "minilm.h5")
    t_convert, _ = timed([sys.executable, "-m", "hpcllm", "convert", minilm_dir(), ckpt])
    print(f"hpcllm convert (once, not counted below): {t_convert:.1f} s", flush=True)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONSAFEPATH": "1"}
    os.environ.update(env)
    results = {}
    if "spark" not in skip:
        results["(a) pyspark TF-IDF + LR"] = worker_result("spark", d, args.ranks)
        print(results, flush=True)
    if "st" not in skip:
        results["(b) sentence-transformers + sklearn LR"] = worker_result("st", d, args.ranks)
        print(results, flush=True)
    out = os.path.join(d, "clf")
    if "linear" not in skip:
        results["(c) hpcllm train-classifier + classify"] = hpcllm_pipeline(d, ckpt, args.ranks, "linear", out)
    if "mlp" not in skip and "linear" not in skip:
        results["(c') same, --head mlp (embeddings reused)"] = hpcllm_pipeline(d, ckpt, args.ranks, "mlp", out)
    if args.finetune and "hf-finetune" not in skip:
        results[f"(d) HF MiniLM fine-tuned {args.finetune} epochs"] = worker_result("hf-finetune", d, args.ranks,
                                                                                   args.finetune)
        print(results, flush=True)
    if args.finetune:
        results[f"(c'') same, --finetune {args.finetune}"] = hpcllm_pipeline(
            d, ckpt, args.ranks, "linear", os.path.join(d, "clf-ft"),
            ["--finetune", args.finetune, "--max-length", 128, "--validation", 0])    # as (d): 128 tokens, every row
    print(f"\n{'pipeline':48} {'accuracy':>9} {'macro-F1':>9} {'seconds':>8}")
    for name, r in results.items():
        print(f"{name:48} {r['accuracy']:9.4f} {r['macro_f1']:9.4f} {r['seconds']:8.1f}")
    b, c = (results.get(k) for k in ("(b) sentence-transformers + sklearn LR", "(c) hpcllm train-classifier + classify"))
    if b and c:
        print(f"(b) / (c) time: {b['seconds'] / c['seconds']:.2f}x")
    for name, r in results.items():
        for line in r.get("log", []):
            print(f"  {name[:4]} {line}")


if __name__ == "__main__":
    main()
