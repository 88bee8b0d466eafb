"""Real multilingual text for tests: Debian's fortunes packages.

`.ci/run` installs fortunes, fortunes-de, fortunes-ru, fortunes-es and
fortunes-zh. Each fortune file is a list of texts separated by lines holding a
single '%'.
"""

import glob
import os

FORTUNES = "/usr/share/games/fortunes"

# corpus name -> glob of its files (the .u8 links and .dat indexes are skipped)
CORPORA = {
    "fortunes": [f"{FORTUNES}/*"],
    "fortunes-de": [f"{FORTUNES}/de/*"],
    "fortunes-ru": [f"{FORTUNES}/ru/*"],
    "fortunes-es": [f"{FORTUNES}/es/*"],
    "fortunes-zh": [f"{FORTUNES}/chinese", f"{FORTUNES}/tang300", f"{FORTUNES}/song100"],
}


def _files(name):
    out = []
    for pattern in CORPORA[name]:
        for path in sorted(glob.glob(pattern)):
            if os.path.isdir(path) or os.path.islink(path) or path.endswith(".dat"):
                continue
            if name == "fortunes" and os.path.basename(path) in ("chinese", "tang300", "song100"):
                continue
            out.append(path)
    return out


def fortunes(name="fortunes", limit=None):
    """Texts of one fortunes corpus, in file order (decoded as UTF-8, bad bytes replaced)."""
    texts = []
    for path in _files(name):
        with open(path, "rb") as f:
            raw = f.read().decode("utf-8", errors="replace")
        for chunk in raw.split("\n%\n"):
            chunk = chunk.strip("%\n")
            if chunk:
                texts.append(chunk)
                if limit is not None and len(texts) >= limit:
                    return texts
    return texts


def all_fortunes(per_corpus=None):
    """{corpus name: texts} for every fortunes corpus installed here."""
    return {name: fortunes(name, per_corpus) for name in CORPORA}


def mixed(n):
    """n texts drawn round-robin from all corpora (deterministic)."""
    pools = [fortunes(name, n) for name in CORPORA]
    pools = [p for p in pools if p]
    out = []
    i = 0
    while len(out) < n:
        pool = pools[i % len(pools)]
        j = i // len(pools)
        if j < len(pool):
            out.append(pool[j])
        i += 1
        if i > n * len(pools) * 2:
            break
    return out
