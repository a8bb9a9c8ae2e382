"""GRPO runs end to end from a warm tiny base: one pretrained for a few seconds on one-operation facts, so its
rollouts get mixed rewards (format and some right answers), advantages are non-zero and every update really
moves the weights (asserted). On it: exact resume after Ctrl-C (SIGINT in the rollouts and in the update of a
step) and after SIGKILL mid-update, comparing the final WEIGHTS with an uninterrupted run; 2 processes under
torchrun == 1 process, with dynamic and prioritized sampling and an uneven split of the groups; mu > 1 and
beta > 0 on real rollouts."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffs import small, worst
from safetensors.torch import load_file

from nanoseek.config import ModelConfig
from nanoseek.corpus import build_corpus
from nanoseek.data import Loader, pack_documents
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer, render_document
from nanoseek.train import grpo
from nanoseek.train.checkpoint import latest_checkpoint, save_checkpoint
from nanoseek.train.common import Dist, TrainConfig, build_optimizer, lr_at, set_lr
from nanoseek.train.grpo import GRPOConfig, train_grpo
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import train_step

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(dim=32, inter_dim=64, moe_inter_dim=32, n_layers=2, n_dense_layers=1, n_heads=2, n_routed_experts=4,
             n_activated_experts=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
             max_seq_len=96, original_seq_len=96, n_mtp=0)


@pytest.fixture(scope="module")
def warm_base(tmp_path_factory) -> Path:
    """A run directory (config.json, tokenizer.json, checkpoint) of a micro model trained for 120 steps on
    difficulty-1 facts: it writes the <think>/<answer> format most of the time and is sometimes right."""
    run = tmp_path_factory.mktemp("warm_base")
    docs = build_corpus("arithmetic", 1500, seed=0, difficulty=1, fact_share=1.0)
    tok = Tokenizer.train([render_document(p, c) for p, c in docs], vocab_size=300)
    tok.save(run / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, **MODEL).validate())
    train = TrainConfig(lr=1e-2, warmup_steps=5, steps=120, batch_size=16, seq_len=64)
    loader = Loader(pack_documents([tok.document_ids(p, c) for p, c in docs], 64, tok.eos_id), 16, seed=0)
    opt = build_optimizer(model, train)
    for step in range(train.steps):
        set_lr(opt, lr_at(step, train))
        train_step(model, opt, loader, train, Dist())
    (run / "config.json").write_text(json.dumps({"model": model.cfg.to_dict()}))
    save_checkpoint(run / "checkpoints", train.steps, model, None, {})
    return run


def rl_cfg(**kw) -> GRPOConfig:
    return GRPOConfig(**{"steps": 4, "group_size": 4, "prompts_per_step": 3, "max_new_tokens": 20, "lr": 3e-4,
                         "ckpt_every": 2, "difficulty": 1, **kw})


def weights(run: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    d = run / "checkpoints" / f"step_{step}" if step else latest_checkpoint(run / "checkpoints")
    return load_file(str(d / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return worst((a[k].double() - b[k].double()).abs() for k in a)  # NaN propagates (Python's max drops it)


def assert_same_run(ref: Path, got: Path, atol: float) -> None:
    a, b = read_metrics(ref / "metrics.jsonl"), read_metrics(got / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("reward", "accuracy", "response_len_mean", "groups_trained", "sampling_rounds"):
            assert ra[k] == rb[k], (ra["step"], k)
        for k in ("loss", "grad_norm", "entropy"):
            if k in ra or k in rb:  # absent in a step that kept no group
                assert rb[k] == pytest.approx(ra[k], abs=atol), (ra["step"], k)
    assert max_diff(weights(ref), weights(got)) <= atol


@pytest.fixture(scope="module")
def full_run(warm_base, tmp_path_factory) -> Path:
    """The uninterrupted reference: 4 steps. Rewards are mixed and the weights move."""
    out = tmp_path_factory.mktemp("rl") / "full"
    train_grpo(warm_base, out, rl_cfg(), quiet=True, device="cpu")
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward", "accuracy", "format_rate", "response_len_mean", "response_len_max", "clip_frac", "kl",
                "entropy", "zero_spread_groups", "uniform_accuracy_groups", "tokens_per_s", "gen_s", "train_s"):
        assert key in rows[-1], key
    assert all(r["zero_spread_groups"] < 1 and r["rows_trained"] > 0 for r in rows)  # non-zero advantages
    assert small(worst(r["logp_diff_max"] for r in rows), 1e-4)  # engine log-probs == the trainer's recompute
    assert len({r["reward"] for r in rows}) > 1
    assert max_diff(weights(out), weights(warm_base)) > 1e-4  # the updates really change the model
    return out


# ---- Ctrl-C and SIGKILL ---------------------------------------------------------------------------------
@pytest.mark.parametrize("phase,at_step", [("update", 3), ("rollout", 4)])
def test_sigint_mid_step_saves_only_a_finished_step_and_resumes_exactly(full_run, warm_base, tmp_path, monkeypatch,
                                                                        phase, at_step):
    """A real SIGINT right after the optimizer step of step 3 (the update has begun: the step completes, then
    stops, saving step 3), or right after the rollouts of step 4 moved the sampler (restored: step 4 never
    happened; the finished step 3 is saved). Step 2's regular checkpoint is never rewritten, and resuming
    gives the uninterrupted run's metrics and weights."""
    out = tmp_path / "run"
    target = {"update": "policy_update", "rollout": "rollout_groups"}[phase]
    real = getattr(grpo, target)
    calls = {"n": 0}

    def interrupted(*a, **kw):
        result = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] == at_step:  # one call per step for both (mu = 1)
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(grpo, target, interrupted)
    # the precondition: Python's own Ctrl-C handler, re-registered (in the full suite, after ~700 other tests in
    # one process, the SIGINT below was lost and this test failed while it passed alone and after each group of
    # the files before it; the cause is not pinned down - a native library replacing the C-level handler is the
    # suspect - and re-registering fixes the full run)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(KeyboardInterrupt):
        train_grpo(warm_base, out, rl_cfg(), quiet=True, device="cpu")
    monkeypatch.undo()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_2", "step_3"]
    assert max_diff(weights(out, 2), weights(full_run, 2)) == 0  # the real step 2, not overwritten
    train_grpo(warm_base, out, rl_cfg(), resume=True, quiet=True, device="cpu")
    assert_same_run(full_run, out, atol=1e-6)


DRIVER = """
import os, signal, sys
from pathlib import Path
from nanoseek.train import grpo
real = grpo.policy_update
calls = []
def killed(*a, **kw):  # SIGKILL right after the optimizer step of step 3: nothing can be saved
    out = real(*a, **kw)
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
grpo.policy_update = killed
cfg = grpo.GRPOConfig(**__import__("json").loads(sys.argv[3]))
grpo.train_grpo(Path(sys.argv[1]), Path(sys.argv[2]), cfg, quiet=True, device="cpu")
"""


def test_sigkill_mid_update_resumes_exactly(full_run, warm_base, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", DRIVER, str(warm_base), str(out), json.dumps(rl_cfg().to_dict())],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert latest_checkpoint(out / "checkpoints").name == "step_2"
    train_grpo(warm_base, out, rl_cfg(), resume=True, quiet=True, device="cpu")
    assert_same_run(full_run, out, atol=1e-6)


# ---- torchrun ---------------------------------------------------------------------------------------------
def test_two_processes_equal_one_with_dynamic_and_prioritized_sampling(warm_base, tmp_path):
    """The same global batch whatever the number of processes: 3 groups over 2 ranks (2 + 1; later rounds of
    dynamic sampling may leave a rank with none), prioritized draws and DAPO's accuracy filter decided on
    all-gathered scores. Discrete metrics agree exactly, losses and final weights to 1e-5."""
    cfg = rl_cfg(steps=2, group_size=8, dynamic_sampling=True, prioritized=True, pool_size=50)
    args = ["rl", "--init", str(warm_base), "--out", str(tmp_path / "ddp"), "--steps", "2", "--group-size", "8",
            "--prompts-per-step", "3", "--max-new-tokens", "20", "--lr", "3e-4", "--difficulty", "1",
            "--dynamic-sampling", "--prioritized", "--pool-size", "50", "--ckpt-every", "2", "--device", "cpu"]
    assert grpo_cli_config(args) == cfg  # the torchrun job runs the same config as the in-process one below
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ddp = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "nanoseek.cli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        train_grpo(warm_base, tmp_path / "one", cfg, quiet=True, device="cpu")  # meanwhile, in this process
        _, err = ddp.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        raise AssertionError("torchrun GRPO did not finish (a rank waiting in a collective?)") from None
    finally:
        ddp.kill()
    assert ddp.returncode == 0, err[-3000:]
    ref = read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert len(ref) == 2 and sum(r.get("rows_trained", 0) for r in ref) > 0  # non-zero advantages were trained
    assert max(r["sampling_rounds"] for r in ref) > 1  # dynamic sampling really drew again
    assert max_diff(weights(tmp_path / "one"), weights(warm_base)) > 1e-4
    assert_same_run(tmp_path / "one", tmp_path / "ddp", atol=1e-5)
    for ra, rb in zip(ref, read_metrics(tmp_path / "ddp" / "metrics.jsonl")):
        for k in ("rows_trained", "uniform_accuracy_groups", "zero_spread_groups", "format_rate"):
            assert ra.get(k) == rb.get(k), (ra["step"], k)


def grpo_cli_config(argv: list[str]) -> GRPOConfig:
    import argparse

    from nanoseek.commands import rl

    parser = argparse.ArgumentParser()
    rl.add_arguments(parser)
    return rl.config_from_args(parser.parse_args(argv[1:]))


# ---- mu > 1, beta > 0, top-p / top-k on real rollouts --------------------------------------------------
def test_mu_two_takes_a_second_update_off_policy(warm_base, tmp_path, monkeypatch):
    """mu = 2: two optimizer steps per rollout batch on the same engine log-probs. In the first the importance
    ratio is 1 on every completion token; in the second (after a weight change) it is not, and it is what the
    clipping acts on."""
    seen = []
    from nanoseek.train import rl_math  # the loss (rl_math.policy_loss) calls these two

    real = rl_math.clipped_surrogate

    def recording(logp, old, adv, lo, hi):
        seen.append((logp.detach().clone(), old.clone()))
        return real(logp, old, adv, lo, hi)

    real_agg = rl_math.aggregate
    masks = []
    monkeypatch.setattr(rl_math, "clipped_surrogate", recording)
    monkeypatch.setattr(rl_math, "aggregate", lambda per_tok, mask, *a, **kw: masks.append(mask.clone()) or
                        real_agg(per_tok, mask, *a, **kw))
    out = train_grpo(warm_base, tmp_path / "mu2", rl_cfg(steps=1, mu=2, lr=3e-3), quiet=True, device="cpu")
    assert out["rows_trained"] > 0 and len(seen) == 2 == len(masks)  # one micro-batch per update
    dev = [float(((logp - old).exp() - 1).abs().mul(m).max()) for (logp, old), m in zip(seen, masks)]
    assert dev[0] < 1e-4 < 1e-2 < dev[1]
    assert out["logp_diff_max"] < 1e-4  # metrics of the first update are kept for it


def test_beta_keeps_a_frozen_initial_reference(warm_base, tmp_path):
    """beta > 0 on real rollouts: the KL to the reference is 0 at the first update (policy == reference),
    positive once the policy has moved, and the reference stays the initial model (it is never updated)."""
    out = tmp_path / "kl"
    train_grpo(warm_base, out, rl_cfg(steps=3, beta=0.1, lr=3e-3), quiet=True, device="cpu")
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["kl"] < 1e-7 and rows[1]["kl"] > 1e-5 and rows[2]["kl"] > 1e-5


def test_top_p_top_k_rollouts_ratio_is_one_at_the_first_update(warm_base, tmp_path):
    """With a nucleus and top-k, the engine's log-probs (of the filtered distribution sampled) equal the
    trainer's recompute under the same support: the first update's ratio is 1, as without filters."""
    out = tmp_path / "nucleus"
    train_grpo(warm_base, out, rl_cfg(steps=2, top_p=0.9, top_k=12), quiet=True, device="cpu")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if r.get("rows_trained", 0) > 0]
    assert rows  # some rows were trained (the check below is over their tokens)
    assert small(worst(r["logp_diff_max"] for r in rows), 1e-4)  # NaN fails


@pytest.mark.slow
def test_compiled_update_equals_the_eager_run_and_resumes(full_run, warm_base, tmp_path):
    """rl --compile: the update's training forwards under torch.compile (rollouts eager). Two compiled steps, then
    a resume for the last two (the stored choice holds), equal the eager reference run to float rounding."""
    out = tmp_path / "compiled"
    train_grpo(warm_base, out, rl_cfg(steps=2, compile=True), quiet=True, device="cpu")
    assert json.loads((out / "config.json").read_text())["rl"]["compile"] is True
    train_grpo(warm_base, out, rl_cfg(steps=4), resume=True, quiet=True, device="cpu")
    assert_same_run(full_run, out, atol=1e-5)
