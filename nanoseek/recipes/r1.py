"""The r1 recipe (`nanoseek r1`, `make r1`): the DeepSeek-R1 pipeline after R1-Zero, in miniature: does distilling a
reasoning teacher beat RL on a small dense student (R1 arXiv 2501.12948 sec. 4.1, Table 6)?

Stages (nanoseek.recipes.stages: each resumable with Ctrl-C then the same command; `--until STAGE`):
  1. the teacher: `runs/demo`'s RL model (the demo is run first when runs/demo holds no finished demo);
  2. the student base: a dense student (`tiny-dense` by default) pretrained on the demo's corpus with the
     demo's tokenizer, for fewer steps than the teacher's base;
  3. rejection sampling: K samples per train problem from the teacher, verified-correct ones kept;
  4. four arms from the student base, each given the same wall-clock budget on the same cores, one after
     the other: (a) GRPO with the demo's RL settings, (b) SFT on the teacher's traces, (c) on-policy
     distillation (reverse KL on the student's samples), (d) SFT for half the budget then GRPO for the rest;
  5. evaluation exactly as the demo's (held-out split, pass@1 at T=0.6 / top-p 0.95 and T=1.0 over 4 samples,
     greedy); a smaller evaluation of every kept checkpoint gives the accuracy-vs-time curves;
  6. runs/r1/report.md, plots/ and summary.json.
Stage names: STAGES below; a rerun in the same --out with other settings is refused. Budgets are wall-clock,
so the step counts each arm reaches depend on the machine and its load (logged).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from nanoseek.cli_config import knob
from nanoseek.config import ConfigError
from nanoseek.io import atomic_write_text
from nanoseek.recipes.report import (eval_run, grpo_seconds_by_step, grpo_used_seconds, pass_table_lines,
                                     print_pass_table, sample_completions, sample_lines)
from nanoseek.recipes.stages import StageRunner, StopAfter, console

ARMS = ("rl", "sft", "onpolicy", "sft_rl")
ARM_TITLES = {"rl": "(a) student + GRPO", "sft": "(b) student + SFT on teacher traces",
              "onpolicy": "(c) student + on-policy distillation", "sft_rl": "(d) student + SFT, then GRPO"}
STAGES = ("student_base", "eval_teacher", "eval_student_base", "traces", "arm_rl", "arm_sft", "arm_onpolicy",
          "arm_sft_rl_sft", "arm_sft_rl", *(f"eval_{a}" for a in ARMS), "curves", "samples")


@dataclass
class R1Config:
    out: str = knob("runs/r1", help="the pipeline's root directory (one run directory per stage inside)")
    demo: str = knob("runs/demo", help="the R1-Zero demo whose RL model is the teacher (run if missing)")
    seed: int = knob(0, help="seed of every stage")
    student_preset: str = knob("tiny-dense", help="model preset of the dense student")
    # The student base gets 300 pretraining steps against the teacher base's 1400: a weaker base of about
    # the teacher's activated size, the situation of R1's small dense students (README "R1 pipeline").
    student_base_steps: int = knob(300, help="pretraining steps of the student base")
    # 2 minutes per arm keeps `nanoseek r1` near 15 minutes on the shared 2-core machine (8 of them in the arms)
    arm_minutes: float = knob(2.0, help="wall-clock budget of each arm")
    # difficulty 1 has ~8,400 distinct train problems; 8000 draws x 2 samples covers most of them once or twice
    trace_problems: int = knob(8000, help="train problems the teacher samples for rejection-sampled traces")
    trace_samples: int = knob(2, help="teacher samples per trace problem")
    trace_temperature: float = 0.7  # the demo's rollout temperature
    sft_lr: float = 1e-3
    sft_batch_size: int = 32
    distill_lr: float = 5e-4
    distill_prompts_per_step: int = 32
    curve_n: int = 100  # held-out problems per checkpoint on the curves (one T=0.6 sample each)
    smoke: bool = knob(False, help="a seconds-long run of every stage (for tests); options given apply on top")

    def validate(self) -> R1Config:
        from nanoseek.config import PRESETS

        if self.student_preset not in PRESETS:
            raise ConfigError(f"unknown student preset {self.student_preset!r}; choose one of {', '.join(PRESETS)}")
        for name in ("student_base_steps", "trace_problems", "trace_samples", "sft_batch_size",
                     "distill_prompts_per_step", "curve_n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.arm_minutes <= 0:
            raise ConfigError(f"arm_minutes must be > 0, got {self.arm_minutes}")
        return self

    @classmethod
    def smoke_config(cls, out: str, demo: str, seed: int = 0) -> R1Config:
        return cls(out=out, demo=demo, seed=seed, student_base_steps=6, arm_minutes=0.05, trace_problems=12,
                   trace_samples=2, sft_batch_size=4, distill_prompts_per_step=4, curve_n=4, smoke=True)


# ---- stages ------------------------------------------------------------------------------------------
def _demo(cfg: R1Config):
    """The finished demo's config (running the demo first if needed)."""
    from nanoseek.recipes.demo import DemoConfig, run_demo

    root = Path(cfg.demo)
    if not (root / "summary.json").exists():
        console.print(f"[bold]{root} holds no finished demo: running it first[/bold]")
        run_demo(DemoConfig.smoke(str(root), cfg.seed) if cfg.smoke else DemoConfig(out=str(root), seed=cfg.seed))
    return DemoConfig(**json.loads((root / "demo_config.json").read_text()))


def _student_base(run: Path, cfg: R1Config, dcfg) -> dict:
    from nanoseek.config import ModelConfig
    from nanoseek.train.checkpoint import latest_checkpoint, read_state
    from nanoseek.train.common import TrainConfig
    from nanoseek.train.pretrain import DataConfig, PretrainConfig, pretrain

    steps = cfg.student_base_steps
    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is not None and int(read_state(ckpt)["step"]) >= steps:
        return {"step": steps}
    run.mkdir(parents=True, exist_ok=True)
    if not (run / "tokenizer.json").exists():  # the teacher's vocabulary: distillation compares ids
        (run / "tokenizer.json").write_bytes((Path(cfg.demo) / "base" / "tokenizer.json").read_bytes())
    train = TrainConfig(lr=dcfg.base_lr, steps=steps, batch_size=dcfg.batch_size, seq_len=dcfg.seq_len, seed=cfg.seed,
                        warmup_steps=min(20, max(1, steps // 10)), eval_interval=max(steps // 4, 1),
                        ckpt_interval=max(steps // 5, 1))
    data = DataConfig(task=dcfg.task, n_docs=dcfg.n_docs, n_test_docs=max(dcfg.n_docs // 50, 20),
                      difficulty=dcfg.difficulty, flawed_share=dcfg.flawed_share, fact_share=dcfg.fact_share)
    pcfg = PretrainConfig(model=ModelConfig.preset(cfg.student_preset), train=train, data=data, dense=True)
    return pretrain(run, pcfg, resume=ckpt is not None, device="cpu")


def _traces(root: Path, cfg: R1Config, dcfg) -> dict:
    from nanoseek.train.traces import TracesConfig, rejection_sample

    tcfg = TracesConfig(run=str(Path(cfg.demo) / "rl"), task=dcfg.task, problems=cfg.trace_problems,
                        samples=cfg.trace_samples, temperature=cfg.trace_temperature, keep="correct",
                        difficulty=dcfg.difficulty, max_new_tokens=dcfg.max_new_tokens, seed=cfg.seed + 7,
                        out=str(root / "traces.jsonl"))
    return rejection_sample(tcfg, print_fn=console.print)


def _grpo(init: Path, run: Path, cfg: R1Config, dcfg, budget_s: float) -> dict:
    from nanoseek.train.checkpoint import latest_checkpoint, read_state
    from nanoseek.train.grpo import GRPOConfig, train_grpo

    used = grpo_used_seconds(run)
    resume = latest_checkpoint(run / "checkpoints") is not None
    if used < budget_s:
        rl = GRPOConfig(task=dcfg.task, difficulty=dcfg.difficulty, steps=1_000_000, group_size=dcfg.group_size,
                        prompts_per_step=dcfg.prompts_per_step, max_new_tokens=dcfg.max_new_tokens, lr=dcfg.rl_lr,
                        seed=cfg.seed, ckpt_every=10, keep_last=1000, bias_update=dcfg.rl_bias_gamma > 0,
                        bias_gamma=dcfg.rl_bias_gamma, temperature=dcfg.rl_temperature,
                        minutes=(budget_s - used) / 60)
        train_grpo(init, run, rl, resume=resume, device="cpu", quiet=cfg.smoke)
    step = int(read_state(latest_checkpoint(run / "checkpoints"))["step"])
    return {"step": step, "seconds": round(grpo_used_seconds(run), 1)}


def _sft(init: Path, run: Path, cfg: R1Config, dcfg, data: Path, budget_s: float) -> dict:
    from nanoseek.train.checkpoint import latest_checkpoint
    from nanoseek.train.common import TrainConfig
    from nanoseek.train.sft import SFTConfig, train_sft

    train = TrainConfig(lr=cfg.sft_lr, steps=1_000_000, batch_size=cfg.sft_batch_size, seq_len=dcfg.seq_len,
                        seed=cfg.seed, warmup_steps=10, eval_interval=0, ckpt_interval=100, keep_last=1000,
                        bias_gamma=0.0)
    scfg = SFTConfig(data=str(data), init=str(init), budget_s=budget_s, train=train)
    resume = latest_checkpoint(run / "checkpoints") is not None
    s = train_sft(run, None if resume else scfg, resume=resume, device="cpu", quiet=cfg.smoke)
    return {"step": s["step"], "seconds": round(s["elapsed_s"], 1), "examples_seen": s["examples_seen"],
            "examples": s["examples"], "skipped": s["skipped"]}


def _onpolicy(init: Path, run: Path, cfg: R1Config, dcfg, budget_s: float) -> dict:
    from nanoseek.train.checkpoint import latest_checkpoint
    from nanoseek.train.common import TrainConfig
    from nanoseek.train.distill import DistillConfig, train_distill

    train = TrainConfig(lr=cfg.distill_lr, steps=1_000_000, warmup_steps=10, weight_decay=0.0, seed=cfg.seed,
                        keep_last=1000, bias_gamma=0.0)
    dc = DistillConfig(teacher=str(Path(cfg.demo) / "rl"), student=str(init), task=dcfg.task,
                       difficulty=dcfg.difficulty, prompts_per_step=cfg.distill_prompts_per_step,
                       max_new_tokens=dcfg.max_new_tokens, temperature=1.0, budget_s=budget_s, ckpt_every=20,
                       train=train)
    resume = latest_checkpoint(run / "checkpoints") is not None
    s = train_distill(run, None if resume else dc, resume=resume, quiet=cfg.smoke)
    return {"step": s["step"], "seconds": round(s["elapsed_s"], 1), "samples_seen": s["samples_seen"]}


# ---- curves ------------------------------------------------------------------------------------------
def _checkpoint_curve(run: Path, dcfg, n: int, x_of_step, offset: float = 0.0) -> list[dict]:
    """pass@1 (T=0.6, top-p 0.95, one sample) on `n` held-out problems for every kept checkpoint."""
    from nanoseek.engine import Engine
    from nanoseek.evaluate import score_batch, test_problems
    from nanoseek.tasks import get_task
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import load_run_model, step_dirs

    task = get_task(dcfg.task)
    problems = test_problems(dcfg.task, n, seed=1234, difficulty=dcfg.difficulty)
    tok = Tokenizer.load(run / "tokenizer.json")
    points = []
    for step, _ in step_dirs(run / "checkpoints"):
        model, _, _ = load_run_model(run, step=step)
        acc, _, _ = score_batch(Engine(model, tok), task, problems, 1, dcfg.max_new_tokens, 0.6, 0.95, 1235)
        points.append({"step": step, "pass1": sum(acc) / len(acc), **x_of_step(step, offset)})
    return points


def _metric_at(run: Path, key: str):
    from nanoseek.train.metrics import read_metrics

    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl")}

    def at(step: int, offset: float = 0.0) -> dict:
        r = rows.get(step, {})
        return {"seconds": offset + float(r.get("elapsed_s", 0.0)), "seen": r.get(key)}

    return at


def _grpo_at(run: Path):
    """Elapsed seconds (summed over resumes) and prompts seen at each GRPO step."""
    out = grpo_seconds_by_step(run)

    def at(step: int, offset: float = 0.0) -> dict:
        return {"seconds": offset + out.get(step, 0.0), "seen": None}

    return at


def _curves(root: Path, cfg: R1Config, dcfg, base_pass1: float) -> dict:
    n = cfg.curve_n
    arms = root / "arms"
    curves = {"rl": _checkpoint_curve(arms / "rl", dcfg, n, _grpo_at(arms / "rl")),
              "sft": _checkpoint_curve(arms / "sft", dcfg, n, _metric_at(arms / "sft", "examples_seen")),
              "onpolicy": _checkpoint_curve(arms / "onpolicy", dcfg, n, _metric_at(arms / "onpolicy", "samples_seen"))}
    sft_part = _checkpoint_curve(arms / "sft_rl_sft", dcfg, n, _metric_at(arms / "sft_rl_sft", "examples_seen"))
    offset = max((p["seconds"] for p in sft_part), default=0.0)
    curves["sft_rl"] = sft_part + _checkpoint_curve(arms / "sft_rl", dcfg, n, _grpo_at(arms / "sft_rl"), offset)
    for pts in curves.values():
        pts.insert(0, {"step": 0, "pass1": base_pass1, "seconds": 0.0, "seen": 0})
    return curves


def _plot(series: list[tuple[str, list[float], list[float]]], xlabel: str, title: str, path: Path) -> Path:
    """One accuracy plot: (label, x, pass@1) series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoseek.report import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, xs, ys in series:
        ax.plot(xs, [100 * y for y in ys], marker=".", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out pass@1, T=0.6 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


def plot_curves(curves: dict, plots: Path) -> list[Path]:
    by_time = [(ARM_TITLES[arm], [p["seconds"] / 60 for p in pts], [p["pass1"] for p in pts])
               for arm, pts in curves.items()]
    by_seen = []
    for arm, label in (("sft", "SFT on teacher traces (traces seen)"),
                       ("onpolicy", "on-policy distillation (student samples seen)")):
        pts = [p for p in curves[arm] if p["seen"] is not None]
        by_seen.append((label, [p["seen"] for p in pts], [p["pass1"] for p in pts]))
    return [_plot(by_time, "arm wall-clock time (min)", "student accuracy vs arm time (same budget each)",
                  plots / "r1_accuracy_vs_time.png"),
            _plot(by_seen, "training sequences seen", "distillation: off-policy (SFT) vs on-policy",
                  plots / "r1_accuracy_vs_samples.png")]


# ---- report ------------------------------------------------------------------------------------------
def write_report(root: Path, cfg: R1Config, dcfg, summary: dict, plots: list[Path], samples: dict) -> Path:
    ev = summary["_evals"]
    arm_s, arm_steps = summary["arm_seconds"], summary["arm_steps"]
    lines = [f"# nanoseek R1 pipeline: distillation vs RL on a dense student (`{dcfg.task}`, seed {cfg.seed})", "",
             f"Teacher: the demo's RL model ({Path(cfg.demo) / 'rl'}). Student: `{cfg.student_preset}` "
             f"({summary['student_params']:,} parameters, dense), its base pretrained {cfg.student_base_steps} steps "
             f"on the demo's corpus. Each arm: {cfg.arm_minutes:g} min of wall-clock on this machine, run one after "
             f"another. Traces: {summary['traces_kept']} verified-correct rows from {summary['traces_problems']} "
             f"solved of {cfg.trace_problems} train problems x {cfg.trace_samples} teacher samples at T="
             f"{cfg.trace_temperature:g}. Held-out split, {dcfg.eval_n} problems, pass@1 = mean over "
             f"{dcfg.eval_samples} samples. Total {summary['seconds_total'] / 60:.1f} min (demo excluded).", ""]
    how = {"teacher": "the demo: MoE base + GRPO", "student_base": f"pretrain {cfg.student_base_steps} steps",
           "rl": f"GRPO, {arm_steps['rl']} steps in {arm_s['rl']:.0f} s",
           "sft": f"SFT, {arm_steps['sft']} steps ({summary['sft_epochs']:.1f} epochs) in {arm_s['sft']:.0f} s",
           "onpolicy": f"on-policy distillation, {arm_steps['onpolicy']} steps in {arm_s['onpolicy']:.0f} s",
           "sft_rl": f"SFT {arm_steps['sft_rl_sft']} steps then GRPO {arm_steps['sft_rl']} steps in "
                     f"{arm_s['sft_rl']:.0f} s"}
    names = {"teacher": "teacher", "student_base": "student base", **{a: ARM_TITLES[a] for a in ARMS}}
    lines += pass_table_lines([(names[k], how[k], ev[k]) for k in ("teacher", "student_base", *ARMS)])
    gap = 100 * (summary["student_sft_pass1"] - summary["student_rl_pass1"])
    lines += ["", f"Distillation (SFT on traces) minus RL at T=0.6: **{gap:+.1f} points** "
              f"(the claim: >= +10; {'holds' if gap >= 10 else 'does not hold'} on this seed).", "",
              "## Curves", "", "Held-out pass@1 at T=0.6 (one sample on each of "
              f"{cfg.curve_n} problems) of every kept checkpoint:", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    lines += ["", "## Sample completions (held-out problems, temperature 1.0)", ""]
    lines += sample_lines(samples)
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def run_r1(cfg: R1Config, until: str | None = None) -> dict | None:
    """Run (or resume) the pipeline in cfg.out (the demo first where cfg.demo holds none); returns the summary,
    or None when stopped after stage `until`."""
    from nanoseek.config import ModelConfig

    cfg.validate()
    t0 = time.time()
    dcfg = _demo(cfg)
    demo_s = time.time() - t0
    root = Path(cfg.out)
    stages = StageRunner(root, {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}, until=until,
                         names=STAGES)
    atomic_write_text(root / "r1_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    base, arms, teacher = root / "student_base", root / "arms", Path(cfg.demo) / "rl"
    budget = cfg.arm_minutes * 60
    data = root / "traces.jsonl"
    try:
        stages.run("student_base", lambda: _student_base(base, cfg, dcfg))
        stages.run("eval_teacher", lambda: eval_run(teacher, dcfg))
        base_eval = stages.run("eval_student_base", lambda: eval_run(base, dcfg))
        traces = stages.run("traces", lambda: _traces(root, cfg, dcfg))
        if traces["rows_kept"] < cfg.sft_batch_size:
            raise ConfigError(f"only {traces['rows_kept']} teacher traces: too few to train on")
        stages.run("arm_rl", lambda: _grpo(base, arms / "rl", cfg, dcfg, budget))
        stages.run("arm_sft", lambda: _sft(base, arms / "sft", cfg, dcfg, data, budget))
        stages.run("arm_onpolicy", lambda: _onpolicy(base, arms / "onpolicy", cfg, dcfg, budget))
        sft_half = stages.run("arm_sft_rl_sft", lambda: _sft(base, arms / "sft_rl_sft", cfg, dcfg, data, budget / 2))
        stages.run("arm_sft_rl", lambda: _grpo(arms / "sft_rl_sft", arms / "sft_rl", cfg, dcfg,
                                               budget - sft_half["seconds"]))
        for arm in ARMS:
            stages.run(f"eval_{arm}", lambda arm=arm: eval_run(arms / arm, dcfg))
        curves = stages.run("curves", lambda: _curves(root, cfg, dcfg, base_eval["pass1"]))
        samples = stages.run("samples", lambda: sample_completions(
            {"teacher": teacher, "student_base": base, **{a: arms / a for a in ARMS}}, dcfg))
    except StopAfter as stop:
        console.print(f"stopped after stage {stop}; rerun without --until to continue")
        return None
    ev = {"teacher": stages.done["eval_teacher"]["result"], "student_base": base_eval,
          **{a: stages.done[f"eval_{a}"]["result"] for a in ARMS}}
    res = {a: stages.done[f"arm_{a}"]["result"] for a in ARMS}
    sft_rl_s = sft_half["seconds"] + res["sft_rl"]["seconds"]
    keys = {"teacher": "teacher", "student_base": "student_base", "rl": "student_rl", "sft": "student_sft",
            "onpolicy": "student_onpolicy", "sft_rl": "student_sft_rl"}
    summary: dict = {"task": dcfg.task, "seed": cfg.seed, "student_preset": cfg.student_preset,
                     "student_params": ModelConfig.preset(cfg.student_preset).param_counts()["total"]}
    for k, name in keys.items():
        summary[f"{name}_pass1"] = ev[k]["pass1"]
        summary[f"{name}_pass1_t1"] = ev[k]["pass1_t1"]
        summary[f"{name}_greedy"] = ev[k]["greedy"]
    summary.update({
        "arm_budget_s": budget,
        "arm_seconds": {"rl": res["rl"]["seconds"], "sft": res["sft"]["seconds"], "onpolicy": res["onpolicy"]["seconds"],
                        "sft_rl": round(sft_rl_s, 1)},
        "arm_steps": {"rl": res["rl"]["step"], "sft": res["sft"]["step"], "onpolicy": res["onpolicy"]["step"],
                      "sft_rl_sft": sft_half["step"], "sft_rl": res["sft_rl"]["step"]},
        "sft_epochs": res["sft"]["examples_seen"] / max(res["sft"]["examples"], 1),
        "onpolicy_samples_seen": res["onpolicy"]["samples_seen"], "sft_examples_seen": res["sft"]["examples_seen"],
        "traces_problems": traces["problems_solved"], "traces_kept": traces["rows_kept"],
        "traces_mean_tokens": traces["mean_tokens"], "sft_minus_rl_pass1": summary["student_sft_pass1"] - summary["student_rl_pass1"],
        "eval_n": dcfg.eval_n, "eval_samples": dcfg.eval_samples, "demo_seconds_this_run": round(demo_s, 1),
        **stages.timing(), "curves": curves})
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    plots = plot_curves(curves, root / "plots")
    report = write_report(root, cfg, dcfg, {**summary, "_evals": ev}, plots, samples)
    print_pass_table(f"R1 pipeline on a {cfg.student_preset} student (held-out {dcfg.task}, n={dcfg.eval_n})", ev,
                     ARM_TITLES)
    console.print(f"total {summary['seconds_total'] / 60:.1f} min (demo excluded); report: {report}; "
                  f"summary: {root / 'summary.json'}")
    return summary
