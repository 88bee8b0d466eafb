"""Truncation and padding, as a tokenizer.json's "truncation" and "padding" sections declare them.

HF `tokenizers` semantics for single sequences: max_length counts the special
tokens; "left" truncation keeps the last content tokens; padding goes to the
batch's longest document (or a fixed length, never cutting a longer one),
rounded up to pad_to_multiple_of. Stride only fills HF's `overflowing`
encodings, which hpcllm does not produce, so the kept ids do not depend on it.
"""

from typing import NamedTuple, Optional

import numpy as np

from hpcllm.errors import HpcllmError
from hpcllm.tokenizer.encoding import FLAG_TRUNCATED, Encoding

DIRECTIONS = ("right", "left")


class Truncation(NamedTuple):
    max_length: int
    direction: str = "right"


class Padding(NamedTuple):
    pad_id: int = 0
    length: Optional[int] = None              # None: the longest document of the batch
    direction: str = "right"
    pad_to_multiple_of: Optional[int] = None


def _direction(value, section, source):
    d = str(value or "Right").lower()
    if d not in DIRECTIONS:
        raise HpcllmError(f"{source}: {section}.direction {value!r} is not Right or Left")
    return d


def parse_truncation(section, source):
    if section is None:
        return None
    if section.get("strategy") == "OnlySecond":
        raise HpcllmError(f"{source}: truncation.strategy OnlySecond needs sentence pairs, which hpcllm "
                          "does not encode")
    return Truncation(int(section["max_length"]), _direction(section.get("direction"), "truncation", source))


def parse_padding(section, source):
    if section is None:
        return None
    strategy = section.get("strategy", "BatchLongest")
    length = None
    if isinstance(strategy, dict) and "Fixed" in strategy:
        length = int(strategy["Fixed"])
    elif strategy != "BatchLongest":
        raise HpcllmError(f"{source}: padding.strategy {strategy!r} is not BatchLongest or Fixed")
    return Padding(int(section.get("pad_id", 0)), length, _direction(section.get("direction"), "padding", source),
                   section.get("pad_to_multiple_of") or None)


def truncate_left(enc, n_prefix, n_suffix, limit):
    """Keep the last `limit` content tokens of each document (its special tokens stay)."""
    excess = np.maximum(enc.lengths() - n_prefix - n_suffix - limit, 0)
    if not excess.any():
        return enc
    pos = enc.positions()
    drop = (pos >= n_prefix) & (pos < n_prefix + np.repeat(excess, enc.lengths()))
    offsets = enc.offsets - np.concatenate(([0], np.cumsum(excess)))
    return Encoding(enc.ids[~drop], offsets, enc.flags | np.where(excess > 0, FLAG_TRUNCATED, 0).astype(np.uint8))


def pad(enc, padding):
    """enc with every document padded to the batch's target length (attention_mask marks the real ids)."""
    lengths = enc.lengths()
    target = padding.length if padding.length is not None else int(lengths.max(initial=0))
    multiple = padding.pad_to_multiple_of
    if multiple and target % multiple:
        target += multiple - target % multiple
    new = np.maximum(lengths, target)
    offsets = np.zeros(len(new) + 1, np.int64)
    np.cumsum(new, out=offsets[1:])
    shift = new - lengths if padding.direction == "left" else np.zeros_like(lengths)
    where = enc.positions() + np.repeat(offsets[:-1] + shift, lengths)
    ids = np.full(offsets[-1], padding.pad_id, np.int32)
    ids[where] = enc.ids
    mask = np.zeros(offsets[-1], np.uint8)
    mask[where] = 1
    return Encoding(ids, offsets, enc.flags, mask)
