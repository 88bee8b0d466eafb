"""Benchmark: an OpenAI Batch file through `hpcllm generate --openai-batch` + `hpcllm export --format
openai-batch` and through `vllm run-batch` (not a test; vLLM in its own virtual environment, see
bench/vllm_constrained.py).

    python bench/openai_batch.py --vllm /tmp/vllm-venv/bin/python [--requests 120] [--max-new 48] [--threads 2]

The same request file for both: chat requests built from real fortunes texts
(SmolLM2-135M-Instruct; vLLM reads the HF directory transformers writes from
the same GGUF), greedy, per-request max_tokens (16 or the flag), some with a
stop string. Prints each side's wall seconds (start-up included: both are
whole commands), the ratio, and how the output files' layouts compare: the
set of key paths (with JSON types) of every line, line order by custom_id,
the finish reasons and how many texts are equal.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/common.py, also under PYTHONSAFEPATH=1

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

from common import converted, corpora, smollm2_gguf, timed  # noqa: E402
from constrained import hf_dir  # noqa: E402


def requests(n, max_new):
    texts = [t.strip() for t in corpora.mixed(3 * n) if t.strip()][:n]
    out = []
    for i, t in enumerate(texts):
        body = {"model": "smollm2", "messages": [{"role": "user", "content": f"Summarise in one sentence:\n\n{t[:300]}"}],
                "max_tokens": 16 if i % 3 == 0 else max_new, "temperature": 0}
        if i % 4 == 1:
            body["stop"] = ["."]
        out.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return out


def paths(value, prefix=""):
    """The key paths of a JSON value with their types ("response.body.choices[].message.content:str")."""
    if isinstance(value, dict):
        return set().union(*(paths(v, f"{prefix}.{k}" if prefix else k) for k, v in value.items())) or {prefix + ":{}"}
    if isinstance(value, list):
        return set().union(*(paths(v, prefix + "[]") for v in value)) if value else {prefix + ":[]"}
    return {f"{prefix}:{type(value).__name__}"}


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vllm", metavar="PYTHON", required=True, help="the python of vLLM's virtual environment")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    gguf = smollm2_gguf()
    h5, model = converted(gguf), hf_dir(gguf)
    work = tempfile.mkdtemp(prefix="bench-openai-batch-")
    inp = os.path.join(work, "requests.jsonl")
    with open(inp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in requests(args.requests, args.max_new))
    print(f"{args.requests} chat requests, load average {os.getloadavg()[0]:.1f}", flush=True)
    ours, theirs = os.path.join(work, "hpcllm.jsonl"), os.path.join(work, "vllm.jsonl")
    vllm_wall, _ = timed([args.vllm, "-m", "vllm.entrypoints.openai.run_batch", "-i", inp, "-o", theirs,
                          "--model", model, "--dtype", "float32", "--max-num-seqs", 32, "--max-model-len", 2048,
                          "--seed", 0, "--served-model-name", "smollm2"], env={"VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}",
                                             "VLLM_CPU_KVCACHE_SPACE": "1"})
    out = os.path.join(work, "out")
    gen_wall, _ = timed(["mpiexec", "-n", "1", sys.executable, "-m", "hpcllm", "generate", "--model", h5, "--input",
                         inp, "--output", out, "--openai-batch", "--max-new-tokens", args.max_new, "--threads",
                         args.threads, "--max-num-seqs", 32, "--progress", 0], env={"PYTHONSAFEPATH": "1"})
    exp_wall, _ = timed([sys.executable, "-m", "hpcllm", "export", out, "--output", ours, "--format", "openai-batch"],
                        env={"PYTHONSAFEPATH": "1"})
    a, b = read(ours), read(theirs)
    print(f"hpcllm generate + export: {gen_wall:.1f} + {exp_wall:.1f} s wall; vllm run-batch: {vllm_wall:.1f} s wall; "
          f"hpcllm/vLLM {(gen_wall + exp_wall) / vllm_wall:.2f}x; load average {os.getloadavg()[0]:.1f}")
    pa, pb = set().union(*map(paths, a)), set().union(*map(paths, b))
    print(f"lines {len(a)} / {len(b)}; custom_id order equal: {[x['custom_id'] for x in a] == [x['custom_id'] for x in b]}")
    print(f"key paths: {len(pa & pb)} shared; only hpcllm: {sorted(pa - pb)}; only vLLM: {sorted(pb - pa)}")
    choice = [(x["response"]["body"]["choices"][0], y["response"]["body"]["choices"][0]) for x, y in zip(a, b)
              if x["response"] and y["response"] and y["response"]["body"]]
    same_reason = sum(x["finish_reason"] == y["finish_reason"] for x, y in choice)
    same_text = sum(x["message"]["content"] == y["message"]["content"] for x, y in choice)
    print(f"finish_reason equal on {same_reason}/{len(choice)} lines, text equal on {same_text}/{len(choice)}")


if __name__ == "__main__":
    main()
