"""Rejection sampling: a wrong, malformed, truncated or duplicated completion is never kept, `shortest` keeps the
shortest, rows carry provenance and come only from the train split."""
import json
import random

import pytest
import torch

from nanoseek import cli
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.corpus import corpus_texts
from nanoseek.engine.engine import Engine, Generation
from nanoseek.model import Transformer
from nanoseek.tasks import get_task
from nanoseek.tasks.base import Problem
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import save_checkpoint
from nanoseek.train.traces import Sample, TracesConfig, rejection_sample, select

TASK = get_task("arithmetic")
PROB = Problem("Compute 2 + 3 * 4.", "14")
RIGHT = "<think>3*4=12. 2+12=14.</think><answer>14</answer>"
RIGHT_SHORT = "<think>2+12=14.</think><answer>14</answer>"


def test_wrong_malformed_truncated_and_duplicate_completions_are_never_kept():
    samples = [Sample("<think>3*4=12. 2+12=15.</think><answer>15</answer>", 14, False),  # wrong
               Sample("<answer>14</answer>", 3, False),  # right answer, no think block: malformed
               Sample("<think>3*4=12.</think><answer>14</answer><answer>14</answer>", 12, False),  # two answers
               Sample("<think>x</think> trailing <answer>14</answer>", 8, False),  # text outside the blocks
               Sample(RIGHT, 14, True),  # truncated
               Sample(RIGHT, 14, False),  # kept
               Sample(RIGHT, 14, False)]  # exact duplicate
    kept = select(TASK, PROB, samples, "correct")
    assert [(i, s.text) for i, s, _ in kept] == [(5, RIGHT)]
    assert kept[0][2] == pytest.approx(1.1)  # accuracy + format reward
    assert select(TASK, PROB, samples[:5], "correct") == []


def test_shortest_keeps_the_shortest_correct_completion():
    samples = [Sample(RIGHT, 14, False), Sample("<think>2+3=5.</think><answer>20</answer>", 9, False),
               Sample(RIGHT_SHORT, 9, False), Sample(RIGHT_SHORT + " ", 9, False)]
    kept = select(TASK, PROB, samples, "shortest")
    assert [(i, s.text) for i, s, _ in kept] == [(2, RIGHT_SHORT)]  # the wrong 9-token one is not eligible
    assert len(select(TASK, PROB, samples, "correct")) == 3


@pytest.fixture()
def teacher(tmp_path):
    """A run directory with an untrained model: the engine is replaced below by one that answers from a script."""
    tok = Tokenizer.train(corpus_texts("arithmetic", 200, seed=0), vocab_size=300)
    run = tmp_path / "teacher"
    cfg = ModelConfig.preset("tiny-dense", vocab_size=tok.vocab_size, n_layers=1, n_dense_layers=1)
    (run).mkdir()
    (run / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
    tok.save(run / "tokenizer.json")
    save_checkpoint(run / "checkpoints", 7, Transformer(cfg), None, {})
    return run


def test_rows_have_provenance_and_come_from_the_train_split(teacher, tmp_path, monkeypatch, capsys):
    rng = random.Random(0)

    def fake_generate(self, prompts, max_new_tokens=64, temperature=0.0, top_p=None, seed=None, **kw):
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids[2:-1])
            right = TASK.solution(_problem(text), rng)
            wrong = right.replace("</answer>", "0</answer>")
            t = rng.choice([right, wrong, "<answer>1</answer>"])
            out.append(Generation(tokens=self.tokenizer.encode(t) + [1], logprobs=[], finish_reason="stop", text=t))
        return out

    monkeypatch.setattr(Engine, "generate", fake_generate)
    out = tmp_path / "traces.jsonl"
    cli.main(["traces", "--run", str(teacher), "--problems", "30", "--samples", "4", "--temperature", "0.7",
              "--out", str(out), "--difficulty", "1"])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and f"{len(rows)} rows kept" in printed
    for r in rows:
        prob = _problem(r["prompt"])
        assert TASK.score(prob, r["completion"]).correct and TASK.split(prob) == "train"
        assert r["teacher_step"] == 7 and r["temperature"] == 0.7 and r["teacher_run"] == str(teacher)
        assert r["tokens"] == len(Tokenizer.load(teacher / "tokenizer.json").encode(r["completion"])) + 1
    assert len({(r["prompt"], r["completion"]) for r in rows}) == len(rows)
    with pytest.raises(ConfigError, match="split train"):
        rejection_sample(TracesConfig(run=str(teacher), split="test", out=str(out)))


_PROBLEMS: dict = {}


def _problem(prompt: str) -> Problem:
    """The problem behind a prompt of the (seeded) train draw, found by regenerating the draw."""
    if not _PROBLEMS:
        r = random.Random(0)
        for _ in range(200):
            p = TASK.sample_split(r, 1, "train")
            _PROBLEMS[p.prompt] = p
    return _PROBLEMS[prompt]


def test_an_untrained_teacher_yields_no_rows(teacher, tmp_path):
    torch.manual_seed(0)
    s = rejection_sample(TracesConfig(run=str(teacher), problems=4, samples=2, max_new_tokens=8,
                                      out=str(tmp_path / "t.jsonl")), print_fn=lambda *_: None)
    assert s["rows_kept"] == 0 and (tmp_path / "t.jsonl").read_text() == ""
