"""`hpcllm embed`: one pooled (and, per the model, normalised) vector per document.

Encoders (BERT family): batches pack documents without padding
(``make_batches(..., padded=False)`` counts real tokens); the encoder runs on
the packed run and pools and normalises as its sentence-transformers config
says (hpcllm.model.encoder).

Decoders (every family of ``DECODER_FAMILIES``; Qwen3-Embedding, gte-Qwen2,
e5-mistral are such embedders): the decoder's forward, which ends at the final
norm (no LM head), over right-padded batches of documents sorted by length (a
causal model never attends a right pad); ``--pooling last`` takes each
document's last token, ``mean`` averages its tokens; L2-normalised unless
``--no-normalize``.  BOS goes first where the model's config says
(``scoring.with_bos``), the model's EOS last with ``--append-eos``.  After the
last all-reduce every tp rank holds the whole hidden states, so each pools
them itself: nothing is gathered.  A document left without tokens (empty, no
BOS, no EOS) keeps the fill vector.

Then, for every model: ``--truncate-dim N`` keeps the first N dimensions
(Matryoshka; normalised again where the vectors are normalised), and
``--out-dtype`` stores them as float32 / float16, as int8 (``quantize_int8``:
per-vector symmetric codes, the scale in ``embedding_scale``) or as packed
sign bits (``quantize_binary``; uint8, sentence-transformers' "ubinary").
``--prefix`` is prepended to each document's text before tokenizing.
"""

import functools
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from hpcllm.corpus.batching import make_batches, pack_batch
from hpcllm.errors import HpcllmError
from hpcllm.executor.job import Job, ShardResult
from hpcllm.model.architectures import architecture, require_family
from hpcllm.scoring import with_bos
from hpcllm.store.results import BASE_COLUMNS, N_TOKENS, Column

BINARY = np.dtype(np.uint8)     # the stored dtype of --out-dtype binary
INT8 = np.dtype(np.int8)


class EmbedJob(Job):
    name = "embed"
    repeats = "same"        # a repeated document is embedded once (hpcllm/executor/repeats.py)

    def __init__(self, cfg, ckpt):
        super().__init__(cfg, ckpt)
        c = ckpt.config
        # classify / train-classifier (subclasses) run encoders only
        self.decoder = self.name == "embed" and architecture(ckpt.architecture).family == "decoder"
        if self.decoder:
            self._decoder_options(cfg, c)
        else:
            require_family(ckpt, "encoder", self.name)
            self.max_length = min(cfg.max_length or c["max_length"], c["max_positions"])
            given = [f for f, v in (("--pooling", cfg.pooling), ("--append-eos", cfg.append_eos),
                                    ("--no-normalize", cfg.no_normalize)) if v]
            if given:
                raise HpcllmError(f"{self.name}: {', '.join(given)} apply to decoder models; {ckpt.path} is an "
                                  f"encoder, which pools and normalises as its sentence-transformers config says")
        self.normalized = not cfg.no_normalize if self.decoder else bool(c["normalize"])
        self.dim = cfg.truncate_dim or c["hidden"]
        if not 1 <= self.dim <= c["hidden"]:
            raise HpcllmError(f"{self.name}: --truncate-dim must be in 1..{c['hidden']} (the model's hidden size), "
                              f"got {cfg.truncate_dim}")
        self.out_dtype = np.dtype("uint8" if cfg.out_dtype == "binary" else cfg.out_dtype)
        if cfg.prefix:
            self.text_of = functools.partial(_prefixed, cfg.prefix, cfg.text_field)
            self.text_of_needs = "--prefix (prepended to each document's text before tokenizing)"
        if cfg.openai_batch:      # /v1/embeddings request lines: body.input is the text (hpcllm.corpus.openai_batch)
            from hpcllm.corpus.openai_batch import embedding_requests

            self.text_of, self.params_of = embedding_requests(cfg, self.text_of)
            self.text_of_needs = "--openai-batch (each line's request)"

    def _decoder_options(self, cfg, c):
        self.pooling = cfg.pooling or "last"
        self.eos = c.get("eos_id") if cfg.append_eos else None
        if cfg.append_eos and self.eos is None:
            raise HpcllmError(f"{self.name}: --append-eos: {cfg.model} names no EOS token")
        # room for the tokens added here (BOS counted even where the template put it there already)
        added = int(self.eos is not None) + int(bool(c.get("add_bos")) and c.get("bos_id") is not None)
        self.max_length = min(cfg.max_length or c["max_positions"], c["max_positions"]) - added
        if self.max_length < 1:
            raise HpcllmError(f"{self.name}: --max-length must leave room for a token besides the {added} "
                              f"added (BOS / EOS), got {cfg.max_length}")

    def schema(self):
        if self.out_dtype == INT8:
            cols = (Column("embedding", INT8, (self.dim,), 0, attrs={"quantization": "int8",
                                                                     "scale": "embedding_scale"}),
                    Column("embedding_scale", np.float32, (), np.nan))
        elif self.out_dtype == BINARY:
            cols = (Column("embedding", BINARY, (-(-self.dim // 8),), 0,
                           attrs={"quantization": "ubinary", "dim": self.dim}),)
        else:
            cols = (Column("embedding", self.out_dtype, (self.dim,), np.nan),)
        return cols + (N_TOKENS,) + BASE_COLUMNS

    def start(self, work):
        rows = work.process
        if self.decoder:
            docs = [self._decoder_tokens(work.doc(r)) for r in rows]
            keep = np.array([len(d) > 0 for d in docs], bool)
            rows, docs = rows[keep], [d for d, k in zip(docs, keep) if k]
            lengths = np.array([len(d) for d in docs], np.int64)
        else:
            docs, lengths = None, np.diff(work.offsets)[rows]
        return SimpleNamespace(work=work, rows=rows, docs=docs, out=self.empty_outputs(work.n_docs),
                               batches=make_batches(lengths, self.cfg.batch_tokens, self.cfg.window,
                                                    padded=self.decoder))

    def _decoder_tokens(self, ids: np.ndarray) -> np.ndarray:
        """A document's ids as the decoder sees them: BOS per the model's config, EOS with --append-eos."""
        ids = with_bos(ids.astype(np.int64), self.ckpt.config)
        if self.eos is not None and not (len(ids) and ids[-1] == self.eos):
            ids = np.append(ids, self.eos)
        return ids

    def compute(self, model, state, batch):
        rows = state.rows[batch]
        device = next(model.parameters()).device
        if self.decoder:
            vec = self._decoder_vectors(model, [state.docs[i] for i in batch], device)
        else:
            flat, doc_lengths = pack_batch(state.work.ids, state.work.offsets, rows)
            vec = model(torch.from_numpy(flat).to(device), torch.from_numpy(doc_lengths).to(device))
        self.store(state.out, rows, vec)

    def _decoder_vectors(self, model, docs, device) -> torch.Tensor:
        """Pooled (and normalised) final hidden states [B, hidden] of documents padded on the right."""
        lengths = torch.tensor([len(d) for d in docs], dtype=torch.int64)
        ids = torch.zeros((len(docs), int(lengths.max())), dtype=torch.int64)
        for i, d in enumerate(docs):
            ids[i, :len(d)] = torch.from_numpy(d)
        hidden, lengths = model(ids.to(device)).float(), lengths.to(device)
        if self.pooling == "last":
            vec = hidden[torch.arange(len(docs), device=device), lengths - 1]
        else:
            real = torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]
            vec = (hidden * real[..., None]).sum(1) / lengths[:, None]
        return F.normalize(vec, dim=-1) if self.normalized else vec

    def empty_outputs(self, n_docs: int) -> dict:
        """The shard's output arrays, filled with the schema's fill values."""
        return {c.name: np.full((n_docs, *c.shape_tail), c.fill, c.np_dtype)
                for c in self.schema() if c.name.startswith("embedding")}

    def store(self, out: dict, rows, vectors: torch.Tensor) -> None:
        """The pooled vectors of ``rows`` into the output arrays: truncated, quantised as --out-dtype says."""
        vectors = vectors.float().cpu()
        if self.dim < vectors.shape[1]:
            vectors = vectors[:, :self.dim]
            if self.normalized:
                vectors = F.normalize(vectors, dim=-1)
        x = vectors.numpy()
        if self.out_dtype == INT8:
            out["embedding"][rows], out["embedding_scale"][rows] = quantize_int8(x)
        elif self.out_dtype == BINARY:
            out["embedding"][rows] = quantize_binary(x)
        else:
            out["embedding"][rows] = x.astype(self.out_dtype, copy=False)

    def result(self, state):
        return ShardResult(state.out)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-vector symmetric int8: codes round(x / s) in [-127, 127], s = max|x| / 127 (float32, 0 for a
    zero vector); x ~ codes * s (``hpcllm.results.dequantize``).  Unlike sentence-transformers' int8
    (per-dimension ranges from calibration data), every vector carries its own scale: nothing to calibrate."""
    scale = (np.abs(x).max(axis=1) / 127).astype(np.float32)
    codes = np.rint(x / np.where(scale > 0, scale, 1)[:, None])
    return np.clip(codes, -127, 127).astype(np.int8), scale


def quantize_binary(x: np.ndarray) -> np.ndarray:
    """Sign bits (1: > 0) packed 8 to a byte, first dimension in the high bit, the last byte zero-padded:
    sentence-transformers' ``quantize_embeddings(x, "ubinary")``."""
    return np.packbits(x > 0, axis=-1)


def _prefixed(prefix: str, field: str, obj: dict):
    """A JSON line's text with the --prefix before it (None: no text, status missing_field); a blank
    text stays as it is (status empty)."""
    text = obj.get(field)
    if not isinstance(text, str):
        return None
    return prefix + text if text.strip() else text
