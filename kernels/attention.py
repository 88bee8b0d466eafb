"""Decode attention over the KV cache slots: one query token per running sequence.

A decode step has, per sequence, one query row for each of its query heads and
its whole past in the cache. Batched matmuls over a view of the slots read
every slot up to the longest sequence (and pad the rest with a mask); this
kernel reads each sequence's own positions only, once: per (sequence, KV
head) it scores the G query heads of that KV group against each cached key
row, takes the softmax, and sums the value rows. Parallel over (sequence, KV
head); fp32 throughout (the CPU cache is fp32, ``hpcllm.generate.kv_cache``).
"""

import numpy as np
from numba import njit, prange


@njit(nogil=True, cache=True, parallel=True, fastmath=True)
def decode_attention(q, k_cache, v_cache, slots, lengths, scale, softcap, out):
    """q [B, Hq, D] fp32, k_cache / v_cache [S, Hkv, L, D] fp32, slots [B] and lengths [B] int64 ->
    ``out`` [B, Hq, D]: softmax(scale * q k^T) v over rows [0, lengths[b]) of slot slots[b], the
    Hq query heads grouped over the Hkv KV heads (GQA: head j reads KV head j // (Hq / Hkv)).
    ``softcap`` > 0: scores become softcap * tanh(scores / softcap) (Gemma 2)."""
    n, n_q, dim = q.shape
    n_kv = k_cache.shape[1]
    group = n_q // n_kv
    scale = np.float32(scale)
    cap = np.float32(softcap)
    for work in prange(n * n_kv):
        b, h = work // n_kv, work % n_kv
        slot, length = slots[b], lengths[b]
        keys, values = k_cache[slot, h], v_cache[slot, h]
        qs = q[b, h * group:(h + 1) * group]                    # [G, D]
        scores = np.empty((group, length), np.float32)
        for p in range(length):
            for g in range(group):
                acc = np.float32(0.0)
                for d in range(dim):
                    acc += qs[g, d] * keys[p, d]
                acc *= scale
                if cap > 0:
                    acc = cap * np.tanh(acc / cap)
                scores[g, p] = acc
        acc_out = np.zeros((group, dim), np.float32)
        for g in range(group):
            top = scores[g, 0]
            for p in range(1, length):
                top = max(top, scores[g, p])
            total = np.float32(0.0)
            for p in range(length):
                e = np.exp(scores[g, p] - top)
                scores[g, p] = e
                total += e
            inv = np.float32(1.0) / total
            for p in range(length):
                scores[g, p] *= inv
        for p in range(length):
            for g in range(group):
                w = scores[g, p]
                for d in range(dim):
                    acc_out[g, d] += w * values[p, d]
        out[b, h * group:(h + 1) * group] = acc_out
