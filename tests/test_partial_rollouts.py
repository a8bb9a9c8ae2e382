"""Partial rollouts (Kimi k1.5): with a budget no response reaches, GRPO is unchanged exactly; with a small one,
carried trajectories are continued by the newer policy and every token keeps its own sampler's log-prob; a
resumed run continues the checkpointed trajectories exactly; torchrun is refused."""

import json

import pytest
import torch

from nanoseek.config import ConfigError
from nanoseek.corpus import corpus_texts
from nanoseek.engine import Engine
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import load_run_model
from nanoseek.train.grpo import GRPOConfig, ProblemSampler, token_logprobs, train_grpo
from nanoseek.train.metrics import read_metrics
from nanoseek.train.partial_rollouts import PartialRollouts
from tiny_runs import write_tiny_run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("pr_base"), corpus_texts("arithmetic", 300, seed=0))


def spread_rewards(monkeypatch) -> None:
    """The tiny untrained model scores 0 everywhere (zero advantages: no update, weights trivially equal);
    reward 1 to every second member of a group instead, so every trained group moves the weights."""
    from nanoseek.train import grpo_rollout

    monkeypatch.setattr(grpo_rollout, "shaped_rewards", lambda scores, lengths, cfg, step: [float(j % 2) for j in
                                                                                   range(len(lengths))])


def assert_same_weights_and_moved(a, b, base) -> None:
    ma, mb, m0 = (load_run_model(r)[0].state_dict() for r in (a, b, base))
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    assert any(not torch.equal(ma[k], m0[k]) for k in ma)  # the updates really changed the weights


def test_budget_above_every_response_equals_grpo(base, tmp_path, monkeypatch):
    spread_rewards(monkeypatch)  # (rewards with a spread: the updates move the weights being compared)
    kw = dict(steps=3, group_size=4, prompts_per_step=2, max_new_tokens=12, ckpt_every=3, bias_update=False)
    train_grpo(base, tmp_path / "plain", GRPOConfig(**kw), device="cpu", quiet=True)
    train_grpo(base, tmp_path / "partial", GRPOConfig(**kw, partial_rollout_tokens=12), device="cpu", quiet=True)
    a, b = read_metrics(tmp_path / "plain" / "metrics.jsonl"), read_metrics(tmp_path / "partial" / "metrics.jsonl")
    for ra, rb in zip(a, b):
        for k in ("reward", "accuracy", "response_len_mean", "loss", "grad_norm", "check_rate"):
            assert ra[k] == rb[k], k
        assert rb["carried"] == 0
    assert_same_weights_and_moved(tmp_path / "plain", tmp_path / "partial", base)


def test_carried_tokens_keep_their_own_policys_logprobs(base):
    model, _, _ = load_run_model(base)
    tok = Tokenizer.load(base / "tokenizer.json")
    cfg = GRPOConfig(group_size=2, prompts_per_step=2, max_new_tokens=8, temperature=1.0)
    engine = Engine(model, tok)
    sampler = ProblemSampler(cfg)
    pr = PartialRollouts(budget=4)
    done1, st1 = pr.step(engine, sampler, cfg, 2, 1, seed=1)
    old = {id(t): list(t.logprobs) for t in pr.carried}
    assert st1["carried"] > 0 and all(len(t.tokens) <= 4 for t in pr.carried)
    policy_1 = Transformer(model.cfg)
    policy_1.load_state_dict(model.state_dict())
    with torch.no_grad():  # a different policy for the second segment
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    done2, _ = pr.step(engine, sampler, cfg, 2, 2, seed=2)
    mixed = [r for r in done2 if len(r.tokens) > 4]
    assert mixed, "some step-1 trajectory must have been continued in step 2"
    for r in mixed:
        ids = torch.tensor([r.prompt + r.tokens])
        with torch.no_grad():
            lp1, _ = token_logprobs(policy_1.eval(), ids, ids[:, 1:], cfg.sampling())
            lp2, _ = token_logprobs(model.eval(), ids, ids[:, 1:], cfg.sampling())
        a = len(r.prompt) - 1
        got = torch.tensor(r.logprobs)
        torch.testing.assert_close(got[:4], lp1[0, a:a + 4], atol=1e-4, rtol=0)  # segment 1: the old policy
        torch.testing.assert_close(got[4:], lp2[0, a + 4:a + len(r.tokens)], atol=1e-4, rtol=0)  # segment 2: new
        assert (got[:4] - lp2[0, a:a + 4]).abs().max() > 1e-3  # the policies really differ there
    assert any(list(r.logprobs[:4]) in old.values() for r in mixed)


def test_partial_with_dynamic_sampling_is_refused():
    with pytest.raises(ConfigError):
        GRPOConfig(partial_rollout_tokens=8, dynamic_sampling=True).validate()


def test_resume_continues_the_carried_trajectories_exactly(base, tmp_path, monkeypatch):
    """The carried trajectories are part of the checkpoint: 2 steps, then --resume to 4, equals 4 steps in one
    go (every metric but timings, and the final weights bit for bit), with trajectories really carried over the
    cut (a resume that dropped them would draw fresh groups: other rewards, lengths and weights)."""
    spread_rewards(monkeypatch)
    kw = dict(group_size=2, prompts_per_step=2, max_new_tokens=8, ckpt_every=1, partial_rollout_tokens=3,
              bias_update=False)
    train_grpo(base, tmp_path / "full", GRPOConfig(steps=4, **kw), device="cpu", quiet=True)
    train_grpo(base, tmp_path / "cut", GRPOConfig(steps=2, **kw), device="cpu", quiet=True)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step_2" / "state.json").read_text())
    assert any(t["finish"] is None for t in state["partial"]["carried"])  # unfinished trajectories at the cut
    train_grpo(base, tmp_path / "cut", GRPOConfig(steps=4, **kw), resume=True, device="cpu", quiet=True)
    a, b = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    timing = {"gen_s", "train_s", "tokens_per_s", "elapsed_s", "verify_s", "checks_per_s", "step_s"}
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in timing} == {k: v for k, v in rb.items() if k not in timing}
    assert a[1]["carried"] > 0 and a[2]["groups_trained"] > 0
    assert_same_weights_and_moved(tmp_path / "full", tmp_path / "cut", base)


def test_ctrl_c_during_rollouts_saves_the_carried_state_of_the_last_finished_step(base, tmp_path, monkeypatch):
    """Ctrl-C while step 3's rollouts run (they have already extended the carried trajectories) saves step 2
    with the carried state as it was after step 2; the resumed run equals the uninterrupted one."""
    spread_rewards(monkeypatch)
    kw = dict(group_size=2, prompts_per_step=2, max_new_tokens=8, ckpt_every=10, partial_rollout_tokens=3,
              bias_update=False)
    train_grpo(base, tmp_path / "full", GRPOConfig(steps=4, **kw), device="cpu", quiet=True)
    real = PartialRollouts.step

    def interrupted(self, engine, sampler, cfg, n, step, **k):
        out = real(self, engine, sampler, cfg, n, step, **k)
        if step == 3:
            raise KeyboardInterrupt  # after the step's generation changed the carried state
        return out

    monkeypatch.setattr(PartialRollouts, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_grpo(base, tmp_path / "cut", GRPOConfig(steps=4, **kw), device="cpu", quiet=True)
    monkeypatch.setattr(PartialRollouts, "step", real)
    assert sorted(d.name for d in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step_2"]
    train_grpo(base, tmp_path / "cut", GRPOConfig(steps=4, **kw), resume=True, device="cpu", quiet=True)
    a, b = read_metrics(tmp_path / "full" / "metrics.jsonl"), read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [(r["carried"], r["response_len_mean"]) for r in a] == [(r["carried"], r["response_len_mean"]) for r in b]
    assert_same_weights_and_moved(tmp_path / "full", tmp_path / "cut", base)


@pytest.mark.parametrize("task_name", ["arithmetic", "countdown", "math"])
def test_carried_problems_survive_the_json_checkpoint(task_name):
    """A carried trajectory's Problem goes through state.json: after the round trip its reference solution
    scores the same (right) and its flawed one the same (wrong)."""
    import random

    from nanoseek.tasks import get_task
    from nanoseek.train.partial_rollouts import Trajectory

    task, rng = get_task(task_name), random.Random(0)
    pr = PartialRollouts(budget=4)
    pr.carried = [Trajectory([1, 2], task.sample(rng), -1, g, [5, 6], [-0.25, -1.5], [1, 1]) for g in range(4)]
    pr.next_group = 4
    back = PartialRollouts(budget=4)
    back.load(json.loads(json.dumps(pr.state())))
    assert json.dumps(back.state()) == json.dumps(pr.state()) and back.next_group == 4  # (tuples come back lists)
    for t, u in zip(pr.carried, back.carried):
        for flawed in (False, True):
            texts = [task.solution(x.problem, random.Random(1), flawed=flawed) for x in (t, u)]
            assert texts[0] == texts[1]
            assert task.score_batch([u.problem], texts[1:], [False])[0].correct == (not flawed)


def test_torchrun_is_refused_before_any_work(base, tmp_path, monkeypatch):
    """The carried trajectories are per process: under torchrun (world > 1) the run is one clear line before
    the model loads or the run directory exists."""
    from nanoseek.train import grpo
    from nanoseek.train.common import Dist

    monkeypatch.setattr(grpo, "setup_distributed", lambda device: Dist(rank=0, world=2))
    with pytest.raises(ConfigError, match="one process"):
        train_grpo(base, tmp_path / "two", GRPOConfig(steps=1, partial_rollout_tokens=4), device="cpu", quiet=True)
    assert not (tmp_path / "two").exists()
