"""Per-document status codes: one home for every outcome a document can have."""

import enum

import numpy as np


class Status(enum.IntEnum):
    OK = 0
    TRUNCATED = 1        # longer than the model's context (or --max-doc-tokens): cut to max length
    EMPTY = 2            # text present but empty (or whitespace only): the model's empty encoding
    BAD_JSON = 3         # the line is not a JSON object
    MISSING_FIELD = 4    # JSON object without the text field (or not a string)
    BAD_UTF8 = 5         # invalid UTF-8 / lone surrogates, replaced by U+FFFD and processed
    TOO_LONG = 6         # larger than --max-doc-bytes, or (--long-docs skip) --max-doc-tokens: not processed
    CHANGED = 7          # follow mode: the file changed (or went away) after it was admitted: not processed
    # Fill value of result datasets: a row nobody wrote. Never produced by a
    # job; a master file that reads it has lost a source (see results.py).
    MISSING = 255


# Rows the reader could not turn into a text: never tokenized, kept with fill outputs.
NOT_PROCESSED = (Status.BAD_JSON, Status.MISSING_FIELD, Status.TOO_LONG, Status.CHANGED)


def named_counts(counts) -> dict[str, int]:
    """A 256-bin count per status code -> {name: count} of the codes that occur."""
    out = {}
    for code in np.flatnonzero(counts):
        name = Status(code).name if code in Status._value2member_map_ else f"code_{code}"
        out[name] = int(counts[code])
    return out


def status_counts(status) -> dict[str, int]:
    """Documents per status name (only statuses that occur), e.g. {"OK": 998, "BAD_JSON": 2}."""
    return named_counts(np.bincount(np.asarray(status, dtype=np.uint8).ravel(), minlength=256))
