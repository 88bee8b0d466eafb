"""Token-budget batching and packing."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hpcllm.corpus.batching import make_batches, pack_batch
from hpcllm.errors import HpcllmError


def padded_tokens(lengths, batch) -> int:
    """Tokens a batch costs once padded: n_docs * longest (zero lengths count as 1)."""
    return len(batch) * max(1, int(np.asarray(lengths)[batch].max())) if len(batch) else 0


def test_known_batches():
    lengths = np.array([3, 10, 2, 10, 5, 1, 0, 7])
    b = make_batches(lengths, max_tokens=20, window=4)
    # window 1: [3,10,2,10] -> sorted longest first, stable: 1,3,0,2; 10*2=20 fits, then 3*2=6
    # window 2: [5,1,0,7]   -> 7,4,5,6 (lengths 7,5,1,0): 7*2=14, 7*3=21 > 20
    assert [x.tolist() for x in b] == [[1, 3], [0, 2], [7, 4], [5, 6]]
    assert [padded_tokens(lengths, x) for x in b] == [20, 6, 14, 2]


def test_long_doc_alone_and_max_batch():
    lengths = np.array([50, 4, 4, 4, 4, 4])
    b = make_batches(lengths, max_tokens=16, window=100, max_batch=3)
    assert [x.tolist() for x in b] == [[0], [1, 2, 3], [4, 5]]
    assert make_batches(np.array([], dtype=np.int64), 16, 4) == []
    with pytest.raises(HpcllmError, match="max_tokens, window and max_batch >= 1"):
        make_batches(lengths, 0, 4)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), max_size=200), max_tokens=st.integers(1, 2000),
       window=st.integers(1, 64), max_batch=st.one_of(st.none(), st.integers(1, 20)))
def test_batch_invariants(lengths, max_tokens, window, max_batch):
    lengths = np.array(lengths, dtype=np.int64)
    batches = make_batches(lengths, max_tokens, window, max_batch)
    allidx = np.concatenate(batches) if batches else np.array([], np.int64)
    assert sorted(allidx.tolist()) == list(range(len(lengths)))          # a permutation
    cost = np.maximum(lengths, 1)
    for i, b in enumerate(batches):
        assert len(b) >= 1 and b.dtype == np.int64
        assert len(set((b // window).tolist())) == 1                      # never crosses a window
        assert max_batch is None or len(b) <= max_batch
        assert padded_tokens(lengths, b) <= max_tokens or len(b) == 1     # budget, padding counted
        assert (np.diff(cost[b]) <= 0).all()                              # longest first
        nxt = batches[i + 1] if i + 1 < len(batches) else None
        if nxt is not None and nxt[0] // window == b[0] // window and (max_batch is None or len(b) < max_batch):
            assert (len(b) + 1) * cost[b[0]] > max_tokens                 # greedy: the next did not fit
    # restoring order: writing result i of each batch to row batch[i] gives back the input
    out = np.empty(len(lengths), np.int64)
    for b in batches:
        out[b] = lengths[b]
    assert (out == lengths).all()


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), max_size=200), max_tokens=st.integers(1, 2000),
       window=st.integers(1, 64), max_batch=st.one_of(st.none(), st.integers(1, 20)))
def test_packed_batch_invariants(lengths, max_tokens, window, max_batch):
    lengths = np.array(lengths, dtype=np.int64)
    batches = make_batches(lengths, max_tokens, window, max_batch, padded=False)
    allidx = np.concatenate(batches) if batches else np.array([], np.int64)
    assert sorted(allidx.tolist()) == list(range(len(lengths)))
    cost = np.maximum(lengths, 1)
    for i, b in enumerate(batches):
        assert len(set((b // window).tolist())) == 1
        assert (np.diff(cost[b]) <= 0).all()                                    # longest first
        assert cost[b].sum() <= max_tokens or len(b) == 1                       # real tokens only
        assert max_batch is None or len(b) <= max_batch
        nxt = batches[i + 1] if i + 1 < len(batches) else None
        if nxt is not None and nxt[0] // window == b[0] // window and (max_batch is None or len(b) < max_batch):
            assert cost[b].sum() + cost[nxt[0]] > max_tokens                    # greedy: the next did not fit


def test_greedy_is_tight():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 256, 5000)
    batches = make_batches(lengths, 4096, window=1000)
    # consecutive batches of one window: adding the next batch's longest doc would exceed the budget
    for a, b in zip(batches, batches[1:]):
        if a[0] // 1000 == b[0] // 1000:
            assert (len(a) + 1) * max(lengths[a].max(), lengths[b].max()) > 4096
    used = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(padded_tokens(lengths, b) for b in batches)
    assert used / padded > 0.95            # sorting inside windows keeps padding small


def test_pack_batch():
    docs = [[5, 6, 7], [], [8], [9, 10, 11, 12]]
    ids = np.array(sum(docs, []), dtype=np.int32)
    offsets = np.cumsum([0] + [len(d) for d in docs]).astype(np.int64)
    flat, lens = pack_batch(ids, offsets, np.array([3, 1, 0]))
    assert flat.dtype == np.int64 and lens.dtype == np.int64
    assert flat.tolist() == [9, 10, 11, 12, 5, 6, 7] and lens.tolist() == [4, 0, 3]
    flat, lens = pack_batch(ids, offsets, np.array([1]))
    assert flat.tolist() == [] and lens.tolist() == [0]


@settings(max_examples=100, deadline=None)
@given(docs=st.lists(st.lists(st.integers(0, 30000), max_size=20), min_size=1, max_size=30),
       data=st.data())
def test_pack_batch_matches_loop(docs, data):
    ids = np.array(sum(docs, []), dtype=np.int32)
    offsets = np.cumsum([0] + [len(d) for d in docs]).astype(np.int64)
    index = np.array(data.draw(st.permutations(range(len(docs)))), dtype=np.int64)
    flat, lens = pack_batch(ids, offsets, index)
    assert flat.tolist() == sum((docs[i] for i in index), [])
    assert lens.tolist() == [len(docs[i]) for i in index]
