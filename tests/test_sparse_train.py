"""Training sparse attention (V3.2 sec. 2.1.1; nanoseek/train/sparse_attention.py): the indexer's KL loss
against a per-query loop (warm-up: all causal keys; sparse stage: the selected set), gradients reaching only
what each stage trains, a short warm-up raising the indexer's recall of the dense attention mass, and
add_indexers keeping the dense model's function."""
from __future__ import annotations

import math

import pytest
import torch
from test_sparse import loop_index_scores, loop_selection, randomize_norms, sparse_cfg

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.model import Transformer
from nanoseek.model.rope import apply_rope
from nanoseek.train.sparse_attention import add_indexers, batches, indexer_recall, oracle_recall, train_stage


def loop_main_probs(attn, x, cos, sin, support: list[list[list[int]]]) -> torch.Tensor:
    """(B, T, T) attention distribution of each query over its support keys: a softmax per head, then the
    heads' mean (what the main attention computes in that stage: all causal keys, or the selected ones)."""
    B, T, _ = x.shape
    H, nope = attn.n_heads, attn.qk_nope_head_dim
    q = attn.wq_b(attn.q_norm(attn.wq_a(x))).view(B, T, H, -1)
    q = torch.cat([q[..., :nope], apply_rope(q[..., nope:], cos, sin)], dim=-1)
    lat = attn.latent(x, cos, sin)
    up = attn.wkv_b(lat[..., :attn.kv_lora_rank]).view(B, T, H, -1)
    k_pe = lat[..., attn.kv_lora_rank:attn.kv_lora_rank + attn.qk_rope_head_dim]
    p = torch.zeros(B, T, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                sel = support[b][t]
                k = torch.cat([up[b, sel, h, :nope], k_pe[b, sel]], dim=-1)
                p[b, t, sel] += torch.softmax(k @ q[b, t, h] * attn.softmax_scale, dim=0).double() / H
    return p


def loop_kl(p: torch.Tensor, scores: torch.Tensor, support: list[list[list[int]]]) -> float:
    """mean over (b, t) of sum_{s in support} p(s) log(p(s) / q(s)), q = softmax of the scores over the support."""
    total, n = 0.0, 0
    for b, rows in enumerate(support):
        for t, sel in enumerate(rows):
            ps = p[b, t, sel]
            logq = torch.log_softmax(scores[b, t, sel], dim=0)
            total += sum(ps[i].item() * (math.log(ps[i].item()) - logq[i].item()) for i in range(len(sel)) if ps[i] > 0)
            n += 1
    return total / n


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_indexer_kl_matches_a_per_query_loop(stage):
    """The KL of one attention layer: warm-up over all causal keys, sparse stage over exactly the selected keys
    (the target is then the sparse main attention itself, which sees only those), against softmaxes written
    per query."""
    cfg = sparse_cfg(index_topk=4)
    model = Transformer(cfg)
    randomize_norms(model)
    attn = model.layers[0].attn
    T = 10
    x = torch.randn(2, T, cfg.dim)
    cos, sin = model.rope(None, 0, T)
    freqs = torch.atan2(model.rope_sin[1], model.rope_cos[1])
    model.set_indexer_training(stage)
    attn(x, cos, sin)
    got = attn.indexer_loss.item()
    with torch.no_grad():
        scores = loop_index_scores(attn, x, freqs)
        support = loop_selection(scores, 4) if stage == "sparse" else [[list(range(t + 1)) for t in range(T)]] * 2
        p = loop_main_probs(attn, x, cos, sin, support)
    assert got == pytest.approx(loop_kl(p, scores, support), rel=1e-4, abs=1e-6)
    assert got > 1e-3


def test_gradients_reach_only_what_each_loss_trains():
    """The KL reaches only indexer parameters (input detached); the main loss never reaches the indexer (in the
    sparse stage too, where the selection shapes the main attention)."""
    model = Transformer(sparse_cfg(index_topk=4, n_mtp=1))
    ids = torch.randint(0, 64, (2, 12))
    for stage in ("warmup", "sparse"):
        model.set_indexer_training(stage)
        _, parts = model(ids, ids.roll(-1, 1))
        model.zero_grad(set_to_none=True)
        parts.indexer.backward(retain_graph=True)
        grads = {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()}
        assert all(g for n, g in grads.items() if ".indexer." in n and "k_norm" not in n)
        assert not any(g for n, g in grads.items() if ".indexer." not in n)
        model.zero_grad(set_to_none=True)
        (parts.main + parts.mtp).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if ".indexer." in n)
    model.set_indexer_training(None)
    _, parts = model(ids, ids.roll(-1, 1))
    assert parts.indexer is None
    with pytest.raises(ConfigError, match="sparse-attention"):
        Transformer(ModelConfig(n_layers=1)).set_indexer_training("warmup")


def test_warmup_raises_recall_and_keeps_the_main_model():
    """A dense model (peaked attention: large init) given fresh indexers: 80 warm-up steps raise the share of
    the dense attention mass inside the top-k (k = L/8) well above its start; no main weight moves."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=32, inter_dim=48, n_layers=2, n_dense_layers=2, n_routed_experts=0,
                      n_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                      v_head_dim=8, max_seq_len=64, original_seq_len=64, n_mtp=0, init_std=0.3)
    dense = Transformer(cfg).eval()
    model = add_indexers(dense, index_topk=4, index_n_heads=4, index_head_dim=16)
    ids = torch.randint(0, 64, (4, 32))
    with torch.no_grad():
        assert torch.equal(dense(ids), add_indexers(dense, index_topk=32)(ids))  # topk >= L: the dense model
    before = indexer_recall(model, ids, 4)
    main_before = {n: p.clone() for n, p in model.named_parameters() if ".indexer." not in n}
    log = train_stage(model, "warmup", batches(torch.randint(0, 64, (64, 33)), 8), steps=80, lr=3e-2)
    after = indexer_recall(model, ids, 4)
    assert all(o >= a - 1e-6 for o, a in zip(oracle_recall(model, ids, 4), after))
    assert log[-1]["indexer"] < 0.5 * log[0]["indexer"]
    assert min(a - b for a, b in zip(after, before)) > 0.15, (before, after)  # 0.28 -> 0.5 here
    assert all(torch.equal(p, main_before[n]) for n, p in model.named_parameters() if ".indexer." not in n)


def test_recalls_match_a_loop():
    """Layer 0 of a model: oracle_recall = mean over t >= k of the k largest dense attention shares, and
    indexer_recall = the dense share inside the indexer's own top-k (loop selection), by hand."""
    cfg = sparse_cfg(index_topk=3, n_layers=1, n_dense_layers=1, init_std=0.3)
    model = Transformer(cfg).eval()
    randomize_norms(model)
    ids = torch.randint(0, 64, (2, 9))
    attn = model.layers[0].attn
    with torch.no_grad():
        x = model.layers[0].attn_norm(model.embed(ids))
        cos, sin = model.rope(None, 0, 9)
        p = loop_main_probs(attn, x, cos, sin, [[list(range(t + 1)) for t in range(9)]] * 2)
        sel = loop_selection(loop_index_scores(attn, x, torch.atan2(model.rope_sin[1], model.rope_cos[1])), 3)
    oracle = sum(sum(sorted(p[b, t, :t + 1].tolist())[-3:]) for b in range(2) for t in range(3, 9)) / 12
    recall = sum(p[b, t, sel[b][t]].sum().item() for b in range(2) for t in range(3, 9)) / 12
    assert oracle_recall(model, ids, 3)[0] == pytest.approx(oracle, rel=1e-5)
    assert indexer_recall(model, ids, 3)[0] == pytest.approx(recall, rel=1e-5)
    assert recall < oracle - 1e-3
