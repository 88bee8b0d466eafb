"""Real multilingual text for tests: Debian's fortunes packages.

`tests/run.sh` installs fortunes, fortunes-de, fortunes-ru, fortunes-es and
fortunes-zh. Each fortune file is a list of texts separated by lines holding a
single '%'. Every corpus is required: a missing one raises ``MissingCorpus``
(the test fails, it is not skipped).
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


class MissingCorpus(FileNotFoundError):
    pass


def _files(name):
    out = []
    for pattern in CORPORA[name]:
        found = []
        for path in sorted(glob.glob(pattern)):
            if os.path.isdir(path) or os.path.islink(path) or path.endswith(".dat"):
                continue
            if name == "fortunes" and os.path.basename(path) in ("chinese", "tang300", "song100"):
                continue
            found.append(path)
        if not found:
            raise MissingCorpus(f"fortunes corpus {name}: no file matches {pattern}; install Debian's "
                                f"{name} package (tests/run.sh does: apt-get install {name})")
        out += found
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
    if not texts:
        raise MissingCorpus(f"fortunes corpus {name}: its files ({', '.join(_files(name))}) hold no text")
    return texts


def all_fortunes(per_corpus=None):
    """{corpus name: texts} for every fortunes corpus (all of them required)."""
    return {name: fortunes(name, per_corpus) for name in CORPORA}


def mixed(n):
    """n texts drawn round-robin from all corpora (deterministic)."""
    pools = [fortunes(name, n) for name in CORPORA]
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
