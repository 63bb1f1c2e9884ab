"""Latent-cache prefix reuse across turns, eviction, and lossless speculative decoding (MTP and n-gram)."""

from __future__ import annotations

import pytest
import torch

from dschat.dev import tiny_checkpoints as tc
from dschat.engine import ContextLengthError, Engine, SamplingParams
from dschat.engine.cache import LatentCache
from dschat.engine.sampling import Sampler, probabilities
from dschat.engine.speculative import NgramDrafter, verify


def prompt(n, seed=0, vocab=512):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n):
    return SamplingParams(max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(checkpoints):
    return {n: Engine.from_pretrained(checkpoints[n], dtype=torch.float32, speculative="none")
            for n in ("v3", "v3_fp8", "v2_lite")}


def fresh(path, **kw):
    return Engine.from_pretrained(path, dtype=torch.float32, **kw)


# -- prefix reuse ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, spec", [("v2_lite", "none"), ("v2_lite", "ngram"), ("v3", "mtp")])
def test_turn_two_reuses_turn_one(checkpoints, name, spec):
    eng = fresh(checkpoints[name], speculative=spec)
    p1 = prompt(70, seed=1)
    r1 = list(eng.generate(p1, greedy(25)))
    assert eng.stats.cached_tokens == 0
    p2 = p1 + r1 + prompt(9, seed=2)
    r2 = list(eng.generate(p2, greedy(20)))
    assert eng.stats.cached_tokens >= len(p1) + len(r1) - 1
    assert r2 == list(fresh(checkpoints[name], speculative="none").generate(p2, greedy(20)))


def test_prefix_shared_mid_page_and_regenerate(checkpoints, plain):
    """A prompt that diverges in the middle of a page, and the same prompt again (regenerate)."""
    eng = fresh(checkpoints["v3"], speculative="none")
    base = prompt(100, seed=3)
    list(eng.generate(base, greedy(5)))
    other = base[:90] + prompt(20, seed=4)
    out = list(eng.generate(other, greedy(12)))
    assert eng.stats.cached_tokens == 90
    assert out == list(plain["v3"].generate(other, greedy(12)))
    again = list(eng.generate(other, greedy(12)))
    assert again == out and eng.stats.cached_tokens == len(other) - 1


def test_long_prompt_is_prefilled_in_chunks(checkpoints, plain):
    from dschat.engine import engine as engine_module

    ids = prompt(engine_module.PREFILL_CHUNK + 150, seed=5)
    eng = plain["v2_lite"]
    first = next(iter(eng.generate(ids, greedy(1))))
    assert first == int(eng.logits(ids)[-1].argmax())


def test_eviction_with_a_small_pool_still_answers_right(checkpoints, plain):
    cfg = plain["v2_lite"].config
    per_token = LatentCache.bytes_per_token(cfg.num_hidden_layers, cfg.latent_dim, torch.float32)
    eng = fresh(checkpoints["v2_lite"], speculative="none", cache_gb=12 * 64 * per_token / 2**30)  # 12 pages
    assert eng.cache.num_pages == 12
    prompts = [prompt(200, seed=s) for s in range(6)]  # 4 pages each: they can't all stay
    for p in prompts + prompts[:2]:
        out = list(eng.generate(p, greedy(10)))
        assert out == list(plain["v2_lite"].generate(p, greedy(10)))
    assert len(eng.cache.free) + sum(1 for _ in eng.cache._nodes()) == 12  # no page lost
    with pytest.raises(ContextLengthError, match="cache is full"):
        list(eng.generate(prompt(900, seed=9), greedy(5)))


def test_cache_tree_copy_on_write_and_lru():
    c = LatentCache(n_layers=2, latent_dim=3, num_pages=4, page_size=4, device=torch.device("cpu"),
                    dtype=torch.float32)
    s = c.open([1, 2, 3, 4, 5, 6])
    c.reserve(s, 6)
    for buf in c.layers:
        buf[c.slots(s, 6)] = torch.arange(6.0)[:, None].expand(6, 3)
    s.ids = [1, 2, 3, 4, 5, 6]
    c.close(s)
    t = c.open([1, 2, 3, 4, 5, 9, 9])  # one whole page shared, one row copied from the partial page
    assert t.cached == 5 and len(t.shared) == 1
    assert torch.equal(c.layers[1][c.slots(t, 5)][:, 0], torch.arange(5.0))
    c.close(t, insert=False)
    u = c.open([7, 7, 7, 7, 7])
    c.reserve(u, 16)  # needs every page: the unpinned tree pages are evicted, least recently used first
    assert len(u.pages) == 4 and not list(c._nodes())


# -- speculation is lossless --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["v3", "v3_fp8"])
@pytest.mark.parametrize("spec, k", [("mtp", 1), ("mtp", 2), ("mtp", 3), ("ngram", 1), ("ngram", 4)])
def test_speculative_greedy_equals_plain_greedy(checkpoints, plain, name, spec, k):
    p = prompt(40, seed=6)
    p = p + p[:15]  # something for prompt lookup to find
    want = list(plain[name].generate(p, greedy(40)))
    eng = fresh(checkpoints[name], speculative=spec, draft_tokens=k)
    assert list(eng.generate(p, greedy(40))) == want
    assert eng.stats.draft_tokens > 0


def test_mtp_drafts_come_from_the_mtp_module(checkpoints):
    """The first draft is argmax of shared_head(MTP block(eh_proj([enorm(e(t_n)); hnorm(norm(h_{n-1}))])))."""
    eng = fresh(checkpoints["v3"], speculative="mtp")
    m, p = eng.model, prompt(12, seed=7)
    with torch.inference_mode():
        h = m(torch.tensor([p]), torch.arange(len(p)))
        t_next = int(m.head(h)[0, -1].argmax())
        # MTP over every prompt position i with (h_i, t_{i+1}), plain attention (no cache)
        next_ids = torch.tensor([p[1:] + [t_next]])
        _, logits = m.mtp_forward(0, m.model.norm(h), next_ids, torch.arange(len(p)))
    expected_draft = int(logits[0, -1].argmax())
    drafted = []
    original = eng._mtp

    def spy(seq, start, hh, ids):
        out = original(seq, start, hh, ids)
        drafted.append(int(out[1][-1].argmax()))
        return out

    eng._mtp = spy
    list(eng.generate(p, greedy(3)))
    assert drafted[0] == expected_draft


def test_ngram_drafter_proposes_the_continuation():
    d = NgramDrafter(k=3)
    d.start([5, 6, 7, 8, 9, 1, 2, 5], None)
    assert d.propose(6, room=5) == ([7, 8, 9], [None] * 3)
    d.accept([7], None)  # the first draft kept, then 4 follows
    assert d.propose(4, room=5) == ([], [])  # "7 4" and "4" never seen before (min n-gram 2)
    d.accept([], None)
    d.propose(8, room=5)  # 7 4 8 ...
    assert d.propose(9, room=2) == ([1, 2], [None] * 2)  # "8 9" was followed by 1 2 5; room cuts it


@pytest.mark.parametrize("draft", ["sampled", "deterministic"])
def test_rejection_sampling_keeps_the_distribution(draft):
    """Out of verify() over two drafts, the first token is distributed as the target p0, and the second, after
    an accepted d1, as p1 (the target after d1), whatever the draft distributions (all decided on the device)."""
    V, N = 6, 8000
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny rows: a second thread only waits for a busy core (18 ms a softmax at load 8)
    try:
        first, second = _verify_two_drafts(draft, V, N)
    finally:
        torch.set_num_threads(threads)
    p0, p1 = probabilities(TARGETS[0], PARAMS), probabilities(TARGETS[1], PARAMS)
    assert (first / N - p0).abs().max() < 0.02  # about 3.5 standard deviations at N = 8000
    assert second.sum() > 0.2 * N and (second / second.sum() - p1).abs().max() < 0.03


TARGETS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5], [0.0, 1.0, -0.5, 2.0, 0.5, 0.0], [0.0] * 6])
PARAMS = SamplingParams(temperature=1.0, seed=0)


def _verify_two_drafts(draft: str, V: int, N: int):
    """N verify() calls over two drafts (sampled from fixed q's, or the fixed 0 3): counts of the first token,
    and of the second where the first is the first draft (the only history TARGETS[1] stands for)."""
    sampler = Sampler(PARAMS)
    qs = [torch.tensor([0.3, 0.25, 0.05, 0.3, 0.05, 0.05]), torch.tensor([0.3, 0.1, 0.1, 0.4, 0.05, 0.05])]
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(N):
        drafts = [sampler.draw(q) for q in qs] if draft == "sampled" else [0, 3]
        n_ok, nxt = verify(drafts, qs if draft == "sampled" else [None, None], TARGETS, sampler)
        out = drafts[:n_ok] + [nxt]
        first[out[0]] += 1
        if n_ok >= 1:  # the second position's target is p1 after an accepted d1 only
            second[out[1]] += 1
    return first, second


def test_speculative_sampling_end_to_end_distribution(tmp_path):
    """On a tiny vocabulary, the second token sampled with MTP drafting has the model's own distribution.

    The reference is exact, not sampled: P(t2) = sum over t1 of P(t1 | p) P(t2 | p, t1), from the model's
    logits and the sampler's own probabilities. Only the MTP side is sampled, so fewer runs give the same power
    as two histograms compared with each other (this test once ran plain decoding 800 times as well)."""
    cfg = tc.v3_config(vocab=8)
    # one dense layer and one MoE layer (and the MTP layer): the 400 sampled runs cost 3 layers a pass, not 5
    cfg.update(num_hidden_layers=2, first_k_dense_replace=1)
    path = tc.write_checkpoint(tmp_path / "tiny", cfg, seed=11)
    mtp_eng = fresh(path, speculative="mtp", draft_tokens=2)
    p = [1, 2, 3, 4]
    params = SamplingParams(temperature=1.0)
    first = probabilities(mtp_eng.logits(p)[-1], params)
    exact = sum(first[t] * probabilities(mtp_eng.logits(p + [t])[-1], params) for t in range(8))

    # Drafting decides the second token only with room for a draft after it (max_tokens 3).
    n = 400
    seen = torch.zeros(8)
    for s in range(n):
        out = list(mtp_eng.generate(p, SamplingParams(temperature=1.0, seed=s, max_tokens=3, ignore_eos=True)))
        seen[out[1]] += 1
    assert mtp_eng.stats.draft_tokens > 0
    assert 0.5 * float((exact - seen / n).abs().sum()) < 0.08


def test_mtp_runs_on_float_states_with_a_packed_lm_head(checkpoints):
    """Under --quant on the CPU lm_head's weight is packed integers: the MTP step's hidden-state buffers take the
    model's float dtype, not that weight's (they were int8, so the drafts read truncated states)."""
    eng = Engine.from_pretrained(checkpoints["v3"], dtype=torch.float32, speculative="mtp", quant="int8")
    assert not eng.model.lm_head.weight.is_floating_point()
    list(eng.generate(prompt(12, seed=3), greedy(12)))
    assert eng.static.mtp_h and all(h.dtype == torch.float32 for h in eng.static.mtp_h.values())
    assert eng.stats.draft_tokens > 0
