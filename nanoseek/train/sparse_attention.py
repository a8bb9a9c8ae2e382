"""Training DeepSeek Sparse Attention into a dense model, as DeepSeek-V3.2-Exp did (report sec. 2.1.1):

1. dense warm-up: the main model frozen, attention still dense; only the lightning indexers learn, each by the
   KL divergence from its layer's main attention distribution (summed over heads, L1-normalized) to the
   softmax of its index scores (`Transformer.set_indexer_training("warmup")`, LossParts.indexer);
2. sparse stage: attention restricted to each query's top-k keys, everything trained: the main model by the
   language-model loss, the indexer by the KL over the selected set only, its input detached from the main
   graph (`set_indexer_training("sparse")`; loss = main + mtp/balance terms + indexer).

`add_indexers` turns a dense checkpoint into a sparse model (fresh indexers, every other weight copied);
`indexer_recall` measures what the warm-up is for: the share of the dense attention mass that falls inside the
indexer's top-k. Simplifications: the stages are library functions used by bench/dsa_train.py, not yet
`pretrain` flags (no resume, no data parallelism); DeepSeek's warm-up learning rate and token counts are not
reproduced at this size.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from nanoseek.config import ModelConfig
from nanoseek.model import Transformer
from nanoseek.model.attention import MLA
from nanoseek.model.rope import apply_rope


def add_indexers(dense: Transformer, index_topk: int, index_n_heads: int = 4, index_head_dim: int = 32,
                 seed: int = 0) -> Transformer:
    """A sparse-attention copy of a dense model: the same weights plus freshly initialized indexers."""
    cfg = ModelConfig.from_dict({**dense.cfg.to_dict(), "index_topk": index_topk, "index_n_heads": index_n_heads,
                                 "index_head_dim": index_head_dim})
    torch.manual_seed(seed)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    if unexpected or any(".indexer." not in k for k in missing):
        raise ValueError(f"not a dense twin: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(next(dense.parameters()).dtype)


def indexer_parameters(model: Transformer) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".indexer." in n]


def freeze_all_but_indexers(model: Transformer, frozen: bool = True) -> list[torch.nn.Parameter]:
    """requires_grad off for every non-indexer parameter (the warm-up's frozen main model); returns the indexers'."""
    for n, p in model.named_parameters():
        p.requires_grad_(".indexer." in n or not frozen)
    return indexer_parameters(model)


@torch.no_grad()
def _layer_recall(attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T) share of the dense attention mass (heads' mean) inside the indexer's top-k of each query."""
    T = x.size(1)
    q_lat = attn.q_norm(attn.wq_a(x))
    lat = attn.latent(x, cos, sin)
    m = attn.kv_lora_rank + attn.qk_rope_head_dim
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
    p = _layer_probs(attn, x, cos, sin)
    saved, attn.indexer.topk = attn.indexer.topk, k
    try:
        keep = attn.indexer.select(attn.indexer.scores(x, q_lat, cos, sin, lat[..., m:]), causal)
    finally:
        attn.indexer.topk = saved
    return (p * keep[:, 0]).sum(dim=-1)


@torch.no_grad()
def _layer_probs(attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    q_nope, q_pe = attn.wq_b(attn.q_norm(attn.wq_a(x))).view(B, T, attn.n_heads, -1).split(
        [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    lat = attn.latent(x, cos, sin)[..., :attn.kv_lora_rank + attn.qk_rope_head_dim]
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
    return attn.attention_probs(q_nope, apply_rope(q_pe, cos, sin), lat, causal).mean(dim=1)


def _layer_inputs(model: Transformer, ids: torch.Tensor) -> list[tuple]:
    """Each main layer's attention input (x, cos, sin) of a dense forward (warm-up mode)."""
    captured: list[tuple] = []
    hooks = [layer.attn.register_forward_hook(lambda mod, args, out: captured.append(args[:3]))
             for layer in model.layers]
    mode = next((m.indexer_train for m in model.modules() if isinstance(m, MLA)), None)
    if model.cfg.sparse_attention:
        model.set_indexer_training("warmup")
    try:
        model.hidden(ids)
    finally:
        if model.cfg.sparse_attention:
            model.set_indexer_training(mode)
        for h in hooks:
            h.remove()
    return captured


@torch.no_grad()
def oracle_recall(model: Transformer, ids: torch.Tensor, k: int) -> list[float]:
    """The best any selection of k keys can do: per main layer, the mean over queries t >= k of the dense
    attention mass (heads' mean) in its k largest entries (the ceiling for indexer_recall)."""
    return [_layer_probs(layer.attn, *args).topk(k, dim=-1).values.sum(-1)[:, k:].mean().item()
            for layer, args in zip(model.layers, _layer_inputs(model, ids))]


@torch.no_grad()
def indexer_recall(model: Transformer, ids: torch.Tensor, k: int) -> list[float]:
    """Per main layer: the mean over queries that see more than k keys (t >= k) of the share of the dense
    attention distribution (heads' mean) that the indexer's top-k holds. Attention runs dense (warm-up mode)
    so every layer's input is the dense model's."""
    return [_layer_recall(layer.attn, *args, k)[:, k:].mean().item()
            for layer, args in zip(model.layers, _layer_inputs(model, ids))]


def batches(rows: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless random batches of rows (N, L + 1) of a token tensor."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield rows[torch.randint(0, rows.size(0), (batch_size,), generator=g)]


def train_stage(model: Transformer, stage: str, data: Iterable[torch.Tensor], steps: int, lr: float,
                indexer_lr: float | None = None, mtp_lambda: float = 0.0) -> list[dict]:
    """Run `steps` AdamW steps of stage "warmup" (only the indexers, KL loss) or "sparse" (all parameters:
    main (+ mtp_lambda * MTP) loss plus the indexers' KL). Returns per-step {"main", "indexer"} losses."""
    if stage not in ("warmup", "sparse"):
        raise ValueError(f"stage must be 'warmup' or 'sparse', got {stage!r}")
    model.train()
    model.set_indexer_training(stage)
    params = freeze_all_but_indexers(model, frozen=stage == "warmup")
    groups = [{"params": params, "lr": indexer_lr or lr}]
    if stage == "sparse":
        groups.append({"params": [p for n, p in model.named_parameters() if ".indexer." not in n], "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    log = []
    it = iter(data)
    try:
        for _ in range(steps):
            rows = next(it)
            _, parts = model(rows[:, :-1], rows[:, 1:])
            loss = parts.indexer if stage == "warmup" else parts.main + mtp_lambda * parts.mtp + parts.indexer
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.append({"main": parts.main.item(), "indexer": parts.indexer.item()})
    finally:
        model.set_indexer_training(None)
        freeze_all_but_indexers(model, frozen=False)
        model.eval()
    return log
