"""The demo recipe (`nanoseek demo`, `make demo`): R1-Zero from nothing to a reasoning model on this machine.

Stages (nanoseek.recipes.stages: each resumable with Ctrl-C then the same command; `--until STAGE`):
  1. tokenizer + corpus + pretrain the tiny MoE base on worked arithmetic, 60% of it with one slip;
  2. evaluate the base on the held-out split;
  3. GRPO with the rule-based reward (accuracy + format) and, at the same time in a second process, the
     control: the base pretrained further for exactly as long as GRPO runs, each on half of the cores
     (same time, same compute, no RL; its lr decays with GRPO's progress and it stops when GRPO stops);
  4. evaluate the RL model and the control, sample a few completions; write runs/demo/report.md, plots and
     summary.json.
Stage names: pretrain_base, eval_base, grpo_and_control, eval_rl, eval_control, samples.
A rerun in the same --out with other settings is refused (finished stages would not match them).
Step counts of the base and of GRPO are fixed (not wall-clock limits), so a seed gives the same base and RL
run on any machine; the control's step count is whatever it reached in GRPO's time.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from nanoseek.cli_config import knob
from nanoseek.io import atomic_write_text
from nanoseek.recipes.report import eval_run, pass_table_lines, print_pass_table, sample_completions, sample_lines
from nanoseek.recipes.stages import StageRunner, StopAfter, console

STAGES = ("pretrain_base", "eval_base", "grpo_and_control", "eval_rl", "eval_control", "samples")


@dataclass
class DemoConfig:
    out: str = knob("runs/demo", help="the demo's root directory (one run directory per stage inside)")
    seed: int = knob(0, help="seed of every stage")
    task: str = "arithmetic"
    difficulty: int = knob(1, help="task difficulty (arithmetic: 1-5)")
    # 1400 steps (the control now runs beside GRPO instead of after it, which freed the time): at 1000 steps
    # some seeds had not yet learned to copy the right operand (seed 1: 73 of 109 greedy misses), and RL
    # cannot add what the base does not know
    base_steps: int = knob(1400, help="pretraining steps of the base model")
    base_lr: float = knob(4e-3, help="pretraining learning rate")
    # 32 rows of 64 tokens (about two worked problems per row) per step: the same 2048 tokens as 16 x 128,
    # but cheaper attention and fewer problems seen through an unrelated one; 1000 steps reached 67.5%
    # greedy instead of 54.5% (seed 0)
    batch_size: int = 32
    seq_len: int = 64
    n_docs: int = 50_000
    # worked solutions carrying one slip: what RL has to remove. 0.6 rather than 0.5: a 1400-step base at 0.5
    # already samples close to its greedy accuracy on some seeds (seed 1: 73.0% at T=0.6, 88.0% greedy), which
    # leaves RL little to sharpen (+11.5); at 0.6 seeds 1 / 2 went 38.2 -> 57.5 and 59.9 -> 86.1
    flawed_share: float = knob(0.6, help="share of pretraining solutions with one arithmetic slip")
    fact_share: float = 0.0  # no always-correct one-operation drills: every problem type keeps its slips
    rl_steps: int = knob(200, help="GRPO steps")  # accuracy levels off by ~160 steps (pilots); 200: under 15 min
    rl_lr: float = knob(1e-4, help="GRPO learning rate")
    # The routing bias stays frozen during RL (V3 also froze it, gamma = 0, for its last 500B pretraining
    # tokens): at RL's 40x lower learning rate the per-step sign update moved the routing more than the
    # weights did and cost the policy 6-8 greedy points (README, R1-Zero demo).
    rl_bias_gamma: float = knob(0.0, help="MoE routing-bias update speed during RL (0 = frozen)")
    # Rollouts (and the policy ratio) at 0.7 rather than R1-Zero's 1.0: the samples then carry the mistakes
    # the model still makes when it is sampled at evaluation temperatures (0.6), not mostly the slips that
    # 1.0 adds; seed-0 pilot, 160 steps: pass@1 T=0.6 62.5% vs 60.5% at 1.0, T=1.0 46.2% vs 48.0%.
    rl_temperature: float = knob(0.7, help="GRPO rollout temperature")
    group_size: int = 8
    prompts_per_step: int = knob(16, help="GRPO groups per step")
    max_new_tokens: int = 64
    eval_n: int = knob(200, help="held-out problems per evaluation")
    eval_samples: int = knob(4, help="samples per problem for pass@1")

    def validate(self) -> "DemoConfig":
        """Fail in the first second, not after minutes of pretraining."""
        from nanoseek.config import ConfigError

        for name in ("base_steps", "rl_steps", "batch_size", "seq_len", "group_size", "prompts_per_step", "eval_n",
                     "eval_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rl_temperature <= 0:
            raise ConfigError(f"rl_temperature must be > 0, got {self.rl_temperature}")
        if self.base_lr <= 0 or self.rl_lr <= 0:
            raise ConfigError("learning rates must be positive")
        if self.rl_bias_gamma < 0:
            raise ConfigError(f"rl_bias_gamma must be >= 0, got {self.rl_bias_gamma}")
        if not 0 <= self.flawed_share <= 1:
            raise ConfigError(f"flawed_share must be in [0, 1], got {self.flawed_share}")
        return self

    @classmethod
    def smoke(cls, out: str, seed: int = 0) -> "DemoConfig":
        """A seconds-long version of the pipeline for tests."""
        return cls(out=out, seed=seed, base_steps=6, batch_size=4, n_docs=300, rl_steps=2, group_size=4,
                   prompts_per_step=2, max_new_tokens=16, eval_n=4, eval_samples=1)


# ---- stages -------------------------------------------------------------------------------------------
def _pretrain(run: Path, cfg: DemoConfig, steps: int, init_from: Path | None = None, lr: float | None = None,
              pace=None) -> dict:
    from nanoseek.config import ModelConfig
    from nanoseek.train.checkpoint import latest_checkpoint, read_state
    from nanoseek.train.common import TrainConfig
    from nanoseek.train.pretrain import DataConfig, PretrainConfig, pretrain

    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is not None and int(read_state(ckpt)["step"]) >= steps:
        return {"step": steps}
    train = TrainConfig(lr=lr or cfg.base_lr, steps=steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                        warmup_steps=min(20, max(1, steps // 10)), eval_interval=max(steps // 4, 1) if pace is None else 0,
                        ckpt_interval=max(steps // 5, 1) if pace is None else 25)
    data = DataConfig(task=cfg.task, n_docs=cfg.n_docs, n_test_docs=max(cfg.n_docs // 50, 20),
                      difficulty=cfg.difficulty, flawed_share=cfg.flawed_share, fact_share=cfg.fact_share)
    pcfg = PretrainConfig(model=ModelConfig.preset("tiny"), train=train, data=data)
    if init_from is not None and not (run / "tokenizer.json").exists():
        run.mkdir(parents=True, exist_ok=True)
        (run / "tokenizer.json").write_bytes((init_from.parent.parent / "tokenizer.json").read_bytes())
    return pretrain(run, pcfg, resume=ckpt is not None, device="cpu", init_from=init_from, pace=pace)


def _rl(base: Path, run: Path, cfg: DemoConfig, on_step=None) -> dict:
    from nanoseek.train.checkpoint import latest_checkpoint, read_state
    from nanoseek.train.grpo import GRPOConfig, train_grpo

    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is not None and int(read_state(ckpt)["step"]) >= cfg.rl_steps:
        return {"step": cfg.rl_steps}
    rl = GRPOConfig(task=cfg.task, difficulty=cfg.difficulty, steps=cfg.rl_steps, group_size=cfg.group_size, prompts_per_step=cfg.prompts_per_step,
                    max_new_tokens=cfg.max_new_tokens, lr=cfg.rl_lr, seed=cfg.seed, ckpt_every=max(cfg.rl_steps // 5, 1),
                    bias_update=cfg.rl_bias_gamma > 0, bias_gamma=cfg.rl_bias_gamma, temperature=cfg.rl_temperature)
    return train_grpo(base, run, rl, resume=ckpt is not None, device="cpu", on_step=on_step)


CONTROL_STEP_CAP = 1_000_000  # the paced control stops when GRPO does; this only bounds its step counter


def _control_worker(control: str, base_ckpt: str, cfg_fields: dict, threads: int, fraction, log: str) -> None:
    """Child process: the control's pretraining, paced by the GRPO run in the parent; output goes to `log`."""
    import os

    import torch

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(threads)
    cfg = DemoConfig(**cfg_fields)
    parent = os.getppid()

    def pace() -> float:  # an orphan (the demo was killed) stops at its next step instead of running on
        return fraction.value if os.getppid() == parent else 1.0

    _pretrain(Path(control), cfg, CONTROL_STEP_CAP, init_from=Path(base_ckpt), lr=cfg.base_lr * 0.25, pace=pace)


def _grpo_and_control(base: Path, rl: Path, control: Path, cfg: DemoConfig) -> dict:
    """GRPO here and the control in a spawned process, each on half of the cores: the control's lr decays with
    GRPO's progress and it stops right after GRPO's last step, so both get the same time on the same cores."""
    import multiprocessing

    import torch

    from nanoseek.train.checkpoint import latest_checkpoint, read_state

    threads = max(1, torch.get_num_threads() // 2)
    rl_ckpt = latest_checkpoint(rl / "checkpoints")
    ctx = multiprocessing.get_context("spawn")
    fraction = ctx.Value("d", (int(read_state(rl_ckpt)["step"]) if rl_ckpt else 0) / cfg.rl_steps)
    control.mkdir(parents=True, exist_ok=True)
    child = ctx.Process(target=_control_worker, name="nanoseek-control",
                        args=(str(control), str(latest_checkpoint(base / "checkpoints")), dataclasses.asdict(cfg),
                              threads, fraction, str(control / "log.txt")))
    child.start()
    console.print(f"[dim]control pretraining runs alongside in process {child.pid} ({threads} thread(s) each; "
                  f"log: {control / 'log.txt'})[/dim]")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = _rl(base, rl, cfg, on_step=lambda step: setattr(fraction, "value", step / cfg.rl_steps))
    finally:
        fraction.value = 1.0  # also on an error here: the control checkpoints and stops after its current step
        torch.set_num_threads(before)
        child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the control pretraining process failed (exit code {child.exitcode}); "
                           f"see {control / 'log.txt'}")
    state = read_state(latest_checkpoint(control / "checkpoints"))
    return {"rl": result, "control_steps": int(state["step"]), "control_seconds": float(state["elapsed_s"]),
            "threads": threads}


# ---- report -------------------------------------------------------------------------------------------
def write_report(root: Path, cfg: DemoConfig, stages: StageRunner, summary: dict, samples: dict) -> Path:
    from nanoseek.rl_report import plot_rl

    plots = plot_rl(root / "rl", root / "plots")
    ev = {k: stages.done[f"eval_{k}"]["result"] for k in ("base", "rl", "control")}
    lines = [f"# nanoseek demo: R1-Zero on `{cfg.task}` (seed {cfg.seed})", "",
             f"Total time {summary['seconds_total'] / 60:.1f} min. Held-out split, {cfg.eval_n} problems, "
             f"pass@1 = mean accuracy over {cfg.eval_samples} samples.", "",
             f"Pretraining: {cfg.batch_size} rows x {cfg.seq_len} tokens per step, lr {cfg.base_lr:g}, difficulty "
             f"{cfg.difficulty}, flawed share {cfg.flawed_share:g}. GRPO: G {cfg.group_size} x {cfg.prompts_per_step} "
             f"prompts per step, lr {cfg.rl_lr:g}, rollout temperature {cfg.rl_temperature:g}, routing-bias speed "
             f"{cfg.rl_bias_gamma:g}{' (frozen)' if cfg.rl_bias_gamma == 0 else ''}. All settings: demo_config.json.", ""]
    paired = stages.done["grpo_and_control"]["result"]
    cores = f"{paired['threads']} thread{'s' if paired['threads'] > 1 else ''}"
    how = {"base": f"pretrain {cfg.base_steps} steps ({stages.seconds('pretrain_base') / 60:.1f} min)",
           "rl": f"base + GRPO {cfg.rl_steps} steps ({stages.seconds('grpo_and_control') / 60:.1f} min, {cores})",
           "control": f"base + {summary['control_steps']} more pretraining steps "
                      f"({paired['control_seconds'] / 60:.1f} min, {cores}, alongside GRPO)"}
    lines += pass_table_lines([(k, how[k], r) for k, r in ev.items()])
    lines += ["", "## RL curves", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    lines += ["", "Pretraining report of the base: [base/report.md](base/report.md)", "",
              "## Sample completions (held-out problems, temperature 1.0)", ""]
    lines += sample_lines(samples)
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ---- the pipeline -------------------------------------------------------------------------------------
def run_demo(cfg: DemoConfig, until: str | None = None) -> dict | None:
    """Run (or resume) the demo in cfg.out; returns the summary, or None when stopped after stage `until`."""
    cfg.validate()
    root = Path(cfg.out)
    stages = StageRunner(root, {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}, until=until,
                         names=STAGES)
    atomic_write_text(root / "demo_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    random.seed(cfg.seed)
    base, rl, control = root / "base", root / "rl", root / "control"
    try:
        stages.run("pretrain_base", lambda: _pretrain(base, cfg, cfg.base_steps))
        stages.run("eval_base", lambda: eval_run(base, cfg))
        paired = stages.run("grpo_and_control", lambda: _grpo_and_control(base, rl, control, cfg))
        stages.run("eval_rl", lambda: eval_run(rl, cfg))
        stages.run("eval_control", lambda: eval_run(control, cfg))
        samples = stages.run("samples", lambda: sample_completions({"base": base, "rl": rl}, cfg))
    except StopAfter as stop:
        console.print(f"stopped after stage {stop}; rerun without --until to continue")
        return None
    ev = {k: stages.done[f"eval_{k}"]["result"] for k in ("base", "rl", "control")}
    summary = {"task": cfg.task, "seed": cfg.seed,
               "base_pass1": ev["base"]["pass1"], "rl_pass1": ev["rl"]["pass1"],
               "base_pass1_t1": ev["base"]["pass1_t1"], "rl_pass1_t1": ev["rl"]["pass1_t1"],
               "base_greedy": ev["base"]["greedy"], "rl_greedy": ev["rl"]["greedy"],
               "control_pass1": ev["control"]["pass1"], "control_pass1_t1": ev["control"]["pass1_t1"],
               "control_greedy": ev["control"]["greedy"], "control_steps": paired["control_steps"],
               "control_seconds": round(paired["control_seconds"], 1), "threads_rl_and_control": paired["threads"],
               "eval_n": cfg.eval_n, "eval_samples": cfg.eval_samples, **stages.timing()}
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    report = write_report(root, cfg, stages, summary, samples)
    print_pass_table(f"before / after RL (held-out {cfg.task}, n={cfg.eval_n})", ev)
    console.print(f"total {summary['seconds_total'] / 60:.1f} min; report: {report}; summary: {root / 'summary.json'}")
    return summary
