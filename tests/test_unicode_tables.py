"""The committed BERT Unicode tables agree with what the installed HF tokenizers does."""

import os

import numpy as np
import pytest

from conftest import minilm_dir
from hpcllm.kernels import gen_unicode_tables as gen
from hpcllm.kernels.unicode_tables import (MN, N_CP, PUNCT, WS, bert_tables, fast_map,
                                           max_expansion, normalize_char)

CONFIGS = [(1, 1, 1, 1), (1, 1, 0, 0), (0, 0, 1, 0), (0, 1, 0, 1)]   # clean, chinese, strip, lower


def _sample_cps():
    """Every code point below U+3400, every one with an NFD/lowercase map, a stride of the rest."""
    t = bert_tables()
    keys = np.union1d(np.nonzero(t.nfd_idx >= 0)[0], np.nonzero(t.low_idx >= 0)[0])
    cps = np.union1d(np.union1d(np.arange(0x3400), keys), np.arange(0x3400, N_CP, 7))
    return [int(c) for c in cps if not 0xD800 <= c <= 0xDFFF]


def test_tables_record_installed_tokenizers_version():
    import tokenizers
    assert bert_tables().version == tokenizers.__version__, \
        "tables were probed from another tokenizers: run python -m hpcllm.kernels.gen_unicode_tables"


@pytest.mark.parametrize("flags", CONFIGS)
def test_normalizer_per_code_point_matches_hf(flags):
    t = bert_tables()
    cps = _sample_cps()
    kw = dict(zip(("clean_text", "handle_chinese_chars", "strip_accents", "lowercase"), map(bool, flags)))
    ref = gen.probe(gen._bert(**kw), [chr(c) for c in cps])
    mine = ["".join(map(chr, normalize_char(t, c, *flags))) for c in cps]
    bad = [hex(c) for c, a, b in zip(cps, mine, ref) if a != b]
    assert not bad, bad[:20]


def test_classes_are_what_hf_says():
    t = bert_tables()
    assert t.cls[ord(" ")] & WS and t.cls[0x3000] & WS and t.cls[0x85] & WS and not t.cls[0x200B] & WS
    assert t.cls[ord("$")] & PUNCT and t.cls[ord("¿")] & PUNCT and not t.cls[ord("a")] & PUNCT
    assert t.cls[0x0301] & MN and not t.cls[ord("a")] & MN
    assert t.ccc[0x0301] > t.ccc[0x0316] > 0 and t.ccc[ord("a")] == 0
    assert max_expansion(1, 1, 1, 1) == 1.0   # kernels size outputs by this


def test_every_code_point_in_a_word_matches_hf():
    """Each code point between two letters, through the whole kernel (fast map and slow path)."""
    from tokenizers import Tokenizer as HFTokenizer

    from hpcllm.tokenizer import Tokenizer
    path = os.path.join(minilm_dir(), "tokenizer.json")
    hf = HFTokenizer.from_file(path)
    hf.no_truncation()
    hf.no_padding()
    cps = [c for c in range(N_CP) if not 0xD800 <= c <= 0xDFFF]
    docs = [" ".join("q" + chr(c) + "z" for c in cps[i:i + 256]) for i in range(0, len(cps), 256)]
    got = Tokenizer.from_file(path, apply_file_settings=False).encode_batch(docs).to_lists()
    ref = [e.ids for e in hf.encode_batch(docs)]
    bad = [hex(cps[i * 256]) for i, (a, b) in enumerate(zip(got, ref)) if a != b]
    assert not bad, bad[:20]


def test_fast_map_is_cached_per_config():
    assert fast_map(1, 1, 1, 1) is fast_map(1, 1, 1, 1)


@pytest.mark.slow
def test_regenerated_tables_equal_committed(tmp_path):
    out = tmp_path / "t.npz"
    gen.main(["--out", str(out)])
    with np.load(out) as new, np.load(os.path.join(os.path.dirname(gen.__file__), "bert_unicode.npz")) as old:
        assert sorted(new.files) == sorted(old.files)
        for k in new.files:
            assert np.array_equal(new[k], old[k]), k
