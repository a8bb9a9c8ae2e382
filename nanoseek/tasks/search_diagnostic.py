"""The pre-RL diagnostic of issue 28: does thinking longer pay in the base's own samples?

GRPO (R1 arXiv 2501.12948 sec. 2.2.1) pushes up completions that beat their group's mean reward. Length grows
under RL only if, within a group (same problem), the right completions are longer than the wrong ones; and a
search only pays if its verification is reliable and its answer copies what it verified. Computed here, from
problems, completion texts, token lengths and correctness (no model needed, so tests use hand-made completions):

- verification precision: of the attempts that say `yes.`, the share whose true value is the target; of
  those that say `no.`, the share whose true value is not the target; the share of attempts whose written
  value is right, and of those whose written target is the prompt's;
- the accuracy by number of attempts, and the mean attempts / tokens of correct vs wrong completions;
- the covariance between length (tokens) and reward (correct) over all samples, and its mean within groups
  of samples of the same problem (what GRPO's advantage sees);
- how often the answer copies the accepted attempt, and how often a search stops after a `no.` (gives up);
- what a wrong verdict comes from: the share of verdicts consistent with the attempt's *written* value and
  target (the comparison itself; a verdict can be consistent and still wrong when the value was miscomputed),
  and the share of written steps right given the written numbers before them (the arithmetic);
- by attempt position (1st, 2nd, ...): how many attempts, the share of their steps right and of their verdicts
  right (a base that never saw late positions of a search in its corpus computes them badly).

Simplification: "reward" here is correctness (0/1), the accuracy part of the RL reward; the 0.1 format reward
is left out so that the covariance reads as accuracy.
"""
from __future__ import annotations

from collections import defaultdict

from nanoseek.tasks.base import Problem, extract_answer
from nanoseek.tasks.search import parse_attempts


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _cov(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / len(xs)


def diagnose(problems: list[Problem], texts: list[str], lengths: list[int], correct: list[bool],
             group: list[int] | None = None) -> dict:
    """The diagnostic over samples i (problem, text, token length, correct); `group[i]` names the problem a
    sample belongs to (default: problem identity by prompt) for the within-group covariance."""
    n = len(texts)
    if not n == len(problems) == len(lengths) == len(correct):
        raise ValueError("diagnose needs as many problems, texts, lengths and correctness flags")
    group = group if group is not None else [hash(p.prompt) for p in problems]
    atts = [parse_attempts(t, p.meta.get("modulus", 0)) for t, p in zip(texts, problems)]
    yes = [(a, p) for al, p in zip(atts, problems) for a in al if a.verdict]
    no = [(a, p) for al, p in zip(atts, problems) for a in al if not a.verdict]
    all_att = [(a, p) for al, p in zip(atts, problems) for a in al]
    accepted = [next((a for a in al if a.verdict), None) for al in atts]
    answers = [extract_answer(t) for t in texts]
    n_att = [len(a) for a in atts]
    by_att: dict[int, list[bool]] = defaultdict(list)
    for k, c in zip(n_att, correct):
        by_att[k].append(c)
    y = [float(c) for c in correct]
    x = [float(v) for v in lengths]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group):
        groups[g].append(i)
    within = [c for idx in groups.values() if len(idx) > 1 and len({correct[i] for i in idx}) > 1
              for c in [_cov([x[i] for i in idx], [y[i] for i in idx])]]
    gave_up = [bool(al) and not al[-1].verdict for al in atts]
    by_pos: dict[int, list[tuple[bool, bool]]] = defaultdict(list)
    for al, p in zip(atts, problems):
        for k, a in enumerate(al):
            st = a.steps_right()
            by_pos[k + 1].append((sum(st) / len(st), a.verdict == (a.true_value() == p.meta["target"])))
    return {
        "samples": n, "pass1": _mean(y),
        "attempts_mean": _mean(n_att),
        "verify_yes_precision": _mean(a.true_value() == p.meta["target"] and a.target == p.meta["target"]
                                      for a, p in yes),
        "verify_no_precision": _mean(a.true_value() != p.meta["target"] for a, p in no),
        "yes_count": len(yes), "no_count": len(no),
        "value_right": _mean(a.value == a.true_value() for a, _ in all_att),
        "verdict_consistent": _mean(a.verdict == (a.value == a.target) for a, _ in all_att),
        "yes_consistent": _mean(a.value == a.target for a, _ in yes),
        "verdict_reads_check": _mean(a.verdict == ((a.check[1] == 0) if a.check else (a.value == a.target))
                                     for a, _ in all_att),
        "step_right": _mean(ok for a, _ in all_att for ok in a.steps_right()),
        "target_copied": _mean(a.target == p.meta["target"] for a, p in all_att),
        "answer_copies_accepted": _mean(ans == acc.expr for ans, acc in zip(answers, accepted) if acc is not None),
        "gave_up_rate": _mean(gave_up),
        "accuracy_by_attempts": {str(k): {"n": len(v), "pass1": sum(v) / len(v)} for k, v in sorted(by_att.items())},
        "by_position": {str(k): {"n": len(v), "steps_right": _mean(s for s, _ in v),
                                 "verdict_right": _mean(r for _, r in v)} for k, v in sorted(by_pos.items())},
        "len_correct": _mean(v for v, c in zip(x, correct) if c),
        "len_wrong": _mean(v for v, c in zip(x, correct) if not c),
        "attempts_correct": _mean(k for k, c in zip(n_att, correct) if c),
        "attempts_wrong": _mean(k for k, c in zip(n_att, correct) if not c),
        "cov_len_reward": _cov(x, y),
        "cov_len_reward_within_group": _mean(within),
        "mixed_groups": len(within),
    }


def longer_pays(d: dict) -> bool:
    """The condition RL needs (issue 28): correct samples longer than wrong ones, within groups (what GRPO
    compares) and overall."""
    w, c, r = d.get("cov_len_reward_within_group"), d.get("len_correct"), d.get("len_wrong")
    return w is not None and w > 0 and c is not None and r is not None and c > r


def diagnostic_table(d: dict) -> list[str]:
    """Markdown rows of the diagnostic (report and README)."""
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    def num(v, f=".1f"):
        return "-" if v is None else format(v, f)

    rows = ["| measure | value |", "|---|---|",
            f"| samples | {d['samples']} |", f"| pass@1 | {pct(d['pass1'])} |",
            f"| attempts per completion | {num(d['attempts_mean'], '.2f')} |",
            f"| `yes.` right (precision) | {pct(d['verify_yes_precision'])} of {d['yes_count']} |",
            f"| `no.` right | {pct(d['verify_no_precision'])} of {d['no_count']} |",
            f"| written value right | {pct(d['value_right'])} |",
            f"| written steps right (given the written numbers) | {pct(d.get('step_right'))} |",
            f"| verdict consistent with the written value | {pct(d.get('verdict_consistent'))} "
            f"(`yes.`: {pct(d.get('yes_consistent'))}) |",
            f"| verdict follows its own check line (difference 0 / value = target) | "
            f"{pct(d.get('verdict_reads_check'))} |",
            f"| target copied right | {pct(d['target_copied'])} |",
            f"| answer copies the accepted attempt | {pct(d['answer_copies_accepted'])} |",
            f"| stops after a `no.` (gives up) | {pct(d['gave_up_rate'])} |",
            f"| tokens correct / wrong | {num(d['len_correct'])} / {num(d['len_wrong'])} |",
            f"| attempts correct / wrong | {num(d['attempts_correct'], '.2f')} / {num(d['attempts_wrong'], '.2f')} |",
            f"| cov(length, reward) all / within group | {num(d['cov_len_reward'], '.2f')} / "
            f"{num(d['cov_len_reward_within_group'], '.2f')} ({d['mixed_groups']} mixed groups) |",
            "| pass@1 by attempts | " + ", ".join(f"{k}: {pct(v['pass1'])} (n {v['n']})"
                                                 for k, v in d["accuracy_by_attempts"].items()) + " |"]
    if d.get("by_position"):
        rows.append("| steps / verdicts right by attempt position | " + ", ".join(
            f"{k}: {pct(v['steps_right'])} / {pct(v['verdict_right'])} (n {v['n']})"
            for k, v in d["by_position"].items()) + " |")
    return rows
