"""The faster decode step of issue 30 against independent references: runtime absorption of W_UK / W_UV and the
compiled static-shape step (engine/decode_static.py) give the shared path's (`Transformer.hidden`) tokens and
log-probs within 1e-5, and greedy tokens equal naive full recompute; the MoE dispatch runs only the experts
some token chose. The compiled step is traced with the `aot_eager` backend here (the same graph, without
inductor's C++ build); one inductor run is `slow`."""
import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.engine import Engine, decode, decode_static
from tests.test_decode_fast import RAGGED, assert_same, count_lean_steps, make_model, naive_greedy

MODELS = [
    dict(),  # MoE (shared expert folded into the grouped experts) after one dense layer
    dict(n_routed_experts=0),  # dense
    dict(n_shared_experts=2),  # shared experts wider than a routed one
    dict(n_shared_experts=0, n_routed_experts=6, n_expert_groups=3, n_limited_groups=2, score_func="softmax"),
]
SAMPLING = [dict(temperature=0.0), dict(temperature=1.0, seed=[11, 12, 13, 14, 15, 16]),
            dict(temperature=0.8, top_k=5, top_p=0.9, seed=3)]


def finishing_eos(model, sampling) -> int:
    """An eos that several rows sample early and others never: rows finish at different steps (compaction)."""
    ref = Engine(model, eos_id=-1, lean_decode=False).generate(RAGGED, max_new_tokens=16, **sampling)
    return max(range(3, 48), key=lambda t: sum(t in o.tokens[:10] for o in ref))


@pytest.mark.parametrize("model_kw", MODELS)
@pytest.mark.parametrize("sampling", SAMPLING)
def test_runtime_absorption_equals_shared_path(model_kw, sampling, monkeypatch):
    model = make_model(seed=1, **model_kw)
    eos = finishing_eos(model, sampling)
    ref = Engine(model, eos_id=eos, lean_decode=False).generate(RAGGED, max_new_tokens=16, **sampling)
    steps = count_lean_steps(monkeypatch)
    engine = Engine(model, eos_id=eos, runtime_absorb=True)
    assert_same(engine.generate(RAGGED, max_new_tokens=16, **sampling), ref)
    assert steps and all(lay.w_uk is not None for lay in engine._lean_layers())


def test_runtime_absorption_greedy_equals_naive_recompute():
    model = make_model(seed=2)
    prompts = [p for p in ([4, 5, 6], [7, 8, 9, 10, 11]) for _ in range(3)]
    out = Engine(model, eos_id=-1, runtime_absorb=True).generate(prompts, max_new_tokens=10)
    assert [o.tokens for o in out] == [naive_greedy(model, p, 10) for p in prompts]


def test_absorption_choice_follows_the_projection_sizes():
    """The tiny preset keeps the fused absorbed matmul; the ~100M bench config and V3's shape absorb at runtime
    (their absorbed projections hold over twice the numbers of the factors)."""
    assert not decode.absorb_at_runtime(ModelConfig.preset("tiny"))
    assert decode.absorb_at_runtime(ModelConfig.from_json("bench/configs/decode_100m.json"))
    assert decode.absorb_at_runtime(ModelConfig.preset("v3-671b"))


def test_moe_runs_only_the_chosen_experts(monkeypatch):
    """Batch 1 on one thread (on more, `decode._moe_one_row` runs the blocked experts instead: test_decode_fast),
    2 routed of 8 experts + the shared one: the grouped matmuls see exactly the 3 chosen experts,
    one row each, never the other 6; at a batch with more pairs than twice the experts, every expert runs (one
    zero-weight pair each) and none on one row."""
    model = make_model(seed=3, n_routed_experts=8, n_activated_experts=2)
    seen = []
    real = torch._grouped_mm

    def spy(a, b, offs=None, **kw):
        seen.append(torch.diff(offs, prepend=offs.new_zeros(1)).tolist())
        return real(a, b, offs=offs, **kw)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Engine(model, eos_id=-1).generate([RAGGED[0]], max_new_tokens=3)
    finally:
        torch.set_num_threads(threads)
    assert seen and all(sorted(c)[-3:] == [1, 1, 1] and sorted(c)[:-3] == [0] * 6 for c in seen)
    seen.clear()
    h = torch.randn(20, 32)
    idx = torch.arange(40).remainder(8).view(20, 2)
    decode_static.moe_experts(h, torch.ones(20, 2), idx, torch.randn(9, 32, 32), torch.randn(9, 16, 32), True)
    assert seen[0] == [6, 6, 6, 6, 6, 6, 6, 6, 21]  # 20 tokens x 2 routed over 8 experts, 20 shared, + 1 each


def test_moe_experts_equal_a_per_expert_reference_at_every_batch_size():
    """moe_experts (single pairs at batch 1, doubled pairs at small batches, a zero pair per expert beyond) against
    the plain sum over each token's chosen experts of w * SwiGLU, plus the folded shared expert (weight 1)."""
    torch.manual_seed(0)
    E, dim, inter = 8, 32, 16
    w13, w2 = torch.randn(E + 1, dim, 2 * inter), torch.randn(E + 1, inter, dim)

    def expert(x, e):
        g, u = (x @ w13[e]).chunk(2, -1)
        return (torch.nn.functional.silu(g) * u) @ w2[e]

    for n in (1, 2, 3, 20):
        h, w = torch.randn(n, dim), torch.rand(n, 2)
        idx = torch.stack([torch.randperm(E)[:2] for _ in range(n)])
        ref = torch.stack([expert(h[t:t + 1], E)[0] + sum(w[t, k] * expert(h[t:t + 1], int(idx[t, k]))[0]
                                                          for k in range(2)) for t in range(n)])
        out = decode_static.moe_experts(h, w, idx, w13, w2, True)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-4), n


@pytest.mark.parametrize("model_kw,sampling", [
    (dict(n_layers=2), SAMPLING[1]),  # one dense and one MoE block: the default suite's case (~10-40 s)
    *[pytest.param(m, s, marks=pytest.mark.slow) for m in MODELS for s in SAMPLING[:2]]])
def test_compiled_step_traced_equals_shared_path(model_kw, sampling):
    """The static-shape step through torch.compile's trace (aot_eager: dynamo + AOT autograd, no inductor):
    ragged rows that finish at different steps (shape changes: recompiles), the shared path's results."""
    model = make_model(seed=1, **model_kw)
    eos = finishing_eos(model, sampling)
    ref = Engine(model, eos_id=eos, lean_decode=False).generate(RAGGED, max_new_tokens=16, **sampling)
    engine = Engine(model, eos_id=eos, compile_decode=True, compile_backend="aot_eager", runtime_absorb=False)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    assert_same(engine.generate(RAGGED, max_new_tokens=16, **sampling), ref)
    one = dict(sampling, seed=7) if "seed" in sampling else sampling
    assert_same(engine.generate(RAGGED[:1], max_new_tokens=5, **one),  # batch 1, workspace reused
                Engine(model, eos_id=eos, lean_decode=False).generate(RAGGED[:1], max_new_tokens=5, **one))
    assert counters["stats"]["unique_graphs"] >= 1, "the static step was not traced"
    assert counters["stats"]["unique_graphs"] <= 4  # automatic dynamic shapes: not one graph per batch size


def test_compiled_step_falls_back_to_eager_with_runtime_absorption(monkeypatch):
    model = make_model(seed=4)
    steps = count_lean_steps(monkeypatch)
    out = Engine(model, eos_id=-1, compile_decode=True, compile_backend="aot_eager",
                 runtime_absorb=True).generate(RAGGED[:3], max_new_tokens=6)
    assert steps and [o.tokens for o in out] == [naive_greedy(model, p, 6) for p in RAGGED[:3]]


@pytest.mark.slow
def test_compiled_step_inductor_equals_eager():
    """The inductor build (C++ kernels) on the tiny preset's shape: greedy tokens of a GRPO-like batch equal the
    eager lean step's, log-probs within 1e-5; batch 1 as well."""
    torch.manual_seed(0)
    model = make_model(seed=5, vocab=64, dim=64, moe_inter_dim=32, n_routed_experts=8, n_heads=4,
                       kv_lora_rank=32, std=0.1)
    prompts = [p for p in ([4, 5, 6], [7, 8, 9, 10, 11]) for _ in range(4)]
    for batch in (prompts, prompts[:1]):
        kw = dict(max_new_tokens=12, temperature=1.0, seed=list(range(len(batch))))
        assert_same(Engine(model, eos_id=-1, compile_decode=True, runtime_absorb=False).generate(batch, **kw),
                    Engine(model, eos_id=-1, runtime_absorb=False).generate(batch, **kw))
