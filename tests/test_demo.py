"""The whole R1-Zero pipeline in seconds (smoke scale): every stage runs, the outputs exist with the
documented keys, and an interrupted demo resumes where it stopped, also from a stages.json written before the
recipe moved onto nanoseek.recipes.stages."""
import dataclasses
import json

import pytest

from nanoseek.config import ConfigError
from nanoseek.recipes import demo

KEYS = {"task", "base_pass1", "rl_pass1", "base_pass1_t1", "rl_pass1_t1", "base_greedy", "rl_greedy",
        "control_pass1", "control_pass1_t1", "eval_n", "seconds_total"}


def test_demo_smoke_runs_every_stage_and_resumes_after_interrupt(tmp_path, monkeypatch):
    cfg = demo.DemoConfig.smoke(str(tmp_path / "demo"))
    real_rl = demo._rl
    calls = {"n": 0}

    def interrupted_rl(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real_rl(*a, **kw)

    monkeypatch.setattr(demo, "_rl", interrupted_rl)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(cfg)
    root = tmp_path / "demo"
    state = json.loads((root / "stages.json").read_text())
    done, partial = state["done"], state["partial_s"]
    assert set(done) == {"pretrain_base", "eval_base"} and partial["grpo_and_control"] > 0
    # the run directory as the demo's earlier stage class left it: stages at the top level, no settings
    old = {**done, "_grpo_and_control_partial_s": partial["grpo_and_control"]}
    (root / "stages.json").write_text(json.dumps(old))
    evaluated = []
    real_eval = demo.eval_run
    monkeypatch.setattr(demo, "eval_run", lambda run, c: evaluated.append(run.name) or real_eval(run, c))
    summary = demo.run_demo(cfg)  # the rerun skips the finished stages
    assert calls["n"] == 2 and evaluated == ["rl", "control"]
    state = json.loads((root / "stages.json").read_text())
    assert state["done"]["pretrain_base"] == done["pretrain_base"] and state["partial_s"] == {}
    assert state["done"]["grpo_and_control"]["seconds"] >= partial["grpo_and_control"]  # both attempts count
    assert summary["seconds_by_stage"]["pretrain_base"] == round(done["pretrain_base"]["seconds"], 1)
    on_disk = json.loads((root / "summary.json").read_text())
    assert KEYS <= set(on_disk) and on_disk == json.loads(json.dumps(summary))
    for key in KEYS - {"task", "eval_n", "seconds_total"}:
        assert 0.0 <= on_disk[key] <= 1.0
    report = (root / "report.md").read_text()
    assert "pass@1 T=0.6" in report and "plots/rl_reward.png" in report
    assert f"rollout temperature {cfg.rl_temperature:g}" in report and "(frozen)" in report
    for name in ("rl_reward.png", "rl_length.png", "rl_kl_entropy.png", "rl_expert_load.png"):
        assert (root / "plots" / name).stat().st_size > 1000
    assert (root / "base" / "report.md").exists()
    # the control ran in its own process beside GRPO and stopped when GRPO did
    assert on_disk["control_steps"] >= 1 and on_disk["control_seconds"] > 0 and "alongside GRPO" in report
    assert "paced budget ran out" in (root / "control" / "log.txt").read_text()
    with pytest.raises(ConfigError, match="rl_steps"):  # finished stages would not match other settings
        demo.run_demo(dataclasses.replace(cfg, rl_steps=3))


@pytest.mark.parametrize("flag, value", [("--rl-bias-gamma", "-1"), ("--prompts-per-step", "0"),
                                         ("--flawed-share", "1.5")])
def test_demo_rejects_bad_settings_before_any_work(tmp_path, capsys, flag, value):
    """A bad value fails in one line at once, not after minutes of pretraining, and writes nothing."""
    from nanoseek.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), flag, value]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag.lstrip("-").replace("-", "_") in err[0]
    assert not out.exists()


def test_demo_freezes_the_routing_bias_during_rl_by_default(tmp_path, monkeypatch):
    """The demo's RL stage runs with the MoE bias update off unless --rl-bias-gamma turns it on."""
    seen = []
    monkeypatch.setattr("nanoseek.train.grpo.train_grpo", lambda init, out, cfg, **kw: seen.append(cfg) or {})
    (tmp_path / "rl").mkdir()
    demo._rl(tmp_path / "base", tmp_path / "rl", demo.DemoConfig(out=str(tmp_path)))
    demo._rl(tmp_path / "base", tmp_path / "rl", demo.DemoConfig(out=str(tmp_path), rl_bias_gamma=1e-4))
    assert (seen[0].bias_update, seen[1].bias_update, seen[1].bias_gamma) == (False, True, 1e-4)
