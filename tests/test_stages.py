"""The recipes' stage runner (nanoseek.recipes.stages): resume by stage, the settings check, --until, per-stage
seconds over interrupted attempts, and a stages.json written by the earlier stage class."""
import json

import pytest

from nanoseek.config import ConfigError
from nanoseek.recipes.stages import StageRunner, Stages, StopAfter

NAMES = ("a", "b", "c")


def test_finished_stages_are_skipped_and_their_results_read_back(tmp_path):
    calls = []
    work = {n: (lambda n=n: calls.append(n) or {"v": n}) for n in NAMES}
    s = StageRunner(tmp_path, {"x": 1})
    assert [s.run(n, work[n]) for n in NAMES] == [{"v": n} for n in NAMES]
    s = StageRunner(tmp_path, {"x": 1})
    assert [s.run(n, work[n]) for n in NAMES] == [{"v": n} for n in NAMES] and calls == list(NAMES)
    t = s.timing()
    assert set(t["seconds_by_stage"]) == set(NAMES) and t["seconds_total"] >= 0


def test_other_settings_are_refused_unless_free(tmp_path):
    StageRunner(tmp_path, {"x": 1, "minutes": 2}, free=("minutes",)).run("a", lambda: 1)
    with pytest.raises(ConfigError, match=r"other settings \(x\)"):
        StageRunner(tmp_path, {"x": 2, "minutes": 2}, free=("minutes",))
    assert StageRunner(tmp_path, {"x": 1, "minutes": 9}, free=("minutes",)).done["a"]["result"] == 1


def test_until_stops_after_the_named_stage(tmp_path):
    s = StageRunner(tmp_path, {}, until="b", names=NAMES)
    s.run("a", lambda: 1)
    with pytest.raises(StopAfter):
        s.run("b", lambda: 2)
    assert set(StageRunner(tmp_path, {}).done) == {"a", "b"}
    with pytest.raises(ConfigError, match="--until must be one of a, b, c"):
        StageRunner(tmp_path, {}, until="z", names=NAMES)


def test_an_interrupted_stage_keeps_its_seconds_for_the_next_attempt(tmp_path, monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 12.0])
    monkeypatch.setattr("nanoseek.recipes.stages.time.time", lambda: next(clock))

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        StageRunner(tmp_path, {}).run("a", interrupted)
    assert StageRunner(tmp_path, {}).state["partial_s"] == {"a": 5.0}
    s = StageRunner(tmp_path, {})
    s.run("a", lambda: 1)
    assert s.seconds("a") == 5.0 + 2.0 and s.state["partial_s"] == {}


def test_a_stages_file_of_the_earlier_layout_resumes(tmp_path):
    """Before nanoseek.recipes the demo / r1 / aha wrote finished stages at the top level and partial seconds as
    `_<stage>_partial_s`; such a run directory resumes (finished stages skipped, partial time kept)."""
    old = {"a": {"result": {"v": 1}, "seconds": 3.5}, "_b_partial_s": 2.0}
    (tmp_path / "stages.json").write_text(json.dumps(old))
    s = StageRunner(tmp_path, {"x": 1})
    assert s.run("a", lambda: pytest.fail("a finished stage ran again")) == {"v": 1}
    assert s.state["partial_s"] == {"b": 2.0} and s.seconds("a") == 3.5
    on_disk = json.loads((tmp_path / "stages.json").read_text())
    assert on_disk["settings"] == {"x": 1} and on_disk["done"] == {"a": old["a"]}
    legacy = Stages(tmp_path / "stages.json")  # the earlier constructor: no settings check
    assert legacy.done["a"]["result"] == {"v": 1} and legacy.state["settings"] == {"x": 1}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_corrupt_stages_file_is_one_clear_error(tmp_path, text):
    (tmp_path / "stages.json").write_text(text)
    with pytest.raises(ConfigError, match="corrupt"):
        StageRunner(tmp_path, {})
