"""`nanoseek aha`: GRPO logs the reflection metrics per step; the whole pipeline end to end (smoke, slow) with
the summary keys of issue 14, and resumability (a rerun skips every finished stage)."""
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


def test_aha_rejects_bad_settings(tmp_path):
    from nanoseek.commands.aha import AhaConfig

    with pytest.raises(ConfigError):
        AhaConfig(out=str(tmp_path), reflect_share=2.0).validate()
    assert main(["aha", "--out", str(tmp_path), "--rl-steps", "0"]) == 2


@pytest.mark.slow
def test_aha_smoke_end_to_end_and_resume(tmp_path):
    out = tmp_path / "aha"
    assert main(["aha", "--smoke", "--out", str(out), "--until", "eval_rl"]) == 0
    assert not (out / "summary.json").exists()
    assert main(["aha", "--smoke", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ("base_check_rate", "rl_check_rate", "base_len", "rl_len", "base_pass1", "rl_pass1",
                "long_tokens_per_correct", "seconds_total"):
        assert key in s
    assert set(s["long2short"]) == {"l2s_length", "l2s_shortest", "l2s_dpo", "l2s_merge"}
    assert (out / "report.md").read_text().startswith("# nanoseek aha")
    rows = read_metrics(out / "rl" / "metrics.jsonl")
    assert rows and all("check_rate" in r for r in rows)
    before = (out / "stages.json").read_text()
    assert main(["aha", "--smoke", "--out", str(out)]) == 0  # everything done: only the report is rewritten
    assert (out / "stages.json").read_text() == before
