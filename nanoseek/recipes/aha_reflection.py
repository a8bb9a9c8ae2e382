"""`nanoseek aha --reflection`: issue 14's long reasoning on worked arithmetic with check lines (docs/long_reasoning.md,
section "Arithmetic reflection"). Moved from nanoseek/commands/aha.py; `nanoseek aha` is now issue 28's search recipe
(nanoseek.recipes.aha).
Why one ~830-line module: it is the published issue-14 experiment kept whole as the record of that finding
(stages, cold start, check-credit analysis and its report read top to bottom against docs/long_reasoning.md);
it is frozen (new work goes to recipes/aha.py), so splitting it would only move lines without a second reader.

Stages, each resumable (Ctrl-C or a timeout, then rerun the same command; `--until STAGE` stops after one):
  1. pretrain_base: the tiny MoE on worked arithmetic where `reflect_share` of the solutions carry one check
     line (`7+8=16. check: 7+8=15.`, nanoseek.tasks.reflection): the base knows the move but rarely makes it;
  2. eval_base; 3. rl: GRPO with the rule-based reward and a long token budget (R1-Zero, arXiv 2501.12948
     sec. 2.2.4): per step, response length, check rate, check-changed rate and accuracy are logged (metrics.jsonl)
     and plotted like R1's fig. 3; 4. eval_rl;
  5. long2short from the RL ("long") model, Kimi k1.5 (arXiv 2501.12599 sec. 2.4):
     l2s_length  - more GRPO with the k1.5 length reward (GRPOConfig.length_weight);
     l2s_shortest - shortest-correct rejection sampling (`nanoseek traces --keep shortest`) + SFT (`nanoseek sft`);
     l2s_dpo     - DPO, shortest correct vs the longest wrong or longer correct sample (`nanoseek dpo`);
     l2s_merge   - weight average of the long model and the short base it started from (`nanoseek merge`);
     each then evaluated;
  6. check_credit: does GRPO reward a check here? Rollouts of the base and of the RL model at the RL
     temperature: accuracy with / without a check, and the checked completions' mean group advantage;
  7. cold start (R1 arXiv 2501.12948 sec. 2.3.1), after every stage above so that seeds stay comparable:
     cold_traces - `cold_traces` readable, verified traces with a check line, written by the reflection corpus's
                   generator (every solution carries a check; the flawed ones fix their slip): the stand-in for
                   R1's curated long chains of thought. They do not come from the RL model, so the comparison
                   costs the cold-start arm nothing that the R1-Zero arm did not also pay;
     cold_sft    - `nanoseek sft` of the same base on them; cold_rl - the same GRPO, for the R1-Zero run's
                   training seconds minus the SFT's (equal total time); each then evaluated;
  8. report: runs/aha/report.md, plots/, summary.json (written once `samples` is done, with the cold start
     once its stages are); `--seeds-report RUN...` tabulates several seeds.

Evaluation (held-out split, fixed problems): pass@1 = mean accuracy of `eval_samples` samples at T=0.6 (and
T=1.0), greedy accuracy, and from the T=0.6 samples: mean response length, tokens per correct answer (mean
length of the correct completions), check rate, check-changed rate.

Simplifications: one seed per invocation; the cold-start traces are program-written (no readability
filter or human post-processing is needed: the corpus form is readable by construction); the
merge partner is the base (the short-CoT model of the same architecture we have), not a separately trained one.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from nanoseek.recipes.report import grpo_used_seconds as _grpo_used_seconds
from nanoseek.recipes.report import plot_rl_curves, sample_lines
from nanoseek.recipes.stages import Stages
from nanoseek.cli_config import knob
from nanoseek.config import ConfigError
from nanoseek.io import atomic_write_text

console = Console()
METHODS = ("l2s_length", "l2s_shortest", "l2s_dpo", "l2s_merge")
LABELS = {"l2s_length": "length-penalty RL", "l2s_shortest": "shortest rejection sampling + SFT",
          "l2s_dpo": "DPO (short vs long)", "l2s_merge": "merge (long + base)"}


@dataclass
class AhaConfig:
    out: str = knob("runs/aha", help="the pipeline's root directory (one run directory per stage inside)")
    seed: int = knob(0, help="seed of every stage")
    task: str = "arithmetic"
    difficulty: int = 1
    # the demo's base recipe (docs in nanoseek/commands/demo.py), plus a small reflection share
    base_steps: int = knob(1400, help="pretraining steps of the base model")
    base_lr: float = 4e-3
    batch_size: int = 32
    seq_len: int = 64
    n_docs: int = 50_000
    flawed_share: float = knob(0.6, help="share of pretraining solutions with one arithmetic slip")
    # "small": the base can check, but rarely does
    reflect_share: float = knob(0.1, help="share of pretraining solutions with one check line")
    rl_steps: int = knob(200, help="GRPO steps of the long-reasoning RL run")
    rl_lr: float = 1e-4
    rl_temperature: float = knob(0.7, help="GRPO rollout temperature (the demo's)")
    group_size: int = 8
    prompts_per_step: int = 16
    # room to grow: a plain level-1 solution is ~15-25 tokens, a check adds ~8
    max_new_tokens: int = knob(96, help="longest completion in tokens")
    # long2short
    length_steps: int = knob(60, help="GRPO steps with the k1.5 length reward (l2s_length)")
    # the k1.5 length reward at half the accuracy reward's weight
    length_weight: float = knob(0.5, help="k1.5 length reward weight (l2s_length)")
    l2s_problems: int = knob(400, help="train problems sampled for rejection sampling and for DPO pairs")
    l2s_samples: int = 4
    sft_epochs: float = 2.0
    sft_lr: float = 1e-4  # a fine-tune of the RL model: RL's lr, not pretraining's
    dpo_steps: int = knob(60, help="DPO steps (l2s_dpo)")
    dpo_beta: float = 0.1
    dpo_lr: float = 1e-4
    eval_n: int = knob(200, help="held-out problems per evaluation")
    eval_samples: int = knob(4, help="samples per problem for pass@1")
    # cold start: R1 uses "thousands" of cold-start traces; ours are drawn with the corpus's flawed share,
    # fine-tuned with sft_epochs / sft_lr above
    cold_traces: int = knob(1000, help="program-written cold-start traces")

    def validate(self) -> "AhaConfig":
        for name in ("base_steps", "rl_steps", "length_steps", "batch_size", "seq_len", "group_size",
                     "prompts_per_step", "max_new_tokens", "l2s_problems", "dpo_steps", "eval_n", "eval_samples",
                     "cold_traces"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.l2s_samples < 2:
            raise ConfigError("l2s_samples must be >= 2 (pairs and shortest need several samples)")
        for name in ("flawed_share", "reflect_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if min(self.base_lr, self.rl_lr, self.sft_lr, self.dpo_lr, self.dpo_beta, self.rl_temperature) <= 0:
            raise ConfigError("learning rates, dpo_beta and rl_temperature must be positive")
        return self

    @classmethod
    def smoke(cls, out: str, seed: int = 0) -> "AhaConfig":
        """A seconds-long version of every stage (tests)."""
        return cls(out=out, seed=seed, base_steps=6, batch_size=4, n_docs=300, reflect_share=0.3, rl_steps=2,
                   group_size=4, prompts_per_step=2, max_new_tokens=24, length_steps=2, l2s_problems=6,
                   l2s_samples=2, sft_epochs=1.0, dpo_steps=2, eval_n=4, eval_samples=1, cold_traces=20)


STAGES = ("pretrain_base", "eval_base", "rl", "eval_rl", *[s for m in METHODS for s in (m, f"eval_{m}")],
          "samples", "check_credit", "cold_traces", "cold_sft", "eval_cold_sft", "cold_rl", "eval_cold_rl")


# ---- stages -------------------------------------------------------------------------------------------
def _pretrain(run: Path, cfg: AhaConfig) -> dict:
    from nanoseek.config import ModelConfig
    from nanoseek.train.checkpoint import latest_checkpoint, read_state
    from nanoseek.train.common import TrainConfig
    from nanoseek.train.pretrain import DataConfig, PretrainConfig, pretrain

    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is None or int(read_state(ckpt)["step"]) < cfg.base_steps:
        steps = cfg.base_steps
        train = TrainConfig(lr=cfg.base_lr, steps=steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                            warmup_steps=min(20, max(1, steps // 10)), eval_interval=max(steps // 4, 1),
                            ckpt_interval=max(steps // 5, 1))
        data = DataConfig(task=cfg.task, n_docs=cfg.n_docs, n_test_docs=max(cfg.n_docs // 50, 20),
                          difficulty=cfg.difficulty, flawed_share=cfg.flawed_share, fact_share=0.0,
                          reflect_share=cfg.reflect_share)
        pretrain(run, PretrainConfig(model=ModelConfig.preset("tiny"), train=train, data=data),
                 resume=ckpt is not None, device="cpu")
    state = read_state(latest_checkpoint(run / "checkpoints"))
    return {"step": int(state["step"]), "elapsed_s": float(state.get("elapsed_s", 0.0))}


def _grpo(init: Path, run: Path, cfg: AhaConfig, steps: int, length_weight: float = 0.0) -> dict:
    from nanoseek.train.checkpoint import latest_checkpoint, read_state
    from nanoseek.train.grpo import GRPOConfig, train_grpo

    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is not None and int(read_state(ckpt)["step"]) >= steps:
        return {"step": steps}
    rl = GRPOConfig(task=cfg.task, difficulty=cfg.difficulty, steps=steps, group_size=cfg.group_size,
                    prompts_per_step=cfg.prompts_per_step, max_new_tokens=cfg.max_new_tokens, lr=cfg.rl_lr,
                    seed=cfg.seed, ckpt_every=max(steps // 5, 1), bias_update=False, bias_gamma=0.0,
                    temperature=cfg.rl_temperature, length_weight=length_weight)
    last = train_grpo(init, run, rl, resume=ckpt is not None, device="cpu")
    return {k: last.get(k) for k in ("step", "accuracy", "response_len_mean", "check_rate", "check_changed_rate")}


def _shortest_sft(rl: Path, run: Path, cfg: AhaConfig) -> dict:
    from nanoseek.train.checkpoint import latest_checkpoint
    from nanoseek.train.common import TrainConfig
    from nanoseek.train.sft import SFTConfig, train_sft
    from nanoseek.train.traces import TracesConfig, rejection_sample

    run.mkdir(parents=True, exist_ok=True)
    data = run.parent / "l2s_shortest_traces.jsonl"
    if not data.exists():
        rejection_sample(TracesConfig(run=str(rl), task=cfg.task, problems=cfg.l2s_problems, samples=cfg.l2s_samples,
                                      temperature=1.0, keep="shortest", difficulty=cfg.difficulty,
                                      max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, out=str(data)),
                         print_fn=console.print)
    if not data.read_text().strip():  # e.g. a smoke run's untrained model: no correct sample at all
        return {"skipped": "no correct sample to fine-tune on"}
    seq_len = 128
    train = TrainConfig(lr=cfg.sft_lr, steps=1, batch_size=32, seq_len=seq_len, seed=cfg.seed, warmup_steps=5,
                        eval_interval=0, ckpt_interval=50, bias_gamma=0.0)
    resume = latest_checkpoint(run / "checkpoints") is not None
    s = train_sft(run, SFTConfig(data=str(data), init=str(rl), epochs=cfg.sft_epochs, train=train), resume=resume,
                  device="cpu", quiet=False)
    return {"step": s["step"], "examples": s["examples"]}


def _dpo(rl: Path, run: Path, cfg: AhaConfig) -> dict:
    from nanoseek.train.checkpoint import latest_checkpoint
    from nanoseek.train.dpo import DPOConfig, preference_pairs, train_dpo, write_pairs

    data = run.parent / "l2s_dpo_pairs.jsonl"
    if not data.exists():
        pairs = preference_pairs(rl, cfg.task, cfg.l2s_problems, cfg.l2s_samples, 1.0, cfg.max_new_tokens,
                                 cfg.seed, cfg.difficulty)
        write_pairs(pairs, data)
    if not data.read_text().strip():  # no problem had both a short correct sample and a longer / wrong one
        return {"skipped": "no preference pair"}
    resume = latest_checkpoint(run / "checkpoints") is not None
    s = train_dpo(run, DPOConfig(init=str(rl), data=str(data), beta=cfg.dpo_beta, lr=cfg.dpo_lr, steps=cfg.dpo_steps,
                                 seq_len=160, seed=cfg.seed, ckpt_every=max(cfg.dpo_steps // 2, 1)), resume=resume,
                  steps=cfg.dpo_steps)
    return {k: s.get(k) for k in ("step", "loss", "margin", "reward_accuracy", "pairs")}


def _cold_traces(path: Path, cfg: AhaConfig) -> dict:
    """The cold-start SFT data: verified corpus solutions with a check line (nanoseek.tasks.reflection)."""
    from nanoseek.tasks.reflection import reflection_traces

    rows = reflection_traces(cfg.cold_traces, seed=10_000 + cfg.seed, difficulty=cfg.difficulty,
                             flawed_share=cfg.flawed_share)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    fixed = sum(r["fixed_slip"] for r in rows)
    console.print(f"{len(rows)} cold-start traces ({fixed} fix a slip, {len(rows) - fixed} re-check a correct step)")
    return {"traces": len(rows), "fixed_slip": fixed, "path": str(path)}


def _cold_sft(base: Path, run: Path, data: Path, cfg: AhaConfig) -> dict:
    from nanoseek.train.checkpoint import latest_checkpoint
    from nanoseek.train.common import TrainConfig
    from nanoseek.train.sft import SFTConfig, train_sft

    n = len(data.read_text().splitlines())
    train = TrainConfig(lr=cfg.sft_lr, steps=1, batch_size=min(32, n), seq_len=128, seed=cfg.seed, warmup_steps=5,
                        eval_interval=0, ckpt_interval=50, bias_gamma=0.0)
    resume = latest_checkpoint(run / "checkpoints") is not None
    s = train_sft(run, SFTConfig(data=str(data), init=str(base), epochs=cfg.sft_epochs, train=train), resume=resume,
                  device="cpu", quiet=False)
    return {"step": s["step"], "examples": s["examples"], "seconds": round(s["elapsed_s"], 1)}


def _cold_rl(init: Path, run: Path, cfg: AhaConfig, budget_s: float) -> dict:
    """The R1-Zero stage's GRPO from the cold-start model, for `budget_s` training seconds (summed over resumes)."""
    from nanoseek.train.checkpoint import latest_checkpoint, read_state
    from nanoseek.train.grpo import GRPOConfig, train_grpo

    used = _grpo_used_seconds(run)
    fresh = latest_checkpoint(run / "checkpoints") is None
    if used < budget_s or fresh:  # at least one step, even when the SFT alone took the whole budget
        rl = GRPOConfig(task=cfg.task, difficulty=cfg.difficulty, steps=1_000_000, group_size=cfg.group_size,
                        prompts_per_step=cfg.prompts_per_step, max_new_tokens=cfg.max_new_tokens, lr=cfg.rl_lr,
                        seed=cfg.seed, ckpt_every=max(cfg.rl_steps // 5, 1), bias_update=False, bias_gamma=0.0,
                        temperature=cfg.rl_temperature, minutes=max(budget_s - used, 1e-3) / 60)
        train_grpo(init, run, rl, resume=not fresh, device="cpu")
    return {"step": int(read_state(latest_checkpoint(run / "checkpoints"))["step"]),
            "seconds": round(_grpo_used_seconds(run), 1), "budget_s": round(budget_s, 1)}


def rollout_accuracy_curve(run: Path) -> list[tuple[int, float, float]]:
    """(step, training seconds summed over resumes, rollout accuracy) of a GRPO run's metrics."""
    from nanoseek.train.metrics import read_metrics

    out, total, prev = [], 0.0, 0.0
    for r in read_metrics(run / "metrics.jsonl"):
        if r["elapsed_s"] < prev:
            total += prev
        prev = r["elapsed_s"]
        out.append((int(r["step"]), total + prev, float(r["accuracy"])))
    return out


def first_reach(curve: list[tuple[int, float, float]], target: float, window: int) -> tuple[int, float] | None:
    """(step, seconds) of the first step whose trailing `window`-step mean rollout accuracy is >= `target`."""
    for i in range(window - 1, len(curve)):
        if sum(c[2] for c in curve[i - window + 1:i + 1]) / window >= target:
            return curve[i][0], curve[i][1]
    return None


def _window_mean(curve: list[tuple[int, float, float]], step: int, window: int) -> float | None:
    """Mean rollout accuracy of the `window` steps ending at `step` (None if the run did not get there)."""
    xs = [c[2] for c in curve if step - window < c[0] <= step]
    return sum(xs) / len(xs) if len(xs) == window else None


def cold_start_summary(root: Path, stages: Stages) -> dict:
    """R1-Zero vs cold start at equal total time: the R1-Zero run's final rollout accuracy (mean of its last
    10% of steps), the step and seconds (SFT included) at which each run's trailing mean first reaches it, and
    the final accuracies (rollout and held-out)."""
    zero, cold = rollout_accuracy_curve(root / "rl"), rollout_accuracy_curve(root / "cold_rl")
    window = max(len(zero) // 10, 1)
    target = sum(c[2] for c in zero[-window:]) / window
    sft = stages.done["cold_sft"]["result"]
    reach_zero, reach_cold = first_reach(zero, target, window), first_reach(cold, target, window)
    ev_zero, ev_cold, ev_sft = (stages.done[k]["result"] for k in ("eval_rl", "eval_cold_rl", "eval_cold_sft"))
    # both runs draw the same problems at every step (same seed): the per-step difference is a paired comparison
    n = min(len(zero), len(cold))
    diff = [cold[i][2] - zero[i][2] for i in range(n)]
    paired = {f"{a + 1}-{min(b, n)}": sum(diff[a:b]) / len(diff[a:b])
              for a, b in ((0, 25), (25, 50), (50, 100), (100, n)) if a < n and diff[a:b]}
    return {"traces": stages.done["cold_traces"]["result"]["traces"],
            "traces_fixing_a_slip": stages.done["cold_traces"]["result"]["fixed_slip"],
            "sft_steps": sft["step"], "sft_seconds": sft["seconds"],
            "rl_steps": stages.done["cold_rl"]["result"]["step"], "rl_seconds": stages.done["cold_rl"]["result"]["seconds"],
            "r1zero_rl_steps": zero[-1][0] if zero else 0, "r1zero_rl_seconds": round(zero[-1][1], 1) if zero else 0.0,
            "window_steps": window, "r1zero_final_rollout_acc": target,
            "cold_final_rollout_acc": sum(c[2] for c in cold[-window:]) / min(window, len(cold)) if cold else None,
            # load-independent: the cold-start run's rollout accuracy over the same window at R1-Zero's step count
            "cold_rollout_acc_at_r1zero_steps": _window_mean(cold, zero[-1][0], window) if zero else None,
            "r1zero_steps_to_final": reach_zero[0] if reach_zero else None,
            "paired_rollout_acc_diff": paired, "paired_steps": n,
            "cold_steps_to_r1zero_final": reach_cold[0] if reach_cold else None,
            "cold_seconds_to_r1zero_final": round(reach_cold[1] + sft["seconds"], 1) if reach_cold else None,
            "r1zero_seconds_to_final": round(reach_zero[1], 1) if reach_zero else None,
            "r1zero_pass1": ev_zero["pass1"], "cold_pass1": ev_cold["pass1"], "cold_sft_pass1": ev_sft["pass1"],
            "r1zero_check_rate": ev_zero["check_rate"], "cold_check_rate": ev_cold["check_rate"],
            "cold_sft_check_rate": ev_sft["check_rate"], "r1zero_len": ev_zero["mean_len"],
            "cold_len": ev_cold["mean_len"], "cold_sft_len": ev_sft["mean_len"]}


def _merge(base: Path, rl: Path, run: Path) -> dict:
    from nanoseek.train.merge import merge_runs

    merge_runs([rl, base], run)
    return {"runs": [str(rl), str(base)]}


def evaluate_long(run: Path, cfg: AhaConfig) -> dict | None:
    """pass@1 (T=0.6, T=1.0), greedy, and length / reflection statistics of the T=0.6 samples; None for a
    method that was skipped (it has no checkpoint)."""
    from nanoseek.engine import Engine
    from nanoseek.evaluate import test_problems
    from nanoseek.tasks import get_task
    from nanoseek.tasks.reflection import check_changed, has_check
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import load_run_model

    from nanoseek.train.checkpoint import latest_checkpoint

    if latest_checkpoint(run / "checkpoints") is None:
        console.print(f"{run.name}: skipped (no model)")
        return None
    task = get_task(cfg.task)
    problems = test_problems(cfg.task, cfg.eval_n, seed=1234, difficulty=cfg.difficulty)
    model, _, _ = load_run_model(run)
    tok = Tokenizer.load(run / "tokenizer.json")
    engine = Engine(model, tok)

    def sample(repeats: int, temperature: float, top_p):
        jobs = [p for p in problems for _ in range(repeats)]
        outs = []
        for i in range(0, len(jobs), 512):
            outs += engine.generate([tok.prompt_ids(p.prompt) for p in jobs[i:i + 512]], cfg.max_new_tokens,
                                    temperature=temperature, top_p=top_p, seed=1235 + i)
        scores = task.score_batch(jobs, [o.text for o in outs], [o.finish_reason == "length" for o in outs])
        return outs, [s.correct for s in scores]

    g_outs, g_ok = sample(1, 0.0, None)
    outs, ok = sample(cfg.eval_samples, 0.6, 0.95)
    _, ok1 = sample(cfg.eval_samples, 1.0, None)
    lens = [len(o.tokens) for o in outs]
    right = [n for n, c in zip(lens, ok) if c]
    checked = [has_check(o.text) for o in outs]
    n = len(outs)
    res = {"pass1": sum(ok) / n, "pass1_t1": sum(ok1) / len(ok1), "greedy": sum(g_ok) / len(g_ok),
           "mean_len": sum(lens) / n, "tokens_per_correct": sum(right) / len(right) if right else None,
           "check_rate": sum(checked) / n, "check_changed_rate": sum(check_changed(o.text) for o in outs) / n,
           "pass1_when_checked": (sum(c for c, k in zip(ok, checked) if k) / sum(checked)) if any(checked) else None,
           "pass1_when_not_checked": (sum(c for c, k in zip(ok, checked) if not k) / (n - sum(checked)))
           if n > sum(checked) else None}
    tpc = "-" if res["tokens_per_correct"] is None else f"{res['tokens_per_correct']:.1f}"
    console.print(f"{run.name}: pass@1 T=0.6 {res['pass1']:.1%}  T=1.0 {res['pass1_t1']:.1%}  greedy {res['greedy']:.1%}"
                  f"  len {res['mean_len']:.1f}  tokens/correct {tpc}  checks {res['check_rate']:.1%}"
                  f"  check changed {res['check_changed_rate']:.1%}")
    return res


def check_credit(run: Path, cfg: AhaConfig) -> dict:
    """Does GRPO reward a check here? 5 x eval_n train-split problems x G rollouts at the RL temperature and
    budget, scored with the RL reward (accuracy + format) and given GRPO's group advantages: the accuracy of
    completions with and without a check, how often a check changed a step and what that did, and the mean
    advantage of the checked completions in groups whose rewards differ (> 0: RL pushes checks up)."""
    import random

    import torch

    from nanoseek.engine import Engine
    from nanoseek.tasks import get_task
    from nanoseek.tasks.reflection import check_changed, has_check
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import load_run_model
    from nanoseek.train.rl_math import group_advantages

    task, G = get_task(cfg.task), cfg.group_size
    rng = random.Random(4321 + cfg.seed)
    probs = [task.sample_split(rng, cfg.difficulty, "train") for _ in range(5 * cfg.eval_n)]
    model, _, _ = load_run_model(run)
    tok = Tokenizer.load(run / "tokenizer.json")
    engine = Engine(model, tok)
    jobs = [p for p in probs for _ in range(G)]
    outs = []
    for i in range(0, len(jobs), 512):
        outs += engine.generate([tok.prompt_ids(p.prompt) for p in jobs[i:i + 512]], cfg.max_new_tokens,
                                temperature=cfg.rl_temperature, seed=777 + i)
    scores = task.score_batch(jobs, [o.text for o in outs], [o.finish_reason == "length" for o in outs])
    adv = group_advantages(torch.tensor([s.reward for s in scores]), G).tolist()
    chk = [has_check(o.text) for o in outs]
    chg = [check_changed(o.text) for o in outs]
    ok = [s.correct for s in scores]
    spread = [adv[(i // G) * G:(i // G + 1) * G] for i in range(len(outs))]
    live = [i for i in range(len(outs)) if any(a != 0 for a in spread[i])]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    res = {"samples": len(outs), "temperature": cfg.rl_temperature, "check_rate": mean(chk),
           "pass1_checked": mean(o for o, c in zip(ok, chk) if c),
           "pass1_not_checked": mean(o for o, c in zip(ok, chk) if not c),
           "check_changed_share_of_checks": mean(g for g, c in zip(chg, chk) if c),
           "pass1_check_changed": mean(o for o, g in zip(ok, chg) if g),
           "pass1_check_unchanged": mean(o for o, c, g in zip(ok, chk, chg) if c and not g),
           "checked_in_mixed_groups": sum(chk[i] for i in live),
           "mean_advantage_checked": mean(adv[i] for i in live if chk[i]),
           "mean_advantage_not_checked": mean(adv[i] for i in live if not chk[i]),
           "len_checked": mean(len(o.tokens) for o, c in zip(outs, chk) if c),
           "len_not_checked": mean(len(o.tokens) for o, c in zip(outs, chk) if not c)}
    console.print(f"{run.name}: T={cfg.rl_temperature:g} checks {res['check_rate']:.1%}; pass@1 checked "
                  f"{_pct(res['pass1_checked'])} vs not {_pct(res['pass1_not_checked'])}; mean GRPO advantage of "
                  f"checked completions {_num2(res['mean_advantage_checked'])} (not checked "
                  f"{_num2(res['mean_advantage_not_checked'])})")
    return res


def _num2(x) -> str:
    return "-" if x is None else f"{x:+.2f}"


def _samples(runs: dict[str, Path], cfg: AhaConfig, k: int = 6) -> dict:
    """Held-out problems with each model's T=0.6 completion (seeded)."""
    from nanoseek.recipes.report import sample_completions as demo_samples

    return demo_samples(runs, cfg, k, temperature=0.6, top_p=0.95)


# ---- report -------------------------------------------------------------------------------------------
def plot_reflection(rl_runs: dict[str, Path], path: Path) -> Path | None:
    """R1 fig. 3 in miniature: mean response length, check rate, check-changed rate and accuracy per RL step."""
    return plot_rl_curves(rl_runs, [("response_len_mean", "mean response length (tokens)"),
                                    ("check_rate", "completions with a check / check changed a step"),
                                    ("accuracy", "rollout accuracy")], path,
                          dashed={"check_rate": ("check_changed_rate", "check changed")})


def plot_cold_start(root: Path, sft_seconds: float, path: Path) -> Path | None:
    """Rollout accuracy against training seconds: R1-Zero (RL from the base) vs cold start (SFT, then RL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoseek.report import _ema, _save

    zero, cold = rollout_accuracy_curve(root / "rl"), rollout_accuracy_curve(root / "cold_rl")
    if not zero or not cold:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for name, curve, offset in (("R1-Zero: RL from the base", zero, 0.0),
                                (f"cold start: SFT ({sft_seconds:.0f} s), then RL", cold, sft_seconds)):
        xs, ys = [offset + c[1] for c in curve], [c[2] for c in curve]
        ax.plot(xs, ys, lw=0.6, alpha=0.3)
        ax.plot(xs, _ema(ys), lw=1.5, label=name, color=ax.lines[-1].get_color())
    ax.set_xlabel("training seconds (SFT included)")
    ax.set_ylabel("rollout accuracy")
    ax.set_title("R1-Zero vs cold start at equal total time", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return path


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def write_report(root: Path, cfg: AhaConfig, stages: Stages, summary: dict, samples: dict) -> Path:
    cs = summary["cold_start"]
    plot = plot_reflection({"R1-Zero-style RL": root / "rl", "length-penalty RL": root / "l2s_length",
                            **({"cold start + RL": root / "cold_rl"} if cs else {})}, root / "plots" / "aha_curves.png")
    cold_plot = plot_cold_start(root, cs["sft_seconds"], root / "plots" / "cold_start.png") if cs else None
    ev = {k: stages.done[f"eval_{k}"]["result"] for k in ("base", "rl", *METHODS, "cold_sft", "cold_rl")
          if f"eval_{k}" in stages.done}
    lines = [f"# nanoseek aha: reflection RL and long2short on `{cfg.task}` (seed {cfg.seed})", "",
             f"Total time {summary['seconds_total'] / 60:.1f} min. Held-out split, {cfg.eval_n} problems; pass@1 = "
             f"mean accuracy of {cfg.eval_samples} samples; lengths and check rates from the T=0.6 samples. "
             "All settings: aha_config.json.", "",
             f"Base: {cfg.base_steps} pretraining steps, reflection share {cfg.reflect_share:g}, flawed share "
             f"{cfg.flawed_share:g}. RL: {cfg.rl_steps} GRPO steps, G {cfg.group_size} x {cfg.prompts_per_step}, "
             f"T {cfg.rl_temperature:g}, budget {cfg.max_new_tokens} new tokens.", "",
             "| model | pass@1 T=0.6 | pass@1 T=1.0 | greedy | mean length | tokens / correct | check rate | "
             "check changed | pass@1 checked / not |", "|---|---|---|---|---|---|---|---|---|"]
    names = {"base": "base", "rl": "RL (long)", **LABELS, "cold_sft": "cold-start SFT", "cold_rl": "cold start + RL"}
    for k, r in ev.items():
        if r is None:
            lines.append(f"| {names[k]} | skipped: {stages.done[k]['result'].get('skipped', '?')} |" + " |" * 7)
            continue
        lines.append(f"| {names[k]} | {_pct(r['pass1'])} | {_pct(r['pass1_t1'])} | {_pct(r['greedy'])} | "
                     f"{_num(r['mean_len'])} | {_num(r['tokens_per_correct'])} | {_pct(r['check_rate'])} | "
                     f"{_pct(r['check_changed_rate'])} | {_pct(r['pass1_when_checked'])} / "
                     f"{_pct(r['pass1_when_not_checked'])} |")
    lines += ["", "## long2short against the long model", "",
              "| method | tokens / correct | vs long | pass@1 T=0.6 | vs long (points) |", "|---|---|---|---|---|"]
    long_tpc = summary["long_tokens_per_correct"]
    for m in METHODS:
        r = summary["long2short"][m]
        if r is None:
            lines.append(f"| {LABELS[m]} | skipped | - | - | - |")
            continue
        rel = "-" if r["tokens_per_correct"] is None or not long_tpc else f"{r['tokens_per_correct'] / long_tpc - 1:+.0%}"
        lines.append(f"| {LABELS[m]} | {_num(r['tokens_per_correct'])} | {rel} | {_pct(r['pass1'])} | "
                     f"{100 * (r['pass1'] - summary['rl_pass1']):+.1f} |")
    lines += ["", "## RL curves (R1-Zero fig. 3 in miniature)", ""]
    if plot:
        lines.append(f"![curves](plots/{plot.name})")

    def reach(step, seconds) -> str:
        return "never" if step is None else f"step {step} ({seconds:.0f} s)"

    lines += ["", "## Cold start (R1 stage 2) vs R1-Zero, equal total time", ""]
    if cs is None:
        lines += ["Not run yet (its stages come after every other one: rerun without `--until` to add it)."]
    else:
        lines += [
                  f"{cs['traces']} verified corpus traces with a check line ({cs['traces_fixing_a_slip']} fix a slip); SFT "
                  f"{cs['sft_steps']} steps ({cs['sft_seconds']:.0f} s), then GRPO {cs['rl_steps']} steps "
                  f"({cs['rl_seconds']:.0f} s) against R1-Zero's {cs['r1zero_rl_steps']} steps ({cs['r1zero_rl_seconds']:.0f} s). "
                  f"Target: R1-Zero's final rollout accuracy {cs['r1zero_final_rollout_acc']:.1%} (mean of its last "
                  f"{cs['window_steps']} steps); reached = the first step whose trailing {cs['window_steps']}-step mean is at "
                  "least that. At R1-Zero's step count the cold-start run's rollout accuracy was "
                  f"{_pct(cs.get('cold_rollout_acc_at_r1zero_steps'))} (steps do not depend on the machine's load; "
                  "seconds do).", "",
                  "| run | reaches R1-Zero's final accuracy | final rollout accuracy | held-out pass@1 T=0.6 | check rate | "
                  "mean length |", "|---|---|---|---|---|---|",
                  f"| R1-Zero (RL from the base) | {reach(cs['r1zero_steps_to_final'], cs['r1zero_seconds_to_final'])} | "
                  f"{_pct(cs['r1zero_final_rollout_acc'])} | {_pct(cs['r1zero_pass1'])} | {_pct(cs['r1zero_check_rate'])} | "
                  f"{_num(cs['r1zero_len'])} |",
                  f"| cold-start SFT only | - | - | {_pct(cs['cold_sft_pass1'])} | {_pct(cs['cold_sft_check_rate'])} | "
                  f"{_num(cs['cold_sft_len'])} |",
                  f"| cold start + RL | {reach(cs['cold_steps_to_r1zero_final'], cs['cold_seconds_to_r1zero_final'])} | "
                  f"{_pct(cs['cold_final_rollout_acc'])} | {_pct(cs['cold_pass1'])} | {_pct(cs['cold_check_rate'])} | "
                  f"{_num(cs['cold_len'])} |"]
    if cold_plot:
        lines += ["", f"![cold start](plots/{cold_plot.name})"]
    cc = summary.get("check_credit")
    if cc:
        lines += ["", "## Does RL reward a check here?", "",
                  f"{cc['base']['samples']} rollouts (train problems x G {cfg.group_size}, T {cfg.rl_temperature:g}, "
                  "the RL reward and GRPO's group advantages; advantages over groups whose rewards differ).", "",
                  "| model | check rate | pass@1 checked / not | checks that changed a step | pass@1 when the check "
                  "changed / did not | mean advantage checked / not | length checked / not |",
                  "|---|---|---|---|---|---|---|"]
        for k in ("base", "rl"):
            c = cc[k]
            lines.append(f"| {names[k]} | {_pct(c['check_rate'])} | {_pct(c['pass1_checked'])} / "
                         f"{_pct(c['pass1_not_checked'])} | {_pct(c['check_changed_share_of_checks'])} | "
                         f"{_pct(c['pass1_check_changed'])} / {_pct(c['pass1_check_unchanged'])} | "
                         f"{_num2(c['mean_advantage_checked'])} / {_num2(c['mean_advantage_not_checked'])} | "
                         f"{_num(c['len_checked'])} / {_num(c['len_not_checked'])} |")
    lines += ["", "## Sample completions (held-out problems, T=0.6)", ""]
    lines += sample_lines(samples, names)
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ---- several seeds -------------------------------------------------------------------------------------
def targets(s: dict) -> dict:
    """Issue 14's targets on one seed's summary: the R1-Zero dynamics, and long2short (best method)."""
    out = {"check_rate_doubles": s["rl_check_rate"] >= 2 * s["base_check_rate"] and s["rl_check_rate"] > 0,
           # "rises": by at least 5% (a 19.18 -> 19.21 token change is sampling noise, not R1's growth)
           "length_rises": s["rl_len"] >= 1.05 * s["base_len"], "pass1_plus_10": s["rl_pass1"] - s["base_pass1"] >= 0.10}
    long_tpc, ok = s["long_tokens_per_correct"], []
    for m, r in s["long2short"].items():
        if r and r["tokens_per_correct"] is not None and long_tpc:
            if r["tokens_per_correct"] <= 0.7 * long_tpc + 1e-9 and r["pass1"] >= s["rl_pass1"] - 0.02 - 1e-9:
                ok.append(m)
    out["long2short_methods_meeting_target"] = ok
    return out


def seeds_report(roots: list[Path], out: Path) -> Path:
    """docs-ready tables over several seeds' summary.json (one row per seed) and the seeds' RL curves."""
    sums = [load_summary(r) for r in roots]
    lines = ["# nanoseek aha over seeds", "", f"Runs: {', '.join(str(r) for r in roots)}.", "",
             "## R1-Zero dynamics (held-out, T=0.6)", "",
             "| seed | check rate base -> RL | check changed base -> RL | mean length base -> RL | pass@1 base -> RL | "
             "greedy base -> RL | targets (check x2 / length +5% / +10 pt) | minutes |", "|---|---|---|---|---|---|---|---|"]
    trend = ["", "## During RL: the rollouts of the first vs the last 10% of the steps (rollout temperature)", "",
        "| seed | check rate | check changed | mean length | accuracy | pass@1 of RL completions with / without a check |",
        "|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "no"}
    for s in sums:
        t = targets(s)
        lines.append(f"| {s['seed']} | {_pct(s['base_check_rate'])} -> {_pct(s['rl_check_rate'])} | "
                     f"{_pct(s['base_check_changed_rate'])} -> {_pct(s['rl_check_changed_rate'])} | "
                     f"{_num(s['base_len'])} -> {_num(s['rl_len'])} ({s['rl_len'] / s['base_len'] - 1:+.1%}) | "
                     f"{_pct(s['base_pass1'])} -> {_pct(s['rl_pass1'])} | "
                     f"{_pct(s['base_greedy'])} -> {_pct(s['rl_greedy'])} | {yes[t['check_rate_doubles']]} / "
                     f"{yes[t['length_rises']]} / {yes[t['pass1_plus_10']]} | "
                     f"{s.get('seconds_without_cold_start', s['seconds_total']) / 60:.1f} |")
        r = s["rl_rollouts"]
        if r:
            trend.append(f"| {s['seed']} | {_pct(r['check_rate_first'])} -> {_pct(r['check_rate_last'])} | "
                         f"{_pct(r['check_changed_rate_first'])} -> {_pct(r['check_changed_rate_last'])} | "
                         f"{_num(r['response_len_mean_first'])} -> {_num(r['response_len_mean_last'])} | "
                         f"{_pct(r['accuracy_first'])} -> {_pct(r['accuracy_last'])} | "
                         f"{_pct(s['rl_pass1_when_checked'])} / {_pct(s['rl_pass1_when_not_checked'])} |")
    lines += trend
    credit = [s for s in sums if s.get("check_credit")]
    if credit:
        lines += ["", "## Does RL reward a check? (train problems x G at the rollout temperature, base -> RL model)", "",
                  "| seed | check rate | pass@1 checked / not (base) | pass@1 when the check changed / did not (base) | "
                  "mean GRPO advantage checked / not (base) |", "|---|---|---|---|---|"]
        for s in credit:
            b, r = s["check_credit"]["base"], s["check_credit"]["rl"]
            lines.append(f"| {s['seed']} | {_pct(b['check_rate'])} -> {_pct(r['check_rate'])} | "
                         f"{_pct(b['pass1_checked'])} / {_pct(b['pass1_not_checked'])} | "
                         f"{_pct(b['pass1_check_changed'])} / {_pct(b['pass1_check_unchanged'])} | "
                         f"{_num2(b['mean_advantage_checked'])} / {_num2(b['mean_advantage_not_checked'])} |")
    lines += ["", "## long2short against the long (RL) model: tokens per correct answer, pass@1 T=0.6 (T=1.0, greedy)",
              "", "| seed | long model | " + " | ".join(LABELS[m] for m in METHODS) + " |",
              "|---|---|" + "---|" * len(METHODS)]
    for s in sums:
        long_tpc = s["long_tokens_per_correct"]
        cells = [f"{_num(long_tpc)} tok, {_pct(s['rl_pass1'])} ({_pct(s['rl_pass1_t1'])}, {_pct(s['rl_greedy'])})"]
        for m in METHODS:
            r = s["long2short"][m]
            if r is None:
                cells.append("not run")
                continue
            rel = "" if r["tokens_per_correct"] is None or not long_tpc else f" ({r['tokens_per_correct'] / long_tpc - 1:+.0%})"
            cells.append(f"{_num(r['tokens_per_correct'])} tok{rel}, {_pct(r['pass1'])} "
                         f"({100 * (r['pass1'] - s['rl_pass1']):+.1f} pt; {_pct(r['pass1_t1'])}, {_pct(r['greedy'])})")
        lines.append(f"| {s['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "Target (>= 30% fewer tokens per correct answer at <= 2 points lower pass@1): "
              + "; ".join(f"seed {s['seed']}: {', '.join(targets(s)['long2short_methods_meeting_target']) or 'none'}"
                          for s in sums)]
    cold = [s for s in sums if s.get("cold_start")]
    if cold:
        lines += ["", "## Cold start vs R1-Zero at equal total time", "",
                  "| seed | SFT steps (s) | RL steps (s) vs R1-Zero's | R1-Zero final rollout acc | cold start reaches it at "
                  "| cold rollout acc at R1-Zero's step count / at its end | held-out pass@1 R1-Zero / SFT only / cold+RL | "
                  "check rate R1-Zero / SFT only / cold+RL |", "|---|---|---|---|---|---|---|---|"]
        paired = ["", "Cold start minus R1-Zero rollout accuracy, step by step on the same problems (both runs draw the "
                  "same problems at each step), in points:", "", "| seed | mean difference |", "|---|---|"]
        for s in cold:
            c = s["cold_start"]
            at = "never" if c["cold_steps_to_r1zero_final"] is None else \
                f"step {c['cold_steps_to_r1zero_final']} ({c['cold_seconds_to_r1zero_final']:.0f} s)"
            at += f" vs R1-Zero's step {c['r1zero_steps_to_final']}"
            paired.append(f"| {s['seed']} | " + ", ".join(f"steps {k}: {100 * v:+.1f}" for k, v in
                                                         c.get("paired_rollout_acc_diff", {}).items()) + " |")
            lines.append(f"| {s['seed']} | {c['sft_steps']} ({c['sft_seconds']:.0f}) | {c['rl_steps']} ({c['rl_seconds']:.0f}) vs "
                         f"{c['r1zero_rl_steps']} ({c['r1zero_rl_seconds']:.0f}) | {_pct(c['r1zero_final_rollout_acc'])} | "
                         f"{at} | {_pct(c.get('cold_rollout_acc_at_r1zero_steps'))} / {_pct(c['cold_final_rollout_acc'])} | "
                         f"{_pct(c['r1zero_pass1'])} / "
                         f"{_pct(c['cold_sft_pass1'])} / {_pct(c['cold_pass1'])} | {_pct(c['r1zero_check_rate'])} / "
                         f"{_pct(c['cold_sft_check_rate'])} / {_pct(c['cold_check_rate'])} |")
        lines += paired
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_reflection({f"seed {s['seed']}": r / "rl" for s, r in zip(sums, roots)}, out / "aha_curves_seeds.png")
    if plot:
        lines += ["", f"![RL curves, every seed]({plot.name})"]
    path = out / "seeds.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def same_settings(saved: dict, cfg: AhaConfig) -> bool:
    """The stored run's settings equal `cfg`'s; a setting added since (absent from `saved`) must be at its
    default, so a run started before the cold-start stages existed resumes into them."""
    now, default = dataclasses.asdict(cfg), dataclasses.asdict(AhaConfig(out=cfg.out, seed=cfg.seed))
    return (set(saved) <= set(now) and all(saved[k] == now[k] for k in saved)
            and all(now[k] == default[k] for k in set(now) - set(saved)))


def run_aha(cfg: AhaConfig, until: str | None = None) -> dict | None:
    cfg.validate()
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / "aha_config.json"
    if cfg_path.exists() and not same_settings(json.loads(cfg_path.read_text()), cfg):
        raise ConfigError(f"{root} holds an aha run with other settings ({cfg_path}); use another --out")
    atomic_write_text(cfg_path, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    stages = Stages(root / "stages.json")
    base, rl = root / "base", root / "rl"
    runs = {"base": base, "rl": rl, **{m: root / m for m in METHODS}}
    work = {"pretrain_base": lambda: _pretrain(base, cfg),
            "eval_base": lambda: evaluate_long(base, cfg),
            "rl": lambda: _grpo(base, rl, cfg, cfg.rl_steps),
            "eval_rl": lambda: evaluate_long(rl, cfg),
            "l2s_length": lambda: _grpo(rl, runs["l2s_length"], cfg, cfg.length_steps, cfg.length_weight),
            "l2s_shortest": lambda: _shortest_sft(rl, runs["l2s_shortest"], cfg),
            "l2s_dpo": lambda: _dpo(rl, runs["l2s_dpo"], cfg),
            "l2s_merge": lambda: _merge(base, rl, runs["l2s_merge"]),
            "samples": lambda: _samples({k: runs[k] for k in ("base", "rl", "l2s_length")}, cfg),
            "check_credit": lambda: {k: check_credit(runs[k], cfg) for k in ("base", "rl")},
            "cold_traces": lambda: _cold_traces(root / "cold_traces.jsonl", cfg),
            "cold_sft": lambda: _cold_sft(base, root / "cold_sft", root / "cold_traces.jsonl", cfg),
            "eval_cold_sft": lambda: evaluate_long(root / "cold_sft", cfg),
            # equal total time: the R1-Zero stage's training seconds, less the SFT's
            "cold_rl": lambda: _cold_rl(root / "cold_sft", root / "cold_rl", cfg,
                                        _grpo_used_seconds(rl) - stages.done["cold_sft"]["result"]["seconds"]),
            "eval_cold_rl": lambda: evaluate_long(root / "cold_rl", cfg)}
    for m in METHODS:
        work[f"eval_{m}"] = (lambda m=m: evaluate_long(runs[m], cfg))
    for name in STAGES:
        stages.run(name, work[name])
        if name == until:
            console.print(f"stopped after stage {name} (--until); rerun to continue")
            break
    if "samples" not in stages.done:
        return None
    return finish(root, cfg, stages)


def rollout_trend(run: Path) -> dict | None:
    """Means over the first and the last 10% of a GRPO run's steps of the rollouts' check rate,
    check-changed rate, mean length and accuracy (the training-time view of R1 fig. 3, at the rollout
    temperature)."""
    from nanoseek.train.metrics import read_metrics

    rows = read_metrics(run / "metrics.jsonl")
    if not rows:
        return None
    w = max(len(rows) // 10, 1)
    keys = ("check_rate", "check_changed_rate", "response_len_mean", "accuracy")
    return {f"{k}_{part}": sum(r.get(k, 0.0) for r in chunk) / len(chunk)
            for part, chunk in (("first", rows[:w]), ("last", rows[-w:])) for k in keys} | {"window_steps": w}


def build_summary(root: Path, cfg: AhaConfig, stages: Stages) -> dict:
    """The summary from the finished stages (eval_base and eval_rl needed); a long2short method or the cold
    start whose stages have not run yet is None."""
    seconds = stages.seconds_by_stage()
    # a base pretrained outside this command (same settings, resumed here) counts with its own training time
    seconds["pretrain_base"] = max(seconds["pretrain_base"], stages.done["pretrain_base"]["result"]["elapsed_s"])
    total = sum(seconds.values())
    cold_s = sum(v for k, v in seconds.items() if k.startswith(("cold_", "eval_cold_")))
    ev = {k: stages.done.get(f"eval_{k}", {}).get("result") for k in ("base", "rl", *METHODS)}
    return {"task": cfg.task, "seed": cfg.seed,
            "base_check_rate": ev["base"]["check_rate"], "rl_check_rate": ev["rl"]["check_rate"],
            "base_check_changed_rate": ev["base"]["check_changed_rate"],
            "rl_check_changed_rate": ev["rl"]["check_changed_rate"],
            "base_len": ev["base"]["mean_len"], "rl_len": ev["rl"]["mean_len"],
            "base_pass1": ev["base"]["pass1"], "rl_pass1": ev["rl"]["pass1"],
            "base_pass1_t1": ev["base"]["pass1_t1"], "rl_pass1_t1": ev["rl"]["pass1_t1"],
            "base_greedy": ev["base"]["greedy"], "rl_greedy": ev["rl"]["greedy"],
            "base_pass1_when_checked": ev["base"]["pass1_when_checked"],
            "rl_pass1_when_checked": ev["rl"]["pass1_when_checked"],
            "rl_pass1_when_not_checked": ev["rl"]["pass1_when_not_checked"],
            "rl_rollouts": rollout_trend(root / "rl"),
            "long_tokens_per_correct": ev["rl"]["tokens_per_correct"],
            "long2short": {m: None if ev[m] is None else
                           {k: ev[m][k] for k in ("tokens_per_correct", "pass1", "pass1_t1", "greedy", "mean_len",
                                                  "check_rate")} for m in METHODS},
            "eval_n": cfg.eval_n, "eval_samples": cfg.eval_samples, "seconds_total": round(total, 1),
            "seconds_without_cold_start": round(total - cold_s, 1),
            "seconds_by_stage": {k: round(v, 1) for k, v in seconds.items()},
            "check_credit": stages.done.get("check_credit", {}).get("result"),
            "cold_start": cold_start_summary(root, stages) if "eval_cold_rl" in stages.done else None}


def finish(root: Path, cfg: AhaConfig, stages: Stages) -> dict:
    """summary.json and report.md from the finished stages: every stage up to `samples` is needed; the
    cold-start part (summary key `cold_start`, a report section) is there once its stages are done too."""
    summary = build_summary(root, cfg, stages)
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    report = write_report(root, cfg, stages, summary, stages.done["samples"]["result"])
    console.print(f"total {summary['seconds_total'] / 60:.1f} min; report: {report}; summary: {root / 'summary.json'}")
    return summary


def load_summary(root: Path) -> dict:
    """A run's summary from its stages (it may still lack long2short methods or the cold start)."""
    stages = Stages(root / "stages.json")
    if "eval_rl" not in stages.done:
        raise ConfigError(f"{root} has no finished eval_rl stage (stages.json): nothing to report yet")
    cfg = AhaConfig(**json.loads((root / "aha_config.json").read_text()))
    return build_summary(root, cfg, stages)
