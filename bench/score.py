"""Benchmark: hpcllm scoring vs HF transformers forward + log_softmax (not a test).

    python bench/score.py [--docs 32] [--length 128] [--batch 8] [--threads N] [--dtypes float32,bfloat16]
                           [--repeat 3]

Same model (SmolLM2-135M from its GGUF: HF loads the GGUF itself, hpcllm its
converted checkpoint), same dtype, same batches of real text (documents of
equal length, so both see identical [batch, length] inputs), same threads,
one rank (tp = 1), the best of ``--repeat`` interleaved rounds. Prints tokens/s
for both, the ratio, and the model FLOP utilisation: achieved FLOP/s (matmul FLOPs of the forward + LM head +
attention) over a large square matmul's FLOP/s measured in the same run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/common.py, also under PYTHONSAFEPATH=1

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import corpora, matmul_flops, smollm2_gguf  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GGUF = smollm2_gguf()


def model_flops_per_token(c: dict, length: int) -> float:
    """Multiply-adds x 2 of one token's forward: projections, MLP, LM head, causal attention (average)."""
    h, d = c["hidden"], c["head_dim"]
    proj = h * d * (2 * c["n_heads"] + 2 * c["n_kv_heads"]) + 3 * h * c["ffn"]
    attn = 2 * c["n_heads"] * d * (length + 1) / 2  # q.k and a.v over the causal half
    return 2 * (c["n_layers"] * (proj + attn) + c["vocab"] * h)


def real_docs(tok, n, length):
    ids = np.concatenate([tok(t, add_special_tokens=False)["input_ids"] for t in corpora.mixed(40 * n)])
    if len(ids) < n * length:
        raise SystemExit(f"corpus too small for {n} x {length} tokens")
    return [ids[i * length:(i + 1) * length].astype(np.int64) for i in range(n)]


def dense_hf(h5, dtype):
    """HF LlamaForCausalLM holding the checkpoint's (dequantised) weights as plain dense tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.checkpoint.hf_llama import _LAYER_NAMES, _TOP_NAMES

    with Checkpoint(h5) as ck:
        c = ck.config
        cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["ffn"],
                          num_hidden_layers=c["n_layers"], num_attention_heads=c["n_heads"],
                          num_key_value_heads=c["n_kv_heads"], head_dim=c["head_dim"], rms_norm_eps=c["rms_eps"],
                          rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
                          max_position_embeddings=c["max_positions"], tie_word_embeddings=c["tie_embeddings"])
        hf_name = {v: k for k, v in _TOP_NAMES.items()} | {v: k for k, v in _LAYER_NAMES.items()}
        state = {}
        for name in ck.names:
            base, _, kind = name.rpartition(".")
            if base.startswith("layers."):
                _, i, rest = base.split(".", 2)
                key = f"model.layers.{i}.{hf_name[rest]}.{kind}"
            else:
                key = f"{hf_name[base]}.{kind}"
            state[key] = torch.from_numpy(ck.read(name, lambda shape: tuple(slice(None) for _ in shape)))
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(state, strict=False)
    if c["tie_embeddings"]:
        model.tie_weights()
    return model.to(dtype).eval()


def time_hf(hf, docs, batch, dtype):
    t = time.perf_counter()
    out = []
    with torch.inference_mode():
        for s in range(0, len(docs), batch):
            ids = torch.from_numpy(np.stack(docs[s:s + batch]))
            lp = torch.log_softmax(hf(ids).logits.float(), dim=-1)
            out.append(lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0])
    return time.perf_counter() - t, torch.cat(out).numpy()


def time_hpcllm(model, docs, batch, length):
    from hpcllm.scoring import score_documents

    t = time.perf_counter()
    lps = score_documents(model, docs, length, length // 2, batch_tokens=batch * length)
    return time.perf_counter() - t, np.stack(lps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds (best of); each round runs every side")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpcllm.checkpoint.hdf5 import Checkpoint
    from hpcllm.world.comm import LocalComm
    from hpcllm.checkpoint.convert import convert
    from hpcllm.model.build import build_model

    where, name = os.path.split(GGUF)
    tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    docs = real_docs(tok, args.docs, args.length)
    n_tokens = args.docs * args.length
    with tempfile.TemporaryDirectory() as tmp:
        h5 = os.path.join(tmp, "smollm2.h5")
        convert(GGUF, h5)
        ck = Checkpoint(h5)
        flops_tok = model_flops_per_token(ck.config, args.length)
        print(f"SmolLM2-135M, {args.docs} docs x {args.length} tokens, batch {args.batch}, "
              f"{torch.get_num_threads()} threads")
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            ours = build_model(ck, 0, 1, LocalComm(), dtype)
            hfs = {"HF dense": dense_hf(h5, dtype),
                   "HF GGUF": AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=dtype).eval()}
            time_hpcllm(ours, docs[:args.batch], args.batch, args.length)  # warm-ups
            for hf in hfs.values():
                time_hf(hf, docs[:args.batch], args.batch, dtype)
            best, lps = {}, {}
            for _ in range(args.repeat):      # rounds interleave the runs: the VM's drift hits all alike
                t, lps["hpcllm"] = time_hpcllm(ours, docs, args.batch, args.length)
                best["hpcllm"] = min(best.get("hpcllm", t), t)
                for label, hf in hfs.items():
                    t, lps[label] = time_hf(hf, docs, args.batch, dtype)
                    best[label] = min(best.get(label, t), t)
            t_us = best["hpcllm"]
            achieved = flops_tok * n_tokens / t_us
            peak = matmul_flops(dtype)
            print(f"{dtype_name:9s} hpcllm {n_tokens / t_us:8.1f} tok/s, {achieved / 1e9:6.1f} GFLOP/s = "
                  f"{100 * achieved / peak:4.1f}% of a {peak / 1e9:6.1f} GFLOP/s matmul (best of {args.repeat})")
            for label in hfs:
                t_hf = best[label]
                print(f"{dtype_name:9s} {label:8s} {n_tokens / t_hf:8.1f} tok/s: hpcllm/HF {t_hf / t_us:5.2f}x, "
                      f"max |dlogprob| {np.abs(lps[label] - lps['hpcllm']).max():.1e}")
            del ours, hfs
        ck.close()


if __name__ == "__main__":
    main()
