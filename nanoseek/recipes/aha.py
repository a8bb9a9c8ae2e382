"""`nanoseek aha` (= `make aha`): the R1-Zero "aha" in miniature, take two (issue 28; docs/long_reasoning.md).

The task is built so that thinking longer pays (nanoseek.tasks.search: Countdown over `(a op1 b) op2 c` with
search traces, a token-local verification per attempt, a fixed enumeration order, the answer copying the
accepted attempt, and a give-up prior). Stages, each resumable (rerun the same command; `--until STAGE` stops
after one; nanoseek.recipes.stages.StageRunner):

  pretrain_base  the tiny MoE on search traces whose searches stop after a `no.` with probability `give_up`
                 (a `persist` share never gives up): it learns the search and the check at every position;
  pretrain_habit (take four; `habit_steps` > 0, the default) its last pretraining steps on lazy traces only
                 (give-up `habit_give_up`, none persists): the same skill, used by habit for one attempt. This
                 is condition (4) of the issue built where the model can hold it: take three measured that a
                 mixed corpus leaves a 2.4M model with one flat stop hazard (0.10-0.22 where the corpus had
                 0.48), i.e. a base that already searches to the end. RL, the control and long2short start here;
  diagnostic     the pre-RL diagnostic (nanoseek.tasks.search_diagnostic) on the base's own samples of train
                 problems, `group_size` per problem at the rollout temperature: verification precision,
                 accuracy by number of attempts, length of correct vs wrong samples, length-reward covariance
                 (overall and within groups, what GRPO sees). RL only makes sense when it says longer pays;
  eval_base      held-out pass@1 at T=0.6 (top-p 0.95), mean length, tokens per correct answer, attempts;
  eval_skill     the same for the base before its habit stage (what the skill alone gives);
  rl             GRPO (R1-Zero, arXiv 2501.12948 sec. 2.2) with a budget for the whole enumeration; metrics.jsonl
                 logs per step the mean length, attempts, accept rate and accuracy (plotted like R1's fig. 3);
  eval_rl;
  control        the same base (after its habit) pretrained further on the main corpus, whose traces show the
                 long searches, for the RL stage's training seconds (lr base_lr/4, cosine over the time budget):
                 does RL beat more pretraining on demonstrations at equal time?; eval_control;
  control_lazy   (with a habit stage) the same on the habit stage's corpus, the base's own last data: does RL
                 beat more of the same pretraining?; eval_control_lazy;
  l2s_*          Kimi k1.5 (arXiv 2501.12599 sec. 2.4) long2short from the RL model: length-penalty RL,
                 shortest rejection sampling + SFT, DPO (short vs long), merge with the base; each evaluated;
  partial        Kimi k1.5 sec. 2.6.2 partial rollouts against ordinary GRPO from the RL model: seconds per step
                 and rollout accuracy over `partial_steps` steps each;
  samples        the same held-out problems answered by the base (early) and the RL model (late);
then report.md, plots/aha_curves.png and summary.json.

Simplifications: one seed per invocation (`--seed`; `--seeds-report RUN...` tabulates several); the
control runs after RL in the same process (not beside it), its seconds read from the RL run's metrics; the
merge partner is the base (the short model of the same architecture there is); the old arithmetic-reflection
pipeline of issue 14 is `nanoseek aha --reflection` (nanoseek.recipes.aha_reflection).
"""
from __future__ import annotations

import json
import random
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from nanoseek.cli_config import knob
from nanoseek.config import ConfigError
from nanoseek.io import atomic_write_text
from nanoseek.recipes.stages import StageRunner, StopAfter, console

TASKS = ("countdown_mod", "countdown_search")  # the search tasks (nanoseek.tasks.search)
METHODS = ("l2s_length", "l2s_shortest", "l2s_dpo", "l2s_merge")
LABELS = {"l2s_length": "length-penalty RL", "l2s_shortest": "shortest rejection sampling + SFT",
          "l2s_dpo": "DPO (short vs long)", "l2s_merge": "merge (long + base)"}
STAGES = ("pretrain_base", "pretrain_habit", "diagnostic", "eval_base", "eval_skill", "rl", "eval_rl", "control", "eval_control",
          "control_lazy", "eval_control_lazy",
          *[s for m in METHODS for s in (m, f"eval_{m}")], "partial", "samples")


@dataclass
class AhaConfig:
    out: str = knob("runs/aha", help="the recipe's root directory (one run directory per stage inside)")
    seed: int = knob(0, help="seed of every stage")
    task: str = knob("countdown_mod", choices=TASKS,
                     help="countdown_mod: every step mod 10 (one-digit verdicts); countdown_search: plain integers")
    difficulty: int = knob(1, help="task level (largest number 9, 15, 25, 50, 100)")
    # per `no.`: the corpus's lazy searches continue with probability 1 - give_up; `persist` of the traces never
    # give up (the base must see every position of a long search to learn its arithmetic; nanoseek.corpus)
    give_up: float = knob(0.8, help="give-up prior of the corpus's lazy traces: P(stop after a `no.`)")
    persist: float = knob(0.4, help="share of the corpus's traces that never give up")
    packing: str = knob("aligned", choices=("aligned", "aligned-fresh"),
                        help="row packing of the base's corpus (aligned-fresh: crops without a length bias)")
    base_steps: int = knob(1440, help="pretraining steps of the base")
    # the habit (take four): the base's last pretraining steps on lazy traces only, so that it has the search
    # (learned above) but by habit gives up after its first `no.`; 0 = no habit stage (take three)
    habit_steps: int = knob(150, help="pretraining steps on lazy traces only after the base (0 = none)")
    habit_give_up: float = knob(0.9, help="give-up prior of the habit corpus (no trace persists)")
    habit_lr: float = knob(1e-3, help="peak lr of the habit stage")
    base_lr: float = knob(4e-3, help="pretraining peak lr")
    batch_size: int = knob(16, help="pretraining rows per step")
    seq_len: int = knob(256, help="pretraining row length (document-aligned rows)")
    n_docs: int = knob(30_000, help="pretraining documents")
    diag_problems: int = knob(96, help="train problems of the pre-RL diagnostic (group_size samples each)")
    rl_steps: int = knob(40, help="GRPO steps")
    rl_lr: float = knob(2e-4, help="GRPO lr")
    rl_temperature: float = knob(0.6, help="rollout (and diagnostic) temperature")
    group_size: int = knob(8, help="GRPO samples per prompt")
    prompts_per_step: int = knob(8, help="GRPO prompts per step")
    # 9 attempts of ~20 tokens plus the answer
    max_new_tokens: int = knob(220, help="token budget of a completion (RL, evaluation)")
    control_lr_scale: float = knob(0.25, help="the control's pretraining lr as a share of base_lr")
    length_steps: int = knob(12, help="GRPO steps with the k1.5 length reward (l2s_length)")
    length_weight: float = knob(0.5, help="k1.5 length reward weight (l2s_length)")
    l2s_problems: int = knob(64, help="train problems sampled for shortest rejection sampling and DPO pairs")
    l2s_samples: int = knob(4, help="samples per problem for l2s_shortest / l2s_dpo")
    sft_epochs: float = knob(2.0, help="SFT epochs (l2s_shortest)")
    sft_lr: float = knob(1e-4, help="SFT lr (l2s_shortest)")
    dpo_steps: int = knob(20, help="DPO steps (l2s_dpo)")
    dpo_beta: float = knob(0.1, help="DPO beta")
    dpo_lr: float = knob(1e-4, help="DPO lr")
    eval_n: int = knob(100, help="held-out problems per evaluation")
    eval_samples: int = knob(4, help="samples per problem (pass@1 at T=0.6)")
    partial_steps: int = knob(4, help="GRPO steps per arm of the partial-rollouts comparison (0 = skip)")
    partial_tokens: int = knob(48, help="partial rollouts: new tokens per trajectory per step")

    def validate(self) -> AhaConfig:
        for name in ("base_steps", "batch_size", "seq_len", "n_docs", "diag_problems", "rl_steps", "group_size",
                     "prompts_per_step", "max_new_tokens", "length_steps", "l2s_problems", "dpo_steps", "eval_n",
                     "eval_samples", "partial_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2 or self.l2s_samples < 2:
            raise ConfigError("group_size and l2s_samples must be >= 2 (groups and pairs need several samples)")
        if self.habit_steps < 0:
            raise ConfigError(f"habit_steps must be >= 0, got {self.habit_steps}")
        if not 0 <= self.habit_give_up < 1:
            raise ConfigError(f"habit_give_up must be in [0, 1), got {self.habit_give_up}")
        if self.partial_steps < 0:
            raise ConfigError(f"partial_steps must be >= 0, got {self.partial_steps}")
        if not 0 <= self.give_up < 1:
            raise ConfigError(f"give_up must be in [0, 1), got {self.give_up}")
        if not 0 <= self.persist <= 1:
            raise ConfigError(f"persist must be in [0, 1], got {self.persist}")
        if min(self.base_lr, self.habit_lr, self.rl_lr, self.sft_lr, self.dpo_lr, self.dpo_beta, self.rl_temperature,
               self.control_lr_scale, self.sft_epochs) <= 0:
            raise ConfigError("learning rates, control_lr_scale, sft_epochs, dpo_beta and rl_temperature must be "
                              "positive")
        from nanoseek.tasks import get_task
        get_task(self.task).check_difficulty(self.difficulty)
        return self

    @classmethod
    def smoke(cls, out: str, seed: int = 0) -> AhaConfig:
        """A seconds-long version of every stage (tests)."""
        return cls(out=out, seed=seed, base_steps=4, batch_size=4, seq_len=128, n_docs=200, diag_problems=3,
                   rl_steps=2, group_size=2, prompts_per_step=2, max_new_tokens=24, length_steps=1, l2s_problems=3,
                   l2s_samples=2, sft_epochs=1.0, dpo_steps=1, eval_n=3, eval_samples=2, partial_steps=1,
                   partial_tokens=8, habit_steps=2)


# ---- training stages ----------------------------------------------------------------------------------------
def _pretrain(run: Path, cfg: AhaConfig, init_from: Path | None = None, seconds: float | None = None,
              habit: bool = False, lazy: bool = False) -> dict:
    """The base; with `habit` (and `init_from` the base) its habit stage: `habit_steps` more steps at peak lr
    habit_lr on a corpus of lazy traces only (persist 0, give-up habit_give_up, n_docs / 5 documents, packed
    `aligned-fresh`: the `aligned` packer crops the shortest pending document, here the one-attempt give-ups,
    i.e. the very habit); with
    `init_from` and `seconds` the equal-time control: more pretraining on the base's corpus for `seconds`, lr
    control_lr_scale * base_lr, cosine over that time budget (`lazy`: on the habit stage's corpus instead)."""
    from nanoseek.config import ModelConfig
    from nanoseek.train.checkpoint import latest_checkpoint, read_state
    from nanoseek.train.common import TrainConfig
    from nanoseek.train.pretrain import DataConfig, PretrainConfig, pretrain

    ckpt = latest_checkpoint(run / "checkpoints")
    control = init_from is not None and not habit
    steps = 1_000_000 if control else cfg.habit_steps if habit else cfg.base_steps
    if ckpt is None or (not control and int(read_state(ckpt)["step"]) < steps):
        lr = cfg.habit_lr if habit else cfg.base_lr * (cfg.control_lr_scale if control else 1.0)
        train = TrainConfig(lr=lr, steps=steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                            warmup_steps=1 if control else min(20, max(1, steps // 10)),
                            eval_interval=0 if control or habit else max(steps // 4, 1),
                            ckpt_interval=max(steps // 5, 1) if habit else max(cfg.base_steps // 5, 1),
                            minutes=(seconds or 0.0) / 60)
        if habit or lazy:
            data = DataConfig(task=cfg.task, n_docs=max(cfg.n_docs // 5, 20), n_test_docs=20, difficulty=cfg.difficulty,
                              flawed_share=cfg.habit_give_up, fact_share=0.0, packing="aligned-fresh", persist_share=0.0)
        else:
            data = DataConfig(task=cfg.task, n_docs=cfg.n_docs, n_test_docs=max(cfg.n_docs // 100, 20),
                              difficulty=cfg.difficulty, flawed_share=cfg.give_up, fact_share=0.0, packing=cfg.packing,
                              persist_share=cfg.persist)
        pcfg = PretrainConfig(model=ModelConfig.preset("tiny"), train=train, data=data, time_schedule=control)
        start = None
        if init_from is not None:
            start = latest_checkpoint(init_from / "checkpoints")
            run.mkdir(parents=True, exist_ok=True)
            (run / "tokenizer.json").write_bytes((init_from / "tokenizer.json").read_bytes())
        pretrain(run, pcfg, resume=ckpt is not None, device="cpu", init_from=start)
    state = read_state(latest_checkpoint(run / "checkpoints"))
    return {"step": int(state["step"]), "elapsed_s": float(state.get("elapsed_s", 0.0))}


def _grpo_cfg(cfg: AhaConfig, steps: int, **over):
    from nanoseek.train.grpo import GRPOConfig

    return GRPOConfig(task=cfg.task, difficulty=cfg.difficulty, steps=steps, group_size=cfg.group_size,
                      prompts_per_step=cfg.prompts_per_step, max_new_tokens=cfg.max_new_tokens, lr=cfg.rl_lr,
                      seed=cfg.seed, ckpt_every=max(steps // 4, 1), bias_update=False, bias_gamma=0.0,
                      temperature=cfg.rl_temperature, **over)


def _grpo(init: Path, run: Path, cfg: AhaConfig, steps: int, **over) -> dict:
    from nanoseek.train.checkpoint import latest_checkpoint, read_state
    from nanoseek.train.grpo import train_grpo

    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is None or int(read_state(ckpt)["step"]) < steps:
        train_grpo(init, run, _grpo_cfg(cfg, steps, **over), resume=ckpt is not None, device="cpu")
    return {"step": steps, "seconds": round(grpo_seconds(run), 1)}


def grpo_seconds(run: Path) -> float:
    from nanoseek.recipes.report import grpo_used_seconds as _grpo_used_seconds

    return _grpo_used_seconds(run)


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
    if not data.read_text().strip():
        return {"skipped": "no correct sample to fine-tune on"}
    train = TrainConfig(lr=cfg.sft_lr, steps=1, batch_size=16, seq_len=256, seed=cfg.seed, warmup_steps=5,
                        eval_interval=0, ckpt_interval=50, bias_gamma=0.0)
    s = train_sft(run, SFTConfig(data=str(data), init=str(rl), epochs=cfg.sft_epochs, train=train),
                  resume=latest_checkpoint(run / "checkpoints") is not None, device="cpu", quiet=False)
    return {"step": s["step"], "examples": s["examples"]}


def _dpo(rl: Path, run: Path, cfg: AhaConfig) -> dict:
    from nanoseek.train.checkpoint import latest_checkpoint
    from nanoseek.train.dpo import DPOConfig, preference_pairs, train_dpo, write_pairs

    data = run.parent / "l2s_dpo_pairs.jsonl"
    if not data.exists():
        write_pairs(preference_pairs(rl, cfg.task, cfg.l2s_problems, cfg.l2s_samples, 1.0, cfg.max_new_tokens, cfg.seed,
                                     cfg.difficulty), data)
    if not data.read_text().strip():
        return {"skipped": "no preference pair"}
    s = train_dpo(run, DPOConfig(init=str(rl), data=str(data), beta=cfg.dpo_beta, lr=cfg.dpo_lr, steps=cfg.dpo_steps,
                                 seq_len=256, seed=cfg.seed, ckpt_every=max(cfg.dpo_steps // 2, 1)),
                  resume=latest_checkpoint(run / "checkpoints") is not None, steps=cfg.dpo_steps)
    return {k: s.get(k) for k in ("step", "loss", "margin", "reward_accuracy", "pairs")}


def _merge(base: Path, rl: Path, run: Path) -> dict:
    from nanoseek.train.merge import merge_runs

    merge_runs([rl, base], run)
    return {"runs": [str(rl), str(base)]}


def _partial(rl: Path, root: Path, cfg: AhaConfig) -> dict:
    """Ordinary GRPO vs partial rollouts (at most `partial_tokens` new tokens per trajectory per step), both
    `partial_steps` steps from the RL model with the same seed: median seconds per step, generated tokens, and
    rollout accuracy over the steps (a group is scored only once all its members finished)."""
    from nanoseek.train.metrics import read_metrics

    if cfg.partial_steps == 0:
        return {"skipped": "partial_steps is 0"}
    out = {}
    for name, tokens in (("ordinary", 0), ("partial", cfg.partial_tokens)):
        run = root / f"partial_{name}"
        _grpo(rl, run, cfg, cfg.partial_steps, partial_rollout_tokens=tokens)
        rows = read_metrics(run / "metrics.jsonl")
        el = [r["elapsed_s"] for r in rows]
        per = [b - a for a, b in zip([0.0] + el[:-1], el)]
        scored = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
        out[name] = {"steps": len(rows), "median_s_per_step": statistics.median(per) if per else None,
                     "seconds": round(el[-1], 1) if el else None,
                     "rollout_accuracy": sum(scored) / len(scored) if scored else None,
                     "response_len_mean": _mean(r.get("response_len_mean") for r in rows)}
    o, p = out["ordinary"]["median_s_per_step"], out["partial"]["median_s_per_step"]
    out["speedup"] = o / p if o and p else None
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ---- sampling, diagnostic, evaluation -----------------------------------------------------------------------
def _engine(run: Path, problems: list):
    """(Engine, tokenizer, task) for sampling a run's latest checkpoint on `problems`."""
    from nanoseek.engine import Engine
    from nanoseek.tasks import get_task
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import load_run_model

    model, _, _ = load_run_model(run)
    tok = Tokenizer.load(run / "tokenizer.json")
    return Engine(model, tok), tok, get_task(problems[0].meta["task"] if problems else "countdown_mod")


def sample_run(run: Path, problems: list, samples: int, temperature: float, top_p: float | None, max_new_tokens: int,
               seed: int) -> tuple[list, list, list[int], list[bool]]:
    """`samples` completions per problem: (problems repeated, texts, token counts, correct)."""
    engine, tok, task = _engine(run, problems)
    jobs = [p for p in problems for _ in range(samples)]
    outs = []
    for i in range(0, len(jobs), 256):
        outs += engine.generate([tok.prompt_ids(p.prompt) for p in jobs[i:i + 256]], max_new_tokens,
                                temperature=temperature, top_p=top_p, seed=seed + i)
    scores = task.score_batch(jobs, [o.text for o in outs], [o.finish_reason == "length" for o in outs])
    return jobs, [o.text for o in outs], [len(o.tokens) for o in outs], [s.correct for s in scores]


FORCE_RE = re.compile(r"^(<think>.*\bno\.)\s*</think>", re.DOTALL)  # a think block closed right after a `no.`


def force_point(text: str) -> str | None:
    """The completion cut where a forced search resumes: everything up to the `no.` that its think block closes on,
    plus ` (`, the start of the next attempt; None where the search did not give up (a `yes.`, no think block,
    or an unfinished one)."""
    m = FORCE_RE.match(text)
    return None if m is None else m.group(1) + " ("


def forced_search(run: Path, problems: list, samples: int, temperature: float, max_new_tokens: int, seed: int,
                  rounds: int = 8) -> tuple[list, list, list[int], list[bool], float]:
    """Budget forcing as a probe (s1, arXiv 2501.19393 sec. 3.1, where "Wait" replaces the end of thinking; here
    the start of the next attempt replaces a give-up): `samples` completions per problem; each that gives up is
    fed back up to its last `no.` plus ` (` and continued, at most `rounds` times or until the token budget runs
    out. Answers "would this base be right more often if it searched longer?" for a base that rarely does: its
    own samples cannot (a lazy base's diagnostic has few long samples to compare). Returns (problems repeated,
    full texts, token counts (re-encoded), correct, share of samples forced at least once). Simplification: the
    resumed text is re-encoded, so its tokens may split differently from the sampled ones."""
    engine, tok, task = _engine(run, problems)
    jobs = [p for p in problems for _ in range(samples)]
    heads = [tok.prompt_ids(p.prompt) for p in jobs]
    texts, finished = [""] * len(jobs), [False] * len(jobs)
    forced = [False] * len(jobs)
    for r in range(rounds + 1):
        done = {i: tok.encode(texts[i]) for i in range(len(jobs)) if not finished[i]}
        todo = [i for i in done if len(done[i]) < max_new_tokens]
        for j in range(0, len(todo), 256):
            by_budget: dict[int, list[int]] = {}
            for i in todo[j:j + 256]:
                by_budget.setdefault(max_new_tokens - len(done[i]), []).append(i)
            for b, rows in by_budget.items():
                outs = engine.generate([heads[i] + done[i] for i in rows], b, temperature=temperature,
                                       seed=seed + 1000 * r + j)
                for i, o in zip(rows, outs):
                    texts[i] += o.text
        for i in range(len(jobs)):
            if finished[i]:
                continue
            cut = force_point(texts[i]) if r < rounds else None
            if cut is None or len(tok.encode(cut)) >= max_new_tokens:
                finished[i] = True
            else:
                texts[i], forced[i] = cut, True
    lens = [len(tok.encode(t)) for t in texts]
    scores = task.score_batch(jobs, texts, [n >= max_new_tokens for n in lens])
    return jobs, texts, lens, [s.correct for s in scores], sum(forced) / max(len(jobs), 1)


def diagnostic(run: Path, cfg: AhaConfig) -> dict:
    """The pre-RL diagnostic on `diag_problems` train problems x group_size samples at the rollout temperature."""
    from nanoseek.tasks import get_task
    from nanoseek.tasks.search_diagnostic import diagnose, diagnostic_table, longer_pays

    rng = random.Random(4321 + cfg.seed)
    task = get_task(cfg.task)
    problems = [task.sample_split(rng, cfg.difficulty, "train") for _ in range(cfg.diag_problems)]
    jobs, texts, lens, ok = sample_run(run, problems, cfg.group_size, cfg.rl_temperature, None, cfg.max_new_tokens,
                                       777 + cfg.seed)
    d = diagnose(jobs, texts, lens, ok, group=[i // cfg.group_size for i in range(len(jobs))])
    d["longer_pays"] = longer_pays(d)
    d["temperature"] = cfg.rl_temperature
    console.print("\n".join(diagnostic_table(d)), markup=False, highlight=False)
    fj, ft, fl, fok, share = forced_search(run, problems, cfg.group_size, cfg.rl_temperature, cfg.max_new_tokens,
                                           777 + cfg.seed)
    f = diagnose(fj, ft, fl, fok, group=[i // cfg.group_size for i in range(len(fj))])
    d["forced"] = {"pass1": f["pass1"], "mean_len": sum(fl) / max(len(fl), 1), "attempts_mean": f["attempts_mean"],
                   "forced_share": share, "accuracy_by_attempts": f["accuracy_by_attempts"]}
    console.print(f"forced search (each give-up resumed with the next attempt, <= 8 times): pass@1 {f['pass1']:.1%} "
                  f"(own {d['pass1']:.1%}), attempts {f['attempts_mean']:.2f}, {share:.0%} of samples forced")
    console.print(f"diagnostic: pass@1 {d['pass1']:.1%}, attempts {d['attempts_mean']:.2f}, tokens correct / wrong "
                  f"{d['len_correct'] or 0:.1f} / {d['len_wrong'] or 0:.1f}, within-group cov(len, reward) "
                  f"{d['cov_len_reward_within_group'] or 0:.2f}, yes-precision {d['verify_yes_precision'] or 0:.1%}: "
                  + ("longer pays" if d["longer_pays"] else "longer does NOT pay"))
    return d


def evaluate(run: Path, cfg: AhaConfig) -> dict | None:
    """Held-out pass@1 at T=0.6 / top-p 0.95 over eval_samples samples of eval_n problems, mean length, tokens per
    correct answer and the diagnostic of those samples; None for a skipped method (no checkpoint)."""
    from nanoseek.evaluate import test_problems
    from nanoseek.tasks.search_diagnostic import diagnose
    from nanoseek.train.checkpoint import latest_checkpoint

    if latest_checkpoint(run / "checkpoints") is None:
        console.print(f"{run.name}: skipped (no model)")
        return None
    problems = test_problems(cfg.task, cfg.eval_n, seed=1234, difficulty=cfg.difficulty)
    jobs, texts, lens, ok = sample_run(run, problems, cfg.eval_samples, 0.6, 0.95, cfg.max_new_tokens, 1235)
    d = diagnose(jobs, texts, lens, ok, group=[i // cfg.eval_samples for i in range(len(jobs))])
    right = [n for n, c in zip(lens, ok) if c]
    res = {"pass1": sum(ok) / len(ok), "mean_len": sum(lens) / len(lens),
           "tokens_per_correct": sum(right) / len(right) if right else None, "attempts_mean": d["attempts_mean"],
           "diagnostic": d}
    tpc = "-" if res["tokens_per_correct"] is None else f"{res['tokens_per_correct']:.1f}"
    console.print(f"{run.name}: pass@1 T=0.6 {res['pass1']:.1%}  len {res['mean_len']:.1f}  tokens/correct {tpc}  "
                  f"attempts {res['attempts_mean']:.2f}")
    return res


def _samples(runs: dict[str, Path], cfg: AhaConfig, n: int = 6) -> dict:
    """The same held-out problems answered (T=0.6) by each model: early (base) and late (RL) completions."""
    from nanoseek.evaluate import test_problems

    problems = test_problems(cfg.task, n, seed=99, difficulty=cfg.difficulty)
    out: dict = {"problems": [p.prompt for p in problems]}
    for name, run in runs.items():
        _, texts, lens, ok = sample_run(run, problems, 1, 0.6, 0.95, cfg.max_new_tokens, 4242)
        out[name] = [{"text": t, "tokens": k, "correct": c} for t, k, c in zip(texts, lens, ok)]
    return out


# ---- summary, report ---------------------------------------------------------------------------------------
def rollout_trend(run: Path) -> dict | None:
    """Means over the first and last 10% of the GRPO steps: length, attempts, accept rate, accuracy."""
    from nanoseek.train.metrics import read_metrics

    rows = read_metrics(run / "metrics.jsonl")
    if not rows:
        return None
    w = max(len(rows) // 10, 1)
    keys = ("response_len_mean", "attempts_mean", "accept_rate", "accuracy")
    return {f"{k}_{part}": _mean(r.get(k) for r in chunk) for part, chunk in (("first", rows[:w]), ("last", rows[-w:]))
            for k in keys} | {"window_steps": w}


def targets(s: dict) -> dict:
    """Issue 28's targets on one seed's summary (questions: the report prints the answers)."""
    out = {"length_x1_5": s["rl_len"] >= 1.5 * s["base_len"], "pass1_plus_15": s["rl_pass1"] - s["base_pass1"] >= 0.15,
           "ahead_of_control": s["control_pass1"] is not None and s["rl_pass1"] > s["control_pass1"],
           "ahead_of_lazy_control": s.get("control_lazy_pass1") is not None and s["rl_pass1"] > s["control_lazy_pass1"]}
    long_tpc, ok = s["long_tokens_per_correct"], []
    for m, r in s["long2short"].items():
        if r and r["tokens_per_correct"] is not None and long_tpc:
            if r["tokens_per_correct"] <= 0.7 * long_tpc + 1e-9 and r["pass1"] >= s["rl_pass1"] - 0.02 - 1e-9:
                ok.append(m)
    out["long2short_methods_meeting_target"] = ok
    sp = (s.get("partial") or {}).get("speedup")
    out["partial_x1_3"] = sp is not None and sp >= 1.3
    return out


def build_summary(root: Path, cfg: AhaConfig, runner: StageRunner) -> dict:
    done = runner.done
    ev = {k: (done.get(f"eval_{k}") or {}).get("result")
          for k in ("base", "skill", "rl", "control", "control_lazy", *METHODS)}
    seconds = runner.seconds_by_stage()
    if "pretrain_base" in done:  # a base pretrained before this invocation counts with its own training time
        seconds["pretrain_base"] = max(seconds["pretrain_base"], done["pretrain_base"]["result"]["elapsed_s"])
    s = {"task": cfg.task, "seed": cfg.seed, "give_up": cfg.give_up, "persist": cfg.persist,
         "base_len": ev["base"]["mean_len"], "rl_len": ev["rl"]["mean_len"],
         "base_pass1": ev["base"]["pass1"], "rl_pass1": ev["rl"]["pass1"],
         "base_attempts": ev["base"]["attempts_mean"], "rl_attempts": ev["rl"]["attempts_mean"],
         "habit_steps": cfg.habit_steps, "habit_give_up": cfg.habit_give_up if cfg.habit_steps else None,
         "skill_pass1": ev["skill"]["pass1"] if ev["skill"] else None,
         "skill_len": ev["skill"]["mean_len"] if ev["skill"] else None,
         "skill_attempts": ev["skill"]["attempts_mean"] if ev["skill"] else None,
         "control_pass1": ev["control"]["pass1"] if ev["control"] else None,
         "control_len": ev["control"]["mean_len"] if ev["control"] else None,
         "control_seconds": (done.get("control") or {}).get("result", {}).get("seconds_budget"),
         "control_lazy_pass1": ev["control_lazy"]["pass1"] if ev["control_lazy"] else None,
         "control_lazy_len": ev["control_lazy"]["mean_len"] if ev["control_lazy"] else None,
         "rl_seconds": (done.get("rl") or {}).get("result", {}).get("seconds"),
         "base_tokens_per_correct": ev["base"]["tokens_per_correct"],
         "long_tokens_per_correct": ev["rl"]["tokens_per_correct"],
         "long2short": {m: None if ev[m] is None else {k: ev[m][k] for k in ("tokens_per_correct", "pass1", "mean_len")}
                        for m in METHODS},
         "diagnostic": done["diagnostic"]["result"],
         "eval_diagnostic": {k: ev[k]["diagnostic"] for k in ("base", "skill", "rl") if ev[k]},
         "rl_rollouts": rollout_trend(root / "rl"),
         "partial": (done.get("partial") or {}).get("result"),
         "eval_n": cfg.eval_n, "eval_samples": cfg.eval_samples,
         "seconds_total": round(sum(seconds.values()), 1), "seconds_by_stage": {k: round(v, 1) for k, v in seconds.items()}}
    s["targets"] = targets(s)
    return s


def finish(root: Path, cfg: AhaConfig, runner: StageRunner) -> dict | None:
    """summary.json and report.md once eval_rl is done (later stages fill in as they finish)."""
    if "eval_rl" not in runner.done:
        return None
    from nanoseek.recipes.aha_report import write_report

    s = build_summary(root, cfg, runner)
    atomic_write_text(root / "summary.json", json.dumps(s, indent=2) + "\n")
    report = write_report(root, cfg, s, (runner.done.get("samples") or {}).get("result"))
    console.print(f"total {s['seconds_total'] / 60:.1f} min; report: {report}; summary: {root / 'summary.json'}")
    return s


def run_aha(cfg: AhaConfig, until: str | None = None) -> dict | None:
    cfg.validate()
    root = Path(cfg.out)
    runner = StageRunner(root, asdict(cfg), until=until, names=STAGES)
    skill, rl = root / "base", root / "rl"
    base = root / "habit" if cfg.habit_steps else skill  # RL's starting point
    runs = {"base": base, "rl": rl, "control": root / "control", "control_lazy": root / "control_lazy",
            **{m: root / m for m in METHODS}}
    work = {"pretrain_base": lambda: _pretrain(skill, cfg),
            "pretrain_habit": lambda: _pretrain(base, cfg, init_from=skill, habit=True) if cfg.habit_steps else None,
            "diagnostic": lambda: diagnostic(base, cfg),
            "eval_base": lambda: evaluate(base, cfg),
            "eval_skill": lambda: evaluate(skill, cfg) if cfg.habit_steps else None,
            "rl": lambda: _grpo(base, rl, cfg, cfg.rl_steps),
            "eval_rl": lambda: evaluate(rl, cfg),
            "control": lambda: _control(base, runs["control"], cfg, grpo_seconds(rl)),
            "eval_control": lambda: evaluate(runs["control"], cfg),
            "control_lazy": lambda: _control(base, runs["control_lazy"], cfg, grpo_seconds(rl), lazy=True)
            if cfg.habit_steps else None,
            "eval_control_lazy": lambda: evaluate(runs["control_lazy"], cfg) if cfg.habit_steps else None,
            "l2s_length": lambda: _grpo(rl, runs["l2s_length"], cfg, cfg.length_steps, length_weight=cfg.length_weight),
            "l2s_shortest": lambda: _shortest_sft(rl, runs["l2s_shortest"], cfg),
            "l2s_dpo": lambda: _dpo(rl, runs["l2s_dpo"], cfg),
            "l2s_merge": lambda: _merge(base, rl, runs["l2s_merge"]),
            "partial": lambda: _partial(rl, root, cfg),
            "samples": lambda: _samples({"base": base, "rl": rl}, cfg)}
    for m in METHODS:
        work[f"eval_{m}"] = (lambda m=m: evaluate(runs[m], cfg))
    try:
        for name in STAGES:
            runner.run(name, work[name])
    except StopAfter as stop:
        console.print(f"stopped after stage {stop} (--until); rerun to continue")
    return finish(root, cfg, runner)


def _control(base: Path, run: Path, cfg: AhaConfig, seconds: float, lazy: bool = False) -> dict:
    r = _pretrain(run, cfg, init_from=base, seconds=seconds, lazy=lazy)
    return {**r, "seconds_budget": round(seconds, 1)}
