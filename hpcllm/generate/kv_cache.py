"""The KV cache of one tp rank: slots of keys and values of only this rank's KV heads.

Layout: per layer, K and V are [n_slots, Hkv_local, slot_len, D]. A running
sequence owns one slot; position p of the sequence is row p of its slot.
Hkv_local is the model's local ``n_kv_heads`` after ``parallelize`` (a
replicated KV head when tp > n_kv_heads), so the cache costs 1/tp of the
attention state, as the weights do.

Why slots and not pages: a decode step attends every running sequence in one
call over the slot tensor (on the CPU a Numba kernel reading each sequence's
positions, elsewhere batched matmuls over a view ``k[:S, :, :L]``), with no
gather of pages; shared prefixes are reused by
copying (one memcpy per layer, ~1000x cheaper than recomputing them) or, when
the new prompt lands in the very slot that holds its prefix, not even that
(``hpcllm.generate.scheduler``). The price is that every slot reserves
``slot_len`` positions: the longest prompt + max_new_tokens of the shard.

A step packs its tokens ``[1, T]``: first one token per decoding sequence,
then the prefill chunks. ``Step`` tells each layer where they go.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def slot_bytes(model, slot_len: int, dtype) -> int:
    """Bytes one slot costs on this rank: K and V of every layer for ``slot_len`` positions."""
    attn = model.layers[0].attn
    return 2 * len(model.layers) * attn.n_kv_heads * slot_len * attn.head_dim * torch.finfo(dtype).bits // 8


def cache_dtype(model) -> torch.dtype:
    """The cache's dtype: the model's, except that a bf16 model on the CPU keeps its keys and values
    in fp32 (exact: they are bf16 values) and attends in fp32. Decode attention is one query row per
    head group against the whole cache, where the CPU's bf16 batched matmul measured slower than
    fp32's (0.74 vs 0.51 ms per layer and step, 32 sequences x 250 positions, AVX512-BF16) despite
    reading half the bytes; the price is twice the cache memory per token."""
    dt = model.dtype
    return torch.float32 if dt == torch.bfloat16 and model.head_weight.device.type == "cpu" else dt


class KVCache:
    def __init__(self, model, n_slots: int, slot_len: int, dtype, device="cpu"):
        attn = model.layers[0].attn
        shape = (n_slots, attn.n_kv_heads, slot_len, attn.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]
        self.n_slots, self.slot_len, self.gqa = n_slots, slot_len, attn.n_heads != attn.n_kv_heads
        self.nbytes = 2 * len(model.layers) * self.k[0].numel() * self.k[0].element_size()
        # decode attention: the Numba kernel (fp32 on the CPU) or batched matmuls (LayerKV._decode)
        self.kernel = self.k[0].device.type == "cpu" and dtype == torch.float32

    def fits(self, n_slots: int, slot_len: int) -> bool:
        return self.n_slots >= n_slots and self.slot_len >= slot_len

    def copy(self, src: int, dst: int, n: int) -> None:
        """Positions [0, n) of slot ``src`` into slot ``dst`` (a shared prefix, or a fork for --n)."""
        if src != dst and n > 0:
            for k, v in zip(self.k, self.v):
                k[dst, :, :n] = k[src, :, :n]
                v[dst, :, :n] = v[src, :, :n]

    def step(self, decode_slots, decode_pos, chunks) -> "Step":
        """A forward pass's layout: decoding sequences' (slot, position), then prefill
        ``chunks`` [(slot, first position, n tokens)] in that order in the packed tokens."""
        return Step(self, decode_slots, decode_pos, chunks)


class Step:
    def __init__(self, cache: KVCache, decode_slots, decode_pos, chunks):
        self.cache, self.chunks = cache, chunks
        slots = list(decode_slots) + [s for s, _, n in chunks for _ in range(n)]
        pos = list(decode_pos) + [p for _, p0, n in chunks for p in range(p0, p0 + n)]
        self.slots = torch.tensor(slots, dtype=torch.int64)
        self.pos = torch.tensor(pos, dtype=torch.int64)
        self.n_decode = len(decode_slots)
        if self.n_decode:
            self.decode = _decode_layout(self.slots[:self.n_decode], self.pos[:self.n_decode], cache.kernel)

    @property
    def positions(self) -> torch.Tensor:
        return self.pos[None]

    def layer(self, i: int) -> "LayerKV":
        return LayerKV(self, self.cache.k[i], self.cache.v[i])


def _decode_layout(slots, pos, kernel: bool):
    """How decode attention reads the cache: with the kernel, each sequence's own positions
    (``hpcllm.kernels.attention``: "slots", "lengths"); else over a view of slots [0, S) when the
    decoding sequences fill at least half of them (no gather), else over a gather of their slots."""
    if kernel:
        return {"slots": slots.numpy(), "lengths": (pos + 1).numpy()}
    length = int(pos.max()) + 1
    span = int(slots.max()) + 1
    if 2 * len(slots) >= span:
        lens = torch.ones(span, dtype=torch.int64)   # idle slots read one (ignored) position
        lens[slots] = pos + 1
        mask = torch.arange(length)[None] < lens[:, None]
        return {"view": span, "rows": slots, "length": length, "mask": mask[:, None, None]}
    mask = torch.arange(length)[None] < (pos + 1)[:, None]
    return {"view": None, "rows": slots, "length": length, "mask": mask[:, None, None]}


class LayerKV:
    """One layer's cache during one step: ``attend`` writes the new keys/values and attends."""

    def __init__(self, step: Step, k_cache, v_cache):
        self.step, self.kc, self.vc = step, k_cache, v_cache

    def attend(self, q, k, v):
        """q [1, Hq, T, D], k and v [1, Hkv, T, D] of the packed tokens -> attention output [1, Hq, T, D]
        (in q's dtype; computed in the cache's, ``cache_dtype``)."""
        st = self.step
        self.kc[st.slots, :, st.pos] = k[0].transpose(0, 1).to(self.kc.dtype)
        self.vc[st.slots, :, st.pos] = v[0].transpose(0, 1).to(self.vc.dtype)
        parts, dtype = [], q.dtype
        q = q.to(self.kc.dtype)
        if st.n_decode:
            parts.append(self._decode(q[0, :, :st.n_decode]))
        t = st.n_decode
        for slot, p0, n in st.chunks:
            parts.append(self._prefill(q[:, :, t:t + n], slot, p0, n))
            t += n
        return (torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]).to(dtype)

    def _decode(self, q):
        """q [Hq, B, D] (one token per decoding sequence) -> [1, Hq, B, D].

        On the CPU in fp32 a Numba kernel that reads each sequence's own positions once
        (``hpcllm.kernels.attention``: 2-3.7x the matmuls below at 32 sequences of 20-260
        positions). Elsewhere two batched matmuls over the cache (the query heads of a KV head
        as the rows of one matrix, so GQA needs no repeated K/V): faster than the fused SDPA
        kernel, whose per-call cost dominates at one query row per sequence."""
        lay = self.step.decode
        if self.step.cache.kernel:
            from hpcllm.kernels.attention import decode_attention

            out = torch.empty((q.shape[1], q.shape[0], q.shape[2]))
            decode_attention(q.transpose(0, 1).contiguous().numpy(), self.kc.numpy(), self.vc.numpy(),
                             lay["slots"], lay["lengths"], out.numpy())
            return out.transpose(0, 1)[None]
        rows, length = lay["rows"], lay["length"]
        hq, b, d = q.shape
        q = q.transpose(0, 1)                                       # [B, Hq, D]
        if lay["view"] is not None:
            full = q.new_zeros((lay["view"], hq, d))
            full[rows] = q
            q, k, v = full, self.kc[:lay["view"], :, :length], self.vc[:lay["view"], :, :length]
        else:
            k, v = self.kc[rows, :, :length], self.vc[rows, :, :length]
        hkv = k.shape[1]
        scores = torch.matmul(q.view(q.shape[0], hkv, hq // hkv, d), k.transpose(-1, -2)) * d ** -0.5
        scores.masked_fill_(~lay["mask"], float("-inf"))            # [S, Hkv, G, L]
        out = torch.matmul(torch.softmax(scores, dim=-1), v).view(q.shape[0], hq, d)
        if lay["view"] is not None:
            out = out[rows]
        return out.transpose(0, 1)[None]

    def _prefill(self, q, slot, p0, n):
        """q [1, Hq, n, D] of positions [p0, p0 + n) of the sequence in ``slot``."""
        k, v = self.kc[slot:slot + 1, :, :p0 + n], self.vc[slot:slot + 1, :, :p0 + n]
        gqa = self.step.cache.gqa
        if p0 == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = torch.arange(p0 + n)[None] <= (p0 + torch.arange(n))[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
