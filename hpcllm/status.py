"""Per-document status codes: one home for every outcome a document can have."""

import enum


class Status(enum.IntEnum):
    OK = 0
    TRUNCATED = 1        # longer than the model's context: cut to max length
    EMPTY = 2            # text present but empty (or whitespace only): the model's empty encoding
    BAD_JSON = 3         # the line is not a JSON object
    MISSING_FIELD = 4    # JSON object without the text field (or not a string)
    BAD_UTF8 = 5         # invalid UTF-8 / lone surrogates, replaced by U+FFFD and processed
    TOO_LONG = 6         # larger than --max-doc-bytes: not processed
    # Fill value of result datasets: a row nobody wrote. Never produced by a
    # job; a master file that reads it has lost a source (see results.py).
    MISSING = 255


STATUS_DTYPE = "u1"
