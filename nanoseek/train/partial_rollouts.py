"""Partial rollouts (Kimi k1.5, arXiv 2501.12599 sec. 2.6.2): cap the tokens generated per RL iteration.

Each iteration generates at most `budget` new tokens per trajectory. A trajectory that neither ended (eos) nor
reached the total budget `max_new_tokens` is carried to the next iteration and continued by the policy of
that iteration, from its prompt plus the tokens it has so far. Every token keeps the log-prob of the policy
that sampled it, so the clipped surrogate's old policy is, token by token, the policy of that token's
segment. A group enters the batch (is scored, shaped and trained on) once all of its G trajectories have
finished; its members that finished earlier wait for it. With `budget >= max_new_tokens` nothing is ever
carried and an iteration is exactly grpo_rollout.rollout_groups (same engine call, same seeds, same shaping).

The carried state (unfinished trajectories, the finished members of their groups, the next group id) is part
of every checkpoint (`state` / `load`, JSON in state.json: a Problem's meta is plain data by design), so a
resumed run continues them and equals the uninterrupted run.

Simplifications: one process only (torchrun is refused before any work: the carried state is per process);
no DAPO dynamic sampling with partial rollouts; no repeat detection (k1.5 also penalises
repeated segments); the continuation of all carried trajectories is one batched engine call with the budget
cut per trajectory after generation (a prefix of a sample is a sample).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from nanoseek.config import ConfigError
from nanoseek.tasks.base import Problem



def check_partial_rollouts(budget: int, world: int) -> None:
    """Refuse, with one line, what partial rollouts do not support: torchrun (world > 1)."""
    if budget and world > 1:
        raise ConfigError(f"--partial-rollout-tokens runs in one process (the carried trajectories are per "
                          f"process), got {world} processes: run it without torchrun")


@dataclass
class Trajectory:
    prompt: list[int]
    problem: Problem
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

    def state(self) -> dict:
        """A JSON-safe snapshot (copies: later steps do not change it) of everything carried between steps."""
        return {"next_group": self.next_group,
                "carried": [{"prompt": list(t.prompt), "problem": dataclasses.asdict(t.problem),
                             "pool_index": t.pool_index, "group": t.group, "tokens": list(t.tokens),
                             "logprobs": list(t.logprobs), "segments": list(t.segments), "finish": t.finish}
                            for t in self.carried]}

    def load(self, state: dict) -> None:
        """Restore a `state()` snapshot (from a checkpoint: the JSON round trip keeps ints and floats exact)."""
        self.next_group = int(state["next_group"])
        self.carried = [Trajectory(list(c["prompt"]), Problem(**c["problem"]), int(c["pool_index"]), int(c["group"]),
                                   list(c["tokens"]), list(c["logprobs"]), list(c["segments"]), c["finish"])
                        for c in state["carried"]]

    def _extend(self, engine, trajs: list[Trajectory], step: int, cfg, seeds: list[int]) -> int:
        """Generate one segment for `trajs` (in place, one seed per trajectory); returns the tokens generated."""
        if not trajs:
            return 0
        cap = min(self.budget, cfg.max_new_tokens)
        prompts = [t.prompt + t.tokens for t in trajs]
        params = cfg.sampling()
        outs = engine.generate(prompts, max_new_tokens=cap, temperature=params.temperature, top_k=params.top_k,
                               top_p=params.top_p, seed=seeds)
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

    def step(self, engine, sampler, cfg, n_prompts: int, step: int, seed: int, dist=None):
        """One iteration: continue the carried trajectories, start `n_prompts` new groups, return the Rollouts of
        the groups that finished (in group order) and the same stats as grpo_rollout.rollout_groups (plus carry counts)."""
        from nanoseek.train.grpo_rollout import GroupResult, Rollout, row_seed, shaped_rewards

        if dist is not None and dist.world > 1:
            raise ValueError("partial rollouts run in one process (their carried trajectories are per process)")
        tok = engine.tokenizer
        G = cfg.group_size
        stats = {"reward": [], "correct": [], "format": [], "len": [], "truncated": [], "zero_spread": [],
                 "uniform_accuracy": [], "texts": [], "rounds": 1, "verify_s": 0.0, "checks": 0}
        drawn = sampler.draw(n_prompts, step)
        fresh = []
        for idx, problem in drawn:
            gid = self.next_group
            self.next_group += 1
            fresh += [Trajectory(tok.prompt_ids(problem.prompt), problem, idx, gid) for _ in range(G)]
        # fresh groups first, with exactly rollout_groups' engine call (round 0, group g, sample j seeds)
        gen_tokens = self._extend(engine, fresh, step, cfg, [row_seed(seed, 0, g, j) for g in range(len(drawn))
                                                             for j in range(G)])
        waiting = [t for t in self.carried if t.finish is None]
        gen_tokens += self._extend(engine, waiting, step, cfg, [row_seed(seed, 500, t.group, k)
                                                               for k, t in enumerate(waiting)])
        pool = self.carried + fresh
        groups: dict[int, list[Trajectory]] = {}
        for t in pool:
            groups.setdefault(t.group, []).append(t)
        done_groups = [g for g in sorted(groups) if all(t.finish is not None for t in groups[g])]
        self.carried = [t for t in pool if t.group not in set(done_groups)]
        stats["carried"] = sum(t.finish is None for t in self.carried)
        stats["gen_tokens"] = gen_tokens
        stats["groups_kept"] = len(done_groups)
        if not done_groups:
            return [], stats
        trajs = [t for g in done_groups for t in groups[g]]
        texts = [tok.completion_text(t.prompt, engine._decode_text(t.tokens)) for t in trajs]  # with an open <think>
        truncated = [t.finish == "length" for t in trajs]
        t_verify = time.perf_counter()
        scores = sampler.task.score_batch([t.problem for t in trajs], texts, truncated)
        stats["verify_s"] = time.perf_counter() - t_verify
        stats["checks"] = sum(s.parsed is not None and not tr for s, tr in zip(scores, truncated))
        kept: list[Rollout] = []
        for k, g in enumerate(done_groups):
            group, sc = trajs[k * G:(k + 1) * G], scores[k * G:(k + 1) * G]
            lengths = [len(t.tokens) for t in group]
            res = GroupResult(shaped_rewards(sc, lengths, cfg, step), [s.correct for s in sc],
                              [s.format_ok for s in sc], lengths, truncated[k * G:(k + 1) * G], texts[k * G:(k + 1) * G])
            sampler.record(group[0].pool_index, res.accuracy)
            stats["reward"] += res.rewards
            stats["correct"] += [float(c) for c in res.correct]
            stats["format"] += [float(f) for f in res.format_ok]
            stats["len"] += lengths
            stats["truncated"] += [float(t) for t in res.truncated]
            stats["zero_spread"].append(float(res.zero_spread))
            stats["uniform_accuracy"].append(float(res.uniform_accuracy))
            stats["texts"] += res.texts
            for t, s, rew in zip(group, sc, res.rewards):
                kept.append(Rollout(t.prompt, t.tokens, t.logprobs, t.finish == "length", rew, s.correct, s.format_ok, k))
        return kept, stats
