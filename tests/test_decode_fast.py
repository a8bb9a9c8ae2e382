"""The lean decode step (engine/decode.py) against the shared decode path (`Transformer.hidden(absorb=True)`,
`Engine(lean_decode=False)`) and against naive full recompute: same tokens, log-probs within 1e-5, on ragged,
shared (GRPO-style) and finishing rows, with top-k / top-p, per-row and batch seeds, MoE and dense models, wide
shared experts, group-limited and softmax routing; models it cannot run (FP8) fall back to the shared path."""
import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.engine import Engine, decode
from nanoseek.model import Transformer


def make_model(vocab=48, seed=0, std=0.3, **kw) -> Transformer:
    torch.manual_seed(seed)
    base = dict(vocab_size=vocab, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=3, n_dense_layers=1, n_heads=2,
                n_routed_experts=4, n_activated_experts=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                v_head_dim=8, max_seq_len=64, original_seq_len=64)
    base.update(kw)
    m = Transformer(ModelConfig(**base))
    for p in m.parameters():
        if p.dim() > 1:
            p.data.normal_(0, std)
    return m.eval()


def count_lean_steps(monkeypatch) -> list[int]:
    calls = []
    real = decode.LeanDecoder.step
    monkeypatch.setattr(decode.LeanDecoder, "step", lambda self, tok, s: calls.append(tok.numel()) or real(self, tok, s))
    return calls


def assert_same(a, b):
    assert [o.tokens for o in a] == [o.tokens for o in b]
    assert [o.finish_reason for o in a] == [o.finish_reason for o in b]
    for x, y in zip(a, b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


RAGGED = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3] * 12, [40], [5, 6, 7, 8, 9, 10, 11], [12, 13]]


@pytest.mark.parametrize("model_kw", [
    dict(),  # MoE (shared expert folded into the grouped experts) after one dense layer
    dict(n_routed_experts=0),  # dense
    dict(n_shared_experts=2),  # shared experts wider than a routed one: run on their own
    dict(n_shared_experts=0, n_routed_experts=6, n_expert_groups=3, n_limited_groups=2),  # group-limited
    dict(score_func="softmax"),  # V2 gate
    dict(q_lora_rank=12),  # low-rank queries (V2 / V3): absorbed projections
    dict(q_lora_rank=12, n_heads=4, kv_lora_rank=32, n_expert_groups=2, n_limited_groups=1),  # runtime absorption
])
@pytest.mark.parametrize("sampling", [
    dict(temperature=0.0),
    dict(temperature=1.0, seed=[11, 12, 13, 14, 15, 16]),  # per-row seeds (what RL rollouts use)
    dict(temperature=0.8, top_k=5, seed=3),
    dict(temperature=1.2, top_p=0.8, top_k=10, seed=[1, 2, 3, 4, 5, 6]),
])
def test_lean_decode_equals_shared_path(model_kw, sampling, monkeypatch):
    """Ragged prompts, two of them repeated (prefilled once), a sampled eos that ends rows at different steps
    (the batch is compacted as they finish): the lean step gives the shared path's tokens and log-probs."""
    model = make_model(seed=1, **model_kw)
    ref = Engine(model, eos_id=-1, lean_decode=False).generate(RAGGED, max_new_tokens=16, **sampling)
    # an eos that several rows produce early and others never: rows finish at different steps
    eos = max(range(3, 48), key=lambda t: sum(t in o.tokens[:10] for o in ref))
    ref = Engine(model, eos_id=eos, lean_decode=False).generate(RAGGED, max_new_tokens=16, **sampling)
    steps = count_lean_steps(monkeypatch)
    out = Engine(model, eos_id=eos).generate(RAGGED, max_new_tokens=16, **sampling)
    assert_same(out, ref)
    assert steps, "the lean decoder did not run"
    if len({len(o.tokens) for o in ref}) > 1 and min(len(o.tokens) for o in ref) < 8:
        assert min(steps) < len(RAGGED)  # rows really left the decode batch


def naive_greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_lean_greedy_equals_naive_recompute_grpo_batch(monkeypatch):
    """A GRPO-shaped batch (3 prompts x G 4, equal and unequal lengths) against full recompute per sequence;
    log-probs against the full forward's log_softmax."""
    model = make_model(seed=2)
    prompts = [p for p in ([4, 5, 6], [7, 8, 9, 10, 11], [12, 13, 14]) for _ in range(4)]
    steps = count_lean_steps(monkeypatch)
    out = Engine(model, eos_id=-1).generate(prompts, max_new_tokens=10)
    assert steps
    for p, o in zip(prompts, out):
        assert o.tokens == naive_greedy(model, p, 10)
        with torch.no_grad():
            logp = model(torch.tensor([p + o.tokens]))[0].log_softmax(-1)
        ref = [float(logp[len(p) - 1 + i, t]) for i, t in enumerate(o.tokens)]
        assert o.logprobs == pytest.approx(ref, abs=1e-5)


def test_equal_length_prompts_need_no_mask():
    model = make_model(seed=3)
    prompts = [[4, 5, 6, 7], [8, 9, 10, 11], [4, 5, 6, 7]]
    kw = dict(max_new_tokens=12, temperature=1.0, seed=[7, 8, 9])
    assert_same(Engine(model, eos_id=-1).generate(prompts, **kw),
                Engine(model, eos_id=-1, lean_decode=False).generate(prompts, **kw))


def test_weights_changed_between_calls_rebuild_the_lean_weights():
    """The lean per-layer tensors are reused while the weights stay the same and rebuilt after an update."""
    model = make_model(seed=4)
    eng, ref = Engine(model, eos_id=-1), Engine(model, eos_id=-1, lean_decode=False)
    assert_same(eng.generate(RAGGED, max_new_tokens=8), ref.generate(RAGGED, max_new_tokens=8))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.3)
    assert_same(eng.generate(RAGGED, max_new_tokens=8), ref.generate(RAGGED, max_new_tokens=8))


def test_unsupported_models_fall_back_to_the_shared_path(monkeypatch):
    """FP8 (per-weight quantized linears), an odd q_lora_rank (the in-place rope of the new key would start at an
    odd offset) and an expert width _grouped_mm cannot stride (not a multiple of 4 floats) decode through
    Transformer.hidden."""
    for kw in (dict(fp8=True), dict(q_lora_rank=13), dict(moe_inter_dim=18)):
        model = make_model(seed=5, **kw)
        model.prepare_inference(True)
        assert not decode.supported(model, torch.float32)
        model.prepare_inference(False)
        steps = count_lean_steps(monkeypatch)
        out = Engine(model, eos_id=-1).generate(RAGGED[:3], max_new_tokens=6)
        assert not steps
        assert [o.tokens for o in out] == [naive_greedy(model, p, 6) for p in RAGGED[:3]]


def test_cache_workspace_reused_across_calls_of_other_shapes():
    """One engine, calls of growing and shrinking batch and length (the workspace is reused, grown, viewed):
    each equals the shared path."""
    model = make_model(seed=6)
    eng, ref = Engine(model, eos_id=-1), Engine(model, eos_id=-1, lean_decode=False)
    for prompts, n in ((RAGGED[:2], 6), (RAGGED, 14), (RAGGED[2:4], 4), (RAGGED * 2, 10)):
        kw = dict(max_new_tokens=n, temperature=1.0, seed=list(range(len(prompts))))
        assert_same(eng.generate(prompts, **kw), ref.generate(prompts, **kw))
    assert eng._workspace.buffers[0].size(0) == 2 * len(RAGGED)


@pytest.mark.parametrize("rank", [15, 16])
def test_odd_kv_lora_rank_falls_back_and_decodes_like_naive_recompute(rank, monkeypatch):
    """An odd kv_lora_rank (which ModelConfig accepts) is refused by the lean decoder (its in-place rope views
    rows of r + d floats as complex pairs) and runs on the shared path, whose rope copes with the odd offset of
    the rope part at batch 1 and batch > 1: greedy tokens equal naive recompute."""
    model = make_model(seed=2, kv_lora_rank=rank)
    engine = Engine(model, eos_id=-1)
    steps = count_lean_steps(monkeypatch)
    for batch in ([RAGGED[0]], RAGGED[:3]):
        out = engine.generate(batch, max_new_tokens=6, temperature=0.0)
        assert [o.tokens for o in out] == [naive_greedy(model, p, 6) for p in batch]
    assert bool(steps) == (rank % 2 == 0)  # the lean decoder ran for the even rank only


@pytest.mark.parametrize("model_kw", [dict(), dict(q_lora_rank=12), dict(n_routed_experts=0),
                                      dict(q_lora_rank=12, n_heads=4, kv_lora_rank=32)])
def test_batch_one_equals_naive_recompute(model_kw, monkeypatch):
    """Batch 1 (chat, the server's lone request) runs the GEMV weight layout (`LeanLayers.gemv`) and single
    expert pairs: greedy tokens equal full recompute, log-probs the full forward's log_softmax; the attention
    projections both precomputed-absorbed and absorbed at runtime."""
    model = make_model(seed=7, **model_kw)
    model.prepare_inference(True)
    runtime = decode.absorb_at_runtime(model.cfg)
    model.prepare_inference(False)
    steps = count_lean_steps(monkeypatch)
    for absorb in (False, True):
        out = Engine(model, eos_id=-1, runtime_absorb=absorb).generate([RAGGED[0]], max_new_tokens=12)[0]
        assert out.tokens == naive_greedy(model, RAGGED[0], 12), (absorb, runtime)
        with torch.no_grad():
            logp = model(torch.tensor([RAGGED[0] + out.tokens]))[0].log_softmax(-1)
        ref = [float(logp[len(RAGGED[0]) - 1 + i, t]) for i, t in enumerate(out.tokens)]
        assert out.logprobs == pytest.approx(ref, abs=1e-5)
    assert steps and set(steps) == {1}


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("model_kw", [dict(), dict(q_lora_rank=12, n_heads=4, kv_lora_rank=32),
                                      dict(n_routed_experts=0), dict(n_shared_experts=1)])
def test_batch_one_on_threads_equals_naive_recompute(threads, model_kw, monkeypatch):
    """Batch 1 on T threads reads every matrix as T row blocks (`decode._blocks`, `_expert_blocks`: one bmm per
    product); 3 threads: widths not a multiple of 3 (vocab 48 is; dim 32 is not) fall back per matrix. Greedy tokens
    equal full recompute and log-probs the full forward's; the layers really hold blocks."""
    model = make_model(seed=11, **model_kw)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for absorb in (False, True):
            eng = Engine(model, eos_id=-1, runtime_absorb=absorb)
            out = eng.generate([RAGGED[2]], max_new_tokens=12)[0]
            assert out.tokens == naive_greedy(model, RAGGED[2], 12), absorb
            with torch.no_grad():
                logp = model(torch.tensor([RAGGED[2] + out.tokens]))[0].log_softmax(-1)
            ref = [float(logp[len(RAGGED[2]) - 1 + i, t]) for i, t in enumerate(out.tokens)]
            assert out.logprobs == pytest.approx(ref, abs=1e-5)
            layers, head = eng._lean_layers().gemv(threads)
            assert head.shape == (threads, 48 // threads, 32)
            blocked = [lay.w13.shape for lay in layers if lay.moe is not None]
            assert all(len(s) == 4 and s[1] in (1, threads) for s in blocked)
    finally:
        torch.set_num_threads(old)


def test_experts_in_nk_storage_equal_the_shared_path(monkeypatch):
    """Experts stored (E, N, K) for batched steps (`decode._nk`, here forced for the small test experts) and
    (E, K, N) for batch 1: the shared path's tokens and log-probs, ragged rows finishing at different steps,
    batch 1 included; the batched layers really hold transposed storage."""
    monkeypatch.setattr(decode, "NK_MIN_BYTES", 0)
    model = make_model(seed=8)
    kw = dict(max_new_tokens=12, temperature=1.0, seed=[1, 2, 3, 4, 5, 6])
    eng = Engine(model, eos_id=-1)
    assert_same(eng.generate(RAGGED, **kw), Engine(model, eos_id=-1, lean_decode=False).generate(RAGGED, **kw))
    one = dict(kw, seed=[9])
    assert_same(eng.generate(RAGGED[:1], **one),
                Engine(model, eos_id=-1, lean_decode=False).generate(RAGGED[:1], **one))
    moe = [lay for lay in eng._lean_layers() if lay.moe is not None]
    assert moe and all(not lay.w13.is_contiguous() and lay.w13.transpose(1, 2).is_contiguous() for lay in moe)
    assert all(lay.w13.is_contiguous() for lay in eng._lean_layers().gemv()[0] if lay.moe is not None)


def test_batch_one_on_threads_reads_only_the_chosen_experts(monkeypatch):
    """Batch 1 on 2 threads (`decode._moe_one_row`): each MoE layer multiplies exactly its 2 chosen routed experts
    and the folded shared one (the last), two products each, never the other 6 (at batch 1 their bytes are most
    of a MoE layer's)."""
    model = make_model(seed=3, n_routed_experts=8, n_activated_experts=2, n_shared_experts=1)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        eng = Engine(model, eos_id=-1)
        eng.generate([RAGGED[0]], max_new_tokens=2)  # builds the blocked layers
        layers, _ = eng._lean_layers().gemv(2)
        stacks = [(lay.w13, lay.w2) for lay in layers if lay.moe is not None]
        used: list[tuple[int, int]] = []
        real = decode.linear

        def spy(x, w):
            for j, (w13, w2) in enumerate(stacks):
                for stack in (w13, w2):
                    off = w.data_ptr() - stack.data_ptr()
                    if 0 <= off < stack.numel() * stack.element_size():
                        used.append((j, off // (stack.stride(0) * stack.element_size())))
            return real(x, w)

        monkeypatch.setattr(decode, "linear", spy)
        eng.generate([RAGGED[0]], max_new_tokens=3)
    finally:
        torch.set_num_threads(old)
    assert used
    for j in range(len(stacks)):
        experts = [e for k, e in used if k == j]
        assert len(experts) % 6 == 0  # per step: w13 then w2 of 2 routed experts (ascending ids), then the shared
        for c in range(0, len(experts), 6):
            a, a2, b, b2, s, s2 = experts[c:c + 6]
            assert a == a2 < b == b2 < s == s2 == 8


@pytest.mark.parametrize("model_kw", [dict(), dict(n_shared_experts=1), dict(q_lora_rank=12, n_heads=4, kv_lora_rank=32),
                                      dict(n_routed_experts=0)])
def test_packed_batches_equal_the_shared_path(model_kw, monkeypatch):
    """Batches with every matrix in oneDNN's packed layout (`decode._packed`, here forced for the small test
    weights) and the experts run one by one (`_moe_packed`): the shared path's tokens and log-probs (within 1e-5),
    ragged rows finishing at different steps, sampled with per-row seeds; the batched layers really are packed."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN not available")
    monkeypatch.setattr(decode, "PACK_MIN_BYTES", 0)
    model = make_model(seed=12, **model_kw)
    kw = dict(max_new_tokens=12, temperature=1.0, seed=[1, 2, 3, 4, 5, 6])
    eng = Engine(model, eos_id=-1)
    assert_same(eng.generate(RAGGED, **kw), Engine(model, eos_id=-1, lean_decode=False).generate(RAGGED, **kw))
    layers, head = eng._lean_layers().packed()
    assert head is not None and head.is_mkldnn and all(lay.w_in.is_mkldnn for lay in layers)
    moe = [lay for lay in layers if lay.moe is not None]
    assert all(isinstance(lay.w13, list) and all(w.is_mkldnn for w in lay.w13) for lay in moe)
