"""The GRPO policy update: one optimizer step on a batch of scored rollouts (R1-Zero; SPEC section 3.2).

The loss itself is `nanoseek.train.rl_math.policy_loss` (clipped surrogate + beta * k3 KL, aggregated over
tokens and samples: a pure function of log-probs); this module computes the log-probs it takes, in
micro-batches whose rows share one forward of their prompt (nanoseek.train.shared_prefix), and steps AdamW.

Departures from the papers, all deliberate:
- The old log-probs are the engine's, computed while sampling under the distribution the token was actually
  drawn from: temperature-scaled and, with `top_k` / `top_p`, renormalized over that support (vLLM's
  "processed" log-probs; engine/sampling.py). The trainer's new log-probs use the same function on its own
  logits (`support_logprobs`: the top-k / top-p support of the current logits, the sampled token always
  kept in it), so the ratio is the importance weight of the policy that really sampled and equals 1 at the
  first update. (TRL and verl instead keep the ratio on the unfiltered distribution and correct the rollout
  mismatch with a truncated importance weight; with one shared sampling function there is no mismatch to
  correct.) The trainer logs the largest engine-vs-trainer difference, which must stay near zero. The KL
  to the reference (beta > 0) uses the same support. The logged entropy is the unfiltered one.
- MoE: expert loads of the training forward passes drive the auxiliary-loss-free bias update after every
  optimizer step (on by default, `bias_update`); the balance loss is not used in RL. Rows whose advantage
  is zero (beta == 0) skip the backward but still count in the loads (a no-grad forward; skipped when the
  bias is frozen, where the loads are only logged).
- torchrun: a rank may train zero rows; it still joins every collective, so two processes compute the same
  global batch and update as one. With --ep every rank runs as many forward/backward passes as the busiest
  one (nanoseek.parallel.training).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as tdist
from torch.autograd.graph import increment_version

from nanoseek.engine.sampling import SamplingParams, support_logprobs
from nanoseek.parallel.training import idle_pass, lockstep, sync_and_clip
from nanoseek.train import precision as prec
from nanoseek.train.common import Dist
from nanoseek.train.grpo_rollout import Rollout
from nanoseek.train.rl_math import policy_loss
from nanoseek.train.shared_prefix import Packed, pack, packed_hidden, plan_micro_batches

if TYPE_CHECKING:
    from nanoseek.train.grpo import GRPOConfig


def batch_tensors(rollouts: list[Rollout], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, L), completion mask over *predicted* positions (B, L-1), engine log-probs (B, L-1)
    and targets (B, L-1)."""
    L = max(len(r.prompt) + len(r.tokens) for r in rollouts)
    B = len(rollouts)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L - 1)
    old = torch.zeros(B, L - 1)
    for i, r in enumerate(rollouts):
        seq = r.prompt + r.tokens
        ids[i, :len(seq)] = torch.tensor(seq)
        a, b = len(r.prompt) - 1, len(seq) - 1
        mask[i, a:b] = 1.0
        old[i, a:b] = torch.tensor(r.logprobs)
    return ids.to(device), mask.to(device), old.to(device), ids[:, 1:].to(device)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, sampling: SamplingParams, vocab: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """From logits (..., V): log-probs of targets (...) under the rollout distribution (temperature, and the
    top-k / top-p support renormalized: `support_logprobs`, the function the engine's log-probs agree with), and
    the per-token entropy of the temperature-scaled, unfiltered distribution. `vocab`: only the first `vocab`
    logits count (an imported checkpoint's padded embedding rows, which the engine never samples)."""
    logits = logits[..., :vocab]
    logp_all = (logits / sampling.temperature).log_softmax(dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    if sampling.top_k is None and (sampling.top_p is None or sampling.top_p >= 1):
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    else:
        logp = support_logprobs(logits, targets, sampling)
    return logp, entropy


def token_logprobs(model, ids: torch.Tensor, targets: torch.Tensor, sampling: SamplingParams, vocab: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`target_logprobs` of targets (B, L-1) over a plain per-row forward of ids (B, L): the reference the
    packed update (`packed_logprobs`) is tested against, and what the partial-rollout tests score with."""
    return target_logprobs(model.logits(model.hidden(ids[:, :-1])), targets, sampling, vocab)


def packed_logprobs(model, p: Packed, sampling: SamplingParams, vocab: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """`target_logprobs` of every completion token of micro-batch `p`, one forward over the shared-prompt
    packs (nanoseek/train/shared_prefix.py); returned as (n rows, Lc) matrices, zero past each row's end."""
    logp, ent = target_logprobs(model.logits(packed_hidden(model, p)), p.targets, sampling, vocab)
    return p.to_rows(logp), p.to_rows(ent)


@torch.no_grad()
def count_expert_loads(model, rows: list[int], prompts: list[list[int]], completions: list[list[int]],
                       micro_batch: int, device, parallel=None) -> None:
    """A no-grad training-mode forward over rows that the update skips, only so that their input tokens add to
    the expert loads of this step's bias update (what a full forward/backward over them would have counted).
    Under --ep every rank runs as many forwards as the busiest (idle passes: nanoseek.parallel.training)."""
    batches = plan_micro_batches(rows, prompts, completions, micro_batch) if rows else []
    for _ in range(lockstep(parallel, [len(batches)])[0] - len(batches)):
        idle_pass(model, grad=False)
    for mb in batches:
        p = pack(mb, prompts, completions, device)
        model.set_load_mask(p.load_weight)
        try:
            model.hidden(p.ids, p.positions, p.mask)
        finally:
            model.set_load_mask(None)


def _all_reduce_max(dist: Dist, x: float) -> float:
    if not dist.active:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=dist.device).nan_to_num(nan=math.inf)  # MAX may drop NaN
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())


def policy_update(model, ref_model, optimizer, rollouts: list[Rollout], adv: torch.Tensor, cfg: GRPOConfig,
                  dist: Dist, first: bool, skip_zero_advantage: bool = True, parallel=None,
                  vocab: int | None = None) -> dict:
    """One optimizer step over the global batch (this rank's `rollouts`, possibly none, in micro-batches of at
    most `micro_batch` rows, each row group sharing one forward of its prompt: shared_prefix.py); returns
    metrics over the global batch (identical on every rank). `parallel`: an ExpertParallel; then every
    rank runs as many forward/backward passes as the busiest (idle passes) and syncs gradients the EP way."""
    device = next(model.parameters()).device
    sampling = cfg.sampling()
    n_local = len(rollouts)
    prompts = [r.prompt for r in rollouts]
    comps = [r.tokens for r in rollouts]
    keep = [0.0 if cfg.mask_truncated and r.truncated else 1.0 for r in rollouts]
    n_tok_local = sum(len(c) * k for c, k in zip(comps, keep))
    counts = torch.tensor([float(n_local), float(n_tok_local)], device=device)
    n_seqs, n_tokens = dist.all_reduce_sum(counts).tolist()
    optimizer.zero_grad(set_to_none=True)
    model.train()
    sums = {"loss": 0.0, "clip": 0.0, "entropy": 0.0, "kl": 0.0, "tokens": 0.0, "rows": 0.0}
    logp_diff = 0.0
    counts_idle = bool(cfg.beta == 0 and skip_zero_advantage and cfg.bias_update and cfg.bias_gamma > 0)
    if n_local:
        adv = adv.to(device)
        rows = list(range(n_local))
        if cfg.beta == 0 and skip_zero_advantage:
            # A zero-advantage row (its group's rewards all equal) adds exactly zero to the loss and its gradient;
            # the normalizers above still count it, so skipping its backward leaves the update unchanged. When
            # the loads drive a bias update, its tokens still count in them (a no-grad forward), as they would
            # without skipping; with the bias frozen the logged loads cover the trained rows only.
            nonzero = (adv != 0).tolist()
            rows = [i for i in range(n_local) if nonzero[i]]
            idle = [i for i in range(n_local) if not nonzero[i]]
            if counts_idle:  # (under --ep also with no idle row: this rank joins the others' forwards)
                with prec.autocast(cfg.precision, device):
                    count_expert_loads(model, idle, prompts, comps, cfg.micro_batch, device, parallel)
        # The loss and its normalizers (global n_seqs / n_tokens) do not depend on how rows are grouped into
        # micro-batches, so the gradient is the one-batch gradient whatever the packing.
        batches = plan_micro_batches(rows, prompts, comps, cfg.micro_batch)
        n_idle = lockstep(parallel, [len(batches)])[0] - len(batches)  # agreed before any pass starts
        for mb in batches:
            p = pack(mb, prompts, comps, device)
            idx = torch.tensor(p.rows, device=device)
            flat_old = torch.tensor([x for i in p.rows for x in rollouts[i].logprobs], device=device)
            mb_old = p.to_rows(flat_old)
            mb_mask = p.to_rows(torch.ones_like(flat_old)) * torch.tensor([keep[i] for i in p.rows], device=device)[:, None]
            with prec.autocast(cfg.precision, device):
                logp, ent = packed_logprobs(model, p, sampling, vocab)
            ref_logp = None
            if cfg.beta > 0:
                with torch.no_grad(), prec.autocast(cfg.precision, device):
                    ref_logp, _ = packed_logprobs(ref_model, p, sampling, vocab)
            loss, clipped, kl = policy_loss(logp, mb_old, adv[idx], mb_mask, cfg.loss_agg, cfg.max_new_tokens,
                                            cfg.eps_low, cfg.eps_high, cfg.beta, ref_logp, n_seqs, n_tokens)
            if kl is not None:
                sums["kl"] += float((kl.detach() * mb_mask).sum())
            (loss * dist.world).backward()  # average_grads divides by world
            sums["loss"] += float(loss.detach())
            sums["clip"] += float((clipped * mb_mask).sum())
            sums["entropy"] += float((ent.detach() * mb_mask).sum())
            sums["tokens"] += float(mb_mask.sum())
            if first:
                # NaN-propagating (Python's max(0.0, nan) is 0.0): a NaN log-prob must show in the metric
                d = float(torch.where(mb_mask > 0, (logp.detach() - mb_old).abs(), 0.0).max())
                logp_diff = math.nan if math.isnan(d) or math.isnan(logp_diff) else max(logp_diff, d)
        sums["rows"] = float(len(rows))
    else:  # under --ep this rank still joins every forward/backward of the others (exact zeros from it)
        if parallel is not None and counts_idle:
            count_expert_loads(model, [], prompts, comps, cfg.micro_batch, device, parallel)
        n_idle = lockstep(parallel, [0])[0]
    for _ in range(n_idle):
        idle_pass(model, grad=True)
    grad_norm = sync_and_clip(model, cfg.grad_clip, dist, parallel)  # ranks without rows contribute zeros
    optimizer.step()
    if any(True for _ in model.moe_layers()):
        loads = dist.all_reduce_sum(model.accumulated_loads().clone())
        if cfg.bias_update:
            model.update_expert_bias(cfg.bias_gamma, loads)
        else:
            for m in model.moe_layers():
                m.load_accum.zero_()
    else:
        loads = torch.zeros(0, 0)
    keys = list(sums)
    total = dict(zip(keys, dist.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                                                             device=device)).tolist()))
    tok = max(total["tokens"], 1.0)
    out = {"loss": total["loss"], "clip_frac": total["clip"] / tok, "entropy": total["entropy"] / tok,
           "grad_norm": grad_norm, "kl": total["kl"] / tok, "rows_trained": int(total["rows"])}
    if first:
        out["logp_diff_max"] = _all_reduce_max(dist, logp_diff)
    if loads.numel():
        per_layer = loads / loads.mean(dim=1, keepdim=True).clamp(min=1e-9)
        out["expert_load_max_over_mean"] = [round(float(x), 3) for x in per_layer.max(dim=1).values]
    return out


def make_optimizer(model, cfg: GRPOConfig) -> torch.optim.AdamW:
    """AdamW over the trainable weights, with torch's fused kernel where the device has one (one pass over all
    tensors: ~4x faster than the per-tensor loop on CPU, the same update to float rounding; what transformers'
    Trainer uses by default too). The fused kernel writes the weights without bumping their autograd version
    counters, which `Transformer.prepare_inference` keys its reuse of the fused inference weights on; a post-step
    hook bumps them, or the next rollout would decode with the previous step's weights (tested)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if prec.uses_fp8(cfg.precision):  # fp8: BF16 moments (nanoseek.train.precision), no fused kernel
        return prec.AdamW(params, **kw)
    try:
        opt = torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, **kw)
    opt.register_step_post_hook(lambda o, args, kwargs: increment_version(
        [p for g in o.param_groups for p in g["params"]]))
    return opt

