"""Continuous batching: per-row cache writes against the shared-offset path, greedy and seeded outputs against
`Engine.generate` on each prompt alone (with requests joining mid-flight, rows finishing and being compacted,
cancellation), and the background thread."""
import threading

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.batcher import Batcher, Request
from nanoseek.model import Transformer

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3] * 12, [40], [7, 1, 9, 30, 31], [20] * 20]


def make_model(seed=0, vocab=64) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, dim=32, inter_dim=64, moe_inter_dim=32, n_layers=3, n_dense_layers=1,
                      n_heads=2, n_routed_experts=4, n_activated_experts=2, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=8, v_head_dim=8, max_seq_len=96, original_seq_len=96)
    m = Transformer(cfg)
    for p in m.parameters():
        if p.dim() > 1:
            p.data.normal_(0, 0.15)
    return m.eval()


def alone(model, prompt, n, eos_id=-1, **kw):
    return Engine(model, eos_id=eos_id).generate([prompt], max_new_tokens=n, **kw)[0].tokens


def drain(b: Batcher) -> None:
    while b.rows or b.pending:
        b.step()


def test_per_row_write_matches_shared_offset_write():
    model = make_model()
    ids = torch.tensor([[3], [9]])
    with torch.no_grad():
        c1 = torch.randn(model.cfg.n_layers, 2, 10, model.cfg.kv_cache_numbers_per_token_layer)
        c2 = c1.clone()
        pos = torch.tensor([4, 4])
        h1 = model.hidden(ids, pos[:, None], None, c1, 4, absorb=True)
        h2 = model.hidden(ids, pos[:, None], None, c2, 4, absorb=True, write_pos=pos)
    assert torch.equal(h1, h2) and torch.equal(c1, c2)


def test_per_row_write_lands_at_each_rows_own_position():
    model = make_model()
    cache = torch.zeros(model.cfg.n_layers, 2, 10, model.cfg.kv_cache_numbers_per_token_layer)
    pos = torch.tensor([2, 6])
    with torch.no_grad():
        model.hidden(torch.tensor([[3], [9]]), pos[:, None], None, cache, 6, absorb=True, write_pos=pos)
    written = cache.abs().sum(dim=(0, 3)) > 0  # (rows, slots)
    assert written.nonzero().tolist() == [[0, 2], [1, 6]]


def test_greedy_equals_engine_alone_with_queueing_and_compaction():
    model = make_model(seed=1)
    b = Batcher(model, eos_id=-1, max_slots=3)  # fewer slots than prompts: some wait, rows get reused
    lengths = [12, 3, 9, 1, 7, 15]
    reqs = [b.submit(Request(p, n)) for p, n in zip(PROMPTS, lengths)]
    drain(b)
    for p, n, r in zip(PROMPTS, lengths, reqs):
        assert r.tokens == alone(model, p, n)
        assert r.finish_reason == "length"
    assert b.stats.max_batch == 3


def test_requests_joining_mid_flight_match_engine():
    model = make_model(seed=2)
    b = Batcher(model, eos_id=-1, max_slots=8)
    first = b.submit(Request(PROMPTS[0], 20))
    for _ in range(5):
        b.step()
    late = [b.submit(Request(p, 10)) for p in PROMPTS[1:4]]
    b.step()
    later = b.submit(Request(PROMPTS[5], 6))
    drain(b)
    assert first.tokens == alone(model, PROMPTS[0], 20)
    for p, r in zip(PROMPTS[1:4], late):
        assert r.tokens == alone(model, p, 10)
    assert later.tokens == alone(model, PROMPTS[5], 6)


def test_eos_ends_a_row_and_the_others_continue():
    model = make_model(seed=3)
    free = alone(model, PROMPTS[0], 10)
    eos = free[2]
    b = Batcher(model, eos_id=eos, max_slots=4)
    reqs = b.generate(PROMPTS[:3], 10)
    for p, r in zip(PROMPTS[:3], reqs):
        expect = alone(model, p, 10, eos_id=eos)
        assert r.tokens == expect
        assert r.finish_reason == ("stop" if expect[-1] == eos else "length")
    assert reqs[0].finish_reason == "stop"


def test_seeded_sampling_equals_engine_and_ignores_neighbours():
    model = make_model(seed=4)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    b = Batcher(model, eos_id=-1, max_slots=8)
    reqs = b.generate(PROMPTS, 8, params, seed=100)
    for i, (p, r) in enumerate(zip(PROMPTS, reqs)):
        assert r.tokens == alone(model, p, 8, temperature=1.0, top_p=0.9, seed=100 + i)
    again = Batcher(model, eos_id=-1, max_slots=8).generate(PROMPTS[2:3], 8, params, seed=102)[0]
    assert again.tokens == reqs[2].tokens


def test_cancel_frees_the_row_and_others_are_unaffected():
    model = make_model(seed=5)
    b = Batcher(model, eos_id=-1, max_slots=2)
    a, c = b.submit(Request(PROMPTS[0], 30)), b.submit(Request(PROMPTS[1], 12))
    waiting = b.submit(Request(PROMPTS[2], 5))
    b.step()
    b.step()
    assert b.n_active == 2 and b.n_pending == 1
    b.cancel(a)
    b.step()  # a's row goes to the waiting request at once
    assert a.finish_reason == "cancelled" and a.done.is_set() and len(a.tokens) == 3  # prefill + 2 decodes
    assert b.rows[0] is c or b.rows[1] is c
    drain(b)
    assert c.tokens == alone(model, PROMPTS[1], 12)
    assert waiting.tokens == alone(model, PROMPTS[2], 5)
    assert b.n_active == 0


def test_background_thread_serves_concurrent_submitters():
    model = make_model(seed=6)
    b = Batcher(model, eos_id=-1, max_slots=4).start()
    try:
        got: dict[int, list[int]] = {}
        finishes: dict[int, str] = {}

        def client(i: int) -> None:
            toks: list[int] = []

            def on_token(tok, fin):
                toks.append(tok)
                if fin:
                    finishes[i] = fin

            r = b.submit(Request(PROMPTS[i], 6 + i, on_token=on_token))
            assert r.done.wait(30)
            got[i] = toks

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        b.close()
    for i, p in enumerate(PROMPTS):
        assert got[i] == alone(model, p, 6 + i)
        assert finishes[i] == "length"


def test_a_failing_consumer_only_loses_its_own_request():
    model = make_model(seed=7)
    b = Batcher(model, eos_id=-1, max_slots=4)

    def broken(tok, fin):
        raise RuntimeError("client went away")

    bad = b.submit(Request(PROMPTS[0], 10, on_token=broken))
    good = b.submit(Request(PROMPTS[1], 10))
    drain(b)
    assert bad.finish_reason == "cancelled"
    assert good.tokens == alone(model, PROMPTS[1], 10)


@pytest.mark.parametrize("req,msg", [
    (Request([], 4), "empty prompt"),
    (Request([1] * 90, 10), "exceeds the context"),
    (Request([1], 0), "max_new_tokens"),
    (Request([100], 4), "token ids"),
    (Request([1], 4, SamplingParams(temperature=-1)), "temperature"),
])
def test_bad_requests_are_refused_at_submit(req, msg):
    b = Batcher(make_model(), eos_id=-1, max_slots=2)
    with pytest.raises(ValueError, match=msg):
        b.submit(req)
    assert b.n_pending == 0


def test_free_rows_go_round_robin_between_groups_not_first_come():
    model = make_model(seed=8)
    b = Batcher(model, eos_id=-1, max_slots=4, reserve_slots=0)
    big = [b.submit(Request(PROMPTS[0], 30, group="big")) for _ in range(20)]
    small = b.submit(Request(PROMPTS[1], 3, group="small"))
    b.step()
    assert small in b.rows and sum(r in b.rows for r in big) == 3  # FIFO would give all 4 rows to "big"
    drain(b)
    assert small.tokens == alone(model, PROMPTS[1], 3)
    assert all(r.tokens == alone(model, PROMPTS[0], 30) for r in big[:1])


def test_round_robin_between_clients_before_their_requests():
    b = Batcher(make_model(seed=9), eos_id=-1, max_slots=3, reserve_slots=0)
    a = [b.submit(Request([5], 4, client="a", group=f"a{i}")) for i in range(4)]  # one client, four requests
    c = b.submit(Request([6], 4, client="c", group="c0"))
    b.step()
    assert b.rows == [a[0], c, a[1]]  # a, c, a: the second client is not behind all of the first's requests


def test_reserved_rows_go_to_a_newcomer_while_a_big_request_holds_the_rest():
    model = make_model(seed=10)
    b = Batcher(model, eos_id=-1, max_slots=4, reserve_slots=1, express_tokens=0)  # express lane off here
    big = [b.submit(Request(PROMPTS[0], 40, client="a", group="big")) for _ in range(10)]
    b.step()
    assert b.n_active == 3 and b.n_pending == 7  # the last free row stays free for someone new
    flood = b.submit(Request(PROMPTS[2], 2, client="a", group="a2"))  # a new request, but of the heavy client
    b.step()
    assert not flood.tokens and b.n_active == 3
    late = b.submit(Request(PROMPTS[3], 2, client="b", group="late"))
    b.step()
    assert late.tokens  # admitted (and prefilled) at once, not after a big row finishes 40 tokens later
    drain(b)
    assert late.tokens == alone(model, PROMPTS[3], 2)
    assert all(r.finish_reason == "length" for r in big)


def test_a_short_request_of_the_heavy_client_takes_the_express_reserve_and_a_long_one_does_not():
    model = make_model(seed=10)
    b = Batcher(model, eos_id=-1, max_slots=4, reserve_slots=1, express_tokens=8)
    big = [b.submit(Request(PROMPTS[0], 40, client="a", group="big")) for _ in range(10)]
    b.step()
    assert b.n_active == 3  # the last free row stays free
    long_one = b.submit(Request(PROMPTS[1], 9, client="a", group="long"))  # one address, budget over the lane
    b.step()
    assert not long_one.tokens and b.n_active == 3
    short = b.submit(Request(PROMPTS[2], 8, client="a", group="short"))  # same address, short: express
    b.step()
    assert short.tokens and b.n_active == 4  # admitted at once, not after a big row's 40 tokens
    drain(b)
    assert short.tokens == alone(model, PROMPTS[2], 8)
    assert all(r.finish_reason == "length" for r in big + [long_one])


def test_logprobs_are_the_models_raw_log_softmax_and_its_top_k():
    model = make_model(seed=11)
    b = Batcher(model, eos_id=-1, max_slots=4)
    params = SamplingParams(temperature=0.8, top_k=5)  # the raw distribution: neither temperature nor top-k
    reqs = [b.submit(Request(p, 6, params, seed=3, logprobs=3)) for p in PROMPTS[:3]]
    drain(b)
    for p, r in zip(PROMPTS[:3], reqs):
        with torch.no_grad():
            logits = model(torch.tensor([p + r.tokens]))  # naive full forward, no cache
        ref = logits[0, len(p) - 1:-1].float().log_softmax(-1)
        assert len(r.token_logprobs) == len(r.tokens) == 6
        for t, (tok, lp) in enumerate(zip(r.tokens, r.token_logprobs)):
            assert lp.logprob == pytest.approx(float(ref[t, tok]), abs=1e-4)
            top = ref[t].topk(3)
            assert [i for i, _ in lp.top] == top.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_cancelled_waiting_requests_leave_the_queue_at_the_next_step():
    b = Batcher(make_model(seed=12), eos_id=-1, max_slots=1)
    running = b.submit(Request(PROMPTS[0], 20))
    waiting = [b.submit(Request(PROMPTS[1], 4, group="g")) for _ in range(5)]
    b.step()
    for r in waiting[:4]:
        b.cancel(r)
    b.step()  # no row is free, yet the cancelled ones no longer count as waiting
    assert b.n_pending == 1 and all(r.finish_reason == "cancelled" for r in waiting[:4])
    drain(b)
    assert running.finish_reason == waiting[4].finish_reason == "length"


@pytest.mark.parametrize("cfg_kw", [dict(), dict(q_lora_rank=12), dict(n_heads=4, kv_lora_rank=32)])
def test_lean_decode_steps_equal_the_shared_path(cfg_kw, monkeypatch):
    """The batcher's decode steps on the lean step (engine/decode.py, one slot per row) against the same batcher
    on `Transformer.hidden`: requests joining mid-flight and finishing at different lengths (rows move into the
    holes), sampled with seeds: same tokens, raw log-probs within 1e-5; the lean step really ran, with rows at
    different slots."""
    from nanoseek.engine import decode

    torch.manual_seed(1)
    model = make_model()
    if cfg_kw:
        model = Transformer(ModelConfig(**{**model.cfg.__dict__, **cfg_kw})).eval()
        for p in model.parameters():
            if p.dim() > 1:
                p.data.normal_(0, 0.15)
    spread = []
    real = decode.LeanDecoder._step_rows
    monkeypatch.setattr(decode.LeanDecoder, "_step_rows",
                        lambda self, tok, s, pos: spread.append(int(pos.max() - pos.min())) or real(self, tok, s, pos))
    params = SamplingParams(temperature=1.0, top_p=0.9)
    runs = []
    for lean in (True, False):
        b = Batcher(model, eos_id=-1, max_slots=3, lean_decode=lean)
        assert (b.lean is not None) == lean
        reqs = [b.submit(Request(p, n, params, seed=50 + i, logprobs=0))
                for i, (p, n) in enumerate(zip(PROMPTS, [12, 3, 9, 1, 7, 15]))]
        b.step()
        reqs.append(b.submit(Request(PROMPTS[0], 6, params, seed=99, logprobs=0)))  # joins mid-flight
        drain(b)
        runs.append(reqs)
    assert spread and max(spread) > 0
    for a, r in zip(*runs):
        assert a.tokens == r.tokens
        assert [t.logprob for t in a.token_logprobs] == pytest.approx([t.logprob for t in r.token_logprobs], abs=1e-5)
