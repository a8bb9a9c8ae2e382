"""Partial rollouts (Kimi k1.5, arXiv 2501.12599 sec. 2.6.2): cap the tokens generated per RL iteration.

Each iteration generates at most `budget` new tokens per trajectory. A trajectory that neither ended (eos) nor
reached the total budget `max_new_tokens` is carried to the next iteration and continued by the policy of
that iteration, from its prompt plus the tokens it has so far. Every token keeps the log-prob of the policy
that sampled it, so the clipped surrogate's old policy is, token by token, the policy of that token's
segment. A group enters the batch (is scored, shaped and trained on) once all of its G trajectories have
finished; its members that finished earlier wait for it. With `budget >= max_new_tokens` nothing is ever
carried and an iteration is exactly grpo.rollout_groups (same engine call, same seeds, same shaping).

Simplifications: no DAPO dynamic sampling with partial rollouts; the carried trajectories are not
checkpointed (a resumed run drops them and draws fresh groups); no repeat detection (k1.5 also penalises
repeated segments); the continuation of all carried trajectories is one batched engine call with the budget
cut per trajectory after generation (a prefix of a sample is a sample).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from nanoseek.train.rl_math import length_rewards, overlong_penalty


@dataclass
class Trajectory:
    prompt: list[int]
    problem: object
    pool_index: int
    group: int  # id of its group (unique over the run)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # each from the policy that sampled that token
    segments: list[int] = field(default_factory=list)  # the step in which each token was sampled
    finish: str | None = None  # None while unfinished; "stop" or "length" once done


class PartialRollouts:
    """The state carried between iterations: unfinished trajectories and the finished members of their groups."""

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"partial rollout budget must be >= 1, got {budget}")
        self.budget = budget
        self.carried: list[Trajectory] = []
        self.next_group = 0

    def _extend(self, engine, trajs: list[Trajectory], step: int, cfg, seed: int) -> int:
        """Generate one segment for `trajs` (in place); returns the number of tokens generated."""
        if not trajs:
            return 0
        cap = min(self.budget, cfg.max_new_tokens)
        prompts = [t.prompt + t.tokens for t in trajs]
        outs = engine.generate(prompts, max_new_tokens=cap, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed)
        n = 0
        for t, o in zip(trajs, outs):
            room = cfg.max_new_tokens - len(t.tokens)
            toks, lps = o.tokens[:room], o.logprobs[:room]
            t.tokens += toks
            t.logprobs += lps
            t.segments += [step] * len(toks)
            n += len(toks)
            if o.finish_reason == "stop" and len(toks) == len(o.tokens):  # ended (eos) inside the total budget
                t.finish = "stop"
            elif len(t.tokens) >= cfg.max_new_tokens:
                t.finish = "length"
        return n

    def step(self, engine, sampler, cfg, n_prompts: int, step: int, seed: int, rank: int = 0, world: int = 1):
        """One iteration: continue the carried trajectories, start `n_prompts` new groups, return the Rollouts of
        the groups that finished (in group order) and the same stats as grpo.rollout_groups (plus carry counts)."""
        from nanoseek.train.grpo import Rollout

        tok = engine.tokenizer
        G = cfg.group_size
        stats = {"reward": [], "correct": [], "format": [], "len": [], "truncated": [], "zero_spread": [], "rounds": 1,
                 "texts": [], "verify_s": 0.0, "checks": 0}
        drawn = sampler.draw(n_prompts * world, step)[rank * n_prompts:(rank + 1) * n_prompts]
        fresh = []
        for idx, problem in drawn:
            gid = self.next_group
            self.next_group += 1
            fresh += [Trajectory(tok.prompt_ids(problem.prompt), problem, idx, gid) for _ in range(G)]
        # fresh groups first, with exactly rollout_groups' engine call (seed * 1000 + round 0)
        gen_tokens = self._extend(engine, fresh, step, cfg, seed * 1000)
        waiting = [t for t in self.carried if t.finish is None]
        gen_tokens += self._extend(engine, waiting, step, cfg, seed * 1000 + 500)
        pool = self.carried + fresh
        groups: dict[int, list[Trajectory]] = {}
        for t in pool:
            groups.setdefault(t.group, []).append(t)
        done_groups = [g for g in sorted(groups) if all(t.finish is not None for t in groups[g])]
        self.carried = [t for t in pool if t.group not in set(done_groups)]
        stats["carried"] = sum(t.finish is None for t in self.carried)
        stats["gen_tokens"] = gen_tokens
        if not done_groups:
            return [], stats
        trajs = [t for g in done_groups for t in groups[g]]
        texts = [engine._decode_text(t.tokens) for t in trajs]
        t_verify = time.perf_counter()
        scores = sampler.task.score_batch([t.problem for t in trajs], texts, [t.finish == "length" for t in trajs])
        stats["verify_s"] = time.perf_counter() - t_verify
        stats["checks"] = len(trajs)
        kept: list[Rollout] = []
        for k, g in enumerate(done_groups):
            group = trajs[k * G:(k + 1) * G]
            sc = scores[k * G:(k + 1) * G]
            rewards = [s.reward for s in sc]
            lengths = [len(t.tokens) for t in group]
            if cfg.overlong_cache > 0:
                rewards = [x + overlong_penalty(n, cfg.max_new_tokens, cfg.overlong_cache) for x, n in zip(rewards, lengths)]
            if cfg.length_weight > 0 and step >= cfg.length_warmup_steps:
                lr_ = length_rewards(lengths, [s.correct for s in sc])
                rewards = [x + cfg.length_weight * y for x, y in zip(rewards, lr_)]
            sampler.record(group[0].pool_index, sum(s.correct for s in sc) / G)
            stats["reward"] += rewards
            stats["correct"] += [float(s.correct) for s in sc]
            stats["format"] += [float(s.format_ok) for s in sc]
            stats["len"] += lengths
            stats["truncated"] += [float(t.finish == "length") for t in group]
            stats["zero_spread"].append(float(max(rewards) - min(rewards) < 1e-9))
            stats["texts"] += texts[k * G:(k + 1) * G]
            for t, s, rew in zip(group, sc, rewards):
                kept.append(Rollout(t.prompt, t.tokens, t.logprobs, t.finish == "length", rew, s.correct, s.format_ok, k))
        return kept, stats
