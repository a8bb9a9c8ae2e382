"""`nanoseek aha --reflection` (issue 14, nanoseek.recipes.aha_reflection): GRPO logs the reflection metrics per step; the whole pipeline end to end (smoke, slow) with
the summary keys of issue 14, and resumability (a rerun skips every finished stage)."""
import dataclasses
import json

import pytest

from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.corpus import corpus_texts
from nanoseek.tasks.reflection import reflection_stats
from nanoseek.train.grpo import GRPOConfig, train_grpo
from nanoseek.train.metrics import read_metrics
from tiny_runs import write_tiny_run


def test_grpo_logs_check_metrics_per_step(tmp_path, monkeypatch):
    run = tmp_path / "base"
    run.mkdir()
    write_tiny_run(run, corpus_texts("arithmetic", 300, seed=0, reflect_share=0.5))
    seen = []
    import nanoseek.train.grpo as grpo

    real = grpo.reflection_stats

    def spy(texts):
        seen.append(list(texts))
        return real(texts)

    monkeypatch.setattr(grpo, "reflection_stats", spy)
    cfg = GRPOConfig(steps=2, group_size=4, prompts_per_step=2, max_new_tokens=12, ckpt_every=2)
    train_grpo(run, tmp_path / "rl", cfg, device="cpu", quiet=True)
    rows = read_metrics(tmp_path / "rl" / "metrics.jsonl")
    assert len(rows) == 2 and len(seen) == 2
    for row, texts in zip(rows, seen):
        assert len(texts) == 8  # every rollout of the step
        want = reflection_stats(texts)
        assert row["check_rate"] == want["check_rate"] and row["check_changed_rate"] == want["check_changed_rate"]
        assert row["attempts_mean"] == want["attempts_mean"] == 0.0  # no search traces in arithmetic


def test_aha_rejects_bad_settings(tmp_path):
    from nanoseek.recipes.aha_reflection import AhaConfig

    with pytest.raises(ConfigError):
        AhaConfig(out=str(tmp_path), reflect_share=2.0).validate()
    assert main(["aha", "--reflection", "--out", str(tmp_path), "--rl-steps", "3"]) == 2  # only out/seed/until/smoke
    assert main(["aha", "--reflection", "--out", str(tmp_path), "--until", "diagnostic"]) == 2  # not its stage


def test_first_reach_uses_the_trailing_mean():
    from nanoseek.recipes.aha_reflection import first_reach

    curve = [(s, 10.0 * s, a) for s, a in enumerate([0.1, 0.9, 0.1, 0.6, 0.6, 0.7], start=1)]
    assert first_reach(curve, 0.6, 1) == (2, 20.0)  # a single step at 0.9
    assert first_reach(curve, 0.6, 2) == (5, 50.0)  # (0.1 + 0.9) / 2 = 0.5 < 0.6, (0.6 + 0.6) / 2 >= 0.6
    assert first_reach(curve, 0.8, 2) is None
    assert first_reach([], 0.1, 1) is None


def test_runs_from_before_the_cold_start_stages_resume_into_them():
    from nanoseek.recipes.aha_reflection import AhaConfig, same_settings

    cfg = AhaConfig(out="x", seed=1)
    saved = dataclasses.asdict(cfg)
    assert same_settings(saved, cfg)
    old = {k: v for k, v in saved.items() if k != "cold_traces"}  # written before the field existed
    assert same_settings(old, cfg)
    assert not same_settings(old, dataclasses.replace(cfg, cold_traces=5))  # a new setting off its default
    assert not same_settings({**saved, "rl_steps": 7}, cfg)
    assert not same_settings({**saved, "gone": 1}, cfg)


@pytest.mark.slow
def test_aha_smoke_end_to_end_and_resume(tmp_path):
    out = tmp_path / "aha"
    assert main(["aha", "--reflection", "--smoke", "--out", str(out), "--until", "eval_rl"]) == 0
    assert not (out / "summary.json").exists()
    assert main(["aha", "--reflection", "--smoke", "--out", str(out), "--until", "samples"]) == 0  # the pipeline, no cold start
    assert json.loads((out / "summary.json").read_text())["cold_start"] is None
    assert "Not run yet" in (out / "report.md").read_text()
    assert main(["aha", "--reflection", "--smoke", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ("base_check_rate", "rl_check_rate", "base_len", "rl_len", "base_pass1", "rl_pass1",
                "long_tokens_per_correct", "seconds_total"):
        assert key in s
    assert set(s["long2short"]) == {"l2s_length", "l2s_shortest", "l2s_dpo", "l2s_merge"}
    cc = s["check_credit"]
    assert set(cc) == {"base", "rl"} and cc["base"]["samples"] == 20 * 4  # 5 x eval_n problems x G
    cs = s["cold_start"]
    assert cs["traces"] == 20 and cs["sft_steps"] >= 1 and cs["rl_steps"] >= 1
    assert cs["r1zero_rl_steps"] == 2 and 0 <= cs["r1zero_final_rollout_acc"] <= 1
    for key in ("cold_pass1", "cold_sft_pass1", "r1zero_pass1", "cold_check_rate", "cold_len"):
        assert key in cs
    assert (out / "cold_rl" / "metrics.jsonl").exists() and "## Cold start" in (out / "report.md").read_text()
    assert (out / "report.md").read_text().startswith("# nanoseek aha")
    rows = read_metrics(out / "rl" / "metrics.jsonl")
    assert rows and all("check_rate" in r for r in rows)
    before = (out / "stages.json").read_text()
    assert main(["aha", "--reflection", "--smoke", "--out", str(out)]) == 0  # everything done: only the report is rewritten
    assert (out / "stages.json").read_text() == before


def test_targets_on_a_hand_written_summary():
    from nanoseek.recipes.aha_reflection import targets

    s = {"base_check_rate": 0.1, "rl_check_rate": 0.2, "base_len": 20.0, "rl_len": 19.0, "base_pass1": 0.5,
         "rl_pass1": 0.61, "long_tokens_per_correct": 30.0,
         "long2short": {"a": {"tokens_per_correct": 21.0, "pass1": 0.59},  # -30%, -2 points: meets it
                        "b": {"tokens_per_correct": 21.1, "pass1": 0.61},  # only -29.7%
                        "c": {"tokens_per_correct": 10.0, "pass1": 0.58},  # -3 points
                        "d": None}}
    t = targets(s)
    assert (t["check_rate_doubles"], t["length_rises"], t["pass1_plus_10"]) == (True, False, True)
    assert t["long2short_methods_meeting_target"] == ["a"]
    assert not targets({**s, "rl_check_rate": 0.19})["check_rate_doubles"]
    assert not targets({**s, "rl_len": 20.9})["length_rises"] and targets({**s, "rl_len": 21.0})["length_rises"]


def test_check_credit_on_scripted_rollouts(monkeypatch, tmp_path):
    """Every group: one checked, right completion whose check changed a step, one plain wrong one. GRPO's
    advantages are then +-0.5 / std([1.1, 0.1]) = +-1/sqrt(2) (closed form)."""
    import math
    from types import SimpleNamespace

    import nanoseek.engine
    import nanoseek.tokenizer
    import nanoseek.train.checkpoint
    from nanoseek.recipes.aha_reflection import AhaConfig, check_credit

    class FakeEngine:
        def __init__(self, model, tok):
            pass

        def generate(self, prompts, max_new_tokens, temperature, seed):
            outs = []
            for i, p in enumerate(prompts):
                ans = eval(p[len("Compute "):-1].replace("/", "//"))
                text = (f"<think>1+1=3. check: 1+1=2.</think><answer>{ans}</answer>" if i % 2 == 0
                        else f"<think></think><answer>{ans + 1}</answer>")
                outs.append(SimpleNamespace(text=text, tokens=[0] * (12 if i % 2 == 0 else 5), finish_reason="stop"))
            return outs

    monkeypatch.setattr(nanoseek.engine, "Engine", FakeEngine)
    monkeypatch.setattr(nanoseek.train.checkpoint, "load_run_model", lambda run: (None, None, None))
    monkeypatch.setattr(nanoseek.tokenizer.Tokenizer, "load",
                        staticmethod(lambda path: SimpleNamespace(prompt_ids=lambda prompt: prompt)))
    c = check_credit(tmp_path, AhaConfig(out=str(tmp_path), group_size=2, eval_n=3))
    assert c["samples"] == 5 * 3 * 2 and c["check_rate"] == 0.5
    assert (c["pass1_checked"], c["pass1_not_checked"], c["check_changed_share_of_checks"]) == (1.0, 0.0, 1.0)
    assert c["pass1_check_changed"] == 1.0 and c["pass1_check_unchanged"] is None
    assert math.isclose(c["mean_advantage_checked"], 1 / math.sqrt(2), rel_tol=1e-3)
    assert math.isclose(c["mean_advantage_not_checked"], -1 / math.sqrt(2), rel_tol=1e-3)
    assert (c["len_checked"], c["len_not_checked"]) == (12, 5)


def test_evaluate_long_on_scripted_samples(monkeypatch, tmp_path):
    """The held-out figures behind the summary (base_/rl_ pass1, len, check_rate, long_tokens_per_correct) on
    scripted samples, against values counted by hand. Each problem at T=0.6 gets three samples: a checked right
    one (12 tokens), a plain wrong one (5) and a plain right one (8); T=1.0 is always wrong, greedy always
    right. Swapping right and checked, averaging lengths over the wrong samples or mixing the temperatures
    changes some figure below."""
    from types import SimpleNamespace

    import nanoseek.engine
    import nanoseek.tokenizer
    import nanoseek.train.checkpoint
    from nanoseek.recipes.aha_reflection import AhaConfig, evaluate_long

    class FakeEngine:
        def __init__(self, model, tok):
            pass

        def generate(self, prompts, max_new_tokens, temperature, top_p, seed):
            outs = []
            for i, p in enumerate(prompts):
                ans = eval(p[len("Compute "):-1].replace("/", "//"))
                kind = "right" if temperature == 0.0 else "wrong" if temperature == 1.0 else \
                    ("checked", "wrong", "right")[i % 3]
                text, n = {"checked": (f"<think>1+1=3. check: 1+1=2.</think><answer>{ans}</answer>", 12),
                           "wrong": (f"<think></think><answer>{ans + 1}</answer>", 5),
                           "right": (f"<think></think><answer>{ans}</answer>", 8)}[kind]
                outs.append(SimpleNamespace(text=text, tokens=[0] * n, finish_reason="stop"))
            return outs

    monkeypatch.setattr(nanoseek.engine, "Engine", FakeEngine)
    monkeypatch.setattr(nanoseek.train.checkpoint, "load_run_model", lambda run: (None, None, None))
    monkeypatch.setattr(nanoseek.train.checkpoint, "latest_checkpoint", lambda path: path / "step_1")
    monkeypatch.setattr(nanoseek.tokenizer.Tokenizer, "load",
                        staticmethod(lambda path: SimpleNamespace(prompt_ids=lambda prompt: prompt)))
    r = evaluate_long(tmp_path, AhaConfig(out=str(tmp_path), eval_n=4, eval_samples=3))
    assert (r["pass1"], r["pass1_t1"], r["greedy"]) == (pytest.approx(2 / 3), 0.0, 1.0)
    assert r["mean_len"] == pytest.approx((12 + 5 + 8) / 3) and r["tokens_per_correct"] == pytest.approx(10.0)
    assert r["check_rate"] == pytest.approx(1 / 3) and r["check_changed_rate"] == pytest.approx(1 / 3)
    assert r["pass1_when_checked"] == 1.0 and r["pass1_when_not_checked"] == pytest.approx(0.5)
