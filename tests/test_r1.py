"""The R1 pipeline's dense student presets and `nanoseek r1` (the full toy-scale run is a slow test)."""

import pytest

from nanoseek import cli
from nanoseek.config import ModelConfig
from nanoseek.model import Transformer


def test_dense_presets_have_no_experts_and_match_their_moe_activated_size():
    for dense, moe in (("tiny-dense", "tiny"), ("small-dense", "small")):
        cfg = ModelConfig.preset(dense)
        assert cfg.n_moe_layers == 0 and cfg.n_mtp == 0
        assert cfg.kv_lora_rank == ModelConfig.preset(moe).kv_lora_rank  # MLA kept
        a, b = cfg.param_counts()["active"], ModelConfig.preset(moe).param_counts()["active"]
        assert abs(a - b) / b < 0.02, (dense, a, b)
    model = Transformer(ModelConfig.preset("tiny-dense"))
    assert not model.moe_layers()
    assert model.num_params() == ModelConfig.preset("tiny-dense").param_counts()["total"]


def test_info_lists_the_dense_presets(capsys):
    assert cli.main(["info", "--list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-dense" in out and "992,640" in out


KEYS = {f"{m}_{k}" for m in ("teacher", "student_base", "student_rl", "student_sft", "student_onpolicy",
                              "student_sft_rl") for k in ("pass1", "pass1_t1", "greedy")}


@pytest.mark.slow
def test_r1_smoke_runs_every_stage_and_resumes_after_interrupt(tmp_path, monkeypatch):
    """Toy scale: the smoke demo's teacher solves nothing, so the traces stage is replaced by gold solutions of
    train problems (what a perfect teacher would give); every other stage runs for real."""
    import json
    import random

    from nanoseek.recipes import r1
    from nanoseek.tasks import get_task

    def gold_traces(root, cfg, dcfg):
        task, rng = get_task(dcfg.task), random.Random(0)
        rows = []
        for i in range(24):
            p = task.sample_split(rng, dcfg.difficulty, "train")
            rows.append({"prompt": p.prompt, "completion": task.solution(p, rng), "problem_id": i})
        (root / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"problems_solved": 24, "rows_kept": 24, "mean_tokens": 20.0}

    monkeypatch.setattr(r1, "_traces", gold_traces)
    real_sft, calls = r1._sft, []

    def interrupted_sft(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_sft(*a, **kw)

    monkeypatch.setattr(r1, "_sft", interrupted_sft)
    cfg = r1.R1Config.smoke_config(str(tmp_path / "r1"), str(tmp_path / "demo"))
    assert r1.run_r1(cfg, until="eval_student_base") is None  # --until: stops there, resumable
    assert list(json.loads((tmp_path / "r1" / "stages.json").read_text())["done"]) == [
        "student_base", "eval_teacher", "eval_student_base"]
    with pytest.raises(KeyboardInterrupt):
        r1.run_r1(cfg)
    stages = json.loads((tmp_path / "r1" / "stages.json").read_text())["done"]
    assert "arm_rl" in stages and "arm_sft" not in stages
    summary = r1.run_r1(cfg)
    on_disk = json.loads((tmp_path / "r1" / "summary.json").read_text())
    assert KEYS <= set(on_disk) and on_disk == json.loads(json.dumps(summary))
    for k in KEYS:
        assert 0.0 <= on_disk[k] <= 1.0
    assert set(on_disk["arm_seconds"]) == {"rl", "sft", "onpolicy", "sft_rl"}
    assert on_disk["traces_kept"] == 24 and on_disk["seconds_total"] > 0
    report = (tmp_path / "r1" / "report.md").read_text()
    assert "on-policy distillation" in report and "plots/r1_accuracy_vs_time.png" in report
    assert (tmp_path / "r1" / "plots" / "r1_accuracy_vs_samples.png").stat().st_size > 1000


def test_grpo_time_used_sums_the_segments_of_a_resumed_run(tmp_path):
    """GRPO's elapsed_s restarts at each resume; an arm's used budget is the sum up to its last checkpoint."""
    import json

    from nanoseek.recipes.report import grpo_seconds_by_step, grpo_used_seconds

    # checkpoint at 2, killed in step 3; the resume cut the file back to step 2 and restarted the clock;
    # step 5 ran after the last checkpoint (step 4), so it is not yet paid for
    rows = [(1, 5.0), (2, 10.0), (3, 6.0), (4, 11.0), (5, 16.0)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "elapsed_s": e}) + "\n" for s, e in rows))
    ck = tmp_path / "checkpoints" / "step_4"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"step": 4}))
    assert grpo_used_seconds(tmp_path) == 10.0 + 11.0
    assert grpo_seconds_by_step(tmp_path) == {1: 5.0, 2: 10.0, 3: 16.0, 4: 21.0, 5: 26.0}
