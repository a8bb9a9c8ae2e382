"""GRPO rollouts: which problems a step draws, the group samples and their scores (R1-Zero; SPEC section 3).

`rollout_groups` draws `prompts_per_step` problems, lets the engine sample `group_size` completions of each
(keeping the engine's log-probs: the old policy's, nanoseek.train.grpo_update), scores them with the task's
program in one batched check (accuracy + format; truncated outputs earn no accuracy) and shapes the rewards
(DAPO overlong penalty, Kimi k1.5 length reward: nanoseek.train.rl_math). The loop is nanoseek.train.grpo.

Departures from the papers, all deliberate:
- DAPO dynamic sampling keeps only groups whose ACCURACY is mixed (some right, some wrong), as DAPO
  specifies, whatever the shaped reward does; it draws up to `max_sampling_rounds` extra batches and, if
  the batch is still not full, trains on what it has rather than stalling.
- Prioritized sampling draws from a fixed pool of train-split problems with probability proportional to
  1 - success rate (Kimi k1.5 sec. 2.3.4), success rates starting at 0.5 and updated by moving average.
- Curriculum raises the difficulty linearly from `curriculum_start` to the task's default over the run.
  With prioritized sampling the pool holds `pool_size` problems per level and each step draws, by
  priority, among the current level's problems.
- torchrun: every sampling decision is global. Each rank holds the same sampler (same seed, same updates)
  and draws the same problems; a round's groups are split over ranks in contiguous shares, each row is
  sampled with its own seed (so a row's tokens do not depend on the rank or batch it lands in), and the
  groups' scores are all-gathered so that every rank records the same success rates and keeps the same
  groups.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as tdist

from nanoseek.config import ConfigError
from nanoseek.engine import Engine
from nanoseek.tasks import get_task
from nanoseek.tasks.base import RewardWeights, Score, stable_hash
from nanoseek.tokenizer import ChatTokenizer
from nanoseek.train.common import Dist
from nanoseek.train.rl_math import length_rewards, overlong_penalty

if TYPE_CHECKING:
    from nanoseek.train.grpo import GRPOConfig


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

