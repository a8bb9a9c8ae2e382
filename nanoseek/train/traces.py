"""Rejection sampling of verified reasoning traces (DeepSeek-R1 arXiv 2501.12948 sec. 2.3.3; Kimi k1.5
arXiv 2501.12599 sec. 2.3.5 "shortest rejection sampling").

K completions per train-split problem from a run's model with the engine; a completion is kept only if it is
well formed (`<think>..</think><answer>..</answer>`, tasks/base.is_well_formed), not truncated and verified
correct by the task's checker. Exact duplicates (same prompt and completion) are dropped. `keep="shortest"`
keeps one row per problem, the correct completion with the fewest tokens (ties: the first sampled).

An imported checkpoint whose generation prompt opens a think block (DeepSeek-R1's template ends `<think>\n`):
the sample is scored with that opening in front (tokenizer.completion_text), and the row's completion is what
the model generated, so `sft` on the rows (prompt through the template + completion) trains exactly the
sampled continuation.

Every row records its provenance: teacher run and checkpoint step, sampling temperature / top-p, problem id,
the problem's answer, its reward and its token count. Problems come only from the train split and each one
is checked against the split function again before its row is written, so no test-split problem can leak
into SFT data. Simplification against R1: no readability filter and no model-judged (non-verifiable) data.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from nanoseek.config import ConfigError
from nanoseek.io import atomic_write_text

KEEP = ("correct", "shortest")
MAX_SAMPLES = 1_000_000  # problems * samples bound per call


@dataclass
class TracesConfig:
    run: str = ""
    task: str = "arithmetic"
    problems: int = 1000
    samples: int = 4
    temperature: float = 1.0
    top_p: float | None = None
    keep: str = "correct"
    split: str = "train"
    difficulty: int | None = None
    max_new_tokens: int = 64
    seed: int = 0
    out: str = "traces.jsonl"

    def validate(self) -> TracesConfig:
        if self.split != "train":
            raise ConfigError(f"traces are SFT data: only --split train is allowed, got {self.split!r}")
        if self.keep not in KEEP:
            raise ConfigError(f"--keep must be one of {', '.join(KEEP)}, got {self.keep!r}")
        if self.problems < 1 or self.samples < 1:
            raise ConfigError("--problems and --samples must be >= 1")
        if self.problems * self.samples > MAX_SAMPLES:
            raise ConfigError(f"--problems x --samples must be <= {MAX_SAMPLES:,}")
        if self.temperature <= 0:
            raise ConfigError("--temperature must be > 0 (rejection sampling needs distinct samples)")
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be >= 1")
        return self


@dataclass
class Sample:
    text: str  # what the model generated (the row's completion: it continues the prompt)
    tokens: int
    truncated: bool
    opened: str = ""  # the prompt's open think block, read with the text when scoring (tokenizer.completion_text)


def select(task, problem, samples: list[Sample], keep: str = "correct") -> list[tuple[int, Sample, float]]:
    """(sample index, sample, reward) of the samples to keep: well formed, not truncated, verified correct,
    exact duplicates dropped; with keep="shortest" only the one with the fewest tokens (first on ties)."""
    kept, seen = [], set()
    for i, s in enumerate(samples):
        score = task.score(problem, s.opened + s.text, truncated=s.truncated)
        if s.truncated or not score.correct or not score.format_ok or s.text in seen:
            continue
        seen.add(s.text)
        kept.append((i, s, score.reward))
    if keep == "shortest" and kept:
        kept = [min(kept, key=lambda k: (k[1].tokens, k[0]))]
    return kept


def rejection_sample(cfg: TracesConfig, print_fn=print) -> dict:
    """Sample, filter and write cfg.out (JSONL, atomically); returns the summary."""
    from nanoseek.engine import Engine
    from nanoseek.tasks import get_task
    from nanoseek.hf_tokenizer import load_tokenizer
    from nanoseek.train.checkpoint import load_run_model, read_state

    cfg.validate()
    task = get_task(cfg.task)
    difficulty = task.check_difficulty(cfg.difficulty)
    model, _, step_dir = load_run_model(cfg.run)
    tok = load_tokenizer(cfg.run)  # nanoseek's own, or an imported checkpoint's
    engine = Engine(model, tok)
    rng = random.Random(cfg.seed)
    problems = [task.sample_split(rng, difficulty, "train") for _ in range(cfg.problems)]
    teacher_step = int(read_state(step_dir)["step"])
    jobs = [(i, p) for i, p in enumerate(problems) for _ in range(cfg.samples)]
    gens = []
    chunk = 512
    prompts = [tok.prompt_ids(p.prompt) for p in problems]
    opened = [tok.completion_text(q, "") for q in prompts]  # R1-style templates open <think> in the prompt
    for c in range(0, len(jobs), chunk):
        part = jobs[c:c + chunk]
        gens += engine.generate([prompts[i] for i, _ in part], cfg.max_new_tokens,
                                temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + c)
    rows, solved, seen = [], 0, set()
    for i, problem in enumerate(problems):
        samples = [Sample(g.text, len(g.tokens), g.finish_reason == "length", opened[i])
                   for g in gens[i * cfg.samples:(i + 1) * cfg.samples]]
        kept = select(task, problem, samples, cfg.keep)
        solved += bool(kept)
        for k, s, reward in kept:
            if (problem.prompt, s.text) in seen:  # the same problem drawn twice
                continue
            if task.split(problem) != "train":  # never a test-split problem in SFT data
                raise RuntimeError(f"test-split problem reached the traces: {problem.prompt!r}")
            seen.add((problem.prompt, s.text))
            rows.append({"prompt": problem.prompt, "completion": s.text, "answer": problem.answer,
                         "problem_id": i, "sample": k, "reward": reward, "tokens": s.tokens,
                         "teacher_run": str(cfg.run), "teacher_step": teacher_step, "temperature": cfg.temperature,
                         "top_p": cfg.top_p, "task": cfg.task, "difficulty": difficulty, "split": "train"})
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    mean_tokens = sum(r["tokens"] for r in rows) / len(rows) if rows else 0.0
    summary = {"problems": cfg.problems, "samples": cfg.samples, "problems_solved": solved, "rows_kept": len(rows),
               "mean_tokens": round(mean_tokens, 2), "keep": cfg.keep, "out": str(out)}
    print_fn(f"{solved}/{cfg.problems} problems with at least one correct sample; {len(rows)} rows kept "
             f"({cfg.keep}); mean {mean_tokens:.1f} tokens; wrote {out}")
    return summary
