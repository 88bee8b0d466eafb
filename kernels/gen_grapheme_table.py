"""Regenerate kernels/grapheme_break.npz: each code point's Grapheme_Cluster_Break class (UAX #29)
and its Extended_Pictographic bit, read from the `regex` module's Unicode data (HF `tokenizers`
segments with the unicode-segmentation crate; the Precompiled normalizer needs its clusters).

    python -m hpcllm.kernels.gen_grapheme_table [--out PATH]

gcb uint8 per code point: the class (kernels/precompiled.py's OTHER .. LVT) | PICT (0x80).
"""

import argparse
import os

import numpy as np

CLASSES = ["Other", "CR", "LF", "Control", "Extend", "ZWJ", "Regional_Indicator", "Prepend", "SpacingMark",
           "L", "V", "T", "LV", "LVT"]
PICT = 0x80


def table():
    import regex
    cps = np.arange(0x110000)
    cps = cps[(cps < 0xD800) | (cps > 0xDFFF)]
    text = "".join(map(chr, cps))
    where = np.zeros(0x110000, np.int64)
    where[cps] = np.arange(len(cps))
    gcb = np.zeros(0x110000, np.uint8)
    for k, name in enumerate(CLASSES[1:], 1):
        for m in regex.finditer(r"\p{Grapheme_Cluster_Break=%s}+" % name, text):
            gcb[cps[m.start():m.end()]] = k
    for m in regex.finditer(r"\p{Extended_Pictographic}+", text):
        gcb[cps[m.start():m.end()]] |= PICT
    return gcb, regex.__version__


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "grapheme_break.npz"))
    args = ap.parse_args()
    gcb, version = table()
    np.savez_compressed(args.out, gcb=gcb, regex_version=np.array(version))
    print(f"wrote {args.out} (regex {version})")


if __name__ == "__main__":
    main()
