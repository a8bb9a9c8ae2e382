"""DPO (Rafailov et al. 2023): the loss against hand-computed values, sequence log-probs against a naive
per-sequence loop, and a few trainer steps that prefer the chosen side; pair building from samples."""
import json
import math
import random

import pytest
import torch

from nanoseek.config import ConfigError
from nanoseek.corpus import corpus_texts
from nanoseek.tasks import get_task
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import latest_checkpoint, load_run_model
from nanoseek.train.dpo import DPOConfig, dpo_loss, encode_pairs, read_pairs, sequence_logps, train_dpo
from tiny_runs import write_tiny_run


def test_dpo_loss_hand_computed():
    # logits = (pc - rc) - (pr - rr) = (-1 + 2) - (-3 + 2) = 2; beta 0.5 -> -log sigmoid(1) = log(1 + e^-1)
    pc = torch.tensor([-1.0], requires_grad=True)
    losses, rc, rr = dpo_loss(pc, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    assert losses.item() == pytest.approx(0.31326168751822286, abs=1e-7)
    assert (rc.item(), rr.item()) == (pytest.approx(0.5), pytest.approx(-0.5))
    losses.sum().backward()  # d/d pc = -beta * sigmoid(-beta * logits) = -0.5 / (1 + e)
    assert pc.grad.item() == pytest.approx(-0.5 / (1 + math.e), abs=1e-7)
    # equal policy and reference: log 2, whatever beta
    z = torch.zeros(3)
    assert torch.allclose(dpo_loss(z, z - 1, z, z - 1, 0.1)[0], torch.full((3,), math.log(2)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("dpo_base"), corpus_texts("arithmetic", 300, seed=0))


def make_pairs(n: int) -> list[dict]:
    task, rng = get_task("arithmetic"), random.Random(0)
    out = []
    for _ in range(n):
        p = task.sample_split(rng, 1, "train")
        out.append({"prompt": p.prompt, "chosen": task.solution(p, rng), "rejected": task.solution(p, rng, flawed=True)})
    return out


def test_sequence_logps_match_a_naive_loop(run):
    model, _, _ = load_run_model(run)
    tok = Tokenizer.load(run / "tokenizer.json")
    pairs = make_pairs(4)
    cw, ct, rw, rt, skipped = encode_pairs(pairs, tok, 64)
    assert skipped == 0
    got = sequence_logps(model, cw, ct).detach()
    for i, p in enumerate(pairs):
        prompt, seq = tok.prompt_ids(p["prompt"]), tok.document_ids(p["prompt"], p["chosen"])
        with torch.no_grad():
            logp = model(torch.tensor([seq[:-1]])).log_softmax(-1)[0]
        want = sum(float(logp[t - 1, seq[t]]) for t in range(len(prompt), len(seq)))
        assert float(got[i]) == pytest.approx(want, abs=1e-4)


def test_trainer_prefers_chosen_and_resumes(run, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(16)))
    cfg = DPOConfig(init=str(run), data=str(data), beta=0.5, lr=3e-3, steps=8, batch_size=8, ckpt_every=4,
                    warmup_steps=1)
    out = tmp_path / "dpo"
    s = train_dpo(out, cfg, quiet=True)
    assert s["step"] == 8 and s["pairs"] == 16
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the first step
    assert rows[-1]["loss"] < 0.6 and rows[-1]["margin"] > 0
    assert latest_checkpoint(out / "checkpoints").name == "step_8"
    load_run_model(out)  # a run directory the next stage can load
    s2 = train_dpo(out, None, resume=True, quiet=True, steps=10)
    assert s2["step"] == 10
    with pytest.raises(ConfigError):
        train_dpo(out, cfg, quiet=True)  # checkpoints present without --resume


def test_cli_resume_keeps_the_stored_step_count(run, tmp_path, capsys):
    """`dpo --resume` without --steps continues to the run's own total (here 3, done: no new step), not the
    default of 100; --steps extends it."""
    from nanoseek import cli

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(8)))
    out = tmp_path / "dpo"
    assert cli.main(["dpo", "--init", str(run), "--data", str(data), "--out", str(out), "--steps", "3",
                     "--batch-size", "4"]) == 0
    capsys.readouterr()
    assert cli.main(["dpo", "--out", str(out), "--resume"]) == 0
    assert "done: step 3," in capsys.readouterr().out
    assert latest_checkpoint(out / "checkpoints").name == "step_3"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "config.json").read_text())["dpo"]["steps"] == 3
    assert cli.main(["dpo", "--out", str(out), "--resume", "--steps", "4"]) == 0
    assert latest_checkpoint(out / "checkpoints").name == "step_4"


def test_bad_pair_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "y"}\n')
    with pytest.raises(ConfigError, match="line 1"):
        read_pairs(bad)
    with pytest.raises(ConfigError):
        read_pairs(tmp_path / "missing.jsonl")
