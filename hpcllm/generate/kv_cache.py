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

A sliding-window layer (``layer_types``: Mistral, Phi-3, Gemma's local layers)
keeps only its window: its slots are rings of ``min(window, slot_len)`` rows,
position p at row p mod ring. A decoding token then attends its ring's rows as
they are (the window is exactly what the ring holds, in any order: RoPE is
already in the keys), and a prefill chunk that wraps reads the window before
the chunk from the ring before writing its own rows. Gemma 3 (5 of 6 layers
sliding over 512 positions) so holds ~1/6 of a full cache at long contexts.
A shared prefix is only reusable from a ring that has not moved past it
(``reusable``).

A step packs its tokens ``[1, T]``: first one token per decoding sequence,
then the prefill chunks. ``Step`` tells each layer where they go.
"""

from __future__ import annotations

import torch

from hpcllm.model.decoder import attention


def ring_lengths(model, slot_len: int) -> list[int]:
    """Rows each layer's slot holds: ``slot_len``, or a sliding layer's window when that is shorter."""
    return [min(layer.attn.window or slot_len, slot_len) for layer in model.layers]


def slot_bytes(model, slot_len: int, dtype) -> int:
    """Bytes one slot costs on this rank: K and V of every layer, for ``slot_len`` positions (a sliding
    layer: its window)."""
    attn = model.layers[0].attn
    rows = sum(ring_lengths(model, slot_len))
    return 2 * attn.n_kv_heads * rows * attn.head_dim * torch.finfo(dtype).bits // 8


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
        rings = ring_lengths(model, slot_len)
        self.k = [torch.zeros((n_slots, attn.n_kv_heads, r, attn.head_dim), dtype=dtype, device=device) for r in rings]
        self.v = [torch.zeros((n_slots, attn.n_kv_heads, r, attn.head_dim), dtype=dtype, device=device) for r in rings]
        self.n_slots, self.slot_len, self.gqa = n_slots, slot_len, attn.n_heads != attn.n_kv_heads
        # the shortest ring: a prefix held in a slot is reusable only while no ring has moved past it
        self.ring = min((r for r in rings if r < slot_len), default=None)
        self.nbytes = sum(2 * k.numel() * k.element_size() for k in self.k)
        # decode attention: the Numba kernel (fp32 on the CPU) or batched matmuls (LayerKV._decode)
        self.kernel = self.k[0].device.type == "cpu" and dtype == torch.float32

    def fits(self, n_slots: int, slot_len: int) -> bool:
        return self.n_slots >= n_slots and self.slot_len >= slot_len

    def reusable(self, n: int, held: int) -> int:
        """How much of an n-token prefix of what a slot holds (``held`` positions written) can be reused:
        all of it, unless a ring has overwritten part of the window before position n."""
        return n if self.ring is None or held <= max(n, self.ring) else 0

    def copy(self, src: int, dst: int, n: int) -> None:
        """Positions [0, n) of slot ``src`` into slot ``dst`` (a shared prefix, or a fork for --n); a ring
        layer copies its rows (positions [n - ring, n))."""
        if src != dst and n > 0:
            for k, v in zip(self.k, self.v):
                rows = min(n, k.shape[2])
                k[dst, :, :rows] = k[src, :, :rows]
                v[dst, :, :rows] = v[src, :, :rows]

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
        self.layouts = {}

    def decode(self, rows: int):
        """The decode layout for a layer whose slots hold ``rows`` positions (a ring: its window)."""
        if rows not in self.layouts:
            n = self.n_decode
            self.layouts[rows] = _decode_layout(self.slots[:n], torch.clamp(self.pos[:n] + 1, max=rows),
                                                self.cache.kernel)
        return self.layouts[rows]

    @property
    def positions(self) -> torch.Tensor:
        return self.pos[None]

    def layer(self, i: int) -> "LayerKV":
        return LayerKV(self, self.cache.k[i], self.cache.v[i])


def _decode_layout(slots, lengths, kernel: bool):
    """How decode attention reads the cache (each sequence's first ``lengths`` rows of its slot): with
    the kernel, each sequence's own rows (``hpcllm.kernels.attention``: "slots", "lengths"); else over
    a view of slots [0, S) when the decoding sequences fill at least half of them (no gather), else
    over a gather of their slots."""
    if kernel:
        return {"slots": slots.numpy(), "lengths": lengths.numpy()}
    length = int(lengths.max())
    span = int(slots.max()) + 1
    if 2 * len(slots) >= span:
        lens = torch.ones(span, dtype=torch.int64)   # idle slots read one (ignored) position
        lens[slots] = lengths
        mask = torch.arange(length)[None] < lens[:, None]
        return {"view": span, "rows": slots, "length": length, "mask": mask[:, None, None]}
    mask = torch.arange(length)[None] < lengths[:, None]
    return {"view": None, "rows": slots, "length": length, "mask": mask[:, None, None]}


class LayerKV:
    """One layer's cache during one step: ``attend`` writes the new keys/values and attends."""

    def __init__(self, step: Step, k_cache, v_cache):
        self.step, self.kc, self.vc = step, k_cache, v_cache
        self.rows = k_cache.shape[2]                 # slot_len, or a sliding layer's ring

    def attend(self, q, k, v, attn):
        """q [1, Hq, T, D], k and v [1, Hkv, T, D] of the packed tokens -> attention output [1, Hq, T, D]
        (in q's dtype; computed in the cache's, ``cache_dtype``). ``attn``: the layer's attention
        (its window, query scale and soft-cap)."""
        st, R = self.step, self.rows
        k, v = k[0].transpose(0, 1).to(self.kc.dtype), v[0].transpose(0, 1).to(self.vc.dtype)   # [T, Hkv, D]
        # a chunk that wraps its ring reads the window before it first, then writes (below)
        wraps = [p0 + n > R for _, p0, n in st.chunks]
        if not any(wraps):
            self.kc[st.slots, :, st.pos % R] = k
            self.vc[st.slots, :, st.pos % R] = v
        else:
            d = st.n_decode
            self.kc[st.slots[:d], :, st.pos[:d] % R] = k[:d]
            self.vc[st.slots[:d], :, st.pos[:d] % R] = v[:d]
        parts, dtype = [], q.dtype
        q = q.to(self.kc.dtype)
        if st.n_decode:
            parts.append(self._decode(q[0, :, :st.n_decode], attn))
        t = st.n_decode
        for (slot, p0, n), wrap in zip(st.chunks, wraps):
            if wrap:
                parts.append(self._prefill_ring(q[:, :, t:t + n], k[t:t + n], v[t:t + n], slot, p0, n, attn))
            elif any(wraps):
                self.kc[slot, :, p0:p0 + n] = k[t:t + n].transpose(0, 1)
                self.vc[slot, :, p0:p0 + n] = v[t:t + n].transpose(0, 1)
                parts.append(self._prefill(q[:, :, t:t + n], slot, p0, n, attn))
            else:
                parts.append(self._prefill(q[:, :, t:t + n], slot, p0, n, attn))
            t += n
        return (torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]).to(dtype)

    def _decode(self, q, attn):
        """q [Hq, B, D] (one token per decoding sequence) -> [1, Hq, B, D]; each sequence reads the first
        min(position + 1, rows) rows of its slot (a ring: its window, whatever their order).

        On the CPU in fp32 a Numba kernel that reads each sequence's own positions once
        (``hpcllm.kernels.attention``: 2-3.7x the matmuls below at 32 sequences of 20-260
        positions). Elsewhere two batched matmuls over the cache (the query heads of a KV head
        as the rows of one matrix, so GQA needs no repeated K/V): faster than the fused SDPA
        kernel, whose per-call cost dominates at one query row per sequence."""
        lay = self.step.decode(self.rows)
        scale = attn.head_dim ** -0.5 if attn.scale is None else attn.scale
        if self.step.cache.kernel:
            from hpcllm.kernels.attention import decode_attention

            out = torch.empty((q.shape[1], q.shape[0], q.shape[2]))
            decode_attention(q.transpose(0, 1).contiguous().numpy(), self.kc.numpy(), self.vc.numpy(),
                             lay["slots"], lay["lengths"], scale, attn.softcap or 0.0, out.numpy())
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
        scores = torch.matmul(q.view(q.shape[0], hkv, hq // hkv, d), k.transpose(-1, -2)) * scale
        if attn.softcap is not None:
            scores = torch.tanh(scores / attn.softcap) * attn.softcap
        scores.masked_fill_(~lay["mask"], float("-inf"))            # [S, Hkv, G, L]
        out = torch.matmul(torch.softmax(scores, dim=-1), v).view(q.shape[0], hq, d)
        if lay["view"] is not None:
            out = out[rows]
        return out.transpose(0, 1)[None]

    def _prefill(self, q, slot, p0, n, attn):
        """q [1, Hq, n, D] of positions [p0, p0 + n) of the sequence in ``slot`` (already written, no
        wrap: position p at row p)."""
        lo = 0 if attn.window is None else max(0, p0 + 1 - attn.window)
        k, v = self.kc[slot:slot + 1, :, lo:p0 + n], self.vc[slot:slot + 1, :, lo:p0 + n]
        return attention(q, k, v, torch.arange(p0, p0 + n), torch.arange(lo, p0 + n), scale=attn.scale,
                         window=attn.window, softcap=attn.softcap)

    def _prefill_ring(self, q, k, v, slot, p0, n, attn):
        """A chunk that wraps its ring: the window's keys before p0 (read from their rows p mod R), then
        the chunk's own; afterwards the chunk's last R positions are written."""
        R = self.rows
        lo = max(0, p0 + 1 - attn.window)
        old = torch.arange(lo, p0) % R
        k_all = torch.cat([self.kc[slot, :, old], k.transpose(0, 1)], dim=1)[None]
        v_all = torch.cat([self.vc[slot, :, old], v.transpose(0, 1)], dim=1)[None]
        out = attention(q, k_all, v_all, torch.arange(p0, p0 + n), torch.arange(lo, p0 + n), scale=attn.scale,
                        window=attn.window, softcap=attn.softcap)
        keep = torch.arange(max(p0, p0 + n - R), p0 + n)
        self.kc[slot, :, keep % R] = k[keep - p0].transpose(0, 1)
        self.vc[slot, :, keep % R] = v[keep - p0].transpose(0, 1)
        return out
