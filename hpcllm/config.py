"""Job options: one dataclass, from which the CLI flags and the TOML job files derive.

Precedence: dataclass defaults < ``--config FILE.toml`` < command-line flags.
Options marked ``result=True`` change what a job writes; their hash is stored
in the output manifest, and a rerun with different values is refused.
"""

import dataclasses
import hashlib
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field

from hpcllm.corpus.shard import DEFAULT_SHARD_DOCS
from hpcllm.errors import HpcllmError


# Jobs that run a model (every job but tokenize): options of the model and its batches apply to them.
MODEL_JOBS = ("embed", "score", "train-classifier", "classify")
TRAIN = ("train-classifier",)
# Jobs that read whole documents (no context of their own cuts them): --max-doc-tokens / --long-docs apply
# (a job honours them through Job.limit_documents, hpcllm/executor/job.py).
DOC_JOBS = ("score", "generate", "classify")
DEFAULT_MAX_DOC_TOKENS = 32768


GEN = ("generate",)
MODEL_JOBS += GEN
RERANK = ("rerank",)
MODEL_JOBS += RERANK
# Jobs that compute a repeated document once (Job.repeats; hpcllm/executor/repeats.py).
REPEAT_JOBS = ("embed", "score", "classify", "train-classifier", "generate", "rerank")


def opt(default, help, result=False, choices=None, jobs=None):
    return field(default=default, metadata={"help": help, "result": result, "choices": choices, "jobs": jobs})


@dataclass
class JobConfig:
    model: str = opt(None, "HDF5 checkpoint written by `hpcllm convert` (tokenize: use its tokenizer and max length)", result=False)
    tokenizer: str = opt(None, "a HF tokenizer.json to tokenize with, instead of --model", jobs=("tokenize",))
    input: str = opt(None, "corpus: a .jsonl / .txt file (optionally .gz or .zst), .parquet, a datasets.save_to_disk directory, a directory, a glob, or HDF5 token shards", result=True)
    output: str = opt(None, "output directory (results.h5, shards/, manifest.json)")
    tp: int = opt(1, "tensor-parallel ranks per model replica (must divide the world size)", jobs=MODEL_JOBS)
    comm: str = opt("mpi", "collectives backend", choices=("mpi", "torch"), jobs=MODEL_JOBS)
    device: str = opt("cpu", "torch device (cpu, cuda)", jobs=MODEL_JOBS)
    dtype: str = opt("float32", "compute dtype", result=True, choices=("float32", "bfloat16"), jobs=MODEL_JOBS)
    text_field: str = opt("text", "JSONL field or Parquet / Arrow column holding the document text (a.b: nested)", result=True)
    id_field: str = opt(None, "JSONL field holding the document id (default: the `id` field where a line has one, else file:line)", result=True)
    format: str = opt("auto", "input format", result=True, choices=("auto", "jsonl", "text"))
    max_length: int = opt(None, "max tokens per document incl. special tokens (default: an encoder's own; "
                          "a decoder scores longer documents with a sliding window of this length; "
                          "tokenize --tokenizer: no limit)", result=True)
    max_doc_bytes: int = opt(64 << 20, "documents larger than this are not processed (status too_long)", result=True)
    max_doc_tokens: int = opt(DEFAULT_MAX_DOC_TOKENS, "most tokens of one document (special tokens included; 0: no "
                              "limit): a longer one is processed on its first N tokens (status truncated) or, with "
                              "--long-docs skip, not at all (status too_long)", result=True, jobs=DOC_JOBS)
    long_docs: str = opt("truncate", "documents longer than --max-doc-tokens: `truncate` (keep the first N tokens) "
                         "or `skip` (status too_long, NaN outputs)", result=True, choices=("truncate", "skip"),
                         jobs=DOC_JOBS)
    repeats: str = opt("auto", "documents repeated in the corpus (the same token ids and request options): `share` "
                       "computes one and copies its results to the others; `compute` runs each; `auto`: share, but "
                       "not in sampled generation (each document's seed is its id's, so copies differ)", result=True,
                       choices=("auto", "share", "compute"), jobs=REPEAT_JOBS)
    repeat_cache_mb: float = opt(256.0, "MiB per dp group holding results of documents computed in earlier shards, "
                                 "for their repeats in later ones (0: repeats are found within a shard only)",
                                 jobs=REPEAT_JOBS)
    shard_docs: int = opt(DEFAULT_SHARD_DOCS, "most documents per corpus shard (unit of resume and of work claiming); a small corpus is cut into 4 shards per dp group", result=True)
    chunk_mb: float = opt(None, "size of the files finished shards are consolidated into, which results.h5 joins "
                          "(default: 1024, larger where a result would need over 64 of them; 0: one per shard)")
    batch_tokens: int = opt(4096, "token budget of one batch (encoder embed, score: real tokens, documents / "
                            "windows are packed; decoder embed: padded to the batch's longest; generate: tokens of "
                            "one forward pass, decodes and prefill chunks)", jobs=MODEL_JOBS)
    window: int = opt(2048, "embed / score / classify: this many documents at a time are sorted by length before "
                      "batching", jobs=tuple(j for j in MODEL_JOBS if j != "generate"))
    threads: int = opt(None, "threads per rank (default: cores per rank on the node)")
    out_dtype: str = opt("float32", "embedding dtype in results: float32, float16, int8 (per-vector symmetric codes, "
                         "their scale in embedding_scale) or binary (sign bits packed 8 to a uint8, as "
                         "sentence-transformers' ubinary)", result=True,
                         choices=("float32", "float16", "int8", "binary"), jobs=("embed",))
    pooling: str = opt(None, "decoder models: `last` (default: the hidden state after the final norm at each "
                       "document's last token) or `mean` (over its tokens); an encoder pools as its "
                       "sentence-transformers config says", result=True, choices=("last", "mean"), jobs=("embed",))
    prefix: str = opt(None, "an instruction prepended to every document's text before tokenizing (e.g. \"query: \")",
                      result=True, jobs=("embed",))
    append_eos: bool = opt(False, "decoder models: end every document with the model's EOS token (e5-mistral); leave "
                           "it off where the tokenizer's template appends one (Qwen3-Embedding)", result=True,
                           jobs=("embed",))
    no_normalize: bool = opt(False, "decoder models: keep the pooled vectors as they are (default: L2-normalised)",
                             result=True, jobs=("embed",))
    truncate_dim: int = opt(None, "keep the first N dimensions of every embedding (Matryoshka), normalised again "
                            "where the vectors are normalised", result=True, jobs=("embed",))
    stride: int = opt(None, "sliding-window stride for documents longer than the context (default: half the context)",
                      result=True, jobs=("score",))
    token_logprobs: bool = opt(False, "also write per-token log-probabilities", result=True, jobs=("score",))
    label_field: str = opt("label", "JSONL field holding the label (any JSON value; rows without one are skipped)", jobs=TRAIN)
    head: str = opt("linear", "classifier head: multinomial logistic regression or a one-hidden-layer MLP",
                    choices=("linear", "mlp"), jobs=TRAIN)
    validation: float = opt(0.1, "held-out fraction (stratified, by document id) for metrics and early stopping", jobs=TRAIN)
    epochs: int = opt(1000, "most full-batch optimiser iterations (each sees every training row once)", jobs=TRAIN)
    l2: float = opt(1e-2, "L2 penalty on the head's weight matrices (on standardised embeddings: 1e-2 was best of 1e-4..1e-1 "
                    "on the fortunes topics, bench/classify_pipeline.py)", jobs=TRAIN)
    class_weight: str = opt("none", "class weights in the loss", choices=("none", "balanced"), jobs=TRAIN)
    hidden: int = opt(256, "hidden units of the mlp head", jobs=TRAIN)
    patience: int = opt(5, "validation rounds (of 20 iterations) without improvement before stopping", jobs=TRAIN)
    finetune: int = opt(0, "after the head, train the encoder with it for this many epochs (data-parallel over all "
                         "ranks; 0: the encoder stays as it is)", jobs=TRAIN)
    finetune_lr: float = opt(1e-4, "fine-tuning: the encoder's peak AdamW learning rate (warm-up over 6% of the steps, then "
                             "linear decay)", jobs=TRAIN)
    finetune_head_lr: float = opt(3e-3, "fine-tuning: the head's peak learning rate (a fresh head learns faster than the "
                                  "encoder may move: 3e-3 vs 1e-4 measured 0.624 vs 0.483 validation accuracy after "
                                  "1 epoch on the fortunes topics)",
                                  jobs=TRAIN)
    finetune_batch: int = opt(32, "fine-tuning: documents per step, over all ranks", jobs=TRAIN)
    seed: int = opt(0, "seed of the validation split and the head's initialisation (train-classifier); of the "
                    "sampling noise (generate: a completion's stream depends only on the seed, its document id, "
                    "completion index and step); of the MinHash permutations (dedup, as datasketch's seed)",
                    jobs=TRAIN + GEN + ("dedup",))
    encoder: str = opt(None, "the classifier's encoder checkpoint (default: the path the classifier records)",
                       jobs=("classify",))
    labels: str = opt(None, "zero-shot classify with a decoder --model: the class names, comma separated (each scored "
                      "by its log-likelihood after the prompt)", result=True, jobs=("classify",))
    labels_file: str = opt(None, "zero-shot classify: a file of class names, one per line (instead of --labels)",
                           result=True, jobs=("classify",))
    prompt_template: str = opt(None, "zero-shot classify: the prompt, with {text} (the document) and optionally {labels} "
                               "(the names, comma separated); default: hpcllm.jobs.zero_shot.DEFAULT_TEMPLATE",
                               result=True, jobs=("classify",))
    # generate: names and meanings as in vLLM's SamplingParams where they overlap
    max_new_tokens: int = opt(16, "most tokens generated per completion", result=True, jobs=GEN)
    temperature: float = opt(1.0, "sampling temperature (0: greedy)", result=True, jobs=GEN)
    top_p: float = opt(1.0, "nucleus sampling: keep the most likely tokens holding this much probability", result=True, jobs=GEN)
    top_k: int = opt(0, "keep the k most likely tokens (0: all)", result=True, jobs=GEN)
    min_p: float = opt(0.0, "drop tokens less likely than min_p times the most likely one", result=True, jobs=GEN)
    repetition_penalty: float = opt(1.0, "divide positive (multiply negative) logits of tokens already in the "
                                    "prompt or output by this", result=True, jobs=GEN)
    stop: list[str] = opt(None, "stop string (repeatable; a TOML list): generation ends when the text contains it; "
                          "trimmed from the text", result=True, jobs=GEN)
    stop_token_ids: list[int] = opt(None, "token id that ends generation (repeatable; a TOML list)", result=True, jobs=GEN)
    ignore_eos: bool = opt(False, "keep generating past the model's EOS ids", result=True, jobs=GEN)
    no_prefix_cache: bool = opt(False, "recompute prompt prefixes that other prompts share instead of reusing their KV "
                                "(to measure the prefix cache)", jobs=GEN)
    n: int = opt(1, "completions per prompt (they share the prompt's KV cache)", result=True, jobs=GEN)
    logprobs: bool = opt(False, "also write the sampled tokens' log-probabilities (output_logprobs)", result=True, jobs=GEN)
    choices: str = opt(None, "constrained decoding: every completion is exactly one of these strings, comma separated",
                       result=True, jobs=GEN)
    choices_file: str = opt(None, "constrained decoding: a file of choices, one per line (instead of --choices)",
                            result=True, jobs=GEN)
    regex: str = opt(None, "constrained decoding: every completion fully matches this regular expression", result=True,
                     jobs=GEN)
    json_schema: str = opt(None, "constrained decoding: a JSON schema file; every completion is JSON valid under it",
                           result=True, jobs=GEN)
    grammar: str = opt(None, "constrained decoding: a Lark grammar file (llguidance's Lark); every completion is a "
                       "sentence of it", result=True, jobs=GEN)
    response_format_field: str = opt(None, "constrained decoding per JSONL line: the field holding a line's own "
                                     "OpenAI-style response_format (json_schema, json_object, text, regex, choice, "
                                     "grammar); lines without it take the job's constraint", result=True, jobs=GEN)
    chat: bool = opt(False, "apply the model's chat template, the text as one user message", result=True, jobs=GEN)
    system: str = opt(None, "with --chat: a system message before the user message", result=True, jobs=GEN)
    messages_field: str = opt("messages", "with --chat: JSONL field holding a conversation [{role, content}, ...], "
                              "used instead of the text where present", result=True, jobs=GEN)
    openai_batch: bool = opt(False, "input lines are OpenAI Batch requests (custom_id, url, body: messages / prompt / "
                             "input and per-request max_tokens, temperature, top_p, seed, stop, n); the document "
                             "id is the custom_id; `hpcllm export --format openai-batch` writes OpenAI's output "
                             "lines", result=True, jobs=("generate", "embed"))
    truncate_prompt: bool = opt(False, "cut prompts that leave no room for max_new_tokens from the left (status "
                                "truncated) instead of status too_long", result=True, jobs=GEN)
    kv_cache_mb: float = opt(2048.0, "KV cache per rank, MiB (it holds only the rank's KV heads; fewer sequences run together when it is full)", jobs=GEN)
    max_num_seqs: int = opt(64, "most sequences decoded together", jobs=GEN)
    progress: float = opt(10.0, "seconds between progress lines on rank 0 (0: none)")
    follow: bool = opt(False, "follow mode: keep polling the --input directory and process files as they land")
    poll_s: float = opt(10.0, "follow mode: seconds between polls of the input directory")
    idle_exit: float = opt(None, "follow mode: exit 0 after this many seconds with no new file and nothing left to do")
    max_files: int = opt(None, "follow mode: admit at most this many files, then finish")
    complete: str = opt("rename", "follow mode: when a file is complete: `rename` (moved in; same size and mtime at "
                        "two polls) or `marker` (NAME.done exists)", choices=("rename", "marker"))
    # dedup (hpcllm/jobs/dedup.py)
    shingle: str = opt("word", "dedup: shingles of --ngram words or characters of the normalised text", result=True,
                       choices=("word", "char"), jobs=("dedup",))
    ngram: int = opt(5, "dedup: words (or characters) per shingle", result=True, jobs=("dedup",))
    num_perm: int = opt(128, "dedup: MinHash permutations per document", result=True, jobs=("dedup",))
    bands: int = opt(None, "dedup: LSH bands (with --rows; default: chosen from --threshold as datasketch's "
                     "MinHashLSH does, but with false negatives weighing 9x)", result=True, jobs=("dedup",))
    rows: int = opt(None, "dedup: permutations per LSH band", result=True, jobs=("dedup",))
    threshold: float = opt(0.8, "dedup: the Jaccard similarity the bands are chosen for (without --bands/--rows)",
                           result=True, jobs=("dedup",))
    simplify: bool = opt(False, "dedup: also lowercase, strip punctuation and diacritics and zero digits before "
                         "comparing (datatrove's simplify_text); always: NFC, whitespace collapsed", result=True,
                         jobs=("dedup",))
    memory_mb: float = opt(1024.0, "dedup: band records a rank holds in memory, MiB; more spill to sorted runs under "
                           "OUT/dedup/", jobs=("dedup",))
    store_minhash: bool = opt(False, "dedup: also write each document's MinHash signature (column minhash)",
                              result=True, jobs=("dedup",))
    verify: bool = opt(False, "dedup: join only candidates whose exact Jaccard similarity (of their shingle sets) is "
                       "at least --threshold (saves each document's shingle set with its signatures)",
                       result=True, jobs=("dedup",))
    embeddings: str = opt(None, "dedup: semantic duplicates instead (SemDeDup): the `hpcllm embed` output of the same "
                          "--input; rows of cosine similarity >= --cosine inside one of --kmeans clusters", result=True,
                          jobs=("dedup",))
    cosine: float = opt(0.95, "dedup --embeddings: the cosine similarity that makes two documents duplicates",
                        result=True, jobs=("dedup",))
    kmeans: int = opt(100, "dedup --embeddings: k-means clusters (pairs are compared inside each)", result=True,
                      jobs=("dedup",))
    kmeans_iter: int = opt(20, "dedup --embeddings: k-means rounds", result=True, jobs=("dedup",))
    # rerank (hpcllm/jobs/rerank.py)
    query_field: str = opt("query", "rerank: JSONL field holding the query (the document is --text-field)",
                           result=True, jobs=RERANK)
    rerank_template: str = opt(None, "rerank with a decoder: the prompt, with {query} and {document}; default: "
                               "Qwen3-Reranker's (hpcllm.jobs.rerank.DEFAULT_TEMPLATE)", result=True, jobs=RERANK)
    yes_token: str = opt("yes", "rerank with a decoder: the token whose log-odds against --no-token is the score",
                         result=True, jobs=RERANK)
    no_token: str = opt("no", "rerank with a decoder: see --yes-token", result=True, jobs=RERANK)

    def result_hash(self, job: str, **extra) -> str:
        """Hash of the options that change results (stored in the manifest); ``extra``: derived values."""
        keep = {"job": job, **extra}
        for f in dataclasses.fields(self):
            if f.metadata["result"] and (f.metadata["jobs"] is None or job in f.metadata["jobs"]):
                keep[f.name] = getattr(self, f.name)
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def add_arguments(parser, job: str):
    parser.add_argument("--config", help="TOML job file; command-line flags override its values")
    for f in dataclasses.fields(JobConfig):
        jobs = f.metadata["jobs"]
        if jobs is not None and job not in jobs:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        elif _list_item(f) is not None:
            parser.add_argument(flag, type=_list_item(f), action="append", default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, default=None, choices=f.metadata["choices"], help=f.metadata["help"])


def _list_item(f):
    """The item type of a ``list[T]`` option (repeatable flag, TOML list), else None."""
    return typing.get_args(f.type)[0] if typing.get_origin(f.type) is list else None


def _field_type(f):
    if _list_item(f) is not None:
        return list
    return {"int": int, "str": str, "float": float, "bool": bool}[f.type if isinstance(f.type, str) else f.type.__name__]


def load_config(args, job: str) -> JobConfig:
    values = {}
    if getattr(args, "config", None):
        values.update(_read_toml(args.config, job))
    for f in dataclasses.fields(JobConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    cfg = JobConfig(**values)
    for name in ("model", "input", "output") if job in MODEL_JOBS else ("input", "output"):
        if getattr(cfg, name) is None:
            raise HpcllmError(f"{job}: --{name} is required (or set `{name}` in the --config file)")
    if cfg.tp < 1:
        raise HpcllmError(f"--tp must be >= 1, got {cfg.tp}")
    if cfg.max_doc_tokens < 0:
        raise HpcllmError(f"--max-doc-tokens must be >= 0 (0: no limit), got {cfg.max_doc_tokens}")
    return cfg


def _read_toml(path, job):
    if not os.path.exists(path):
        raise HpcllmError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise HpcllmError(f"{path}: invalid TOML: {exc}") from None
    data = {**{k: v for k, v in data.items() if not isinstance(v, dict)}, **data.get(job, {})}
    known = {f.name: f for f in dataclasses.fields(JobConfig)}
    for key, value in data.items():
        if key not in known:
            raise HpcllmError(f"{path}: unknown option {key!r}")
        kind = _field_type(known[key])
        item = _list_item(known[key])
        if item is not None:
            if not (isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)):
                raise HpcllmError(f"{path}: option {key!r} must be a list of {item.__name__}, got {value!r}")
            continue
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise HpcllmError(f"{path}: option {key!r} must be {kind.__name__}, got {value!r}")
    # relative paths in a job file are relative to where the job is launched (like flags)
    return data
