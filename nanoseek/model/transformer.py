"""The DeepSeek-V3 decoder (SPEC 1): pre-norm blocks of MLA + (dense SwiGLU | DeepSeekMoE), a final
RMSNorm, an untied head, and D Multi-Token Prediction modules (V3 report sec. 2.2, SPEC 1.4).

MTP module k at position i combines the previous depth's hidden state with the embedding of token
t_{i+k}: h' = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]), runs one block, and predicts t_{i+k+1}
through its own RMSNorm and the SHARED output head. The concatenation order (embedding first) is the
one the released V3 weights use (the paper writes the hidden state first); interop needs the former.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.model.attention import MLA
from nanoseek.model.moe import MoE, SwiGLU
from nanoseek.model.rope import RMSNorm, rope_cos_sin

IGNORE = -1  # target value that contributes no loss (padding, prompt tokens)


@dataclass
class LossParts:
    """Loss terms kept apart so the trainer weighs them: total = main + lambda * mtp + alpha * balance
    (+ aux_alpha * aux under `--balance aux`). `aux`: the batch-wise auxiliary balance loss summed over MoE
    layers (nanoseek.model.moe.batch_balance_loss); None where a caller did not compute it.
    indexer: the mean over attention layers of the sparse-attention indexer's KL loss (only while
    `set_indexer_training` is on; it trains the indexer alone, so it is simply added)."""

    main: torch.Tensor
    mtp: torch.Tensor
    balance: torch.Tensor
    aux: torch.Tensor | None = None
    indexer: torch.Tensor | None = None


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        use_moe = cfg.n_routed_experts > 0 and layer_id >= cfg.n_dense_layers
        self.ffn = MoE(cfg) if use_moe else SwiGLU(cfg.dim, cfg.inter_dim, cfg.fp8)
        # training/scoring forwards (autograd on, no cache) through torch.compile: Transformer.compile_training
        self.compiled = False

    def forward(self, x, cos, sin, mask=None, cache=None, start=0, absorb=False, write_pos=None):
        if self.compiled and cache is None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return _compiled_block()(self, x, cos, sin, mask)
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, start, absorb, write_pos)
        return x + self.ffn(self.ffn_norm(x))


def _block_train_forward(block: Block, x, cos, sin, mask):
    return block(x, cos, sin, mask)


@functools.cache
def _compiled_block():
    """One compiled training forward shared by every Block of every model (regional compilation: the blocks'
    weights are graph inputs, so all layers of one kind reuse one graph; a dense and a MoE block are two).
    Shapes start static and turn dynamic on the first change (torch.compile's automatic dynamic shapes), so
    varying batch sizes and packed lengths cost one recompile, not one per shape. Inside the trace
    `compiled` is ignored (is_compiling), and the MoE dispatch graph-breaks (MoE.dispatch is compiler-disabled)."""
    return torch.compile(_block_train_forward, dynamic=True)


# inference-only fused tensors per module type (see Transformer.prepare_inference)
_FUSED_ATTRS = ((MLA, "fused"), (MoE, "stacked"), (SwiGLU, "w13"))


class MTPModule(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(layer_id, cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h_prev, emb_next, cos, sin, mask=None, cache=None, start=0, absorb=False):
        """Returns the new hidden state (before `norm`; the caller applies norm + shared head)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(x, cos, sin, mask, cache, start, absorb)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.fused = False  # prepare_inference() state
        self._fused_cache: tuple | None = None  # (weights key, fused tensors) of the last prepare_inference
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg.n_layers + k, cfg) for k in range(cfg.n_mtp))
        cos, sin = rope_cos_sin(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
        elif hasattr(m, "weight") and isinstance(getattr(m, "weight"), nn.Parameter) and m.weight.dim() == 2:
            nn.init.normal_(m.weight, std=self.cfg.init_std)  # the MoE gate

    # ---- pieces the engine uses ---------------------------------------------------------------
    def rope(self, positions: torch.Tensor | None, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for explicit positions (B, T) or for the range [start, start + T)."""
        if positions is None:
            return self.rope_cos[start:start + T].unsqueeze(0), self.rope_sin[start:start + T].unsqueeze(0)
        return self.rope_cos[positions], self.rope_sin[positions]

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               cache: torch.Tensor | None = None, start: int = 0, absorb: bool = False,
               write_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states before the last norm (B, T, dim). cache: (n_layers, B, S_max, latent).
        write_pos (B,): per-row cache offsets for the new latents (see MLA.forward); None = `start` for all."""
        B, T = ids.shape
        if positions is None and start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope(positions, start, T)
        x = self.embed(ids)
        if mask is None and cache is not None and start > 0 and T > 1 and not (absorb and self.fused):
            # causal over a prefix-filled cache (the fused decode path applies causality itself)
            mask = torch.ones(T, start + T, dtype=torch.bool, device=ids.device).tril(start)[None, None]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache[i], start, absorb, write_pos)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self.head(self.norm(h))
        return out if out.dtype == torch.float32 else out.float()

    @torch.no_grad()
    def prepare_inference(self, enable: bool = True) -> None:
        """Precompute (or drop) the inference-only fused weights: absorbed MLA projections, stacked routed
        experts, [w1; w3] of dense and shared FFNs. They are used only without autograd and are stale once
        the weights change, so callers enable them around a generate call (or once, for a frozen server).
        Enabling again with unchanged weights (same storage, same in-place version counters, which every
        optimizer step and load_state_dict bump) reuses the last fused set instead of rebuilding it: ~5 ms
        per generate call at the tiny size, which batch-1 and speculative decoding would otherwise pay.
        Writes through `p.data` bypass the version counter: edit weights under torch.no_grad() instead."""
        self.fused = enable
        fused_attrs = [(m, name) for m in self.modules() for cls, name in _FUSED_ATTRS if isinstance(m, cls)]
        if not enable:
            for m, name in fused_attrs:
                setattr(m, name, None)
            return
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in self.parameters())
        if self._fused_cache is not None and self._fused_cache[0] == key:
            for (m, name), value in zip(fused_attrs, self._fused_cache[1]):
                setattr(m, name, value)
            return
        self._fused_cache = None
        for m in self.modules():
            if isinstance(m, MLA):
                m.fuse_absorbed(True)
            elif isinstance(m, MoE):
                m.stack_experts(True)
            elif isinstance(m, Block) and isinstance(m.ffn, SwiGLU):
                m.ffn.fuse(True)
        self._fused_cache = (key, [getattr(m, name) for m, name in fused_attrs])

    def compile_training(self, enable: bool = True) -> None:
        """Run the blocks' training forwards (autograd on, no KV cache: pretrain, SFT, the GRPO update) through
        torch.compile, one region per block kind (`_compiled_block`); decode, prefill and no-grad scoring stay
        eager. Numerics: the same ops up to inductor's fusion and reduction order (float rounding)."""
        for m in self.modules():
            if isinstance(m, Block):
                m.compiled = enable

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    # ---- training / scoring forward -----------------------------------------------------------
    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None):
        """ids (B, T) -> logits (B, T, vocab); with targets (B, T) (targets[t] = ids[t+1], IGNORE = -1)
        returns (logits, LossParts). The balance loss is this call's: MoE layers compute it only in training
        mode, so in eval mode (and for any layer this call did not run) it is zero, never a stale value."""
        for m in self.moe_layers():
            m.balance_loss = m.aux_loss = None
        for m in self.modules():
            if isinstance(m, MLA):
                m.indexer_loss = None
        h = self.hidden(ids)
        logits = self.logits(h)
        if targets is None:
            return logits
        main = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        mtp = self.mtp_loss(h, ids, targets)
        bal = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        balance = torch.stack(bal).sum() if bal else logits.new_zeros(())
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        idx = [m.indexer_loss for m in self.modules() if isinstance(m, MLA) and m.indexer_loss is not None]
        return logits, LossParts(main, mtp, balance, torch.stack(aux).sum() if aux else logits.new_zeros(()),
                                 torch.stack(idx).mean() if idx else None)

    def set_indexer_training(self, mode: str | None) -> None:
        """Sparse-attention training stages (DeepSeek-V3.2 report sec. 2.1.1): "warmup" = dense attention, every
        indexer learns the main attention distribution (KL, LossParts.indexer); "sparse" = attention restricted to
        the indexer's top-k, the KL taken over the selected keys; None = off. The indexer's inputs are detached
        either way, so the main loss never reaches it and the KL reaches nothing else (freezing the main model
        in the warm-up is the optimizer's business: nanoseek.train.sparse_attention)."""
        if mode not in (None, "warmup", "sparse"):
            raise ValueError(f"indexer training mode must be None, 'warmup' or 'sparse', got {mode!r}")
        if mode is not None and not self.cfg.sparse_attention:
            raise ConfigError("indexer training needs a sparse-attention model (index_topk > 0)")
        for m in self.modules():
            if isinstance(m, MLA):
                m.indexer_train = mode

    def mtp_loss(self, h: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(1/D) sum_k CE_k, where depth k at position i predicts t_{i+k+1} = targets[i + k]."""
        T = ids.size(1)
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            if T - k < 1:
                break
            cos, sin = self.rope(None, 0, T - k)
            h = module(h[:, :T - k], self.embed(ids[:, k:]), cos, sin)
            logits = self.head(module.norm(h)).float()
            losses.append(F.cross_entropy(logits.flatten(0, 1), targets[:, k:].flatten(), ignore_index=IGNORE))
        return torch.stack(losses).mean() if losses else h.new_zeros(()).float()

    # ---- auxiliary-loss-free balancing --------------------------------------------------------
    def expert_loads(self) -> torch.Tensor:
        """(n_moe_layers, n_routed_experts) token counts of the last forward."""
        layers = self.moe_layers()
        return torch.stack([m.last_load for m in layers]) if layers else torch.zeros(0, 0)

    @torch.no_grad()
    def update_expert_bias(self, gamma: float, loads: torch.Tensor | None = None) -> None:
        """b_i += gamma * sign(mean_load - load_i) per MoE layer. `loads` defaults to the counts
        accumulated since the last update (all micro-batches of the step); the accumulators reset."""
        for i, m in enumerate(self.moe_layers()):
            load = m.load_accum if loads is None else loads[i].to(m.load_accum)
            m.gate.bias += gamma * torch.sign(load.mean() - load)
            m.load_accum.zero_()

    def set_load_mask(self, mask: torch.Tensor | None) -> None:
        """Count only mask==True tokens (B, T) in the expert loads of the following training forwards (None:
        all tokens). For padded batches (RL), where pad tokens would skew the bias update. A float mask
        weighs each token instead (a packed prompt shared by m rows counts m times; 0 = padding)."""
        for m in self.moe_layers():
            m.load_mask = mask

    def accumulated_loads(self) -> torch.Tensor:
        layers = self.moe_layers()
        return torch.stack([m.load_accum for m in layers]) if layers else torch.zeros(0, 0)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
