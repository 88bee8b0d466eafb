"""The names of what a run writes in its output directory: one home for every one of them.

    OUT/manifest.json        the plan and what it was made for (hpcllm.store.manifest)
    OUT/admissions.jsonl     follow mode: the files admitted so far (hpcllm.store.admissions)
    OUT/shards/shard-NNNNN.h5  one result (or token) file per shard of the plan
    OUT/parts/...            a shard computed in parts by several dp groups (hpcllm.executor.parts)
    OUT/repeats/keys-NNNNN.h5  the keys of the rows computed in a shard, for the dp groups to find
                             their repeats (hpcllm.executor.repeats); removed when the job ends
    OUT/chunks/chunk-FFFFF-LLLLL.h5  shards FFFFF..LLLLL consolidated into one file (hpcllm.store.chunks)
    OUT/results.h5           the master file joining the chunks (and shards not consolidated yet)
    OUT/tokens.json          tokenize: written last, marks a finished token directory
    OUT/STOPPED.json         a run stopped early by a signal (hpcllm.signals)
    OUT/classifier.h5, OUT/encoder.h5, OUT/finetune-state.pt   train-classifier's products

A leaf module: it imports nothing of hpcllm, so every layer may use it.
"""

import os
import re

MANIFEST_NAME = "manifest.json"
ADMISSIONS_NAME = "admissions.jsonl"
SHARDS_DIR = "shards"
CHUNKS_DIR = "chunks"
PARTS_DIR = "parts"
REPEATS_DIR = "repeats"
RESULTS_NAME = "results.h5"
TOKENS_INFO_NAME = "tokens.json"
STOP_NOTE = "STOPPED.json"
CLASSIFIER_NAME = "classifier.h5"
ENCODER_NAME = "encoder.h5"            # train-classifier --finetune: the trained encoder
FINETUNE_STATE_NAME = "finetune-state.pt"


def shard_filename(index: int) -> str:
    """Name of a shard's file inside ``OUT/shards/`` (results and token shards alike)."""
    return f"shard-{index:05d}.h5"


def shard_file(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, SHARDS_DIR, shard_filename(index))


def keys_file(out_dir: str, index: int) -> str:
    """The keys of the rows computed in shard ``index`` (hpcllm.executor.repeats)."""
    return os.path.join(out_dir, REPEATS_DIR, f"keys-{index:05d}.h5")


def part_file(out_dir: str, index: int, part: int, parts: int) -> str:
    """Part ``part`` of ``parts`` of shard ``index``, computed by one dp group (hpcllm.executor.parts)."""
    return os.path.join(out_dir, PARTS_DIR, f"shard-{index:05d}.part-{part}-of-{parts}.h5")


def chunk_filename(first: int, last: int) -> str:
    """Name of the file inside ``OUT/chunks/`` holding shards ``first``..``last`` (hpcllm.store.chunks)."""
    return f"chunk-{first:05d}-{last:05d}.h5"


def chunk_range(name: str) -> tuple[int, int] | None:
    """(first, last) of a chunk file name, or None for any other name (temporaries included)."""
    m = re.fullmatch(r"chunk-(\d+)-(\d+)\.h5", name)
    return (int(m.group(1)), int(m.group(2))) if m else None
