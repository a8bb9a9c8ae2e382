"""What the recipes (demo, r1, aha) share to evaluate, time and report their models, in one place.

- `eval_run`: the demo's held-out evaluation of a run directory (pass@1 at T=0.6 / top-p 0.95 and T=1.0 over
  `eval_samples` samples, greedy, format rate, mean length: nanoseek.evaluate);
- `sample_completions` / `sample_lines`: a few held-out problems with every model's completion, as markdown;
- `pass_table_lines` / `print_pass_table`: the models-by-accuracy table of report.md and of the terminal;
- `grpo_used_seconds` / `grpo_seconds_by_step`: a GRPO run's training time, summed over resumes (its metrics'
  elapsed_s restarts at every resume).
"""
from __future__ import annotations

from pathlib import Path

from nanoseek.recipes.stages import console

PASS_HEADER = ["| model | training | pass@1 T=0.6 | pass@1 T=1.0 | greedy | format | mean length |",
               "|---|---|---|---|---|---|---|"]


# ---- evaluation and samples -----------------------------------------------------------------------------
def eval_run(run: Path, cfg) -> dict:
    """Held-out evaluation of the model in run directory `run`; `cfg` is any config with task, difficulty,
    eval_n, eval_samples and max_new_tokens (DemoConfig, AhaConfig). Fixed evaluation seed 1234."""
    from nanoseek.evaluate import evaluate
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import load_run_model

    model, _, _ = load_run_model(run)
    res = evaluate(model, Tokenizer.load(run / "tokenizer.json"), cfg.task, cfg.eval_n, cfg.eval_samples,
                   cfg.max_new_tokens, seed=1234, difficulty=cfg.difficulty).to_dict()
    console.print(f"{run.name}: pass@1 T=0.6 {res['pass1']:.1%}  T=1.0 {res['pass1_t1']:.1%}  "
                  f"greedy {res['greedy']:.1%}  format {res['format_rate']:.1%}")
    return res


def sample_completions(runs: dict[str, Path], cfg, k: int = 4, temperature: float = 1.0,
                       top_p: float | None = None) -> dict:
    """A few held-out problems with each model's completion at `temperature` (seeded); `cfg` is any config with
    task, difficulty, max_new_tokens and seed (DemoConfig, AhaConfig)."""
    from nanoseek.engine import Engine
    from nanoseek.evaluate import test_problems
    from nanoseek.tasks import get_task
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import load_run_model

    task = get_task(cfg.task)
    problems = test_problems(cfg.task, k, seed=99, difficulty=cfg.difficulty)
    out = {"problems": [p.prompt for p in problems]}
    for name, run in runs.items():
        model, _, _ = load_run_model(run)
        tok = Tokenizer.load(run / "tokenizer.json")
        gens = Engine(model, tok).generate([tok.prompt_ids(p.prompt) for p in problems], cfg.max_new_tokens,
                                           temperature=temperature, top_p=top_p, seed=cfg.seed)
        out[name] = [{"text": g.text, "correct": task.score(p, g.text, g.finish_reason == "length").correct}
                     for p, g in zip(problems, gens)]
    return out


# ---- report lines -------------------------------------------------------------------------------------
def sample_lines(samples: dict, labels: dict[str, str] | None = None) -> list[str]:
    """Markdown of `sample_completions`' result: each problem in bold, then every model's completion (its label,
    else its name) marked correct or wrong."""
    lines = []
    for i, prob in enumerate(samples["problems"]):
        lines += [f"**{prob}**", ""]
        for name in samples:
            if name == "problems":
                continue
            s = samples[name][i]
            lines.append(f"- {(labels or {}).get(name, name)} ({'correct' if s['correct'] else 'wrong'}): `{s['text']}`")
        lines.append("")
    return lines


def pass_table_lines(rows: list[tuple[str, str, dict]]) -> list[str]:
    """Markdown table of (model, how it was trained, eval_run result) rows."""
    return PASS_HEADER + [f"| {name} | {how} | {r['pass1']:.1%} | {r['pass1_t1']:.1%} | {r['greedy']:.1%} | "
                          f"{r['format_rate']:.1%} | {r['mean_len']:.1f} |" for name, how, r in rows]


def print_pass_table(title: str, ev: dict[str, dict], labels: dict[str, str] | None = None) -> None:
    """One row per evaluated model (its label, else its key): pass@1 at T=0.6 and T=1.0, and greedy."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("model", "pass@1 T=0.6", "pass@1 T=1.0", "greedy"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for k, r in ev.items():
        table.add_row((labels or {}).get(k, k), f"{r['pass1']:.1%}", f"{r['pass1_t1']:.1%}", f"{r['greedy']:.1%}")
    console.print(table)


# ---- GRPO time ----------------------------------------------------------------------------------------
def _grpo_elapsed(run: Path) -> list[tuple[int, float]]:
    """(step, training seconds up to it) for every metrics row in file order, the segments of a resumed run
    (elapsed_s restarting below its previous value) summed."""
    from nanoseek.train.metrics import read_metrics

    out, total, prev = [], 0.0, 0.0
    for r in read_metrics(run / "metrics.jsonl"):
        if r["elapsed_s"] < prev:
            total += prev
        prev = r["elapsed_s"]
        out.append((r["step"], total + prev))
    return out


def grpo_seconds_by_step(run: Path) -> dict[int, float]:
    """Training seconds (summed over resumes) at each logged GRPO step."""
    return dict(_grpo_elapsed(run))


def grpo_used_seconds(run: Path) -> float:
    """Training time of a GRPO run up to its last checkpoint (0 without one): what an arm's budget has paid."""
    from nanoseek.train.checkpoint import latest_checkpoint, read_state

    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is None:
        return 0.0
    last, used = int(read_state(ckpt)["step"]), 0.0
    for step, seconds in _grpo_elapsed(run):
        if step > last:
            break
        used = seconds
    return used


def plot_rl_curves(rl_runs: dict[str, Path], panels: list[tuple[str, str]], path: Path,
                   dashed: dict[str, tuple[str, str]] | None = None) -> Path | None:
    """R1 fig. 3 in miniature: one panel per (metrics key, title), raw per-step values and their EMA for each run;
    `dashed`: panel key -> (another key drawn dashed in that panel, its label suffix). None without metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nanoseek.report import ema, save_figure
    from nanoseek.train.metrics import read_metrics

    data = {k: read_metrics(r / "metrics.jsonl") for k, r in rl_runs.items()}
    if not any(data.values()):
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for name, rows in data.items():
            if not rows:
                continue
            steps, ys = [r["step"] for r in rows], [r.get(key) or 0.0 for r in rows]
            ax.plot(steps, ys, lw=0.6, alpha=0.3)
            ax.plot(steps, ema(ys), lw=1.5, label=name, color=ax.lines[-1].get_color())
            if dashed and key in dashed:
                other, suffix = dashed[key]
                ax.plot(steps, ema([r.get(other) or 0.0 for r in rows]), lw=1.2, ls="--", label=f"{name}: {suffix}",
                        color=ax.lines[-1].get_color())
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return path

