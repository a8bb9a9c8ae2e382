"""GRPO and its refinements: RL from verifiable rewards (R1-Zero; SPEC section 3).

One step: sample `prompts_per_step` problems, let the engine roll out `group_size` completions each
(temperature 1.0), score them with the task's program (accuracy + format; truncated outputs earn no
accuracy), shape rewards (DAPO overlong, Kimi length reward), compute group advantages, then take `mu`
AdamW steps on the clipped surrogate (+ beta * k3 KL to a frozen reference when beta > 0).

Departures from the papers, all deliberate:
- The old log-probs are the engine's (computed during generation, under the same temperature); the
  trainer recomputes them once per step and logs the largest difference, which must stay near zero.
- No reference copy of the model is kept when beta == 0 (the default; DAPO and Dr. GRPO drop the KL).
- DAPO dynamic sampling draws up to `max_sampling_rounds` extra batches; if the batch is still not full it
  trains on what it has rather than stalling.
- Prioritized sampling draws from a fixed pool of train-split problems with probability proportional to
  1 - success rate (Kimi k1.5 sec. 2.3.4), success rates starting at 0.5 and updated by moving average.
- Curriculum raises the difficulty linearly from `curriculum_start` to the task's default over the run.
- MoE: expert loads of the training forward passes drive the auxiliary-loss-free bias update after every
  optimizer step (on by default, `bias_update`); the balance loss is not used in RL.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.config import ConfigError
from nanoseek.engine import Engine
from nanoseek.io import atomic_write_text
from nanoseek.tasks import get_task
from nanoseek.tasks.base import RewardWeights
from nanoseek.tasks.reflection import reflection_stats
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import latest_checkpoint, load_checkpoint, load_run_model, save_checkpoint
from nanoseek.train.common import Dist, clip_grads, setup_distributed
from nanoseek.train.metrics import MetricsLogger, ProgressLine
from nanoseek.train.partial_rollouts import PartialRollouts
from nanoseek.train.rl_math import (AGGREGATIONS, aggregate, clipped_surrogate, group_advantages, k3_kl,
                                    length_rewards, overlong_penalty)


@dataclass
class GRPOConfig:
    """Every RL knob, with its default and where it comes from."""

    task: str = "arithmetic"
    difficulty: int | None = None  # None = the task's default
    steps: int = 200
    minutes: float | None = None  # stop (and checkpoint) after this much wall time
    group_size: int = 8  # G (R1: 16)
    prompts_per_step: int = 16
    max_new_tokens: int = 64
    temperature: float = 1.0  # rollout temperature (R1: 1.0)
    top_p: float | None = None
    lr: float = 1e-4  # 2e-4 collapsed a weak tiny base in the prototype; 1e-4 was stable
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    micro_batch: int = 64  # sequences per training forward (memory bound only; the loss is the same)
    mu: int = 1  # policy updates per rollout batch (GRPO's mu)
    advantage: str = "grpo"  # "grpo" (divide by group std) or "dr_grpo" (mean only)
    loss_agg: str = "grpo"  # grpo | dapo | dr_grpo
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO clip-higher: 0.28
    beta: float = 0.0  # KL weight (R1: 0.001); 0 keeps no reference model
    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, resample
    max_sampling_rounds: int = 3
    overlong_cache: int = 0  # DAPO soft overlong punishment interval L_cache (0 = off)
    mask_truncated: bool = False  # DAPO: truncated samples contribute no loss
    length_weight: float = 0.0  # Kimi k1.5 length reward weight (0 = off)
    length_warmup_steps: int = 0  # length reward off during these first steps
    prioritized: bool = False  # Kimi: sample problems with p ~ 1 - success rate
    pool_size: int = 2000
    curriculum: bool = False
    curriculum_start: int = 1
    bias_update: bool = True
    # Pretraining's 1e-3 moves the routing more than RL's ~40x smaller lr moves the weights (greedy accuracy
    # fell 6-8 points in two demo pilots); 1e-4 keeps loads balanced without that drift, 0 freezes the bias.
    bias_gamma: float = 1e-4
    seed: int = 0
    ckpt_every: int = 50
    keep_last: int = 2
    partial_rollout_tokens: int = 0  # Kimi k1.5 partial rollouts: new tokens per trajectory per step (0 = off)

    def validate(self) -> "GRPOConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.group_size >= 2, f"group_size must be >= 2 (advantages compare samples), got {self.group_size}")
        need(self.prompts_per_step >= 1, "prompts_per_step must be >= 1")
        need(self.steps >= 1 and self.max_new_tokens >= 1 and self.mu >= 1, "steps, max_new_tokens and mu must be >= 1")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.temperature > 0, "rollout temperature must be > 0 (log-probs of a greedy policy are undefined)")
        need(self.advantage in ("grpo", "dr_grpo"), f"advantage must be grpo or dr_grpo, got {self.advantage!r}")
        need(self.loss_agg in AGGREGATIONS, f"loss_agg must be one of {AGGREGATIONS}, got {self.loss_agg!r}")
        need(0 <= self.eps_low < 1 and self.eps_high >= 0, "need 0 <= eps_low < 1 and eps_high >= 0")
        need(self.beta >= 0, "beta must be >= 0")
        need(self.bias_gamma >= 0, f"bias_gamma must be >= 0, got {self.bias_gamma}")
        need(self.minutes is None or self.minutes > 0, "minutes must be positive")
        need(self.partial_rollout_tokens >= 0 and not (self.partial_rollout_tokens and self.dynamic_sampling),
             "partial_rollout_tokens must be >= 0 and cannot be combined with dynamic sampling")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- problem sampling -------------------------------------------------------------------------------
class ProblemSampler:
    """Draws train-split problems: uniformly fresh ones, or from a pool by priority 1 - success rate;
    optionally with a curriculum on difficulty. Its state round-trips through checkpoints."""

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg
        self.task = get_task(cfg.task, RewardWeights(cfg.accuracy_weight, cfg.format_weight))
        self.rng = random.Random(cfg.seed)
        self.target = self.task.check_difficulty(cfg.difficulty)
        self.pool = []
        self.success: list[float] = []
        if cfg.prioritized:
            prng = random.Random(cfg.seed + 1)
            self.pool = [self.task.sample_split(prng, self.target, "train") for _ in range(cfg.pool_size)]
            self.success = [0.5] * cfg.pool_size

    def difficulty(self, step: int) -> int:
        if not self.cfg.curriculum:
            return self.target
        lo = min(self.cfg.curriculum_start, self.target)
        frac = min(step / max(self.cfg.steps - 1, 1), 1.0)
        return int(round(lo + (self.target - lo) * frac))

    def draw(self, n: int, step: int) -> list[tuple[int, object]]:
        if self.cfg.prioritized:
            weights = [1.0 - s + 1e-3 for s in self.success]
            idx = self.rng.choices(range(len(self.pool)), weights=weights, k=n)
            return [(i, self.pool[i]) for i in idx]
        d = self.difficulty(step)
        return [(-1, self.task.sample_split(self.rng, d, "train")) for _ in range(n)]

    def record(self, idx: int, accuracy: float) -> None:
        if idx >= 0:
            self.success[idx] = 0.7 * self.success[idx] + 0.3 * accuracy

    def state(self) -> dict:
        s = self.rng.getstate()
        return {"rng": [s[0], list(s[1]), s[2]], "success": self.success}

    def load(self, state: dict) -> None:
        s = state["rng"]
        self.rng.setstate((s[0], tuple(s[1]), s[2]))
        self.success = list(state["success"])


# ---- rollouts and rewards ---------------------------------------------------------------------------
@dataclass
class Rollout:
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    truncated: bool
    reward: float
    correct: bool
    format_ok: bool
    group: int


def rollout_groups(engine: Engine, sampler: ProblemSampler, cfg: GRPOConfig, n_prompts: int, step: int,
                   seed: int, rank: int = 0, world: int = 1) -> tuple[list[Rollout], dict]:
    """Generate, score and shape one batch of groups (with DAPO dynamic sampling when enabled)."""
    tok: Tokenizer = engine.tokenizer
    G = cfg.group_size
    kept: list[Rollout] = []
    stats = {"reward": [], "correct": [], "format": [], "len": [], "truncated": [], "zero_spread": [], "rounds": 0,
             "texts": []}
    rounds = 1 + (cfg.max_sampling_rounds if cfg.dynamic_sampling else 0)
    for r in range(rounds):
        need = n_prompts - len(kept) // G
        if need <= 0:
            break
        drawn = sampler.draw(need * world, step)[rank * need:(rank + 1) * need]
        stats["rounds"] += 1
        prompts = [tok.prompt_ids(p.prompt) for _, p in drawn for _ in range(G)]
        outs = engine.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               top_p=cfg.top_p, seed=seed * 1000 + r)
        t_verify = time.perf_counter()  # one batched (parallel, sandboxed where needed) check of the round
        all_scores = sampler.task.score_batch([p for _, p in drawn for _ in range(G)], [o.text for o in outs],
                                              [o.finish_reason == "length" for o in outs])
        stats["verify_s"] = stats.get("verify_s", 0.0) + time.perf_counter() - t_verify
        stats["checks"] = stats.get("checks", 0) + len(outs)
        for g, (idx, problem) in enumerate(drawn):
            group = outs[g * G:(g + 1) * G]
            scores = all_scores[g * G:(g + 1) * G]
            rewards = [s.reward for s in scores]
            lengths = [len(o.tokens) for o in group]
            if cfg.overlong_cache > 0:
                rewards = [x + overlong_penalty(n, cfg.max_new_tokens, cfg.overlong_cache) for x, n in zip(rewards, lengths)]
            if cfg.length_weight > 0 and step >= cfg.length_warmup_steps:
                lr_ = length_rewards(lengths, [s.correct for s in scores])
                rewards = [x + cfg.length_weight * y for x, y in zip(rewards, lr_)]
            acc = sum(s.correct for s in scores) / G
            sampler.record(idx, acc)
            spread_zero = max(rewards) - min(rewards) < 1e-9
            stats["reward"] += rewards
            stats["correct"] += [float(s.correct) for s in scores]
            stats["format"] += [float(s.format_ok) for s in scores]
            stats["len"] += lengths
            stats["texts"] += [o.text for o in group]  # for the reflection metrics (nanoseek.tasks.reflection)
            stats["truncated"] += [float(o.finish_reason == "length") for o in group]
            stats["zero_spread"].append(float(spread_zero))
            if cfg.dynamic_sampling and spread_zero:
                continue
            if len(kept) // G >= n_prompts:
                continue
            for o, s, rew in zip(group, scores, rewards):
                kept.append(Rollout(prompts[g * G], o.tokens, o.logprobs, o.finish_reason == "length", rew,
                                    s.correct, s.format_ok, len(kept) // G))
    return kept, stats


# ---- the policy-gradient update ---------------------------------------------------------------------
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


def token_logprobs(model, ids: torch.Tensor, targets: torch.Tensor, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of targets (B, L-1) under the temperature-scaled policy, and per-token entropy."""
    logits = model.logits(model.hidden(ids[:, :-1])) / temperature
    logp_all = logits.log_softmax(dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def policy_update(model, ref_model, optimizer, rollouts: list[Rollout], adv: torch.Tensor, cfg: GRPOConfig,
                  dist: Dist, first: bool) -> dict:
    """One optimizer step over the batch in micro-batches; returns metrics."""
    device = next(model.parameters()).device
    ids, mask, old, targets = batch_tensors(rollouts, device)
    if cfg.mask_truncated:
        keep = torch.tensor([0.0 if r.truncated else 1.0 for r in rollouts], device=device)
        mask = mask * keep.unsqueeze(-1)
    lengths = torch.tensor([len(r.prompt) + len(r.tokens) for r in rollouts], device=device)
    n_seqs = dist.all_reduce_sum(torch.tensor([float(len(rollouts))], device=device)).item()
    n_tokens = dist.all_reduce_sum(mask.sum().reshape(1).clone()).item()
    if cfg.beta == 0:
        # A zero-advantage row (its group's rewards all equal) adds exactly zero to the loss and its gradient;
        # the normalizers above still count it, so skipping its forward/backward leaves the update unchanged
        # (one row is kept so every rank runs a backward). Metrics below are over the trained rows.
        rows = (adv != 0).nonzero().flatten()
        rows = rows if rows.numel() else torch.zeros(1, dtype=torch.long)
        ids, mask, old, targets, lengths, adv = (t[rows.to(t.device)] for t in (ids, mask, old, targets, lengths, adv))
    n_rows = ids.size(0)
    optimizer.zero_grad(set_to_none=True)
    sums = {"clip": 0.0, "kl": 0.0, "entropy": 0.0, "logp_diff": 0.0, "loss": 0.0}
    model.train()
    for s in range(0, n_rows, cfg.micro_batch):
        sl = slice(s, s + cfg.micro_batch)
        # drop right padding beyond this micro-batch's longest sequence
        width = int(mask[sl].nonzero()[:, 1].max()) + 2 if mask[sl].any() else 2
        mb_ids, mb_mask, mb_old, mb_t = ids[sl, :width], mask[sl, :width - 1], old[sl, :width - 1], targets[sl, :width - 1]
        real = torch.arange(width - 1, device=device)[None, :] < lengths[sl, None]  # not right padding
        model.set_load_mask(real)
        try:
            logp, ent = token_logprobs(model, mb_ids, mb_t, cfg.temperature)
        finally:
            model.set_load_mask(None)
        per_tok, clipped = clipped_surrogate(logp, mb_old, adv[sl].to(device), cfg.eps_low, cfg.eps_high)
        if cfg.beta > 0:
            with torch.no_grad():
                ref_logp, _ = token_logprobs(ref_model, mb_ids, mb_t, cfg.temperature)
            kl = k3_kl(logp, ref_logp)
            per_tok = per_tok + cfg.beta * kl
            sums["kl"] += float((kl * mb_mask).sum())
        loss = aggregate(per_tok, mb_mask, cfg.loss_agg, cfg.max_new_tokens, n_seqs=n_seqs, n_tokens=n_tokens)
        (loss * dist.world).backward()  # average_grads divides by world
        sums["loss"] += float(loss.detach())
        sums["clip"] += float((clipped * mb_mask).sum())
        sums["entropy"] += float((ent.detach() * mb_mask).sum())
        if first:
            sums["logp_diff"] = max(sums["logp_diff"], float(((logp.detach() - mb_old).abs() * mb_mask).max()))
    dist.average_grads(model)
    grad_norm = clip_grads(model, cfg.grad_clip)
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
    tok = max(float(mask.sum()), 1.0)
    out = {"loss": sums["loss"], "clip_frac": sums["clip"] / tok, "entropy": sums["entropy"] / tok,
           "grad_norm": grad_norm, "kl": sums["kl"] / tok, "rows_trained": n_rows}
    if first:
        out["logp_diff_max"] = sums["logp_diff"]
    if loads.numel():
        per_layer = loads / loads.mean(dim=1, keepdim=True).clamp(min=1e-9)
        out["expert_load_max_over_mean"] = [round(float(x), 3) for x in per_layer.max(dim=1).values]
    return out


# ---- the run ----------------------------------------------------------------------------------------
def _mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def train_grpo(init: str | Path, out: str | Path, cfg: GRPOConfig, resume: bool = False, device: str = "auto",
               quiet: bool = False, on_step: Callable[[int], None] | None = None) -> dict:
    """Run GRPO from the model in run directory `init`, writing run directory `out`. Returns the last metrics.
    `on_step(step)` is called after every finished (and, when due, checkpointed) step."""
    cfg.validate()
    dist = setup_distributed(device)
    out = Path(out)
    init = Path(init)
    ckpt_dir = out / "checkpoints"
    if resume:
        if latest_checkpoint(ckpt_dir) is None:
            raise ConfigError(f"--resume: {out} has no checkpoint to resume from")
        saved = json.loads((out / "config.json").read_text())
        cfg = GRPOConfig(**{**saved["rl"], "steps": cfg.steps, "minutes": cfg.minutes})
        init = Path(saved["init"])
    elif latest_checkpoint(ckpt_dir) is not None:
        raise ConfigError(f"{out} already holds an RL run: pass --resume to continue it, or choose another --out")
    model, init_cfg, _ = load_run_model(init, device=dist.device)
    tok_path = init / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_path)
    ref_model = None
    if cfg.beta > 0:
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    sampler = ProblemSampler(cfg)
    metrics = MetricsLogger(out / "metrics.jsonl", enabled=dist.is_main)
    start = 0
    if resume:
        step_dir = latest_checkpoint(ckpt_dir)
        state = load_checkpoint(step_dir, model, optimizer)
        sampler.load(state["sampler"])
        start = int(state["step"])
        metrics.truncate_after(start)
    elif dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        run_cfg = {"model": model.cfg.to_dict(), "rl": cfg.to_dict(), "init": str(init), "stage": "grpo"}
        atomic_write_text(out / "config.json", json.dumps(run_cfg, indent=2) + "\n")
        shutil.copyfile(tok_path, out / "tokenizer.json")
    engine = Engine(model, tokenizer)
    partial = PartialRollouts(cfg.partial_rollout_tokens) if cfg.partial_rollout_tokens else None
    progress = ProgressLine(cfg.steps, start=start, enabled=dist.is_main and not quiet,
                            print_every=5, description="grpo")
    t_start = time.time()
    n_local = max(cfg.prompts_per_step // dist.world, 1)
    last = {}
    step = start
    try:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.time()
            gen = partial.step if partial is not None else rollout_groups  # partial: Kimi k1.5 sec. 2.6.2
            rollouts, st = gen(engine, sampler, cfg, n_local, step, seed=cfg.seed * 100003 + step,
                               rank=dist.rank, world=dist.world)
            t_gen = time.time() - t0
            rec = {"step": step, "reward": _mean(st["reward"]), "accuracy": _mean(st["correct"]),
                   "format_rate": _mean(st["format"]), "response_len_mean": _mean(st["len"]),
                   "response_len_max": max(st["len"]) if st["len"] else 0, "truncated": _mean(st["truncated"]),
                   "zero_spread_groups": _mean(st["zero_spread"]), "sampling_rounds": st["rounds"],
                   "groups_trained": len(rollouts) // cfg.group_size, "verify_s": round(st.get("verify_s", 0.0), 3),
                   "checks_per_s": round(st.get("checks", 0) / max(st.get("verify_s", 0.0), 1e-9), 1)}
            rec.update(reflection_stats(st["texts"]))  # check rate, check-changed rate (issue 14)
            if partial is not None:
                rec.update({"carried": st["carried"], "gen_tokens": st["gen_tokens"]})
            t1 = time.time()
            if rollouts:
                rewards = torch.tensor([r.reward for r in rollouts])
                adv = group_advantages(rewards, cfg.group_size, scale=cfg.advantage == "grpo")
                for it in range(cfg.mu):
                    rec.update(policy_update(model, ref_model, optimizer, rollouts, adv, cfg, dist, first=it == 0))
            t_train = time.time() - t1
            gen_tokens = sum(st["len"])
            rec.update({"gen_s": round(t_gen, 3), "train_s": round(t_train, 3),
                        "tokens_per_s": gen_tokens / max(time.time() - t0, 1e-9), "lr": cfg.lr,
                        "elapsed_s": round(time.time() - t_start, 1)})
            metrics.log(rec)
            last = rec
            progress.update(step, rec.get("loss", 0.0), cfg.lr, rec["tokens_per_s"],
                            extra=f"reward {rec['reward']:.3f} acc {rec['accuracy']:.2f} fmt {rec['format_rate']:.2f} "
                                  f"len {rec['response_len_mean']:.0f} ent {rec.get('entropy', 0):.2f}")
            timed_out = cfg.minutes is not None and dist.any_flag(time.time() - t_start > cfg.minutes * 60)
            if dist.is_main and (step % cfg.ckpt_every == 0 or step == cfg.steps or timed_out):
                save_checkpoint(ckpt_dir, step, model, optimizer, {"sampler": sampler.state()}, cfg.keep_last)
            if on_step is not None:
                on_step(step)
            if timed_out:
                break
    except KeyboardInterrupt:
        if dist.is_main and step > start:
            save_checkpoint(ckpt_dir, step - 1 if not last or last.get("step") != step else step, model, optimizer,
                            {"sampler": sampler.state()}, cfg.keep_last)
        raise
    finally:
        progress.close()
        dist.close()
    return last
