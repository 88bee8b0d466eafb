"""Mixture of experts at tensor parallelism: whole experts per rank against 1/tp of every expert's
columns (the choice behind ``MOE_UNIT`` in hpcllm/model/architectures.py).

    python bench/moe_split.py [--tp 2]

A random Mixtral-shaped decoder (hidden 512, 8 heads, 4 layers, 8 experts of ffn 1024, top 2, vocab
2000) is written once per split (~/.cache/hpcllm-bench), then run under ``mpiexec -n TP`` by this
same script (``--run``), one thread per rank: scoring 16 documents x 256 tokens (prefill), and
forward passes of 8 one-token rows (the MLP work of a decode step at 8 sequences); best of repeats.
Each line also gives the token x expert products each rank computed and its resident expert MiB.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/common.py, also under PYTHONSAFEPATH=1

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from common import CACHE, smollm2_gguf  # noqa: E402

HIDDEN, LAYERS, EXPERTS, FFN, VOCAB = 512, 4, 8, 1024, 2000
UNITS = ("experts", "expert_ffn")


def plan_with(unit: str) -> dict:
    """The decoder's plan with the stacked expert weights split by ``unit`` (patched in place, so the
    model built in this process is split the same way)."""
    from hpcllm.model import architectures
    from hpcllm.model.partition import col, row

    for w in ("gate", "up", "down"):
        architectures.LLAMA_PLAN[f"layers.*.mlp.{w}_exps"] = (row if w == "down" else col)(unit)
    return architectures.LLAMA_PLAN


def make(unit: str, path: str) -> None:
    from hpcllm.checkpoint.hdf5 import write_checkpoint
    from hpcllm.checkpoint.sources import decoder_config, moe_config
    from hpcllm.model.architectures import DECODER_FAMILIES
    from hpcllm.tokenizer.bpe import ByteLevelBPE

    moe = moe_config(n_experts=EXPERTS, top_k=2, expert_ffn=FFN, shared_ffn=0, shared_gate=False,
                     router="softmax_topk", norm_topk=True, dense_layers=[], n_layers=LAYERS, where="bench")
    cfg = decoder_config(vocab=VOCAB, hidden=HIDDEN, n_layers=LAYERS, n_heads=8, n_kv_heads=8, head_dim=64, ffn=FFN,
                         rms_eps=1e-5, rope_theta=1e4, rope_scaling=None, max_positions=512, tie_embeddings=True,
                         qkv_bias=False, o_bias=False, qk_norm=False, add_bos=False, bos_id=None, eos_id=2, pad_id=0,
                         eos_ids=[2], chat_template=None, features=DECODER_FAMILIES["mixtral"],
                         layer_types=["full"] * LAYERS, sliding_window=None, rope_local_theta=None, attn_scale=None,
                         attn_softcap=None, final_softcap=None, moe=moe)
    rng = np.random.default_rng(0)

    def r(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)
    ones = np.ones(HIDDEN, np.float32)
    tensors = {"embed.weight": r(VOCAB, HIDDEN), "norm.weight": ones}
    for i in range(LAYERS):
        p = f"layers.{i}."
        tensors.update({p + "attn_norm.weight": ones, p + "mlp_norm.weight": ones, p + "attn.q.weight": r(HIDDEN, HIDDEN),
                        p + "attn.k.weight": r(HIDDEN, HIDDEN), p + "attn.v.weight": r(HIDDEN, HIDDEN),
                        p + "attn.o.weight": r(HIDDEN, HIDDEN), p + "mlp.router.weight": r(EXPERTS, HIDDEN, scale=1.0),
                        p + "mlp.gate_exps.weight": r(EXPERTS, FFN, HIDDEN), p + "mlp.up_exps.weight": r(EXPERTS, FFN, HIDDEN),
                        p + "mlp.down_exps.weight": r(EXPERTS, HIDDEN, FFN)})
    tokenizer = json.dumps(ByteLevelBPE.from_gguf(smollm2_gguf()).to_json_dict())
    write_checkpoint(path, "llama", cfg, tensors, tokenizer, "bench/moe_split.py", plan=plan_with(unit))


def run(unit: str, path: str) -> None:
    """Under mpiexec: one tp group of the whole world."""
    import torch
    from mpi4py import MPI

    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.model.build import build_model
    from hpcllm.model.moe import expert_bytes, rank_load
    from hpcllm.scoring import score_documents
    from hpcllm.world.mesh import Mesh, set_threads

    plan_with(unit)
    world = MPI.COMM_WORLD
    mesh = Mesh.create(world, world.Get_size(), "mpi")
    set_threads(mesh.local_size)
    with Checkpoint(path) as ck:
        model = build_model(ck, mesh.tp_rank, mesh.tp_size, mesh.tp_comm)
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, VOCAB, 256) for _ in range(16)]
    score_documents(model, docs[:2], 512, 256)   # warm up

    def best(fn, repeat):
        times = []
        for _ in range(repeat):
            world.Barrier()
            t0 = time.perf_counter()
            fn()
            world.Barrier()
            times.append(time.perf_counter() - t0)
        return min(times)
    prefill = 16 * 256 / best(lambda: score_documents(model, docs, 512, 256, batch_tokens=1024), 3)
    rows = torch.as_tensor(rng.integers(0, VOCAB, (8, 1)))
    decode = 8 / best(lambda: model(rows), 60)
    loads = world.gather((rank_load(model), expert_bytes(model)), root=0)
    if world.Get_rank() == 0:
        print(json.dumps({"unit": unit, "prefill": prefill, "decode": decode, "loads": [n for n, _ in loads],
                          "expert_mib": [round(b / 2**20, 1) for _, b in loads]}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--run", nargs=2, metavar=("UNIT", "CKPT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        return run(*args.run)
    os.makedirs(CACHE, exist_ok=True)
    got = {}
    for unit in UNITS:
        path = os.path.join(CACHE, f"moe_split_{unit}.h5")
        if not os.path.exists(path):
            make(unit, path)
        env = dict(os.environ, PYTHONSAFEPATH="1")
        proc = subprocess.run(["mpiexec", "-n", str(args.tp), sys.executable, os.path.abspath(__file__), "--run",
                               unit, path], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{unit}: mpiexec failed:\n{proc.stderr[-2000:]}")
        got[unit] = json.loads(proc.stdout.strip().splitlines()[-1])
        g = got[unit]
        print(f"{unit:10s} tp={args.tp}  prefill {g['prefill']:7.0f} tok/s  decode (8 rows) {g['decode']:6.0f} tok/s  "
              f"token x expert per rank {g['loads']}  expert MiB per rank {g['expert_mib']}", flush=True)
    a, b = got["experts"], got["expert_ffn"]
    print(f"whole experts / 1/tp columns: prefill {a['prefill'] / b['prefill']:.2f}x, "
          f"decode {a['decode'] / b['decode']:.2f}x")


if __name__ == "__main__":
    main()
