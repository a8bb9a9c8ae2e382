"""The report of `nanoseek aha` (nanoseek.recipes.aha): report.md, the RL curves (R1 fig. 3 in miniature:
length, attempts, accept rate, accuracy per step), and the table over seeds (`--seeds-report`)."""
from __future__ import annotations

import json
from pathlib import Path

from nanoseek.config import ConfigError
from nanoseek.io import atomic_write_text
from nanoseek.recipes.aha import LABELS, METHODS, AhaConfig
from nanoseek.recipes.report import plot_rl_curves


def plot_curves(rl_runs: dict[str, Path], path: Path) -> Path | None:
    """R1 fig. 3 in miniature: mean response length, attempts per completion, accept rate and accuracy per step."""
    return plot_rl_curves(rl_runs, [("response_len_mean", "mean response length (tokens)"),
                                    ("attempts_mean", "attempts per completion"),
                                    ("accept_rate", "completions that accept an attempt (yes.)"),
                                    ("accuracy", "rollout accuracy")], path)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v, f: str = ".1f") -> str:
    return "-" if v is None else format(v, f)


def _forced_lines(d: dict) -> list[str]:
    """The budget-forcing probe's line (`aha.forced_search`), if the diagnostic ran it."""
    f = d.get("forced")
    if not f:
        return []
    return ["", f"Forced search (each give-up resumed with the next attempt, at most 8 times; the same samples "
                f"otherwise): pass@1 {_pct(f['pass1'])} against the base's own {_pct(d['pass1'])}, attempts "
                f"{_num(f['attempts_mean'], '.2f')} against {_num(d['attempts_mean'], '.2f')}, "
                f"{_pct(f['forced_share'])} of the samples forced: "
                + ("searching longer would pay." if f["pass1"] > d["pass1"] else "searching longer would not pay.")]


def write_report(root: Path, cfg: AhaConfig, s: dict, samples: dict | None) -> Path:
    from nanoseek.recipes.report import sample_lines
    from nanoseek.tasks.search_diagnostic import diagnostic_table

    plot = plot_curves({f"seed {cfg.seed}": root / "rl"}, root / "plots" / "aha_curves.png")
    t = s["targets"]
    yes = {True: "yes", False: "no"}
    lines = [f"# nanoseek aha: Countdown search, task {cfg.task} (seed {cfg.seed})", "",
             f"Total {s['seconds_total'] / 60:.1f} min. Corpus: {cfg.persist:g} of the traces never give up, the rest "
             f"after a `no.` with probability {cfg.give_up:g}; base {cfg.base_steps} steps of "
             f"{cfg.batch_size} x {cfg.seq_len} tokens"
             + (f", then a habit stage of {cfg.habit_steps} steps on lazy traces only (give-up {cfg.habit_give_up:g}, "
                f"none persists)" if cfg.habit_steps else "")
             + f"; GRPO {cfg.rl_steps} steps, G {cfg.group_size} x "
             f"{cfg.prompts_per_step} prompts, lr {cfg.rl_lr:g}, T {cfg.rl_temperature:g}, budget {cfg.max_new_tokens} "
             f"tokens. Held-out: {cfg.eval_n} problems x {cfg.eval_samples} samples at T=0.6, top-p 0.95.", "",
             "## Pre-RL diagnostic (the base's own samples of train problems, rollout temperature)", "",
             *diagnostic_table(s["diagnostic"]), "",
             f"Longer pays (correct longer than wrong, within groups and overall): {yes[s['diagnostic']['longer_pays']]}.",
             *_forced_lines(s["diagnostic"]),
             "", "## Base, RL, equal-time control (held-out, T=0.6)", "",
             "| model | pass@1 | mean length | attempts | tokens per correct |", "|---|---|---|---|---|"]
    rows = [("base", "base (RL's start)"), ("rl", "RL"), ("control", "control (pretrained for RL's seconds)"),
            ("control_lazy", "control on the habit corpus (pretrained for RL's seconds)")]
    if s.get("habit_steps"):
        rows.insert(0, ("skill", f"base before its {s['habit_steps']}-step habit stage"))
    for pre, label in rows:
        if s.get(f"{pre}_pass1") is None:
            lines.append(f"| {label} | not run | | | |")
            continue
        ev = {"base": ("base_len", "base_attempts", "base_tokens_per_correct"), "skill": ("skill_len", "skill_attempts", None),
              "rl": ("rl_len", "rl_attempts", "long_tokens_per_correct"), "control": ("control_len", None, None),
              "control_lazy": ("control_lazy_len", None, None)}[pre]
        lines.append(f"| {label} | {_pct(s[f'{pre}_pass1'])} | {_num(s[ev[0]])} | "
                     f"{_num(s[ev[1]], '.2f') if ev[1] else '-'} | {_num(s[ev[2]]) if ev[2] else '-'} |")
    lines += ["", f"Targets: length >= 1.5x base {yes[t['length_x1_5']]} ({s['rl_len'] / s['base_len']:.2f}x); "
              f"pass@1 +15 points {yes[t['pass1_plus_15']]} ({100 * (s['rl_pass1'] - s['base_pass1']):+.1f}); "
              f"ahead of the control {yes[t['ahead_of_control']]}"
              + (f", of the habit-corpus control {yes[t['ahead_of_lazy_control']]}" if s.get("control_lazy_pass1") is not None
                 else "") + ".", ""]
    if plot:
        lines += [f"![RL curves](plots/{plot.name})", ""]
    r = s["rl_rollouts"]
    if r:
        lines += ["During RL (rollouts, first -> last 10% of steps): "
                  f"length {_num(r['response_len_mean_first'])} -> {_num(r['response_len_mean_last'])}, attempts "
                  f"{_num(r['attempts_mean_first'], '.2f')} -> {_num(r['attempts_mean_last'], '.2f')}, accept rate "
                  f"{_pct(r['accept_rate_first'])} -> {_pct(r['accept_rate_last'])}, accuracy {_pct(r['accuracy_first'])} -> "
                  f"{_pct(r['accuracy_last'])}.", ""]
    if "rl" in s["eval_diagnostic"]:
        lines += ["Held-out diagnostic, base -> RL:", "", "| measure | base | RL |", "|---|---|---|"]
        b, q = s["eval_diagnostic"]["base"], s["eval_diagnostic"]["rl"]
        for key, f in (("verify_yes_precision", _pct), ("value_right", _pct), ("answer_copies_accepted", _pct),
                       ("gave_up_rate", _pct), ("attempts_correct", _num), ("attempts_wrong", _num),
                       ("cov_len_reward_within_group", lambda v: _num(v, ".2f"))):
            lines.append(f"| {key} | {f(b[key])} | {f(q[key])} |")
        lines.append("")
    lines += ["## long2short from the RL model (held-out, T=0.6)", "",
              "| method | tokens per correct | vs long | pass@1 | vs long |", "|---|---|---|---|---|",
              f"| long (RL) model | {_num(s['long_tokens_per_correct'])} | | {_pct(s['rl_pass1'])} | |"]
    for m in METHODS:
        x = s["long2short"][m]
        if x is None:
            lines.append(f"| {LABELS[m]} | not run | | | |")
            continue
        rel = "-" if x["tokens_per_correct"] is None or not s["long_tokens_per_correct"] else \
            f"{x['tokens_per_correct'] / s['long_tokens_per_correct'] - 1:+.0%}"
        lines.append(f"| {LABELS[m]} | {_num(x['tokens_per_correct'])} | {rel} | {_pct(x['pass1'])} | "
                     f"{100 * (x['pass1'] - s['rl_pass1']):+.1f} pt |")
    lines += ["", "Methods at >= 30% fewer tokens per correct answer and <= 2 points lower pass@1: "
              + (", ".join(t["long2short_methods_meeting_target"]) or "none"), ""]
    p = s.get("partial")
    if p and "ordinary" in p:
        lines += ["## Partial rollouts vs ordinary GRPO (from the RL model)", "",
                  "| arm | steps | median s / step | rollout accuracy | mean length |", "|---|---|---|---|---|"]
        for k in ("ordinary", "partial"):
            lines.append(f"| {k} | {p[k]['steps']} | {_num(p[k]['median_s_per_step'], '.2f')} | "
                         f"{_pct(p[k]['rollout_accuracy'])} | {_num(p[k]['response_len_mean'])} |")
        lines += ["", f"Ordinary / partial seconds per step: {_num(p['speedup'], '.2f')}x (one thread, a loaded machine "
                  "gives provisional ratios).", ""]
    if samples:
        lines += ["## Samples: early (base) and late (RL) completions", "",
                  *sample_lines(samples, {"base": "base (early)", "rl": "RL (late)"})]
    lines += ["## Seconds by stage", "", ", ".join(f"{k} {v:.0f}" for k, v in s["seconds_by_stage"].items())]
    path = root / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def seeds_report(roots: list[Path], out: Path) -> Path:
    """docs-ready tables over several seeds' summary.json and their RL curves."""
    sums = []
    for r in roots:
        p = r / "summary.json"
        if not p.exists():
            raise ConfigError(f"{p} does not exist: run `nanoseek aha --out {r}` through eval_rl first")
        sums.append(json.loads(p.read_text()))
    lines = ["# nanoseek aha over seeds", "", "| seed | pass@1 base -> RL (control; habit-corpus control) | length base -> RL | attempts base -> RL "
             "| before the habit: pass@1, length | diagnostic: tokens correct / wrong, within-group cov, forced pass@1 "
             "| long2short meeting the target | partial speedup |", "|---|---|---|---|---|---|---|---|"]
    for s in sums:
        d = s["diagnostic"]
        lines.append(f"| {s['seed']} | {_pct(s['base_pass1'])} -> {_pct(s['rl_pass1'])} ({_pct(s['control_pass1'])}; "
                     f"{_pct(s.get('control_lazy_pass1'))}) | "
                     f"{_num(s['base_len'])} -> {_num(s['rl_len'])} | {_num(s['base_attempts'], '.2f')} -> "
                     f"{_num(s['rl_attempts'], '.2f')} | {_pct(s.get('skill_pass1'))}, {_num(s.get('skill_len'))} | "
                     f"{_num(d['len_correct'])} / {_num(d['len_wrong'])}, "
                     f"{_num(d['cov_len_reward_within_group'], '.2f')}, {_pct((d.get('forced') or {}).get('pass1'))} | "
                     f"{(', '.join(s['targets']['long2short_methods_meeting_target']) or 'none') if any(s['long2short'].values()) else 'not run'} | "
                     f"{_num((s.get('partial') or {}).get('speedup'), '.2f')} |")
    out.mkdir(parents=True, exist_ok=True)
    plot = plot_curves({f"seed {s['seed']}": r / "rl" for s, r in zip(sums, roots)}, out / "aha_curves_seeds.png")
    if plot:
        lines += ["", f"![RL curves, every seed]({plot.name})"]
    path = out / "seeds.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
