"""Trainer properties: the lr schedule's closed form, what the optimizer does and does not own, the expert-bias
sign rule, checkpoint round trips and corruption, exact kill-and-resume, 2-process DDP == 1 process, and
one-line CLI errors."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek import cli
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.data import Loader, pack_documents
from nanoseek.model import Transformer
from nanoseek.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, step_dirs
from nanoseek.train.common import Dist, TrainConfig, build_optimizer, lr_at
from nanoseek.train.metrics import MetricsLogger, read_metrics
from nanoseek.train.pretrain import dense_equivalent, train_step

REPO = Path(__file__).resolve().parents[1]
MICRO = {"vocab_size": 64, "dim": 32, "inter_dim": 64, "moe_inter_dim": 32, "n_layers": 2, "n_dense_layers": 1,
         "n_heads": 2, "n_routed_experts": 4, "n_shared_experts": 1, "n_activated_experts": 2, "kv_lora_rank": 16,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "max_seq_len": 64, "original_seq_len": 64}


def micro_model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**MICRO, **kw}).validate())


def random_loader(batch=4, seq_len=16, seed=0) -> Loader:
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 64, (int(n),), generator=g).tolist() for n in torch.randint(4, 30, (80,), generator=g)]
    return Loader(pack_documents(docs, seq_len, eos_id=1), batch, seed=seed)


# ---- schedule and optimizer ---------------------------------------------------------------------------------
def test_lr_schedule_closed_form():
    c = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, steps=110)
    assert lr_at(0, c) == pytest.approx(1e-4)
    assert lr_at(4, c) == pytest.approx(5e-4)
    assert lr_at(9, c) == pytest.approx(1e-3)  # warmup ends at the peak
    assert lr_at(10, c) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(109, c) == pytest.approx(1e-4)  # and reaches min_lr at the last step
    for s in (10, 33, 60, 87, 109):
        p = (s - 10) / 99
        assert lr_at(s, c) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * p)))
    assert lr_at(59.5, c) == pytest.approx(5.5e-4)  # the midpoint of the cosine is the mean of lr and min_lr
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(10, 109))


def test_optimizer_groups_norms_undecayed_and_no_gate_bias():
    model = micro_model()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    in_opt = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(in_opt) == len(names)  # every parameter exactly once
    for name, p in names.items():
        assert in_opt[id(p)] == (0.0 if p.dim() == 1 else 0.1), name
        if "norm" in name:
            assert in_opt[id(p)] == 0.0
    biases = [b for n, b in model.named_buffers() if n.endswith("gate.bias")]
    assert biases and all(id(b) not in in_opt for b in biases)


def test_gate_bias_moves_only_by_the_sign_rule():
    model = micro_model()
    cfg = TrainConfig(batch_size=4, grad_accum=2, lr=1e-2, bias_gamma=1e-3, steps=5)
    opt = build_optimizer(model, cfg)
    loader = random_loader()
    gates = [m.gate for m in model.moe_layers()]
    for _ in range(3):
        before = [g.bias.clone() for g in gates]
        out = train_step(model, opt, loader, cfg, Dist())
        loads = out["loads"]
        assert loads.sum() > 0
        for i, g in enumerate(gates):
            expected = before[i] + 1e-3 * torch.sign(loads[i].mean() - loads[i])
            assert torch.equal(g.bias, expected)
        assert all(m.load_accum.sum() == 0 for m in model.moe_layers())  # accumulators reset per step
    frozen = [g.bias.clone() for g in gates]
    train_step(model, opt, loader, TrainConfig(**{**cfg.to_dict(), "bias_gamma": 0.0}), Dist())
    assert all(torch.equal(g.bias, f) for g, f in zip(gates, frozen))  # weight decay never touches it


def test_dense_equivalent_matches_active_params():
    tiny = ModelConfig.preset("tiny")
    dense = dense_equivalent(tiny)
    assert dense.n_moe_layers == 0 and dense.n_routed_experts == 0
    a, b = tiny.param_counts()["active"], dense.param_counts()["active"]
    assert abs(a - b) / a < 0.005
    assert Transformer(dense).moe_layers() == []


# ---- checkpoints -------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_pruning(tmp_path):
    model = micro_model()
    cfg = TrainConfig(batch_size=4, steps=5)
    opt = build_optimizer(model, cfg)
    loader = random_loader()
    for step in range(1, 4):
        train_step(model, opt, loader, cfg, Dist())
        save_checkpoint(tmp_path, step, model, opt, {"loader": loader.state_dict()}, keep_last=2)
    assert [s for s, _ in step_dirs(tmp_path)] == [2, 3]
    (tmp_path / ".tmp_step_9_x").mkdir()  # a killed save leaves a temp dir: never "latest"
    (tmp_path / "step_7").mkdir()  # a step dir without state.json is incomplete: ignored
    assert latest_checkpoint(tmp_path).name == "step_3"
    expected_rand = torch.rand(3)

    fresh = micro_model(n_routed_experts=4)
    fresh_opt = build_optimizer(fresh, cfg)
    torch.manual_seed(123)
    state = load_checkpoint(tmp_path / "step_3", fresh, fresh_opt)
    assert state["step"] == 3 and state["loader"] == loader.state_dict()
    assert torch.equal(torch.rand(3), expected_rand)  # RNG restored to the moment of saving
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n  # includes the gate bias buffers
    assert any(n.endswith("gate.bias") for n in fresh.state_dict())
    s1, s2 = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "state.json"])
def test_corrupted_checkpoint_is_a_config_error(tmp_path, victim):
    model = micro_model()
    opt = build_optimizer(model, TrainConfig())
    d = save_checkpoint(tmp_path, 1, model, opt, {})
    path = d / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match="corrupted"):
        load_checkpoint(d, micro_model(), build_optimizer(micro_model(), TrainConfig()))


def test_checkpoint_of_another_shape_is_a_config_error(tmp_path):
    d = save_checkpoint(tmp_path, 1, micro_model(), None, {})
    with pytest.raises(ConfigError, match="does not fit"):
        load_checkpoint(d, micro_model(dim=48))


def test_metrics_truncate_drops_partial_and_later_lines(tmp_path):
    m = MetricsLogger(tmp_path / "metrics.jsonl")
    for s in range(1, 6):
        m.log({"step": s, "loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a kill mid-write
    m.truncate_after(3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


# ---- whole runs in subprocesses ----------------------------------------------------------------------------
def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    e.pop("NANOSEEK_TEST_KILL_AFTER_STEP", None)
    return e


def pretrain_args(tmp_path: Path, out: str, steps: int = 8, batch: int = 8) -> list[str]:
    cfg = tmp_path / "micro.json"
    if not cfg.exists():
        cfg.write_text(json.dumps(MICRO))
    return ["pretrain", "--config", str(cfg), "--out", str(tmp_path / out), "--steps", str(steps),
            "--seq-len", "32", "--batch-size", str(batch), "--n-docs", "40", "--n-test-docs", "20",
            "--warmup", "2", "--lr", "3e-3", "--eval-interval", "3", "--ckpt-interval", "2", "--keep-last", "2",
            "--device", "cpu"]


def spawn(args: list[str], extra_env: dict | None = None, torchrun: int = 0) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}",
                "-m", "nanoseek.cli"] if torchrun else [sys.executable, "-m", "nanoseek.cli"]
    return subprocess.Popen(launcher + args, cwd=REPO, env={**env(), **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen, ok: bool = True) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=240)
    if ok:
        assert p.returncode == 0, f"exit {p.returncode}\n{out}\n{err}"
    return p.returncode, out, err


LOSS_KEYS = ("loss", "main", "mtp", "balance", "grad_norm", "lr", "eval_loss")


def assert_same_losses(a: list[dict], b: list[dict], rel: float, abs_: float = 0.0) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in LOSS_KEYS:
            if k in ra or k in rb:
                assert rb[k] == pytest.approx(ra[k], rel=rel, abs=abs_), (ra["step"], k)


def test_kill_and_resume_is_exact(tmp_path):
    full = spawn(pretrain_args(tmp_path, "full"))
    killed = spawn(pretrain_args(tmp_path, "killed"), {"NANOSEEK_TEST_KILL_AFTER_STEP": "5"})
    finish(full)
    code, _, _ = finish(killed, ok=False)
    assert code == -9  # SIGKILLed after step 5; the last checkpoint is step 4
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step_4"
    assert [r["step"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl")][-1] == 5
    _, out, _ = finish(spawn(pretrain_args(tmp_path, "killed") + ["--resume"]))
    assert "resumed from" in out
    ref = read_metrics(tmp_path / "full" / "metrics.jsonl")
    got = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert len(ref) == 8
    assert_same_losses(ref, got, rel=0, abs_=1e-6)
    assert [r["expert_load"] for r in ref] == [r["expert_load"] for r in got]
    assert (tmp_path / "killed" / "report.md").exists()
    assert (tmp_path / "killed" / "plots" / "loss.png").exists()
    assert (tmp_path / "killed" / "plots" / "expert_load.png").exists()


def test_two_process_ddp_matches_one_process(tmp_path):
    ddp = spawn(pretrain_args(tmp_path, "ddp", steps=4), torchrun=2)
    one = spawn(pretrain_args(tmp_path, "one", steps=4))
    finish(one)
    _, out, _ = finish(ddp)
    ref = read_metrics(tmp_path / "one" / "metrics.jsonl")
    got = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert len(got) == 4  # one writer: no duplicated lines
    assert_same_losses(ref, got, rel=1e-5, abs_=1e-7)
    def listing(d):
        return sorted(str(p.relative_to(d)) for p in d.rglob("*"))

    assert listing(tmp_path / "ddp") == listing(tmp_path / "one")  # rank 1 wrote nothing extra
    assert out.count("done: step 4") == 1  # only rank 0 reports


# ---- CLI errors --------------------------------------------------------------------------------------------
def cli_error(capsys, argv: list[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_cli_errors_are_one_line(tmp_path, capsys):
    base = pretrain_args(tmp_path, "run")
    assert "unknown preset" in cli_error(capsys, ["pretrain", "--preset", "huge", "--out", str(tmp_path / "x")])
    assert "unknown task" in cli_error(capsys, ["pretrain", "--task", "chess", "--out", str(tmp_path / "x")])
    assert "does not exist" in cli_error(capsys, ["pretrain", "--out", str(tmp_path / "nope"), "--resume"])
    (tmp_path / "empty").mkdir()
    assert "config.json" in cli_error(capsys, ["pretrain", "--out", str(tmp_path / "empty"), "--resume"])
    bad_shape = base + ["--seq-len", "100"]  # micro model's max_seq_len is 64
    assert "max_seq_len" in cli_error(capsys, bad_shape)
    assert "steps must be" in cli_error(capsys, base + ["--steps", "0"])
    assert "does not exist" in cli_error(capsys, ["sample", "--run", str(tmp_path / "nope"), "--prompt", "hi"])


def test_cli_corrupted_checkpoint_and_resume_without_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    model = micro_model()
    (run / "config.json").write_text(json.dumps({"model": model.cfg.to_dict(), "train": TrainConfig().to_dict(),
                                                 "data": {"task": "arithmetic"}}))
    assert "nothing to resume" in cli_error(capsys, ["pretrain", "--out", str(run), "--resume"])
    assert "no checkpoint" in cli_error(capsys, ["sample", "--run", str(run), "--prompt", "hi"])
    d = save_checkpoint(run / "checkpoints", 3, model, None, {})
    (d / "model.safetensors").write_bytes(b"\x00garbage")
    assert "corrupted" in cli_error(capsys, ["sample", "--run", str(run), "--prompt", "hi"])


def test_cli_error_in_a_real_process_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "nanoseek.cli", "pretrain", "--out", str(tmp_path / "nope"),
                        "--resume"], check=False, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_sample_after_pretraining(tmp_path):
    """End to end: a short run, then `nanoseek sample` prints a completion (content is not judged here)."""
    finish(spawn(pretrain_args(tmp_path, "s", steps=3)))
    t = time.time()
    _, out, _ = finish(spawn(["sample", "--run", str(tmp_path / "s"), "--prompt", "Compute 2 + 3.",
                              "--max-new-tokens", "8"]))
    assert out.strip() and time.time() - t < 120


def test_paced_pretraining_follows_the_outside_clock_and_stops_at_its_end(tmp_path):
    """`pace`: after warmup the lr is the cosine of the clock's fraction (closed form), not of the step count,
    and the run stops (with a checkpoint) right after the step that sees the clock at 1, far below its cap."""
    from nanoseek.train.pretrain import DataConfig, PretrainConfig, pretrain

    reads = {"n": 0}

    def clock() -> float:  # read twice per step (lr before, stop after): 0.25 more per finished step
        reads["n"] += 1
        return min(1.0, (reads["n"] // 2) * 0.25)

    train = TrainConfig(lr=2e-3, min_lr_ratio=0.1, warmup_steps=1, steps=1000, batch_size=4, seq_len=16,
                        eval_interval=0, ckpt_interval=0, log_interval=1)
    cfg = PretrainConfig(model=ModelConfig(**MICRO), train=train, data=DataConfig(n_docs=60, n_test_docs=20))
    out = pretrain(tmp_path / "paced", cfg, device="cpu", pace=clock)
    assert out["step"] == 4  # the clock reads 1.0 after the 4th step
    lrs = [r["lr"] for r in read_metrics(tmp_path / "paced" / "metrics.jsonl")]
    expected = [2e-3] + [2e-4 + 0.5 * 1.8e-3 * (1 + math.cos(math.pi * f)) for f in (0.25, 0.5, 0.75)]
    assert lrs == pytest.approx(expected)
    assert latest_checkpoint(tmp_path / "paced" / "checkpoints").name.endswith("4")
