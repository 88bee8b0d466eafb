"""Micro-benchmark: which CPU kernel runs an int8-weight linear fastest here (decode and prefill shapes).

    python bench/quant_kernels.py [--rows 1,8,32,512] [--model smollm2|qwen05|both] [--reps 20]

For each linear of SmolLM2-135M / Qwen2.5-0.5B at tp=1 (the fused Q|K|V, o, fused gate|up, down and
the tied LM head) and each row count M, the time of one call of:

    fp32      hpcllm's fp32 path (oneDNN packed weight, ``hpcllm.model.layers.pack_weight``)
    bf16      hpcllm's bf16 path (the same, bf16 weight and input)
    w8 fp32   torch.ops.aten._weight_int8pack_mm, fp32 input, int8 [N, K] weight, per-channel scales
    w8 bf16   the same kernel with bf16 input and scales
    w8 deq    the codes converted to bf16 in the call, a plain bf16 matmul, the output scaled (what
              ``hpcllm.model.layers.int8_linear`` runs from 2 rows up)
    w8a8 x86  dynamic int8 activations (per tensor) x per-channel int8 weights:
              torch.ops.quantized.linear_dynamic, engine "x86" (fbgemm / oneDNN, VNNI)
    w8a8 dnn  the same op with engine "onednn"

and each one's speed relative to bf16 (>1: faster).  Threads: all of this process's cores (2 here);
the machine is shared, so each figure is the fastest of --reps calls and only ratios within one
run mean anything.
"""

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/common.py, also under PYTHONSAFEPATH=1
from common import best_of  # noqa: E402  (the fastest call: the machine is shared)
from hpcllm.model.layers import linear, pack_weight  # noqa: E402

# (name, out N, in K) of each linear at tp=1
SHAPES = {
    "smollm2": [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
                ("head", 49152, 576)],
    "qwen05": [("qkv", 1152, 896), ("o", 896, 896), ("gate_up", 9728, 896), ("down", 896, 4864),
               ("head", 151936, 896)],
}


def kernels(w: torch.Tensor):
    """name -> fn(x fp32) for the weight w [N, K] fp32."""
    scale = w.abs().amax(1).clamp_min(1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    packed32, packed16 = pack_weight(w), pack_weight(w.bfloat16())
    scale16 = scale.bfloat16()
    warnings.filterwarnings("ignore", "torch.quantize_per_tensor")   # deprecated, still the op's input
    qw = torch.quantize_per_channel(w, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
    prepacked = {}
    for engine in ("x86", "onednn"):
        torch.backends.quantized.engine = engine
        prepacked[engine] = torch.ops.quantized.linear_prepack(qw, None)
    return {
        "fp32": lambda x: linear(x, packed32),
        "bf16": lambda x: linear(x.bfloat16(), packed16),
        "w8 fp32": lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scale),
        "w8 bf16": lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, scale16),
        "w8 deq": lambda x: torch.nn.functional.linear(x.bfloat16(), q.bfloat16()) * scale16,
        "w8a8 x86": lambda x: _dynamic(x, prepacked["x86"], "x86"),
        "w8a8 dnn": lambda x: _dynamic(x, prepacked["onednn"], "onednn"),
    }


def _dynamic(x, packed, engine):
    torch.backends.quantized.engine = engine
    return torch.ops.quantized.linear_dynamic(x, packed, False)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,8,32,512")
    p.add_argument("--model", default="both", choices=("smollm2", "qwen05", "both"))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: as torch starts)")
    a = p.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    models = list(SHAPES) if a.model == "both" else [a.model]
    print(f"threads {torch.get_num_threads()}; ms per call, (x bf16) = bf16 time / this time")
    with torch.inference_mode():
        for model in models:
            totals = {}
            for name, n, k in SHAPES[model]:
                w = torch.randn(n, k) * 0.05
                fns = kernels(w)
                for m in rows:
                    x = torch.randn(m, k)
                    reps = max(2, a.reps if m <= 32 else a.reps // 4)
                    if name == "head" and m == 512:
                        reps = 2
                    ms = {kname: 1e3 * best_of(lambda f=f: f(x), reps + 1) for kname, f in fns.items()}
                    for kname, v in ms.items():
                        totals[(m, kname)] = totals.get((m, kname), 0.0) + v
                    print(f"{model:8s} {name:8s} M={m:4d} " + "  ".join(
                        f"{kname} {v:7.3f} ({ms['bf16'] / v:4.2f}x)" for kname, v in ms.items()), flush=True)
            for m in rows:
                bf = totals[(m, "bf16")]
                print(f"{model:8s} ALL      M={m:4d} " + "  ".join(
                    f"{kname} {totals[(m, kname)]:7.3f} ({bf / totals[(m, kname)]:4.2f}x)"
                    for kname in fns), flush=True)


if __name__ == "__main__":
    main()
