"""Pretraining optimizers: AdamW (V3 report sec. 4.2) or Muon for the hidden matrices with AdamW for the rest
(Moonlight: Liu et al. 2025, "Muon is Scalable for LLM Training"), and Kimi K2's QK-clip for MLA.

`--optimizer muon`: torch's own `torch.optim.Muon` (torch >= 2.9; used rather than a hand-written copy) over every
2-D hidden matrix: the attention projections (wq / wq_a / wq_b, wkv_a, wkv_b, wo), the dense FFN, each routed and
shared expert's w1 / w2 / w3 (experts train as separate 2-D weights, so each expert is orthogonalized on its own;
the stacked (E, ...) tensors of `MoE.stack_experts` exist only at inference), the MTP projection and the indexer's
projections. Per matrix: momentum 0.95 with Nesterov, five Newton-Schulz quintic iterations with Keller Jordan's
coefficients (3.4445, -4.7750, 2.0315) in BF16, then Moonlight's two fixes: decoupled weight decay
(W <- W - lr * wd * W) and the update scaled by 0.2 * sqrt(max(A, B)) so its RMS matches AdamW's (~0.2), which
lets Muon reuse AdamW's lr and weight decay (torch's adjust_lr_fn="match_rms_adamw"). AdamW (nanoseek's,
precision.build_optimizer: BF16 moments under fp8) keeps the embedding, the output head, the MoE router gates,
the norms' gains (the router's selection bias is a buffer: only the bias rule moves it). One lr schedule drives
both (`MuonAdamW.param_groups`). Simplifications: Muon's momentum is FP32 in every precision; not combined with
--ep / --pp yet (their optimizer-state sharding knows AdamW's moments only).

QK-clip (Kimi K2 report sec. 2.1, "MuonClip"): the training forward of every MLA layer records each head's max
pre-softmax logit over the step's batch (`MLA.max_logit`, only while `track_max_logit` is on: one extra QK^T per
layer, no gradient); after the optimizer step, per head h with S_h = max logit > tau, gamma = tau / S_h scales
that head's q_nope rows and k_nope rows (wq / wq_b and wkv_b) by sqrt(gamma) each and its q_rope rows by gamma;
the shared rope key (wkv_a's rope part) is untouched, so that head's logits on the same batch scale by exactly
gamma (its max becomes tau) and no other head changes. K2 clips the weights after the update with the logits of
the step's own forward, so the next forward's max can exceed tau by what one update adds (logged as it is).
Under DDP the per-head maxima are all-reduced (max) first, so every rank clips alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed
from torch import nn

from nanoseek.cli_config import knob
from nanoseek.config import ConfigError
from nanoseek.model.attention import MLA
from nanoseek.model.moe import Gate

OPTIMIZERS = ("adamw", "muon")


@dataclass
class OptimConfig:
    """Which optimizer pretraining uses, and QK-clip. lr, weight decay and betas stay in TrainConfig (Muon reuses
    AdamW's lr and weight decay through the RMS matching)."""

    optimizer: str = knob("adamw", choices=OPTIMIZERS, help="adamw (V3), or muon: Muon for the hidden matrices "
                          "and AdamW for embedding, head, router and norms (Moonlight; nanoseek.train.optim)")
    muon_momentum: float = knob(0.95, help="Muon's Nesterov momentum (--optimizer muon)")
    qk_clip_tau: float = knob(0.0, help="QK-clip threshold (Kimi K2 uses 100): after each step, scale the q/k "
                              "weights of every attention head whose max logit exceeded it; 0 = off")
    log_max_logit: bool = knob(False, help="record and log each step's max attention logit (always on with "
                               "--qk-clip-tau; one extra QK^T per layer)")

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.qk_clip_tau < 0:
            raise ConfigError(f"qk_clip_tau must be >= 0 (0 = off), got {self.qk_clip_tau}")

    @property
    def tracks_logits(self) -> bool:
        return self.log_max_logit or self.qk_clip_tau > 0

    def check_parallel(self, ep: int, pp: int, compile: bool) -> None:
        """The combinations not supported yet, as one ConfigError (before anything is written)."""
        if (ep > 1 or pp > 1) and (self.optimizer == "muon" or self.tracks_logits):
            raise ConfigError("--optimizer muon, --qk-clip-tau and --log-max-logit do not combine with --ep / --pp "
                              "yet; use one process or torchrun data parallelism")
        if compile and self.tracks_logits:
            raise ConfigError("--qk-clip-tau / --log-max-logit do not combine with --compile yet; drop --compile")


# ---- Muon + AdamW ----------------------------------------------------------------------------------------------
def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], nn.Module]:
    """(the hidden matrices Muon takes, a module holding every other trainable parameter, for AdamW).
    AdamW keeps: embeddings, the output head, MoE router gates, and anything not 2-D (norm gains)."""
    aside = set()
    for name, m in model.named_modules():
        if isinstance(m, (nn.Embedding, Gate)) or name == "head":
            aside.update(id(p) for p in m.parameters(recurse=False))
    muon, rest = [], nn.ParameterList()
    for p in model.parameters():
        if p.requires_grad:
            (muon if p.dim() == 2 and id(p) not in aside else rest).append(p)
    return muon, rest


class MuonAdamW:
    """torch.optim.Muon over the hidden matrices and AdamW over the rest, used as one optimizer: `param_groups`
    (both optimizers' groups: the trainer's lr schedule sets them all), step, zero_grad, state_dict /
    load_state_dict (one dict with both, for checkpoints)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    @torch.no_grad()
    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("not a Muon + AdamW optimizer state (a run that trained with --optimizer adamw?)")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def build_optimizer(model: nn.Module, tcfg, ocfg: OptimConfig | None = None, precision: str = "fp32"):
    """The run's optimizer: nanoseek's AdamW (precision.build_optimizer), or MuonAdamW under --optimizer muon."""
    from nanoseek.train import precision as prec
    from nanoseek.train.common import lr_at

    if ocfg is None or ocfg.optimizer == "adamw":
        return prec.build_optimizer(model, tcfg, precision)
    hidden, rest = muon_split(model)
    muon = torch.optim.Muon(hidden, lr=lr_at(0, tcfg), weight_decay=tcfg.weight_decay, momentum=ocfg.muon_momentum,
                            nesterov=True, adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, prec.build_optimizer(rest, tcfg, precision))


# ---- QK-clip ---------------------------------------------------------------------------------------------------
def attention_layers(model: nn.Module) -> list[MLA]:
    return [m for m in model.modules() if isinstance(m, MLA)]


def track_max_logit(model: nn.Module, enable: bool) -> None:
    """Turn the per-head max-logit recording of every MLA layer's training forward on or off."""
    for attn in attention_layers(model):
        attn.track_logits, attn.max_logit = enable, None


@torch.no_grad()
def clip_heads(attn: MLA, max_logit: torch.Tensor, tau: float) -> torch.Tensor:
    """QK-clip one MLA layer (K2 sec. 2.1): heads whose max logit exceeds tau get gamma = tau / max_logit,
    q_nope and k_nope rows scaled by sqrt(gamma), q_rope rows by gamma; other heads are not touched. Returns
    the indices of the clipped heads."""
    heads = (max_logit > tau).nonzero().flatten()
    if heads.numel() == 0:
        return heads
    gamma = (tau / max_logit[heads].double()).view(-1, 1, 1)
    H, nope = attn.n_heads, attn.qk_nope_head_dim
    wq = (attn.wq if attn.q_lora_rank == 0 else attn.wq_b).weight.view(H, nope + attn.qk_rope_head_dim, -1)
    wkv = attn.wkv_b.weight.view(H, nope + attn.v_head_dim, attn.kv_lora_rank)
    root = gamma.sqrt()
    wq[heads, :nope] = (wq[heads, :nope].double() * root).to(wq.dtype)
    wq[heads, nope:] = (wq[heads, nope:].double() * gamma).to(wq.dtype)
    wkv[heads, :nope] = (wkv[heads, :nope].double() * root).to(wkv.dtype)
    return heads


@torch.no_grad()
def qk_clip(model: nn.Module, tau: float, dist=None) -> float | None:
    """After an optimizer step: the step's max attention logit over every layer and head (None when nothing was
    recorded), clipping the heads above tau when tau > 0. Resets the recorded maxima for the next step."""
    layers = [a for a in attention_layers(model) if a.max_logit is not None]
    if not layers:
        return None
    maxima = torch.stack([a.max_logit for a in layers])  # (L, H)
    if dist is not None and dist.active:
        torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
    for attn, row in zip(layers, maxima):
        attn.max_logit = None
        if tau > 0:
            clip_heads(attn, row, tau)
    return float(maxima.max())
