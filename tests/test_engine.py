"""Engine: batched latent-cache decoding against naive full recompute, sampling against reference
distributions, MTP speculative decoding against plain decoding (greedy: identical tokens; sampling: the exact
law of the outputs, by enumerating every random draw)."""
import math
import time
from collections import Counter

import pytest
import torch
from diffs import small
from diffs import worst as nanmax

from nanoseek.config import ModelConfig
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.sampling import filtered_logits, sample
from nanoseek.model import Transformer


def make_model(vocab=64, seed=0, std=0.15, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, dim=32, inter_dim=64, moe_inter_dim=32, n_layers=3, n_dense_layers=1,
                      n_heads=2, n_routed_experts=4, n_activated_experts=2, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=8, v_head_dim=8, max_seq_len=96, original_seq_len=96, **kw)
    m = Transformer(cfg)
    for p in m.parameters():
        if p.dim() > 1:
            p.data.normal_(0, std)
    return m.eval()


def naive_greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3] * 12, [40]]


def test_greedy_matches_naive_recompute_with_ragged_batch():
    model = make_model()
    out = Engine(model, eos_id=-1).generate(PROMPTS, max_new_tokens=12)
    for p, o in zip(PROMPTS, out):
        assert o.tokens == naive_greedy(model, p, 12)
        assert o.finish_reason == "length"


def test_row_output_independent_of_batch_neighbours():
    model = make_model(seed=1)
    eng = Engine(model, eos_id=-1)
    batch = eng.generate(PROMPTS, max_new_tokens=8, temperature=0)
    alone = [eng.generate([p], max_new_tokens=8)[0] for p in PROMPTS]
    assert [o.tokens for o in batch] == [o.tokens for o in alone]


def test_repeated_prompts_are_prefilled_once_and_decode_like_naive(monkeypatch):
    """A GRPO-style batch (each prompt G times): the prefill forward sees each distinct prompt once, and every
    copy decodes exactly as naive recompute does."""
    model = make_model(seed=5)
    widths = []
    real_hidden = model.hidden
    monkeypatch.setattr(model, "hidden", lambda ids, *a, **kw: widths.append(ids.shape) or real_hidden(ids, *a, **kw))
    batch = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[3], PROMPTS[1], PROMPTS[0]]
    out = Engine(model, eos_id=-1).generate(batch, max_new_tokens=6)
    assert widths[0] == (3, len(PROMPTS[0]))  # prefill: 3 distinct prompts; decode steps: all 6 rows
    assert all(w[0] == 6 for w in widths[1:])
    for p, o in zip(batch, out):
        assert o.tokens == naive_greedy(model, p, 6)


def test_logprobs_are_those_of_the_full_model():
    model = make_model(seed=2)
    o = Engine(model, eos_id=-1).generate([PROMPTS[0]], max_new_tokens=6, temperature=0.7, seed=3)[0]
    seq = PROMPTS[0] + o.tokens
    with torch.no_grad():
        logp = (model(torch.tensor([seq]))[0] / 0.7).log_softmax(-1)
    ref = [float(logp[len(PROMPTS[0]) - 1 + i, t]) for i, t in enumerate(o.tokens)]
    assert o.logprobs == pytest.approx(ref, abs=1e-4)


def test_seeded_sampling_is_reproducible():
    eng = Engine(make_model(seed=3), eos_id=-1)
    a = eng.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=11)
    b = eng.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=11)
    c = eng.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=12)
    assert [o.tokens for o in a] == [o.tokens for o in b]
    assert [o.tokens for o in a] != [o.tokens for o in c]


def test_eos_finishes_a_row_and_others_continue():
    model = make_model(seed=4)
    free = naive_greedy(model, PROMPTS[0], 10)
    eos = free[3]
    out = Engine(model, eos_id=eos).generate([PROMPTS[0], PROMPTS[1]], max_new_tokens=10)
    assert out[0].tokens == free[:free.index(eos) + 1] and out[0].finish_reason == "stop"
    other = naive_greedy(model, PROMPTS[1], 10)
    expect = other[:other.index(eos) + 1] if eos in other else other
    assert out[1].tokens == expect


class CharTokenizer:
    """Each token id is one character: enough to test stop strings and text output."""
    eos_id = 1

    def encode(self, text):
        return [ord(c) - 60 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 60) for i in ids)


def test_stop_string_truncates_text():
    model = make_model(seed=5)
    tok = CharTokenizer()
    free = naive_greedy(model, PROMPTS[0], 12)
    stop = tok.decode(free[4:6])
    o = Engine(model, tokenizer=tok, eos_id=-1).generate([PROMPTS[0]], max_new_tokens=12, stop=[stop])[0]
    assert o.finish_reason == "stop"
    assert o.text == tok.decode(free)[:tok.decode(free).find(stop)]
    assert len(o.tokens) <= 6


def test_cache_holds_only_the_latent():
    model = make_model()
    eng = Engine(model)
    cfg = model.cfg
    assert eng.cache_bytes_per_token() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * 4
    cache = eng.new_cache(2, 10)
    assert cache.shape == (cfg.n_layers, 2, 10, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert Engine(model, cache_dtype=torch.bfloat16).cache_bytes_per_token() == \
        (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.n_layers * 2


@pytest.mark.parametrize("kwargs,msg", [
    (dict(prompts=[[]]), "empty prompt"),
    (dict(prompts=[[1] * 90], max_new_tokens=10), "exceeds the model context"),
    (dict(prompts=[[1]], temperature=-1), "temperature"),
    (dict(prompts=[[1]], top_p=0.0), "top_p"),
    (dict(prompts=[[1]], top_k=0), "top_k"),
    (dict(prompts=[[1000]]), "token ids"),
    (dict(prompts=["abc"]), "tokenizer"),
])
def test_bad_input_gives_clear_error(kwargs, msg):
    eng = Engine(make_model())
    with pytest.raises(ValueError, match=msg):
        eng.generate(**kwargs)


# ---- sampling distributions ----------------------------------------------------------------------
def reference_probs(logits: list[float], temperature: float, top_k=None, top_p=None) -> list[float]:
    """Textbook definitions, written independently with plain Python."""
    z = [x / temperature for x in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = set(order[:top_k] if top_k else order)
    if top_p is not None:
        m = max(z)
        e = [math.exp(x - m) for x in z]
        s = sum(e)
        cum, nucleus = 0.0, set()
        for i in order:
            nucleus.add(i)
            cum += e[i] / s
            if cum >= top_p:
                break
        keep &= nucleus
    m = max(z[i] for i in keep)
    e = [math.exp(z[i] - m) if i in keep else 0.0 for i in range(len(z))]
    s = sum(e)
    return [x / s for x in e]


@pytest.mark.parametrize("t,k,p", [(1.0, None, None), (0.5, None, None), (1.0, 3, None), (1.0, None, 0.7),
                                   (2.0, 4, 0.9)])
def test_sampler_matches_reference_distribution(t, k, p):
    logits = [1.5, 0.2, -0.3, 2.0, 0.9, -1.0]
    ref = reference_probs(logits, t, k, p)
    params = SamplingParams(t, k, p)
    probs = filtered_logits(torch.tensor([logits]), params).softmax(-1)[0].tolist()
    assert probs == pytest.approx(ref, abs=1e-6)
    n = 40000
    tok, _ = sample(torch.tensor([logits]).repeat(n, 1), params, torch.Generator().manual_seed(0))
    freq = Counter(tok.tolist())
    for i, r in enumerate(ref):
        assert abs(freq[i] / n - r) < 4 * math.sqrt(r * (1 - r) / n) + 1e-9


# ---- speculative decoding ------------------------------------------------------------------------
def test_speculative_greedy_is_identical_to_plain():
    model = make_model(vocab=8, seed=6, std=0.3)
    eng = Engine(model, eos_id=-1)
    prompts = [[5, 6, 7, 1], [2, 3, 4]]
    plain = eng.generate(prompts, max_new_tokens=20)
    spec = eng.generate(prompts, max_new_tokens=20, speculative=True)
    assert [o.tokens for o in spec] == [o.tokens for o in plain]
    assert eng.spec_stats.accepted > 0 and eng.spec_stats.accepted < eng.spec_stats.drafted  # both paths ran


class Enumerate:
    """Exhaustive enumeration of a procedure's random draws. While active, torch.multinomial (one sample) and
    torch.bernoulli (a 0-d probability) return a scripted outcome and record its probability; `paths(fn)`
    runs fn once per distinct sequence of outcomes (depth first, outcomes of probability 0 pruned) and
    yields (fn's result, the path's probability)."""

    def __init__(self, monkeypatch):
        self.script: list[int] = []
        self.taken: list[tuple[int, int]] = []  # per draw: (choice, number of outcomes)
        self.prob = 1.0
        monkeypatch.setattr(torch, "multinomial", self._multinomial)
        monkeypatch.setattr(torch, "bernoulli", self._bernoulli)

    def _pick(self, outcomes: list[tuple[int, float]]) -> int:
        d = len(self.taken)
        i = self.script[d] if d < len(self.script) else 0
        self.taken.append((i, len(outcomes)))
        self.prob *= outcomes[i][1]
        return outcomes[i][0]

    def _multinomial(self, probs, num_samples, replacement=False, *, generator=None):
        assert num_samples == 1 and probs.dim() in (1, 2) and (probs.dim() == 1 or probs.size(0) == 1)
        p = probs.double().flatten()
        p = p / p.sum()
        tok = self._pick([(i, float(p[i])) for i in range(p.numel()) if p[i] > 0])
        return torch.tensor([tok] if probs.dim() == 1 else [[tok]])

    def _bernoulli(self, p, *, generator=None):
        assert p.dim() == 0
        a = float(p)
        return torch.tensor(float(self._pick([(o, w) for o, w in ((1, a), (0, 1 - a)) if w > 0])))

    def paths(self, fn):
        todo = [[]]
        while todo:
            self.script, self.taken, self.prob = todo.pop(), [], 1.0
            result = fn()
            for d in range(len(self.script), len(self.taken)):  # siblings of every newly taken draw
                todo += [[c for c, _ in self.taken[:d]] + [j] for j in range(1, self.taken[d][1])]
            yield result, self.prob


@pytest.mark.parametrize("t,k", [(1.0, None), (0.7, 3)])
def test_speculative_sampling_law_is_exactly_the_target_distribution(t, k, monkeypatch):
    """The joint law of the first three new tokens under MTP speculative sampling, computed exactly by
    enumerating every outcome of every random draw (draft, accept coin, bonus / corrected token) with its
    probability, equals the model's own law: prod_i p(t_i | prompt, t_<i) from full forward passes with the
    sampler's textbook distribution (temperature, top-k). A wrong acceptance ratio or residual fails by far
    more than the 1e-5 tolerance; both the accept and the reject branch carry real mass."""
    model = make_model(vocab=4, seed=7, std=0.6)
    prompt = [1, 2, 3]

    def target(prefix):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + prefix]))[0, -1].tolist()
        return reference_probs(logits, t, k)

    exact = {}
    for a, pa in enumerate(target([])):
        for b, pb in enumerate(target([a])):
            for c, pc in enumerate(target([a, b])):
                exact[(a, b, c)] = pa * pb * pc
    eng = Engine(model, eos_id=-1)
    enum = Enumerate(monkeypatch)

    def run():
        eng.spec_stats = type(eng.spec_stats)()
        out = eng.generate([prompt], max_new_tokens=3, temperature=t, top_k=k, speculative=True)[0]
        return tuple(out.tokens), eng.spec_stats.accepted, eng.spec_stats.drafted

    law, n_paths, accepted_mass, rejected_mass = {}, 0, 0.0, 0.0
    for (tokens, accepted, drafted), prob in enum.paths(run):
        law[tokens] = law.get(tokens, 0.0) + prob
        n_paths += 1
        accepted_mass += prob * (accepted > 0)
        rejected_mass += prob * (accepted < drafted)
    assert n_paths > 50 and sum(law.values()) == pytest.approx(1.0, abs=1e-9)
    assert accepted_mass > 0.1 and rejected_mass > 0.1  # both branches exercised with real probability
    assert set(law) <= set(exact)
    err = nanmax(abs(law.get(key, 0.0) - v) for key, v in exact.items())  # Python's max would drop a NaN
    assert small(err, 1e-5), f"largest joint-probability error {err:.2e}"


def test_rows_finishing_at_different_steps_match_naive_decoding():
    """Rows leave the decode batch (compaction) as they hit eos; survivors must be unaffected."""
    model = make_model(vocab=16, seed=8, std=0.4)
    prompts = [[i % 16, (3 * i) % 16, 5] for i in range(10)]
    free = [naive_greedy(model, p, 12) for p in prompts]
    eos = max(range(16), key=lambda t: sum(t in f for f in free))  # a token many rows produce
    out = Engine(model, eos_id=eos).generate(prompts, max_new_tokens=12)
    for f, o in zip(free, out):
        expect = f[:f.index(eos) + 1] if eos in f else f
        assert o.tokens == expect
        assert o.finish_reason == ("stop" if eos in f else "length")
    assert len({len(o.tokens) for o in out}) > 2  # rows really finished at different steps


# ---- log-probs of the sampled distribution (what GRPO's ratio divides by) -------------------------
def warper_probs(logits: list[float], temperature: float, top_k=None, top_p=None) -> list[float]:
    """Temperature, then top-k, then top-p over the top-k-renormalized distribution: the order of HF's
    logits warpers and vLLM's apply_top_k_top_p (for top-k alone or top-p alone it is `reference_probs`)."""
    probs = reference_probs(logits, temperature, top_k)
    if top_p is None:
        return probs
    cum, nucleus = 0.0, set()
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        nucleus.add(i)
        cum += probs[i]
        if cum >= top_p:
            break
    s = sum(probs[i] for i in nucleus)
    return [probs[i] / s if i in nucleus else 0.0 for i in range(len(probs))]


@pytest.mark.parametrize("t,k,p,speculative", [(0.8, 5, None, False), (1.0, None, 0.6, False),
                                               (1.3, 6, 0.8, False), (1.0, 5, 0.7, True)])
def test_logprobs_are_those_of_the_filtered_distribution_actually_sampled(t, k, p, speculative):
    """With top-k / top-p, each returned log-prob is log of the temperature-scaled distribution renormalized
    over the support the token was drawn from (the textbook `reference_probs` on naive full-recompute logits),
    not the unfiltered log_softmax(logits / T); every sampled token lies in that support. Plain decoding and
    MTP speculative decoding (whose emitted tokens follow the same filtered target distribution)."""
    model = make_model(vocab=16, seed=9, std=0.5, n_mtp=1 if speculative else 0)
    prompts = [[3, 4, 5], [7, 8]]
    outs = Engine(model, eos_id=-1).generate(prompts, max_new_tokens=8, temperature=t, top_k=k, top_p=p, seed=4,
                                             speculative=speculative)
    differs = 0.0
    for prompt, o in zip(prompts, outs):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + o.tokens]))[0].double()
        for i, tok in enumerate(o.tokens):
            row = logits[len(prompt) - 1 + i].tolist()
            ref = warper_probs(row, t, k, p)
            assert ref[tok] > 0, "sampled a token outside the top-k / top-p support"
            assert o.logprobs[i] == pytest.approx(math.log(ref[tok]), abs=2e-4)
            differs = max(differs, abs(o.logprobs[i] - float((logits[len(prompt) - 1 + i] / t).log_softmax(-1)[tok])))
    assert differs > 1e-2  # the filter really changed the log-probs (the unfiltered ones would fail above)


def test_per_row_seeds_make_a_row_independent_of_its_batch():
    """One seed per prompt: a row's sample depends on its own seed only, so the same (prompt, seed) gives the
    same tokens alone, in any batch, at any position (how RL rollouts stay identical however they are split
    over processes)."""
    eng = Engine(make_model(seed=10), eos_id=-1)
    batch = eng.generate(PROMPTS, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=[11, 12, 13, 14])
    alone = [eng.generate([pr], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=[s])[0]
             for pr, s in zip(PROMPTS, [11, 12, 13, 14])]
    swapped = eng.generate(PROMPTS[::-1], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=[14, 13, 12, 11])
    assert [o.tokens for o in batch] == [o.tokens for o in alone] == [o.tokens for o in swapped[::-1]]
    for a, b in zip(batch, alone):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    same_seed = eng.generate([PROMPTS[0]] * 2, max_new_tokens=10, temperature=1.0, seed=[5, 6])
    assert same_seed[0].tokens != same_seed[1].tokens  # different seeds, different samples
    with pytest.raises(ValueError, match="seeds for"):
        eng.generate(PROMPTS, max_new_tokens=4, temperature=1.0, seed=[1, 2])


@pytest.mark.parametrize("t,k,p", [(1.0, None, None), (1.0, 3, None), (2.0, 4, 0.9), (0.7, None, 0.6)])
def test_per_row_inverse_cdf_sampling_is_exactly_the_filtered_distribution(t, k, p):
    """Per-row uniforms (what per-prompt seeds use) sample by inverse CDF: on an even grid of N uniforms each
    token is chosen exactly N * its probability times, up to one, and never one outside the support."""
    logits = [1.5, 0.2, -0.3, 2.0, 0.9, -1.0]
    ref = warper_probs(logits, t, k, p)
    n = 10000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tok, logp = sample(torch.tensor([logits]).repeat(n, 1), SamplingParams(t, k, p), uniforms=u)
    freq = Counter(tok.tolist())
    for i, r in enumerate(ref):
        assert abs(freq[i] - n * r) <= 1.0 + 1e-6 * n, (i, freq[i], n * r)
    assert logp.tolist() == pytest.approx([math.log(ref[x]) for x in tok.tolist()], abs=1e-5)


class SlowReadEngine(Engine):
    """An Engine whose workspace slot takes 1 ms to read (the GIL is released meanwhile): a read-then-clear that
    is not atomic lets a second thread read the same workspace in that window, as it can on any interpreter
    that switches threads between the two bytecodes (CPython 3.11 happens not to, so the window is made here)."""

    @property
    def _workspace(self):
        ws = self.__dict__.get("_slot")
        time.sleep(1e-3)
        return ws

    @_workspace.setter
    def _workspace(self, ws) -> None:
        self.__dict__["_slot"] = ws


def test_workspace_claim_is_atomic_across_threads():
    """The engine's cache workspace is claimed (read and cleared) by each generate call: threads claiming at once
    never hold the same workspace, and it is not lost when a thread whose claim found None returns."""
    import threading

    engine = SlowReadEngine(make_model(), eos_id=-1)
    first = engine._workspace
    assert first is not None
    held: dict[int, int] = {}  # id(workspace) -> number of threads holding it now
    guard = threading.Lock()
    shared: list[int] = []
    got = [0]
    start = threading.Barrier(6)

    def worker() -> None:
        start.wait()
        for _ in range(15):
            ws = engine._claim_workspace()
            if ws is not None:
                with guard:
                    got[0] += 1
                    held[id(ws)] = held.get(id(ws), 0) + 1
                    if held[id(ws)] > 1:
                        shared.append(id(ws))
                time.sleep(1e-4)
                with guard:
                    held[id(ws)] -= 1
            engine._return_workspace(ws)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not shared, f"{len(shared)} claims of a workspace another thread held"
    assert got[0] > 0 and engine._workspace is first  # claimed and given back, never dropped
