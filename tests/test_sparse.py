"""DeepSeek Sparse Attention (V3.2's lightning indexer, nanoseek/model/indexer.py): the selection against a
per-query loop written from the formula, MLA restricted to the selected keys (naive and absorbed paths)
against a per-query softmax over that set, index_topk >= L equal to dense attention bit for bit, config checks."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.model import Transformer
from nanoseek.model.attention import MLA


def sparse_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=2, n_dense_layers=1, n_heads=3,
                n_routed_experts=4, n_activated_experts=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=8, v_head_dim=12, max_seq_len=64, original_seq_len=64, n_mtp=0, init_std=0.2,
                index_n_heads=6, index_head_dim=12, index_topk=5)
    base.update(kw)
    return ModelConfig(**base).validate()


def randomize_norms(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)


def rope_pair(a: float, b: float, angle: float) -> tuple[float, float]:
    return a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle)


def loop_index_scores(attn: MLA, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """I[b, t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s]) / sqrt(d * n) from the formula, one number at a time;
    RoPE by hand on (x_i, x_{i + d_rope/2}) pairs of the first d_rope numbers, angle = position * freqs[i]."""
    idx = attn.indexer
    B, T, _ = x.shape
    n, d, dr = idx.n_heads, idx.head_dim, idx.rope_dim
    x = x.double()
    q_lat = attn.q_norm(attn.wq_a(x.float())).double()
    q = (q_lat @ idx.wq_b.weight.double().T).view(B, T, n, d).clone()
    k = F.layer_norm(x @ idx.wk.weight.double().T, (d,), idx.k_norm.weight.double(), idx.k_norm.bias.double(), 1e-6)
    w = x @ idx.weights_proj.weight.double().T
    for t in range(T):
        for i in range(dr // 2):
            ang = t * freqs[i].item()
            for b in range(B):
                k[b, t, i], k[b, t, i + dr // 2] = rope_pair(k[b, t, i].item(), k[b, t, i + dr // 2].item(), ang)
                for j in range(n):
                    q[b, t, j, i], q[b, t, j, i + dr // 2] = rope_pair(q[b, t, j, i].item(),
                                                                       q[b, t, j, i + dr // 2].item(), ang)
    out = torch.zeros(B, T, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for s in range(T):
                out[b, t, s] = sum(w[b, t, j] * max((q[b, t, j] @ k[b, s]).item(), 0.0) for j in range(n))
    return out / math.sqrt(d * n)


def loop_selection(scores: torch.Tensor, topk: int) -> list[list[list[int]]]:
    """Per (b, t): the topk causal keys s <= t of highest score, by sorting (all of them when t < topk)."""
    B, T, _ = scores.shape
    return [[sorted(sorted(range(t + 1), key=lambda s: -scores[b, t, s].item())[:topk]) for t in range(T)]
            for b in range(B)]


def test_selection_matches_a_per_query_loop():
    """Indexer scores (rope, LayerNorm key, ReLU, head weights, both scales) and its causal top-k against the
    formula evaluated number by number."""
    cfg = sparse_cfg(index_topk=5, rope_factor=2.0, original_seq_len=16)  # YaRN frequencies too
    model = Transformer(cfg).eval()
    randomize_norms(model)
    attn = model.layers[0].attn
    x = torch.randn(2, 14, cfg.dim)
    cos, sin = model.rope(None, 0, 14)
    freqs = torch.atan2(model.rope_sin[1], model.rope_cos[1])  # angle of position 1 = the frequencies
    with torch.no_grad():
        lat = attn.latent(x, cos, sin)
        q_lat = attn.q_norm(attn.wq_a(x))
        scores = attn.indexer.scores(x, q_lat, cos, sin, lat[..., cfg.kv_lora_rank + cfg.qk_rope_head_dim:])
        ref = loop_index_scores(attn, x, freqs)
        assert torch.allclose(scores.double(), ref, rtol=1e-4, atol=1e-5)
        causal = torch.ones(14, 14, dtype=torch.bool).tril()[None, None]
        keep = attn.indexer.select(scores, causal)
    want = loop_selection(ref, 5)
    got = [[keep[b, 0, t].nonzero().flatten().tolist() for t in range(14)] for b in range(2)]
    assert got == want
    assert all(len(got[b][t]) == min(t + 1, 5) for b in range(2) for t in range(14))


def loop_sparse_attention(attn: MLA, x: torch.Tensor, cos, sin, keep: torch.Tensor) -> torch.Tensor:
    """Per query: softmax over its selected keys only of q . [k_nope ; k_rope] * scale, then W_O of the
    weighted values: the naive MLA formula restricted to keep[b, 0, t]."""
    B, T, _ = x.shape
    H, nope, v_dim = attn.n_heads, attn.qk_nope_head_dim, attn.v_head_dim
    from nanoseek.model.rope import apply_rope
    q = attn.wq_b(attn.q_norm(attn.wq_a(x))).view(B, T, H, -1)
    q = torch.cat([q[..., :nope], apply_rope(q[..., nope:], cos, sin)], dim=-1)
    lat = attn.latent(x, cos, sin)
    kv, k_pe = lat[..., :attn.kv_lora_rank], lat[..., attn.kv_lora_rank:attn.kv_lora_rank + attn.qk_rope_head_dim]
    up = attn.wkv_b(kv).view(B, T, H, -1)
    out = torch.zeros(B, T, H, v_dim)
    for b in range(B):
        for t in range(T):
            sel = keep[b, 0, t].nonzero().flatten()
            for h in range(H):
                k = torch.cat([up[b, sel, h, :nope], k_pe[b, sel]], dim=-1)
                p = torch.softmax(k @ q[b, t, h] * attn.softmax_scale, dim=0)
                out[b, t, h] = p @ up[b, sel, h, nope:]
    return attn.wo(out.view(B, T, -1))


@pytest.mark.parametrize("path", ["naive", "absorbed", "fused"])
def test_mla_attends_only_to_the_selected_keys(path):
    """MLA with an indexer (naive path, absorbed path, the fused decode weights of prepare_inference) equals a per-query softmax over exactly the keys the
    indexer selected; the selection really drops keys (queries past topk see topk of t + 1)."""
    cfg = sparse_cfg(index_topk=4)
    model = Transformer(cfg).eval()
    randomize_norms(model)
    attn = model.layers[1].attn
    T = 12
    x = torch.randn(2, T, cfg.dim)
    cos, sin = model.rope(None, 0, T)
    with torch.no_grad():
        lat = attn.latent(x, cos, sin)
        keep = attn._sparse_mask(x, attn.q_norm(attn.wq_a(x)), cos, sin, lat, None)
        assert keep.sum(-1)[..., T - 1].eq(4).all() and not keep[0, 0, T - 1, :T - 4].all()
        ref = loop_sparse_attention(attn, x, cos, sin, keep)
        model.prepare_inference(path == "fused")
        assert (attn.fused is not None) == (path == "fused")
        out = attn(x, cos, sin, absorb=path != "naive")
        dense = loop_sparse_attention(attn, x, cos, sin, torch.ones(T, T, dtype=torch.bool).tril()[None, None]
                                      .expand(2, 1, T, T))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert (out - dense).abs().max() > 1e-3  # dropping keys changed the result


def _dense_twin(model: Transformer) -> Transformer:
    """The same weights without indexers (index_topk = 0)."""
    cfg = ModelConfig.from_dict({**model.cfg.to_dict(), "index_topk": 0, "index_n_heads": 0, "index_head_dim": 0})
    dense = Transformer(cfg).eval()
    missing, unexpected = dense.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(".indexer." in k for k in unexpected)
    return dense


def test_topk_at_least_length_is_dense_attention_exactly():
    """index_topk >= L: logits (forward, absorbed hidden, MTP loss) bit-identical to the dense model of the same
    weights; index_topk = L - 1 differs (the comparison can fail)."""
    L = 16
    cfg = sparse_cfg(index_topk=L, n_mtp=1)
    model = Transformer(cfg).eval()
    randomize_norms(model)
    dense = _dense_twin(model)
    ids = torch.randint(0, cfg.vocab_size, (2, L))
    with torch.no_grad():
        assert torch.equal(model(ids), dense(ids))
        assert torch.equal(model.logits(model.hidden(ids, absorb=True)), dense.logits(dense.hidden(ids, absorb=True)))
        targets = ids.roll(-1, 1)
        assert torch.equal(model(ids, targets)[1].mtp, dense(ids, targets)[1].mtp)
        for m in model.modules():
            if isinstance(m, MLA):
                m.indexer.topk = L - 1
        assert (model(ids) - dense(ids)).abs().max() > 1e-4


def test_config_checks_and_old_configs():
    """Old config dicts (no index_* fields) load dense and unchanged; bad sparse settings are one-line errors;
    the cache row grows by index_head_dim; parameter counts include the indexer."""
    old = {k: v for k, v in ModelConfig().to_dict().items() if not k.startswith("index_")}
    cfg = ModelConfig.from_dict(old)
    assert not cfg.sparse_attention and cfg.kv_cache_numbers_per_token_layer == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    with pytest.raises(ConfigError, match="q_lora_rank"):
        sparse_cfg(q_lora_rank=0)
    with pytest.raises(ConfigError, match="index_n_heads"):
        sparse_cfg(index_n_heads=0)
    with pytest.raises(ConfigError, match="index_head_dim"):
        sparse_cfg(index_head_dim=6)
    cfg = sparse_cfg()
    assert cfg.kv_cache_numbers_per_token_layer == 16 + 8 + 12
    model = Transformer(cfg)
    assert cfg.param_counts()["total"] == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))


# ---- decoding: the engine's latent + indexer-key cache against a full recompute ---------------------------
def decode_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(sparse_cfg(index_topk=4, n_mtp=1, init_std=0.15)).eval()
    randomize_norms(model)
    return model


def recompute_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by a full forward over the whole sequence at every step (no cache at all)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


DECODE_PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 3, 4], [12, 13, 2, 2, 9, 30], [3] * 3 + list(range(20, 31)), [40, 41]]


def test_engine_sparse_decode_equals_full_recompute():
    """Engine.generate (ragged batch: left padding masked out of the selection; prefill naive, decode absorbed
    on fused weights over the cached latents and indexer keys) and MTP speculative decoding (draft and verify
    both select through their own indexers) give the tokens of a cache-free full recompute. index_topk = 4 < the
    context, so every decode step drops keys."""
    from nanoseek.engine import Engine

    model = decode_model()
    want = [recompute_greedy(model, p, 14) for p in DECODE_PROMPTS]
    engine = Engine(model, eos_id=-1)
    assert [g.tokens for g in engine.generate(DECODE_PROMPTS, max_new_tokens=14)] == want
    spec = [engine.generate([p], max_new_tokens=14, speculative=True)[0].tokens for p in DECODE_PROMPTS]
    assert spec == want and engine.spec_stats.steps > 0
    assert engine.new_cache(1, 8).size(-1) == 16 + 8 + 12  # [c_KV ; k_rope ; indexer key]


def test_batcher_sparse_decode_equals_full_recompute():
    """Continuous batching (per-row cache writes, a request joining mid-flight, rows retired) with sparse
    attention: the tokens of a full recompute."""
    from nanoseek.engine.batcher import Batcher, Request

    model = decode_model(seed=1)
    b = Batcher(model, eos_id=-1, max_slots=3)
    first = b.submit(Request(DECODE_PROMPTS[0], 12))
    for _ in range(4):
        b.step()
    rest = [b.submit(Request(p, n)) for p, n in zip(DECODE_PROMPTS[1:], (5, 12, 9))]
    while b.rows or b.pending:
        b.step()
    for r, p, n in zip([first] + rest, DECODE_PROMPTS, (12, 5, 12, 9)):
        assert r.tokens == recompute_greedy(model, p, n)


def test_gathered_sparse_prefill_equals_the_mask_formulation():
    """Inference (no autograd) attends over a gather of each query's top-k cache rows in MLA's absorbed form,
    a few queries at a time; training keeps the mask over the full score matrix. Same keys, so the same logits:
    a whole prompt, a prompt continued on a prefix-filled cache, and the fused weights, against the mask
    formulation (autograd on). Queries before position k see fewer than k keys (the padding picks drop out)."""
    cfg = sparse_cfg(index_topk=4)
    model = Transformer(cfg).eval()
    randomize_norms(model)
    for m in model.modules():
        if isinstance(m, MLA):
            m.gather_chunk = 3  # several chunks, the last one short
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    ref = model(ids).detach()  # autograd on: the mask formulation
    with torch.no_grad():
        assert torch.allclose(model(ids), ref, atol=1e-5, rtol=1e-4)
        def new_cache():
            return torch.zeros(cfg.n_layers, 2, 20, cfg.kv_cache_numbers_per_token_layer)

        cache = new_cache()
        model.hidden(ids[:, :12], cache=cache, start=0)
        tail = model.logits(model.hidden(ids[:, 12:], cache=cache, start=12))
        assert torch.allclose(tail, ref[:, 12:], atol=1e-5, rtol=1e-4)
        model.prepare_inference(True)
        fused = model.logits(model.hidden(ids, cache=new_cache(), start=0, absorb=True))
        assert torch.allclose(fused, ref, atol=1e-5, rtol=1e-4)
