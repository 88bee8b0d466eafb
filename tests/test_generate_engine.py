"""The generation engine in one process: greedy ids equal HF ``transformers.generate`` on tiny
random models of every decoder family (chunked prefill, continuous batching through few slots,
shared prefixes, sliding-window layers' ring caches wrapping in decode and in prefill chunks), sampling matches softmax(logits / T) cut by top-k / top-p / min-p (chi-square)
and is identical when the vocabulary is split over two ranks (threads with a counting comm that
never sees V numbers), stop strings across token boundaries, byte-exact detokenizing, and chat
templates against transformers' renderer and its sandbox."""

import functools
import math
import os
import threading

import numpy as np
import pytest
import torch

from hpcllm.checkpoint.hdf5 import Checkpoint
from hpcllm.generate.engine import Engine, Limits
from hpcllm.generate.kv_cache import KVCache
from hpcllm.generate.sampling import SamplingParams, row_key, sample
from hpcllm.generate.scheduler import EOS, LENGTH, STOP
from hpcllm.generate.text import Completion
from hpcllm.model.build import build_model
from hpcllm.world.comm import Comm, LocalComm
from conftest import REPO, mpirun
from test_decoder import FAMILIES, GGUF_PATH, smol_tokenizer_json, tiny  # noqa: F401  (fixtures)

SPLIT_SCRIPT = os.path.join(REPO, "tests", "mpi_scripts", "sample_split.py")

MAX_NEW = 10


def _engine(model, prompts, n_slots, batch_tokens, params=SamplingParams(temperature=0), n=1, limits=None,
            max_new=MAX_NEW, tokenizer=None, prefix_cache=True, cache_dtype=torch.float32):
    context = model.cfg["max_positions"]
    cache = KVCache(model, n_slots, context, cache_dtype)
    limits = limits or Limits(frozenset(), frozenset(), ())
    eng = Engine(model, cache, prompts, [min(max_new, context - len(p)) for p in prompts],
                 [f"doc{i}" for i in range(len(prompts))], params, limits, n, batch_tokens, n_slots,
                 tokenizer or _ByteTok(), logprobs=True, prefix_cache=prefix_cache)
    eng.run_until(sum(1 for p in prompts if len(p)))
    return eng


class _ByteTok:
    """Token t -> one byte (enough for the leader's text bookkeeping on random ids)."""

    def decode_bytes(self, ids, skip_special_tokens=True, at_start=True):
        return bytes(int(i) % 256 for i in ids)


def _prompts(seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 320, size=n).astype(np.int64) for n in (1, 9, 20, 33, 5)]


def _hf_greedy(hf, prompt, max_new):
    x = torch.as_tensor(prompt)[None]
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, min_new_tokens=max_new,
                      do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_equals_transformers_generate(tiny, name):
    hf, h5 = tiny[name]
    with Checkpoint(h5) as ck:
        model = build_model(ck, 0, 1, LocalComm())
        context = ck.config["max_positions"]
    prompts = [p for p in _prompts(1) if len(p) < context]
    eng = _engine(model, prompts, n_slots=3, batch_tokens=16)     # chunked prefill, slots reused
    for j, p in enumerate(prompts):
        ids, lps, reason, _ = eng.results[j, 0]
        want = min(MAX_NEW, context - len(p))
        assert ids == _hf_greedy(hf, p, want) and reason == LENGTH, (name, j)
        assert len(lps) == len(ids) and all(lp <= 0 for lp in lps)
    # one slot at a time and a bigger budget: the same ids
    again = _engine(model, prompts, n_slots=1, batch_tokens=64)
    assert all(again.results[k][0] == eng.results[k][0] for k in eng.results)
    if "sliding" in model.cfg["layer_types"]:   # a float64 cache: the batched-matmul decode path (a GPU's)
        wide = _engine(model, prompts, n_slots=3, batch_tokens=16, cache_dtype=torch.float64)
        assert all(wide.results[k][0] == eng.results[k][0] for k in eng.results)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_shared_prefixes_are_reused_not_recomputed(tiny, name):
    """gemma3: its sliding layers' rings (8 rows) have moved past a kept slot's prefix, so only prefixes
    of slots that hold no more than max(prefix, 8) positions are reused; the ids stay the same."""
    hf, h5 = tiny[name]
    with Checkpoint(h5) as ck:
        model = build_model(ck, 0, 1, LocalComm())
    a = np.random.default_rng(4).integers(0, 320, size=33).astype(np.int64)
    prompts = [a, a[:2], np.concatenate([a[:30], [7, 8]]), a.copy(), np.concatenate([a[:20], [9]])]
    eng = _engine(model, prompts, n_slots=2, batch_tokens=64)
    # b and the copy of a land in a's kept slot (30 and 32 positions), the last copies 20 from a busy one
    if name == "llama":
        assert eng.sched.reused_tokens >= 30 + 20
    else:   # a's slot holds 33 + 10 positions, past every prefix but a's own copy (32: 43 > max(32, 8))
        assert eng.sched.reused_tokens == 0
    solo = _engine(model, prompts, n_slots=1, batch_tokens=7)        # other sharing and chunks: same ids
    assert all(eng.results[k][0] == solo.results[k][0] for k in eng.results)
    assert eng.results[0, 0][0] == _hf_greedy(hf, a, MAX_NEW)
    # --no-prefix-cache: every prompt token computed, the same ids
    cold = _engine(model, prompts, n_slots=2, batch_tokens=64, prefix_cache=False)
    assert cold.sched.reused_tokens == 0
    assert all(eng.results[k][0] == cold.results[k][0] for k in eng.results)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_n_completions_share_the_prompt_and_differ(tiny, name):
    """Forks copy their prompt's KV (gemma3: the sliding layers' whole rings, prompts being longer
    than the 8-token window)."""
    hf, h5 = tiny[name]
    with Checkpoint(h5) as ck:
        model = build_model(ck, 0, 1, LocalComm())
    prompts = _prompts(2)[:4]
    params = SamplingParams(temperature=1.0, top_k=20, seed=5)
    eng = _engine(model, prompts, n_slots=6, batch_tokens=24, params=params, n=3)
    solo = _engine(model, prompts, n_slots=3, batch_tokens=8, params=params, n=3)
    for j in range(len(prompts)):
        outs = [eng.results[j, c][0] for c in range(3)]
        assert len({tuple(o) for o in outs}) > 1                       # independent streams
        assert outs == [solo.results[j, c][0] for c in range(3)]       # independent of the batching
    greedy = _engine(model, prompts, n_slots=6, batch_tokens=24, n=2)
    for j, p in enumerate(prompts):
        assert greedy.results[j, 0][0] == greedy.results[j, 1][0] == _hf_greedy(hf, p, MAX_NEW)


def test_sliding_layers_keep_only_their_window(tiny):
    """gemma3's 3 sliding layers (window 8) hold 8 rows per slot, its 2 full layers the slot length:
    (2 * 64 + 3 * 8) / (5 * 64) of a full cache, which is what the scheduler sizes slots with."""
    from hpcllm.generate.kv_cache import slot_bytes

    with Checkpoint(tiny["gemma3"][1]) as ck:
        model = build_model(ck, 0, 1, LocalComm())
    cache = KVCache(model, 3, 64, torch.float32)
    assert [k.shape[2] for k in cache.k] == [8, 8, 64, 8, 64] and cache.ring == 8
    full = 3 * 5 * 2 * 2 * 64 * 16 * 4                   # slots x layers x K,V x KV heads x rows x D x bytes
    assert cache.nbytes == 3 * slot_bytes(model, 64, torch.float32) == full * (2 * 64 + 3 * 8) // (5 * 64)
    assert [cache.reusable(n, held) for n, held in [(5, 8), (20, 20), (20, 21), (5, 9), (30, 30)]] == \
        [5, 20, 0, 0, 30]


def test_finish_reasons_eos_stop_ids_stop_strings_length(tiny):
    _, h5 = tiny["qwen2"]
    with Checkpoint(h5) as ck:
        model = build_model(ck, 0, 1, LocalComm())
    prompts = _prompts(3)[:6]
    free = _engine(model, prompts, n_slots=4, batch_tokens=32)
    first = [free.results[j, 0][0] for j in range(len(prompts))]
    eos, stop_id = first[0][2], first[1][4]
    stop_text = bytes([first[2][3] % 256, first[2][4] % 256])
    limits = Limits(frozenset([eos]), frozenset([stop_id]), (stop_text,))
    eng = _engine(model, prompts, n_slots=4, batch_tokens=32, limits=limits)
    ids0, _, r0, _ = eng.results[0, 0]
    assert r0 == EOS and ids0 == first[0][:first[0].index(eos) + 1]
    ids1, _, r1, _ = eng.results[1, 0]
    assert r1 == STOP and ids1[-1] in (stop_id, eos) or first[1].index(stop_id) >= len(ids1)
    ids2, _, r2, text2 = eng.results[2, 0]
    assert r2 in (EOS, STOP) and len(ids2) <= 5
    if r2 == STOP and ids2[-1] not in (stop_id, eos):
        assert stop_text not in text2.encode("latin-1", "replace")


def _dist_case():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 40, generator=g) * 2


def _check_filtered_softmax(ids, params):
    """``ids``: first tokens drawn for 20,000 keys from ``_dist_case``'s row; chi-square against HF's
    warpers (temperature, top-k, top-p, min-p in HF's order) applied to the same logits."""
    from scipy.stats import chisquare
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits, n = _dist_case(), len(ids)
    s = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        s = TopKLogitsWarper(params.top_k)(None, s)
    if params.top_p < 1:
        s = TopPLogitsWarper(params.top_p)(None, s)
    if params.min_p:
        s = MinPLogitsWarper(params.min_p)(None, s)
    p = torch.softmax(s, dim=-1)[0].double().numpy()
    counts = np.bincount(np.asarray(ids), minlength=40)
    assert counts[p == 0].sum() == 0, "a filtered token was sampled"
    keep = p > 0
    assert chisquare(counts[keep], p[keep] / p[keep].sum() * n).pvalue > 1e-3


SAMPLE_CASES = {"topk": SamplingParams(temperature=0.7, top_k=12),
                "topp": SamplingParams(temperature=1.3, top_p=0.8),
                "minp": SamplingParams(temperature=1.0, min_p=0.1),
                "all": SamplingParams(temperature=0.9, top_k=25, top_p=0.9, min_p=0.02)}


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_sampling_matches_the_filtered_softmax(case):
    params, n = SAMPLE_CASES[case], 20000
    rows = _dist_case().expand(n, -1).contiguous()
    keys = torch.tensor([row_key(params.seed, f"d{i}", 0, 0) - (1 << 63) for i in range(n)], dtype=torch.int64)
    ids, _ = sample(rows, keys, params, 0, 40, LocalComm())
    _check_filtered_softmax(ids.numpy(), params)


@pytest.fixture(scope="module")
def split_draws(tmp_path_factory):
    """The same draws with the vocabulary split over a real tp = 2 group (mpiexec), both backends."""
    out = tmp_path_factory.mktemp("split") / "draws.npz"
    mpirun(2, [SPLIT_SCRIPT, out, "mpi,torch"], python_module="mpi4py", timeout=180)
    return dict(np.load(out))


@pytest.mark.parametrize("backend", ["mpi", "torch"])
@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_sampling_at_tp2_under_mpi_matches_the_filtered_softmax(split_draws, backend, case):
    """tp = 2 under mpiexec (slices of 23 + 17 tokens): the draws follow the filtered softmax and equal
    the single-process draws key for key (that no collective carries rows of logits is checked with the
    counting comm below, on a vocabulary larger than the candidates)."""
    params, n = SAMPLE_CASES[case], 20000
    ids = split_draws[f"ids_{backend}_{case}"]
    _check_filtered_softmax(ids, params)
    keys = torch.tensor([row_key(params.seed, f"d{i}", 0, 0) - (1 << 63) for i in range(n)], dtype=torch.int64)
    whole, _ = sample(_dist_case().expand(n, -1).contiguous(), keys, params, 0, 40, LocalComm())
    np.testing.assert_array_equal(ids, whole.numpy())


def test_gumbel_kernel_equals_the_torch_noise_and_race():
    """The Numba race (``hpcllm.kernels.gumbel``) draws the same noise as ``gumbel_noise`` bit for bit and
    picks what an argmax of the kept entries of scaled + noise picks, at any slice offset, with rows that
    keep everything (temperature alone), rows that keep one token and rows of a slice that keeps none."""
    from hpcllm.generate.sampling import gumbel_noise
    from hpcllm.kernels.gumbel import gumbel, gumbel_argmax

    g = torch.Generator().manual_seed(5)
    n, width, start = 48, 3000, 12345
    keys = torch.tensor([row_key(9, f"d{i}", i % 3, i) - (1 << 63) for i in range(n)], dtype=torch.int64)
    tokens = torch.randint(0, 1 << 17, (n,), generator=g)
    want = gumbel_noise(keys, tokens)
    got = torch.tensor([gumbel(int(k), int(t)) for k, t in zip(keys, tokens)], dtype=torch.float64)
    assert torch.equal(got, want)
    scaled = torch.randn(n, width, generator=g) * 4
    cut = torch.full((n,), -math.inf)
    cut[n // 3:2 * n // 3] = scaled[n // 3:2 * n // 3].max(dim=1).values       # one token kept
    cut[-4:] = math.inf                                                          # none kept in this slice
    best, index = gumbel_argmax(scaled.numpy(), cut.numpy(), keys.numpy(), start)
    rows, cols = (scaled >= cut[:, None]).nonzero(as_tuple=True)
    noisy = torch.full(scaled.shape, -math.inf, dtype=torch.float64)
    noisy[rows, cols] = scaled[rows, cols].double() + gumbel_noise(keys[rows], cols + start)
    value, at = noisy.max(dim=-1)
    assert torch.equal(torch.from_numpy(index), at) and torch.equal(torch.from_numpy(best), value)
    assert (index[-4:] == 0).all() and np.isinf(best[-4:]).all()


class _ThreadComm(Comm):
    """Two ranks as threads: all-reduce through a shared list and a barrier; counts the largest buffer."""

    def __init__(self, rank, shared):
        super().__init__()
        self.rank, self.size, self.shared = rank, 2, shared

    def _all_reduce(self, t, op):
        bar, slots = self.shared["barrier"], self.shared["slots"]
        slots[self.rank] = t.clone()
        bar.wait()
        a, b = slots
        out = a + b if op == "sum" else torch.maximum(a, b)
        bar.wait()
        t.copy_(out)
        self.shared["largest"] = max(self.shared["largest"], t.numel())


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_p=0.9),
                                    SamplingParams(temperature=1.1, top_k=30, min_p=0.05)])
def test_split_vocabulary_samples_the_same_tokens_without_gathering_it(params):
    vocab, n = 1000, 64
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(1)) * 3
    keys = torch.tensor([row_key(3, f"d{i}", 0, 7) - (1 << 63) for i in range(n)], dtype=torch.int64)
    whole = sample(logits, keys, params, 0, vocab, LocalComm(), want_logprobs=True)
    shared = {"barrier": threading.Barrier(2), "slots": [None, None], "largest": 0}
    got = [None, None]
    cut = 413                                           # uneven slices

    def rank(r):
        part = logits[:, :cut] if r == 0 else logits[:, cut:]
        got[r] = sample(part.contiguous(), keys, params, 0 if r == 0 else cut, vocab, _ThreadComm(r, shared),
                        want_logprobs=True)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ids, lps in got:
        assert torch.equal(ids, whole[0])
        torch.testing.assert_close(lps, whole[1], atol=1e-5, rtol=0)
    assert shared["largest"] <= 2 * n * 64 < n * vocab, "a collective carried whole rows of logits"


def test_stop_strings_across_token_boundaries_and_exact_bytes(smol_tokenizer_json):
    from tokenizers import Tokenizer as HFTokenizer

    from hpcllm.tokenizer import Tokenizer

    ours, ref = Tokenizer.from_str(smol_tokenizer_json), HFTokenizer.from_str(smol_tokenizer_json)
    text = "Grüße aus Köln — 東京タワー 🎉!\n\nThe end."
    ids = ours.encode(text, add_special_tokens=False)
    c = Completion(ours, [])
    for t in ids:                                      # a token may end inside a character
        c.add(t)
    assert c.text() == ref.decode(ids) == text
    for stop in ("\n\n", "タワ", "end", "ße a"):
        c = Completion(ours, [stop.encode()])
        hit = next(k for k, t in enumerate(ids) if c.add(t))
        assert c.text() == text[:text.index(stop)]
        assert stop in ref.decode(ids[:hit + 1]) and stop not in ref.decode(ids[:hit])


@functools.lru_cache
def _smol_template():
    from gguf import GGUFReader

    return GGUFReader(GGUF_PATH).fields["tokenizer.chat_template"].contents()


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour.\n"}]])
def test_chat_template_equals_transformers(messages):
    from transformers.utils.chat_template_utils import render_jinja_template

    from hpcllm.generate.chat import ChatTemplate

    source = _smol_template()
    ours = ChatTemplate(source, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, "m.h5").render(messages)
    ref = render_jinja_template([messages], chat_template=source, add_generation_prompt=True,
                                bos_token="<|im_start|>", eos_token="<|im_end|>")[0][0]
    assert ours == ref


def test_chat_template_sandbox_refuses_python_internals():
    from hpcllm.errors import HpcllmError
    from hpcllm.generate.chat import ChatTemplate

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(HpcllmError, match=r"^m\.h5: the chat template was refused by the sandbox .*$") as exc:
        ChatTemplate(evil, {}, "m.h5")
    assert "\n" not in str(exc.value)


def test_list_options_from_flags_and_toml(tmp_path):
    from hpcllm.config import load_config
    from hpcllm.cli import build_parser
    from hpcllm.errors import HpcllmError

    job = tmp_path / "gen.toml"
    job.write_text('model = "m.h5"\ninput = "in.jsonl"\noutput = "out"\n[generate]\nstop = ["\\n\\n", "END"]\n'
                   'stop_token_ids = [2, 7]\ntemperature = 0\n')
    cfg = load_config(build_parser().parse_args(["generate", "--config", str(job)]), "generate")
    assert cfg.stop == ["\n\n", "END"] and cfg.stop_token_ids == [2, 7] and cfg.temperature == 0
    cfg = load_config(build_parser().parse_args(["generate", "--config", str(job), "--stop", "x", "--stop", "y",
                                                 "--stop-token-ids", "3"]), "generate")
    assert cfg.stop == ["x", "y"] and cfg.stop_token_ids == [3]
    job.write_text('model = "m.h5"\ninput = "in.jsonl"\noutput = "out"\nstop_token_ids = ["2"]\n')
    with pytest.raises(HpcllmError, match="stop_token_ids"):
        load_config(build_parser().parse_args(["generate", "--config", str(job)]), "generate")


@pytest.mark.parametrize("lengths,slots", [
    ([30, 41, 35, 400, 28, 33], [0, 1, 2, 3, 4, 5]),        # a view over the slots, one row much longer
    ([50, 50, 50, 50], [0, 1, 2, 3]),
    ([30, 1, 35], [0, 4, 5]),                                  # idle slots inside the view
    ([12, 500, 9], [2, 9, 14]),                                # few rows among many slots: gathered
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_attention_equals_per_sequence_attention(lengths, slots, dtype):
    """Decode attention over the slot cache equals each sequence's own softmax attention over its
    positions: fp32 on the CPU takes the Numba kernel, other caches (float64 here, a GPU's) the
    batched, masked matmuls with GQA as grouped rows."""
    from types import SimpleNamespace

    from hpcllm.generate.kv_cache import LayerKV

    hq, hkv, d = 6, 2, 16
    attn = SimpleNamespace(n_heads=hq, n_kv_heads=hkv, head_dim=d, window=None, scale=None, softcap=None)
    model = SimpleNamespace(layers=[SimpleNamespace(attn=attn)])
    cache = KVCache(model, 16, 512, dtype)
    g = torch.Generator().manual_seed(0)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    step = cache.step(slots, [n - 1 for n in lengths], [])
    assert cache.kernel == (dtype == torch.float32)
    if not cache.kernel:                                               # the matmul path's slot view
        assert (step.decode(512)["view"] is None) == (2 * len(slots) < max(slots) + 1)
    q = torch.randn(hq, len(slots), d, generator=g, dtype=dtype)
    got = LayerKV(step, cache.k[0], cache.v[0])._decode(q, attn)[0]    # [Hq, B, D]
    for i, (slot, n) in enumerate(zip(slots, lengths)):
        k = cache.k[0][slot, :, :n].repeat_interleave(hq // hkv, 0)     # [Hq, n, D]
        v = cache.v[0][slot, :, :n].repeat_interleave(hq // hkv, 0)
        want = torch.softmax(q[:, i:i + 1] @ k.transpose(1, 2) / d ** 0.5, -1) @ v
        torch.testing.assert_close(got[:, i], want[:, 0], atol=1e-5, rtol=1e-5)
