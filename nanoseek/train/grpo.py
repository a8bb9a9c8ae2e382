"""GRPO and its refinements: RL from verifiable rewards (R1-Zero; SPEC section 3).

One step: sample `prompts_per_step` problems, let the engine roll out `group_size` completions each
(temperature 1.0), score them with the task's program (accuracy + format; truncated outputs earn no
accuracy), shape rewards (DAPO overlong, Kimi length reward), compute group advantages, then take `mu`
AdamW steps on the clipped surrogate (+ beta * k3 KL to a frozen reference when beta > 0).

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
- No reference copy of the model is kept when beta == 0 (the default; DAPO and Dr. GRPO drop the KL).
- DAPO dynamic sampling keeps only groups whose ACCURACY is mixed (some right, some wrong), as DAPO
  specifies, whatever the shaped reward does; it draws up to `max_sampling_rounds` extra batches and, if
  the batch is still not full, trains on what it has rather than stalling.
- Prioritized sampling draws from a fixed pool of train-split problems with probability proportional to
  1 - success rate (Kimi k1.5 sec. 2.3.4), success rates starting at 0.5 and updated by moving average.
- Curriculum raises the difficulty linearly from `curriculum_start` to the task's default over the run.
  With prioritized sampling the pool holds `pool_size` problems per level and each step draws, by
  priority, among the current level's problems.
- MoE: expert loads of the training forward passes drive the auxiliary-loss-free bias update after every
  optimizer step (on by default, `bias_update`); the balance loss is not used in RL. Rows whose advantage
  is zero (beta == 0) skip the backward but still count in the loads (a no-grad forward; skipped when the
  bias is frozen, where the loads are only logged).
- torchrun: every sampling decision is global. Each rank holds the same sampler (same seed, same updates)
  and draws the same problems; a round's groups are split over ranks in contiguous shares, each row is
  sampled with its own seed (so a row's tokens do not depend on the rank or batch it lands in), and the
  groups' scores are all-gathered so that every rank records the same success rates and keeps the same
  groups. A rank may train zero groups; it still joins every collective. Two processes therefore compute
  the same global batch and update as one (tests/test_grpo_runs.py). With --ep the update shards the routed
  experts, every rank runs as many forward/backward passes as the busiest one, and rollouts run on a full
  copy of the weights refreshed before each step (nanoseek.parallel.training; tests/test_parallel_train.py).
- Ctrl-C: a step's rollouts move only the sampler, which is restored when interrupted there; from the
  policy update to the step's metrics and checkpoint an interrupt waits for the step to finish. On
  KeyboardInterrupt the state of the last finished step is saved, unless that step already has a
  checkpoint (an existing checkpoint is never overwritten); resuming continues exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.autograd.graph import increment_version

from nanoseek.cli_config import knob
from nanoseek import sandbox
from nanoseek.config import ConfigError
from nanoseek.engine import Engine
from nanoseek.engine.sampling import SamplingParams, support_logprobs
from nanoseek.io import atomic_write_text
from nanoseek.model import Transformer
from nanoseek.parallel.training import (RolloutCopy, check_ep_flags, checkpoint_pair, idle_pass, lockstep, setup_ep,
                                       sync_and_clip)
from nanoseek.tasks import get_task
from nanoseek.tasks.base import RewardWeights, Score, stable_hash
from nanoseek.tasks.reflection import reflection_stats
from nanoseek.hf_tokenizer import copy_tokenizer_files, load_tokenizer
from nanoseek.tokenizer import ChatTokenizer
from nanoseek.train.checkpoint import latest_checkpoint, load_checkpoint, load_run_model, save_checkpoint
from nanoseek.train import precision as prec
from nanoseek.train.common import Dist, check_compile, enable_compile, setup_distributed
from nanoseek.train.metrics import MetricsLogger, ProgressLine
from nanoseek.train.partial_rollouts import PartialRollouts, check_partial_rollouts
from nanoseek.train.rl_math import (AGGREGATIONS, aggregate, clipped_surrogate, group_advantages, k3_kl,
                                    length_rewards, overlong_penalty)
from nanoseek.train.shared_prefix import Packed, pack, packed_hidden, plan_micro_batches


@dataclass
class GRPOConfig:
    """Every RL knob, with its default and where it comes from."""

    task: str = knob("arithmetic", help="task whose problems and reward program are used (nanoseek.tasks)")
    difficulty: int | None = knob(None, help="task difficulty (none = the task's default)")
    steps: int = knob(200, resume="override", help="RL steps (rollouts + update) in the whole run")
    minutes: float | None = knob(None, resume="override", help="wall-clock limit; checkpoints and stops")
    group_size: int = knob(8, help="G samples per prompt (R1: 16)")
    prompts_per_step: int = knob(16, help="groups per step over all processes")
    max_new_tokens: int = knob(64, help="longest completion in tokens")
    temperature: float = knob(1.0, help="rollout temperature (R1: 1.0)")
    top_p: float | None = knob(None, help="rollout nucleus; the importance ratio uses the same renormalized "
                               "support (module docstring)")
    top_k: int | None = knob(None, help="rollout top-k (same support in the ratio)")
    # 2e-4 collapsed a weak tiny base in the prototype; 1e-4 was stable
    lr: float = knob(1e-4, help="learning rate")
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    micro_batch: int = 64  # sequences per training forward (memory bound only; the loss is the same)
    mu: int = knob(1, help="policy updates per rollout batch (GRPO's mu)")
    advantage: str = knob("grpo", choices=("grpo", "dr_grpo"),
                          help="grpo (divide by the group's std) or dr_grpo (mean only)")
    loss_agg: str = knob("grpo", choices=AGGREGATIONS, help="loss aggregation over tokens and samples")
    eps_low: float = knob(0.2, help="lower clip of the importance ratio")
    eps_high: float = knob(0.2, help="upper clip of the importance ratio (DAPO clip-higher uses 0.28)")
    beta: float = knob(0.0, help="KL weight (k3; R1: 0.001); 0 keeps no reference model")
    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    dynamic_sampling: bool = knob(False, help="DAPO: drop groups whose accuracy is all 0 or all 1, resample")
    max_sampling_rounds: int = 3
    overlong_cache: int = knob(0, help="DAPO soft overlong punishment interval L_cache (0 = off)")
    mask_truncated: bool = knob(False, help="DAPO: truncated samples contribute no loss")
    length_weight: float = knob(0.0, help="Kimi k1.5 length reward weight (0 = off)")
    length_warmup_steps: int = knob(0, help="length reward off during these first steps")
    prioritized: bool = knob(False, help="Kimi k1.5: sample problems by 1 - success rate")
    pool_size: int = knob(2000, help="prioritized pool: problems per difficulty level")
    curriculum: bool = knob(False, help="raise difficulty over the run (with --prioritized: by priority within "
                            "each level)")
    curriculum_start: int = 1
    bias_update: bool = knob(True, help="auxiliary-loss-free MoE bias update during RL (--no-bias-update "
                             "freezes the selection bias)")
    # Pretraining's 1e-3 moves the routing more than RL's ~40x smaller lr moves the weights (greedy accuracy
    # fell 6-8 points in two demo pilots); 1e-4 keeps loads balanced without that drift, 0 freezes the bias.
    bias_gamma: float = knob(1e-4, help="bias update speed per step")
    seed: int = knob(0, help="seed of problems, rollouts and init")
    ckpt_every: int = knob(50, help="steps between checkpoints")
    keep_last: int = 2
    partial_rollout_tokens: int = knob(0, metavar="N", help="Kimi k1.5 partial rollouts: at most N new tokens per "
                                       "trajectory per step; unfinished ones continue in the next step (0 = off)")
    # fp32 | bf16 | fp8 (nanoseek.train.precision): the training forwards run under its autocast, fp8 turns the
    # model's FP8 linears on (rollouts use them too) and keeps AdamW's moments in BF16; rollouts run unautocast
    precision: str = knob("fp32", choices=prec.PUBLIC, resume="override",
                          help="training forwards in fp32, bf16 or fp8 (docs/precision.md)")
    # torch.compile the update's training forwards (nanoseek.train.common.enable_compile); rollouts stay eager.
    # A speed knob: the same update to float rounding; a resume may switch it
    compile: bool = knob(False, resume="override", help="torch.compile the update's training forwards "
                         "(docs/grpo_bench.md); rollouts stay eager")
    # --unsafe-no-sandbox: score code/proof/math answers without bubblewrap where it cannot run (nanoseek.sandbox);
    # recorded here so a run says whether its rewards came from unconfined model code. A resume takes the new choice
    unsafe_no_sandbox: bool = knob(False, resume="override", help="score code/proof/math answers even where the "
                                   "sandbox (bubblewrap, prlimit) cannot run: model output then runs with NO file-system "
                                   "isolation (also NANOSEEK_UNSAFE_NO_SANDBOX=1)")

    def validate(self) -> "GRPOConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.group_size >= 2, f"group_size must be >= 2 (advantages compare samples), got {self.group_size}")
        need(self.prompts_per_step >= 1, "prompts_per_step must be >= 1")
        need(self.steps >= 1 and self.max_new_tokens >= 1 and self.mu >= 1, "steps, max_new_tokens and mu must be >= 1")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.temperature > 0, "rollout temperature must be > 0 (log-probs of a greedy policy are undefined)")
        need(self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        need(self.advantage in ("grpo", "dr_grpo"), f"advantage must be grpo or dr_grpo, got {self.advantage!r}")
        need(self.loss_agg in AGGREGATIONS, f"loss_agg must be one of {AGGREGATIONS}, got {self.loss_agg!r}")
        need(0 <= self.eps_low < 1 and self.eps_high >= 0, "need 0 <= eps_low < 1 and eps_high >= 0")
        need(self.beta >= 0, "beta must be >= 0")
        need(self.bias_gamma >= 0, f"bias_gamma must be >= 0, got {self.bias_gamma}")
        need(self.minutes is None or self.minutes > 0, "minutes must be positive")
        need(self.max_sampling_rounds >= 0, f"max_sampling_rounds must be >= 0, got {self.max_sampling_rounds}")
        need(not self.prioritized or self.pool_size >= 1, f"pool_size must be >= 1, got {self.pool_size}")
        need(self.ckpt_every >= 1 and self.keep_last >= 1, "ckpt_every and keep_last must be >= 1")
        need(self.partial_rollout_tokens >= 0 and not (self.partial_rollout_tokens and self.dynamic_sampling),
             "partial_rollout_tokens must be >= 0 and cannot be combined with dynamic sampling")
        prec.check(self.precision)
        return self

    def sampling(self) -> SamplingParams:
        """The rollout distribution; the trainer's log-probs are taken under the same one."""
        return SamplingParams(self.temperature, self.top_k, self.top_p).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- problem sampling -------------------------------------------------------------------------------
class ProblemSampler:
    """Draws train-split problems: uniformly fresh ones, or from a pool by priority 1 - success rate;
    optionally with a curriculum on difficulty (composing with the pool: one sub-pool per level). Its state
    round-trips through checkpoints. Deterministic in the seed and the recorded accuracies, so every rank
    of a torchrun job holds the same sampler when it records the same (all-gathered) accuracies."""

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg
        self.task = get_task(cfg.task, RewardWeights(cfg.accuracy_weight, cfg.format_weight))
        self.rng = random.Random(cfg.seed)
        self.target = self.task.check_difficulty(cfg.difficulty)
        if cfg.curriculum:
            self.task.check_difficulty(cfg.curriculum_start)
        self.pool = []
        self.success: list[float] = []
        self.level_slice: dict[int, range] = {}  # difficulty -> the pool indices of that level
        if cfg.prioritized:
            prng = random.Random(cfg.seed + 1)
            for d in self.levels():
                self.level_slice[d] = range(len(self.pool), len(self.pool) + cfg.pool_size)
                self.pool += [self.task.sample_split(prng, d, "train") for _ in range(cfg.pool_size)]
            self.success = [0.5] * len(self.pool)

    def levels(self) -> list[int]:
        """Every difficulty the run can draw at: the target, or the curriculum's range."""
        if not self.cfg.curriculum:
            return [self.target]
        lo = min(self.cfg.curriculum_start, self.target)
        return list(range(lo, self.target + 1))

    def difficulty(self, step: int) -> int:
        """The level of (1-based) step `step`: curriculum_start at step 1, the target at the last step."""
        if not self.cfg.curriculum:
            return self.target
        lo = min(self.cfg.curriculum_start, self.target)
        frac = min(max(step - 1, 0) / max(self.cfg.steps - 1, 1), 1.0)
        return int(round(lo + (self.target - lo) * frac))

    def draw(self, n: int, step: int) -> list[tuple[int, object]]:
        """n (pool index or -1, problem) pairs."""
        d = self.difficulty(step)
        if self.cfg.prioritized:
            candidates = self.level_slice[d]
            weights = [1.0 - self.success[i] + 1e-3 for i in candidates]
            idx = self.rng.choices(candidates, weights=weights, k=n)
            return [(i, self.pool[i]) for i in idx]
        return [(-1, self.task.sample_split(self.rng, d, "train")) for _ in range(n)]

    def record(self, idx: int, accuracy: float) -> None:
        if idx >= 0:
            self.success[idx] = 0.7 * self.success[idx] + 0.3 * accuracy

    def state(self) -> dict:
        """A snapshot (copies, not views: later draws and records do not change it)."""
        s = self.rng.getstate()
        return {"rng": [s[0], list(s[1]), s[2]], "success": list(self.success)}

    def load(self, state: dict) -> None:
        if len(state["success"]) != len(self.success):
            raise ConfigError(f"sampler state holds {len(state['success'])} success rates but this config's pool "
                              f"has {len(self.success)} problems (pool_size, curriculum or prioritized changed?)")
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


@dataclass
class GroupResult:
    """One group's scores: all that every rank needs to record, keep or drop, and log the group the same way."""

    rewards: list[float]  # shaped
    correct: list[bool]
    format_ok: list[bool]
    lengths: list[int]
    truncated: list[bool]
    texts: list[str]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def uniform_accuracy(self) -> bool:
        """All right or all wrong: what DAPO dynamic sampling drops."""
        return all(self.correct) or not any(self.correct)

    @property
    def zero_spread(self) -> bool:
        """All shaped rewards equal: every advantage of the group is zero."""
        return max(self.rewards) - min(self.rewards) < 1e-9


def shaped_rewards(scores: list[Score], lengths: list[int], cfg: GRPOConfig, step: int) -> list[float]:
    """Task reward + DAPO overlong penalty + Kimi length reward (each when enabled), for one group."""
    rewards = [s.reward for s in scores]
    if cfg.overlong_cache > 0:
        rewards = [x + overlong_penalty(n, cfg.max_new_tokens, cfg.overlong_cache) for x, n in zip(rewards, lengths)]
    if cfg.length_weight > 0 and step >= cfg.length_warmup_steps:
        lr_ = length_rewards(lengths, [s.correct for s in scores])
        rewards = [x + cfg.length_weight * y for x, y in zip(rewards, lr_)]
    return rewards


def row_seed(seed: int, round_: int, group: int, sample: int) -> int:
    """The sampling seed of one rollout row: a function of (step seed, sampling round, global group index,
    sample index) only, so the row's tokens are the same whichever rank and batch generate it."""
    return stable_hash(f"grpo-rollout|{seed}|{round_}|{group}|{sample}") >> 1


def shard(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of n items (the first n % world ranks get one more)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return range(lo, lo + base + (rank < extra))


def gather_lists(dist: Dist, items: list) -> list:
    """Concatenate every rank's list in rank order (identity with one process)."""
    if not dist.active:
        return list(items)
    parts: list = [None] * dist.world
    tdist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def rollout_groups(engine: Engine, sampler: ProblemSampler, cfg: GRPOConfig, n_prompts: int, step: int,
                   seed: int, dist: Dist | None = None) -> tuple[list[Rollout], dict]:
    """Generate, score and shape one batch of `n_prompts` groups over all ranks (with DAPO dynamic sampling
    when enabled). Returns this rank's kept rollouts (whole groups, consecutive) and the statistics of every
    drawn group of every rank (identical on all ranks); stats["groups_kept"] is the global count."""
    dist = dist or Dist()
    tok: ChatTokenizer = engine.tokenizer
    params = cfg.sampling()
    G = cfg.group_size
    kept: list[Rollout] = []
    n_kept = 0
    stats = {"reward": [], "correct": [], "format": [], "len": [], "truncated": [], "zero_spread": [],
             "uniform_accuracy": [], "texts": [], "rounds": 0, "groups_kept": 0}
    rounds = 1 + (cfg.max_sampling_rounds if cfg.dynamic_sampling else 0)
    for r in range(rounds):
        need = n_prompts - n_kept
        if need <= 0:
            break
        drawn = sampler.draw(need, step)  # the same problems on every rank
        stats["rounds"] += 1
        mine = shard(len(drawn), dist.rank, dist.world)
        prompts = [tok.prompt_ids(drawn[g][1].prompt) for g in mine for _ in range(G)]
        outs = []
        if prompts:
            seeds = [row_seed(seed, r, g, j) for g in mine for j in range(G)]
            outs = engine.generate(prompts, max_new_tokens=cfg.max_new_tokens, temperature=params.temperature,
                                   top_k=params.top_k, top_p=params.top_p, seed=seeds)
        local_results, local_rollouts = [], {}
        truncated_all = [o.finish_reason == "length" for o in outs]
        t_verify = time.perf_counter()  # one batched (parallel, sandboxed where needed) check of the round
        all_scores = sampler.task.score_batch([drawn[g][1] for g in mine for _ in range(G)],  # the reply whole:
                                              [tok.completion_text(p, o.text) for p, o in zip(prompts, outs)],
                                              truncated_all) if outs else []  # with a prompt's open <think>
        stats["verify_s"] = stats.get("verify_s", 0.0) + time.perf_counter() - t_verify
        stats["checks"] = stats.get("checks", 0) + sum(s.parsed is not None and not t
                                                       for s, t in zip(all_scores, truncated_all))  # sent to the checker
        for k, g in enumerate(mine):
            group = outs[k * G:(k + 1) * G]
            truncated = truncated_all[k * G:(k + 1) * G]
            scores = all_scores[k * G:(k + 1) * G]
            lengths = [len(o.tokens) for o in group]
            res = GroupResult(shaped_rewards(scores, lengths, cfg, step), [s.correct for s in scores],
                              [s.format_ok for s in scores], lengths, truncated, [o.text for o in group])
            local_results.append(res)
            local_rollouts[g] = [Rollout(prompts[k * G], o.tokens, o.logprobs, t, rew, s.correct, s.format_ok, -1)
                                 for o, t, s, rew in zip(group, truncated, scores, res.rewards)]
        results = gather_lists(dist, local_results)  # every group of the round, in draw order
        for g, ((idx, _), res) in enumerate(zip(drawn, results)):
            sampler.record(idx, res.accuracy)
            stats["reward"] += res.rewards
            stats["correct"] += [float(c) for c in res.correct]
            stats["format"] += [float(f) for f in res.format_ok]
            stats["len"] += res.lengths
            stats["texts"] += res.texts  # for the reflection metrics (nanoseek.tasks.reflection)
            stats["truncated"] += [float(t) for t in res.truncated]
            stats["zero_spread"].append(float(res.zero_spread))
            stats["uniform_accuracy"].append(float(res.uniform_accuracy))
            if (cfg.dynamic_sampling and res.uniform_accuracy) or n_kept >= n_prompts:
                continue
            if g in local_rollouts:
                kept += [dataclasses.replace(x, group=n_kept) for x in local_rollouts[g]]
            n_kept += 1
    stats["groups_kept"] = n_kept
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
            per_tok, clipped = clipped_surrogate(logp, mb_old, adv[idx], cfg.eps_low, cfg.eps_high)
            if cfg.beta > 0:
                with torch.no_grad(), prec.autocast(cfg.precision, device):
                    ref_logp, _ = packed_logprobs(ref_model, p, sampling, vocab)
                kl = k3_kl(logp, ref_logp)
                per_tok = per_tok + cfg.beta * kl
                sums["kl"] += float((kl.detach() * mb_mask).sum())
            loss = aggregate(per_tok, mb_mask, cfg.loss_agg, cfg.max_new_tokens, n_seqs=n_seqs, n_tokens=n_tokens)
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


# ---- Ctrl-C -----------------------------------------------------------------------------------------
class DeferredInterrupt:
    """Within the block a SIGINT is only recorded; it takes effect (the previous handler runs, by default
    raising KeyboardInterrupt) when the block ends. For state changes that must finish once begun. A no-op
    outside the main thread, where Python never delivers SIGINT anyway."""

    def __enter__(self) -> "DeferredInterrupt":
        self.hit = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.hit = True

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            if self.hit and exc_type is None and callable(self.previous):
                self.previous(signal.SIGINT, None)
        return False


# ---- the run ----------------------------------------------------------------------------------------
def _mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def train_grpo(init: str | Path, out: str | Path, cfg: GRPOConfig, resume: bool = False, device: str = "auto",
               quiet: bool = False, on_step: Callable[[int], None] | None = None, ep: int = 1,
               ep_redundant: int = 0, precision: str | None = None, compile: bool | None = None) -> dict:
    """Run GRPO from the model in run directory `init`, writing run directory `out`. Returns the last metrics.
    `on_step(step)` is called after every finished (and, when due, checkpointed) step. On resume the stored
    config holds (steps and minutes from `cfg`); `precision` / `compile`, when given, override its own. `ep` > 1: the
    update runs with expert parallelism over groups of `ep` ranks (`ep_redundant` extra experts placed by the init
    run's recorded loads) and rollouts run on a full copy of the weights (nanoseek.parallel.training)."""
    cfg.validate()
    dist = setup_distributed(device)
    use_ep = check_ep_flags(ep, ep_redundant, dist.world)
    out = Path(out)
    init = Path(init)
    ckpt_dir = out / "checkpoints"
    if resume:
        if latest_checkpoint(ckpt_dir) is None:
            raise ConfigError(f"--resume: {out} has no checkpoint to resume from")
        saved = json.loads((out / "config.json").read_text())
        stored = saved["rl"].get("precision", "fp32")
        cfg = GRPOConfig(**{**saved["rl"], "steps": cfg.steps, "minutes": cfg.minutes,
                            "precision": precision or stored,
                            "compile": saved["rl"].get("compile", False) if compile is None else compile,
                            "unsafe_no_sandbox": cfg.unsafe_no_sandbox}).validate()
        init = Path(saved["init"])
    elif latest_checkpoint(ckpt_dir) is not None:
        raise ConfigError(f"{out} already holds an RL run: pass --resume to continue it, or choose another --out")
    check_partial_rollouts(cfg.partial_rollout_tokens, dist.world)
    check_compile(cfg.compile, ep, 1, cfg.precision)  # before any work or write
    model, init_cfg, _ = load_run_model(init, device=dist.device)
    if cfg.bias_update and model.cfg.score_func == "softmax":  # DeepSeek-V2's softmax gate has no selection bias
        cfg = dataclasses.replace(cfg, bias_update=False)      # (an imported V2 stays exportable: nanoseek.hf)
    model = prec.apply(model, cfg.precision)
    tokenizer = load_tokenizer(init)  # nanoseek's own, or an imported checkpoint's (its chat template's prompts)
    sandbox.check_for_task(cfg.task, cfg.unsafe_no_sandbox)  # no sandbox and no opt-out: refuse before any write
    ref_model = None
    if cfg.beta > 0:
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    def build_optimizer(m) -> torch.optim.AdamW:
        return make_optimizer(m, cfg)

    optimizer = build_optimizer(model)
    sampler = ProblemSampler(cfg)
    metrics = MetricsLogger(out / "metrics.jsonl", enabled=dist.is_main)
    start = 0
    if resume:
        step_dir = latest_checkpoint(ckpt_dir)
        state = load_checkpoint(step_dir, model, optimizer)
        sampler.load(state["sampler"])
        carried = state.get("partial")
        if cfg.partial_rollout_tokens and carried is None:
            raise ConfigError(f"{step_dir} holds no partial-rollout state (a checkpoint from before it was saved):"
                              " it cannot be resumed exactly; start a new run in another --out")
        start = int(state["step"])
        metrics.truncate_after(start)
        if dist.is_main and (stored != cfg.precision or saved["rl"].get("unsafe_no_sandbox", False) != cfg.unsafe_no_sandbox):
            # resumed in another precision or sandbox choice: the run's is now this one
            saved["rl"]["precision"], saved["model"] = cfg.precision, model.cfg.to_dict()
            saved["rl"]["unsafe_no_sandbox"] = cfg.unsafe_no_sandbox
            atomic_write_text(out / "config.json", json.dumps(saved, indent=2) + "\n")
    elif dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        run_cfg = {"model": model.cfg.to_dict(), "rl": cfg.to_dict(), "init": str(init), "stage": "grpo"}
        atomic_write_text(out / "config.json", json.dumps(run_cfg, indent=2) + "\n")
        copy_tokenizer_files(init, out)
    parallel = rollout_copy = None
    if use_ep:  # the update shards the experts; rollouts run on a full copy refreshed before each step
        parallel, optimizer = setup_ep(model, optimizer, ep, ep_redundant, dist.device, build_optimizer,
                                       [out if resume else None, init], dist.is_main)
        rollout_copy = RolloutCopy(parallel, lambda: prec.configure_model(Transformer(model.cfg).to(dist.device),
                                                                          cfg.precision))
        progress_note = parallel.describe() + "; rollouts on a full copy of the weights"
    enable_compile(model, cfg.compile, ep, 1, cfg.precision)
    engine = Engine(model if rollout_copy is None else rollout_copy.model, tokenizer)
    partial = PartialRollouts(cfg.partial_rollout_tokens) if cfg.partial_rollout_tokens else None
    if partial is not None and resume:  # the unfinished trajectories continue where they stopped
        partial.load(carried)
    progress = ProgressLine(cfg.steps, start=start, enabled=dist.is_main and not quiet,
                            print_every=5, description="grpo")
    t_start = time.time()
    last = {}
    done = start  # the last step whose whole update (sampler, weights, optimizer, metrics) is in memory
    sampler_at_done: dict | None = None  # while rollouts run: the sampler as it was at `done`
    partial_at_done: dict | None = None  # ... and the carried partial rollouts

    if parallel is not None:
        progress.message(progress_note)

    def save(step: int) -> None:  # collective under --ep (the single-model layout is gathered on rank 0)
        to_save = checkpoint_pair(model, optimizer, parallel, lambda: (lambda m: (m, build_optimizer(m)))(
            Transformer(model.cfg).to(dist.device)))
        if dist.is_main:
            state = {"sampler": sampler.state(), **({"partial": partial.state()} if partial is not None else {})}
            save_checkpoint(ckpt_dir, step, *to_save, state, cfg.keep_last)

    try:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.time()
            if rollout_copy is not None:
                rollout_copy.refresh(model)
            sampler_at_done = sampler.state()
            partial_at_done = partial.state() if partial is not None else None
            gen = partial.step if partial is not None else rollout_groups  # partial: Kimi k1.5 sec. 2.6.2
            rollouts, st = gen(engine, sampler, cfg, cfg.prompts_per_step, step, seed=cfg.seed * 100003 + step,
                               dist=dist)
            t_gen = time.time() - t0
            with DeferredInterrupt():  # from the first weight change to the checkpoint, the step completes
                sampler_at_done = partial_at_done = None
                rec = {"step": step, "reward": _mean(st["reward"]), "accuracy": _mean(st["correct"]),
                       "format_rate": _mean(st["format"]), "response_len_mean": _mean(st["len"]),
                       "response_len_max": max(st["len"]) if st["len"] else 0, "truncated": _mean(st["truncated"]),
                       "zero_spread_groups": _mean(st["zero_spread"]),
                       "uniform_accuracy_groups": _mean(st["uniform_accuracy"]), "sampling_rounds": st["rounds"],
                       "groups_trained": st["groups_kept"], "verify_s": round(st.get("verify_s", 0.0), 3),
                       "checks_per_s": round(st.get("checks", 0) / max(st.get("verify_s", 0.0), 1e-9), 1)}
                rec.update(reflection_stats(st["texts"]))  # check rate, check-changed rate (issue 14)
                if partial is not None:
                    rec.update({"carried": st["carried"], "gen_tokens": st["gen_tokens"]})
                t1 = time.time()
                if st["groups_kept"]:  # global: every rank takes the same branch
                    rewards = torch.tensor([r.reward for r in rollouts])
                    adv = group_advantages(rewards, cfg.group_size, scale=cfg.advantage == "grpo")
                    for it in range(cfg.mu):
                        rec.update(policy_update(model, ref_model, optimizer, rollouts, adv, cfg, dist,
                                                 first=it == 0, parallel=parallel, vocab=tokenizer.sample_vocab))
                t_train = time.time() - t1
                gen_tokens = sum(st["len"])
                rec.update({"gen_s": round(t_gen, 3), "train_s": round(t_train, 3),
                            "tokens_per_s": gen_tokens / max(time.time() - t0, 1e-9), "lr": cfg.lr,
                            "elapsed_s": round(time.time() - t_start, 1)})
                metrics.log(rec)
                last = rec
                done = step
                timed_out = cfg.minutes is not None and dist.any_flag(time.time() - t_start > cfg.minutes * 60)
                if step % cfg.ckpt_every == 0 or step == cfg.steps or timed_out:
                    save(step)
            progress.update(step, rec.get("loss", 0.0), cfg.lr, rec["tokens_per_s"],
                            extra=f"reward {rec['reward']:.3f} acc {rec['accuracy']:.2f} fmt {rec['format_rate']:.2f} "
                                  f"len {rec['response_len_mean']:.0f} ent {rec.get('entropy', 0):.2f}")
            if on_step is not None:
                on_step(step)
            if timed_out:
                break
    except KeyboardInterrupt:
        if sampler_at_done is not None:  # interrupted during rollouts: that step never happened
            sampler.load(sampler_at_done)
        if partial_at_done is not None:
            partial.load(partial_at_done)
        # (not under --ep: the gather is a collective the other ranks may not reach; the periodic one stands)
        if dist.is_main and parallel is None and done > start and not (ckpt_dir / f"step_{done}").exists():
            save(done)
        raise
    finally:
        progress.close()
        dist.close()
    return last
