"""Regenerate kernels/bert_unicode.npz by probing the installed HF `tokenizers`.

    python -m hpcllm.kernels.gen_unicode_tables [--out PATH]

Python's unicodedata follows the Python release's Unicode version, while the
Rust crates inside `tokenizers` follow theirs; the two differ on new letters,
marks and CJK blocks. So every property here is measured on what tokenizers
actually does to each code point, never read from unicodedata (which only
proposes candidate characters for the combining-class ladder, and every rung
is verified by probing). The tokenizers version is recorded in the file; the
tests fail when the installed version differs.

Tables (dense arrays are indexed by code point, 0..0x10FFFF; surrogates, which
never reach the kernels, are left 0):
  cls   uint8 bits: DROP (clean_text deletes it), SPACE (clean_text makes it
        ' '), CHINESE (handle_chinese_chars pads it with spaces), WS (the
        BertPreTokenizer splits on it), PUNCT (BertPreTokenizer isolates it),
        MN (strip_accents deletes it after NFD)
  ccc   uint8: rank of the canonical combining class (0 = starter); only the
        order matters, for NFD's canonical reordering
  nfd_* / lower_*: sparse maps cp -> code points (CSR: keys, off, data) for
        code points whose NFD / lowercase is not themselves
"""

import argparse
import os
import unicodedata

import numpy as np

N_CP = 0x110000
DROP, SPACE, CHINESE, WS, PUNCT, MN = 1, 2, 4, 8, 16, 32
SEP = "|"   # ASCII punct: fixed under every probe, ccc 0 (stops reordering)
CHUNK = 4096


def _chars():
    return [c for c in range(N_CP) if not (0xD800 <= c <= 0xDFFF)]


def probe(fn, strings):
    """fn applied to each string, batched: join with SEP, split the output."""
    out = []
    for i in range(0, len(strings), CHUNK):
        part = strings[i:i + CHUNK]
        if any(SEP in s for s in part):   # rare: probe one by one
            out.extend(fn(s) for s in part)
            continue
        res = fn(SEP.join(part)).split(SEP)
        assert len(res) == len(part), "probe output does not align"
        out.extend(res)
    return out


def _bert(**kw):
    from tokenizers import normalizers
    flags = dict(clean_text=False, handle_chinese_chars=False, strip_accents=False, lowercase=False)
    flags.update(kw)
    return normalizers.BertNormalizer(**flags).normalize_str


def _sparse(cps, outs):
    keys, off, data = [], [0], []
    for cp, o in zip(cps, outs):
        if o != chr(cp):
            keys.append(cp)
            data.extend(ord(ch) for ch in o)
            off.append(len(data))
    return (np.array(keys, np.int32), np.array(off, np.int32), np.array(data, np.int32))


def pretok_classes(cps, cls):
    from tokenizers import pre_tokenizers
    pre = pre_tokenizers.BertPreTokenizer().pre_tokenize_str
    for cp in cps:
        pieces = [p for p, _ in pre("a" + chr(cp) + "b")]
        if pieces == ["a", "b"]:
            cls[cp] |= WS
        elif pieces == ["a", chr(cp), "b"]:
            cls[cp] |= PUNCT
        else:
            assert pieces == ["a" + chr(cp) + "b"], (hex(cp), pieces)


def ccc_ranks(cps, nfd):
    """Rank of each code point's combining class, measured by NFD reordering.

    NFD(x + y) swaps two non-starters when ccc(x) > ccc(y). A ladder of one
    verified character per class (candidates from unicodedata) gives every
    probed character its place: s = rungs it sorts after, g = rungs before.
    """
    cand = {}
    for cp in cps:
        k = unicodedata.combining(chr(cp))
        if k and unicodedata.decomposition(chr(cp)) == "":
            cand.setdefault(k, []).append(chr(cp))
    ladder = []
    for k in sorted(cand):                     # keep a rung only if it sorts after the last one
        for c in cand[k][:8]:
            if ladder and nfd(c + ladder[-1]) == ladder[-1] + c:
                ladder.append(c)
                break
            if not ladder and any(nfd(y[0] + c) == c + y[0] for y in cand.values() if y[0] != c):
                ladder.append(c)
                break
    single = [cp for cp in cps if nfd(chr(cp)) == chr(cp)]
    ccc = np.zeros(N_CP, np.uint8)
    top, bottom = ladder[-1], ladder[0]
    swaps_top = probe(nfd, [top + chr(cp) for cp in single])
    swaps_bot = probe(nfd, [chr(cp) + bottom for cp in single])
    for cp, st, sb in zip(single, swaps_top, swaps_bot):
        c = chr(cp)
        if st == top + c and sb == c + bottom and c not in ladder:
            continue                           # a starter (ccc 0)
        s = sum(nfd(c + r) == r + c for r in ladder if r != c)
        g = sum(nfd(r + c) == c + r for r in ladder if r != c)
        assert s + g == len(ladder) - 1, f"U+{cp:04X}: combining class not on the ladder"
        ccc[cp] = s + 1
    return ccc


def build():
    import tokenizers
    from tokenizers import normalizers
    cps = _chars()
    strs = [chr(c) for c in cps]
    cls = np.zeros(N_CP, np.uint8)
    for cp, o in zip(cps, probe(_bert(clean_text=True), strs)):
        if o == "":
            cls[cp] |= DROP
        elif o == " " and cp != 0x20:
            cls[cp] |= SPACE
        else:
            assert o == chr(cp), hex(cp)
    for cp, o in zip(cps, probe(_bert(handle_chinese_chars=True), strs)):
        if o == " " + chr(cp) + " ":
            cls[cp] |= CHINESE
        else:
            assert o == chr(cp), hex(cp)
    nfd = normalizers.NFD().normalize_str
    nfd_out = probe(nfd, strs)
    strip_out = probe(_bert(strip_accents=True), strs)
    for cp, d, o in zip(cps, nfd_out, strip_out):
        if d == chr(cp) and o == "":
            cls[cp] |= MN
    for cp, d, o in zip(cps, nfd_out, strip_out):  # strip == NFD minus the MN marks
        assert o == "".join(ch for ch in d if not cls[ord(ch)] & MN), hex(cp)
    pretok_classes(cps, cls)
    lower_out = probe(_bert(lowercase=True), strs)
    tables = dict(cls=cls, ccc=ccc_ranks(cps, nfd))
    for name, outs in (("nfd", nfd_out), ("lower", lower_out)):
        tables[name + "_keys"], tables[name + "_off"], tables[name + "_data"] = _sparse(cps, outs)
    tables["tokenizers_version"] = np.array(tokenizers.__version__)
    return tables


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "bert_unicode.npz"))
    args = ap.parse_args(argv)
    tables = build()
    np.savez_compressed(args.out, **tables)
    print(f"wrote {args.out} (tokenizers {tables['tokenizers_version']}, "
          f"{len(tables['nfd_keys'])} NFD, {len(tables['lower_keys'])} lowercase entries)")


if __name__ == "__main__":
    main()
