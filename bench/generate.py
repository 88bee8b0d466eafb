"""Benchmark: `hpcllm generate` vs HF transformers `generate` (not a test).

    python bench/generate.py [--prompts 32] [--max-new 64] [--batch 8] [--threads 2] [--dtype float32]
                             [--shared] [--skip hf,llamacpp,1x,dp,tp,nocache]

Same model (SmolLM2-135M-Instruct from its GGUF: HF loads the GGUF itself,
hpcllm its converted checkpoint), same dtype, same chat prompts (real text of
mixed length, the model's chat template), greedy, same cores. HF runs static
batches of ``--batch`` prompts with left padding (a batch runs until its
longest reply ends); hpcllm runs as whole processes (start-up, model load and
result files included): 1 rank x THREADS threads, and THREADS ranks x 1
thread as dp and as tp. llama-cpp-python, when installed (``pip install
llama-cpp-python`` builds llama.cpp from source), runs the same GGUF with its
own quantised kernels, one prompt at a time (its Python API does not batch). Generated tokens are counted up to and including EOS.
Prints tokens/s and the ratios; the decode FLOP utilisation is against a
large square matmul measured in the same run.

``--shared``: every prompt also carries the same long instruction as its
system message (a shared-instruction workload); the 1-rank run is repeated
with ``--no-prefix-cache`` to show what reusing that prefix's KV saves.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/common.py, also under PYTHONSAFEPATH=1

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from common import corpora, matmul_flops, smollm2_gguf  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYTHONSAFEPATH", "1")

GGUF = smollm2_gguf()


def prompts(n):
    texts = [t.strip() for t in corpora.mixed(4 * n) if t.strip()]
    asks = ("Summarise in one sentence:", "What is this about?", "Give a title for:", "Continue:")
    return [f"{asks[i % 4]} {texts[i][:40 + (i * 97) % 400]}" for i in range(n)]


SHARED = ("You label and summarise documents for a corpus curation team. Read the user's text carefully. "
          "Answer in plain English, in one or two short sentences, without lists, headings or quotation marks. "
          "If the text is a joke, a quotation or a poem, say so first. If it is not in English, say which "
          "language it is in and answer in English anyway. Never repeat the text itself. Do not add advice, "
          "warnings or greetings. Keep names, numbers and technical terms exactly as they are written.")


def chat(text, args):
    return ([{"role": "system", "content": SHARED}] if args.shared else []) + [{"role": "user", "content": text}]


def run_hf(texts, args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    where, name = os.path.split(GGUF)
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    tok.padding_side = "left"
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=dtype).eval()
    loaded = time.perf_counter()
    n_tokens = 0
    for b in range(0, len(texts), args.batch):
        chats = [chat(t, args) for t in texts[b:b + args.batch]]
        enc = tok.apply_chat_template(chats, add_generation_prompt=True, return_tensors="pt", padding=True,
                                      return_dict=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=args.max_new, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            n_tokens += row.index(2) + 1 if 2 in row else len(row)
    end = time.perf_counter()
    return n_tokens, end - start, end - loaded


def run_llamacpp(texts, args):
    """llama-cpp-python on the same GGUF (its own Q4_1 kernels), one chat completion at a time, greedy,
    EOS counted as a generated token like the others. None when it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    start = time.perf_counter()
    llm = Llama(model_path=GGUF, n_ctx=2048, n_threads=args.threads, n_batch=512, verbose=False)
    loaded = time.perf_counter()
    n_tokens = 0
    for t in texts:
        out = llm.create_chat_completion(messages=chat(t, args), max_tokens=args.max_new, temperature=0.0,
                                         top_k=1)
        n_tokens += out["usage"]["completion_tokens"] + (out["choices"][0]["finish_reason"] == "stop")
    end = time.perf_counter()
    return n_tokens, end - start, end - loaded


def run_hpcllm(h5, inp, ranks, tp, threads, args, extra=()):
    out = tempfile.mkdtemp(prefix="bench-gen-")
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, "-m", "hpcllm", "generate", "--model", h5, "--input", inp,
           "--output", out, "--chat", "--temperature", "0", "--max-new-tokens", str(args.max_new), "--tp", str(tp),
           "--threads", str(threads), "--dtype", args.dtype, "--progress", "0", "--batch-tokens",
           str(args.batch_tokens), "--max-num-seqs", str(args.max_num_seqs), *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, PYTHONSAFEPATH="1"))
    wall = time.perf_counter() - start
    import h5py

    with h5py.File(os.path.join(out, "results.h5"), "r") as f:
        n_tokens = int(f["n_generated"][()].sum())
        timings = json.loads(f.attrs["timings"])
    compute = max(r["seconds"]["compute"] + r["seconds"].get("comm", 0.0) for r in timings)
    return n_tokens, wall, compute


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8, help="HF static batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--batch-tokens", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--shared", action="store_true", help="a long instruction shared by every prompt (system)")
    ap.add_argument("--skip", default="", help="comma list of runs to skip: hf,llamacpp,1x,dp,tp,nocache")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    texts = prompts(args.prompts)
    work = tempfile.mkdtemp(prefix="bench-gen-in-")
    inp = os.path.join(work, "prompts.jsonl")
    with open(inp, "w") as f:
        f.writelines(json.dumps({"messages": chat(t, args)}) + "\n" for t in texts)
    from hpcllm.checkpoint.convert import convert

    h5 = os.path.join(work, "smol.h5")
    convert(GGUF, h5, args.dtype)
    peak = matmul_flops(getattr(torch, args.dtype))
    print(f"{args.prompts} chat prompts, max_new_tokens {args.max_new}, greedy, {args.dtype}, "
          f"{args.threads} cores; matmul peak {peak / 1e9:.1f} GFLOP/s")
    skip = set(args.skip.split(","))
    rows = []
    if "hf" not in skip:
        n, wall, gen = run_hf(texts, args)
        rows.append(("transformers generate (batch %d)" % args.batch, n, wall, gen))
        print("hf", rows[-1], flush=True)
    if "llamacpp" not in skip:
        got = run_llamacpp(texts, args)
        if got is not None:
            rows.append(("llama-cpp-python (GGUF Q4_1, 1 prompt at a time)",) + got)
            print(rows[-1], flush=True)
    runs = [("1x", 1, 1, args.threads, ()), ("dp", args.threads, 1, 1, ()), ("tp", args.threads, args.threads, 1, ())]
    if args.shared:
        runs.insert(1, ("nocache", 1, 1, args.threads, ("--no-prefix-cache",)))
    for key, ranks, tp, threads, extra in runs:
        if key not in skip:
            n, wall, gen = run_hpcllm(h5, inp, ranks, tp, threads, args, extra)
            rows.append((f"hpcllm {ranks} rank(s) x {threads} thread(s), tp {tp}{' ' + ' '.join(extra) if extra else ''}",
                         n, wall, gen))
            print(rows[-1], flush=True)
    flops_per_token = 2 * 135e6
    base = rows[0][2] if rows and "hf" not in skip else None
    print(f"{'run':44s} {'tokens':>7s} {'wall s':>7s} {'tok/s':>7s} {'gen s':>7s} {'gen tok/s':>9s} "
          f"{'MFU':>5s} {'x HF':>6s} {'gen x HF':>8s}")
    for name, n, wall, gen in rows:
        ratio = f"{(rows[0][2] / rows[0][1]) / (wall / n):.2f}" if base else "-"
        gen_ratio = f"{(rows[0][3] / rows[0][1]) / (gen / n):.2f}" if base else "-"
        print(f"{name:44s} {n:7d} {wall:7.1f} {n / wall:7.1f} {gen:7.1f} {n / gen:9.1f} "
              f"{n * flops_per_token / gen / peak:5.1%} {ratio:>6s} {gen_ratio:>8s}")


if __name__ == "__main__":
    main()
