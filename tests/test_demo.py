"""The whole R1-Zero pipeline in seconds (smoke scale): every stage runs, the outputs exist with the
documented keys, and an interrupted demo resumes where it stopped."""
import json

import pytest

from nanoseek.commands import demo

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
    stages = json.loads((tmp_path / "demo" / "stages.json").read_text())
    assert "pretrain_base" in stages and "eval_base" in stages and "grpo_and_control" not in stages
    summary = demo.run_demo(cfg)  # the rerun skips the finished stages
    assert calls["n"] == 2
    root = tmp_path / "demo"
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
