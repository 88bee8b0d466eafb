"""GPT-2's byte-level alphabet: each byte spelled as one printable character.

A leaf of the tokenizer package, shared by the BPE tokenizer (hpcllm.tokenizer.bpe)
and the GGUF metadata reader (hpcllm.tokenizer.gguf_meta), which respells raw-text tokens in it.
"""


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


BYTE_CHARS = bytes_to_unicode()
CHAR_BYTES = {c: b for b, c in BYTE_CHARS.items()}


def token_bytes(token):
    """The bytes a token decodes to (HF ByteLevel decoder: raw UTF-8 if a char is off the map)."""
    try:
        return bytes(CHAR_BYTES[c] for c in token)
    except KeyError:
        return token.encode("utf-8")
