"""V3's ablation knobs (issue 29): `--balance {bias,aux,none}` (the batch-wise auxiliary loss against a hand
computation, which mode moves the gate bias, the aux gradient), MaxVio (Wang et al. 2024) against hand-made
loads, and `--mtp-depth`."""
import argparse

import pytest
import torch

from nanoseek.commands import pretrain as pretrain_cmd
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.data import Loader, pack_documents
from nanoseek.model import Transformer
from nanoseek.model.moe import batch_balance_loss, load_summary, max_vio, mean_max_vio, sequence_balance_loss
from nanoseek.train.common import Dist, TrainConfig, build_optimizer
from nanoseek.train import pretrain as pt
from nanoseek.train.metrics import read_metrics
from nanoseek.train.pretrain import train_step

MICRO = {"vocab_size": 64, "dim": 32, "inter_dim": 64, "moe_inter_dim": 32, "n_layers": 2, "n_dense_layers": 1,
         "n_heads": 2, "n_routed_experts": 4, "n_shared_experts": 1, "n_activated_experts": 2, "kv_lora_rank": 16,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "max_seq_len": 64, "original_seq_len": 64,
         "init_std": 0.1}


def micro_model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**MICRO, **kw}).validate())


def random_loader(batch=4, seq_len=16, seed=0) -> Loader:
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, 64, (int(n),), generator=g).tolist() for n in torch.randint(4, 30, (80,), generator=g)]
    return Loader(pack_documents(docs, seq_len, eos_id=1), batch, seed=seed)


# ---- --balance ------------------------------------------------------------------------------------------------
SCORES = torch.tensor([[[0.9, 0.5, 0.3, 0.1], [0.2, 0.8, 0.6, 0.4]],
                       [[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]])
INDICES = torch.tensor([[[0, 1], [1, 2]], [[0, 1], [2, 3]]])


def test_batch_aux_loss_hand_computed():
    """Over the batch's N=4 tokens (E=4, K=2): picks {0,1},{1,2},{0,1},{2,3} give counts [2,3,2,1], so
    f = E/(K N) * counts = [1, 1.5, 1, 0.5]; normalized scores per token are [1/2, 5/18, 1/6, 1/18],
    [.1, .4, .3, .2] and twice [.25]*4, so P = [11/40, 53/180, 29/120, 17/90] and
    L = 11/40 + 53/120 + 29/120 + 17/180 = 379/360. The per-sequence mean (V3's complementary loss) of the same
    routing is 398/360: a loss averaged per sequence, unnormalized affinities or a missing E/(K N) all fail."""
    loss = batch_balance_loss(SCORES.reshape(4, 4), INDICES.reshape(4, 2))
    assert loss.item() == pytest.approx(379 / 360, rel=1e-6)
    assert sequence_balance_loss(SCORES, INDICES).item() == pytest.approx(398 / 360, rel=1e-6)
    uniform = torch.full((6, 3), 0.7)
    assert batch_balance_loss(uniform, torch.tensor([[0], [1], [2], [0], [1], [2]])).item() == pytest.approx(1.0)


def test_aux_loss_gradient_reaches_only_the_gate():
    """L_aux flows into every MoE layer's gate weights (through P; f is a count); a layer's own experts are not
    upstream of its gate, so the last MoE layer's (the MTP block's) get no gradient from it."""
    model = micro_model(n_layers=3)
    model.train()
    ids = torch.randint(0, 64, (2, 16))
    _, parts = model(ids, ids.roll(-1, 1))
    per_layer = [m.aux_loss for m in model.moe_layers()]
    assert len(per_layer) == 3  # two main-model MoE layers and the MTP block's
    assert parts.aux.item() == pytest.approx(sum(p.item() for p in per_layer))
    parts.aux.backward()
    for m in model.moe_layers():
        assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.moe_layers()[-1].experts.parameters())
    model.eval()
    _, parts = model(ids, ids.roll(-1, 1))
    assert parts.aux.item() == 0.0  # eval forwards compute no balance loss (no stale value)


def _steps(balance: str, steps: int = 3, **kw) -> tuple[Transformer, list[dict], TrainConfig]:
    model = micro_model()
    cfg = TrainConfig(batch_size=4, grad_accum=2, lr=1e-2, bias_gamma=1e-2, steps=5, balance=balance, **kw)
    opt = build_optimizer(model, cfg)
    loader = random_loader()
    return model, [train_step(model, opt, loader, cfg, Dist()) for _ in range(steps)], cfg


@pytest.mark.parametrize("balance", ["aux", "none"])
def test_aux_and_none_never_move_the_bias(balance):
    """Only `bias` moves the gate bias; aux adds aux_alpha * L_aux to the loss, none adds nothing (the sequence-wise
    term stays in both). Loads are still counted (and their accumulators reset) for MaxVio."""
    model, outs, cfg = _steps(balance, aux_alpha=0.5)
    assert all(torch.equal(m.gate.bias, torch.zeros(4)) for m in model.moe_layers())
    assert all(m.load_accum.sum() == 0 for m in model.moe_layers())
    for out in outs:
        assert out["loads"].sum() > 0 and out["aux"] >= 1 - 1e-6
        want = out["main"] + cfg.mtp_lambda * out["mtp"] + cfg.balance_alpha * out["balance"]
        if balance == "aux":
            want += cfg.aux_alpha * out["aux"]
        assert out["loss"] == pytest.approx(want, rel=1e-5)


def test_bias_mode_moves_the_bias_and_aux_changes_the_gate_update():
    """bias (the default) moves the bias; aux and none start from the same weights and batches and differ in the
    gate weights after one step (the aux gradient)."""
    model, _, _ = _steps("bias", steps=1)
    assert all(m.gate.bias.abs().sum() > 0 for m in model.moe_layers())
    aux, _, _ = _steps("aux", steps=1, aux_alpha=1.0)
    none, _, _ = _steps("none", steps=1)
    for a, n in zip(aux.moe_layers(), none.moe_layers()):
        assert not torch.equal(a.gate.weight, n.gate.weight)


def test_balance_flag_validation():
    with pytest.raises(ConfigError, match="balance must be one of"):
        TrainConfig(balance="loss").validate()
    with pytest.raises(ConfigError, match="aux_alpha"):
        TrainConfig(aux_alpha=-1.0).validate()
    assert TrainConfig().balance == "bias" and TrainConfig.from_dict({}).aux_alpha == 1e-3


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    pretrain_cmd.add_arguments(p)
    return p.parse_args(["--out", "unused", *argv])


def test_cli_balance_flags_reach_the_config():
    cfg = pretrain_cmd.resolve_config(_parse("--balance", "aux", "--aux-alpha", "0.01", "--bias-gamma", "0.002"))
    assert (cfg.train.balance, cfg.train.aux_alpha, cfg.train.bias_gamma) == ("aux", 0.01, 0.002)
    assert pretrain_cmd.resolve_config(_parse()).train.balance == "bias"


# ---- MaxVio ---------------------------------------------------------------------------------------------------
def test_max_vio_hand_made_loads():
    """Layer 1: max 4 / mean 2 - 1 = 1; layer 2: 5 / 2 - 1 = 1.5; averaged over layers: 1.25. A balanced layer
    is 0; no MoE layers (a dense model) or no routed tokens give None. Held-out: the mean of per-batch values."""
    loads = torch.tensor([[4.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 5.0]])
    assert max_vio(loads) == pytest.approx(1.25)
    assert max_vio(torch.full((3, 8), 7.0)) == 0.0
    assert max_vio(torch.zeros(0, 0)) is None and max_vio(torch.zeros(2, 4)) is None
    assert mean_max_vio([loads, torch.tensor([[3.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])]) == \
        pytest.approx((1.25 + (3.0 - 1.0) / 2) / 2)
    assert load_summary(loads)["max_vio"] == pytest.approx(1.25)


def tiny_run_cfg(balance: str = "bias", steps: int = 4, n_mtp: int = 1) -> pt.PretrainConfig:
    model = {**MICRO, "dim": 64, "kv_lora_rank": 32, "n_mtp": n_mtp}
    return pt.PretrainConfig(
        model=ModelConfig(**model),
        train=TrainConfig(steps=steps, seq_len=32, batch_size=4, warmup_steps=1, lr=3e-3, eval_interval=2,
                          eval_batches=2, ckpt_interval=0, balance=balance),
        data=pt.DataConfig(n_docs=40, n_test_docs=20))


def test_pretrain_logs_max_vio_for_train_and_held_out(tmp_path):
    """Every logged step has max_vio (its batch's loads, all micro-batches summed: equal to what its expert_load
    shares give, E * max share - 1 per layer, averaged); every evaluation has val_max_vio >= 0."""
    pt.pretrain(tmp_path / "run", tiny_run_cfg("none"), device="cpu")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        shares = r["expert_load"]
        want = sum(len(s) * max(s) - 1 for s in shares) / len(shares)
        assert r["max_vio"] == pytest.approx(want, abs=1e-3)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(r["val_max_vio"] >= 0 for r in evals)
    assert all(m.gate.bias.abs().sum() == 0 for m in _final_model(tmp_path / "run").moe_layers())


def _final_model(run) -> Transformer:
    from nanoseek.train.checkpoint import latest_checkpoint, load_model_weights

    cfg = pt.PretrainConfig.load(run)
    model = Transformer(cfg.model)
    load_model_weights(latest_checkpoint(run / "checkpoints"), model)
    return model


# ---- --mtp-depth ----------------------------------------------------------------------------------------------
def test_mtp_depth_zero_has_no_mtp_and_loss_is_main():
    """--mtp-depth 0: no MTP parameters, the MTP term is exactly 0 and (sequence loss off) loss == main; the main
    model (parameters, FLOPs per token) is the same for every depth, so on/off compares at equal main-model cost."""
    from nanoseek.train.metrics import model_flops_per_token

    cfgs = {d: pretrain_cmd.resolve_config(_parse("--mtp-depth", str(d))).model for d in (0, 1, 2)}
    assert [c.n_mtp for c in cfgs.values()] == [0, 1, 2]
    assert len({c.param_counts()["active"] for c in cfgs.values()}) == 1
    assert len({model_flops_per_token(c, 64, mtp=False) for c in cfgs.values()}) == 1
    assert cfgs[0].param_counts()["mtp"] == 0 < cfgs[1].param_counts()["mtp"]
    model = micro_model(n_mtp=0)
    assert len(model.mtp) == 0 and not any(n.startswith("mtp.") for n, _ in model.named_parameters())
    with_mtp = micro_model(n_mtp=1)
    assert model.num_params() < with_mtp.num_params()
    cfg = TrainConfig(batch_size=4, lr=1e-2, steps=5, balance_alpha=0.0)
    out = train_step(model, build_optimizer(model, cfg), random_loader(), cfg, Dist())
    assert out["mtp"] == 0.0 and out["loss"] == out["main"]
    out = train_step(with_mtp, build_optimizer(with_mtp, cfg), random_loader(), cfg, Dist())
    assert out["mtp"] > 0 and out["loss"] == pytest.approx(out["main"] + cfg.mtp_lambda * out["mtp"], rel=1e-6)


def test_mtp_depth_flag_errors(tmp_path):
    with pytest.raises(ConfigError, match="mtp-depth must be >= 0"):
        pretrain_cmd.resolve_config(_parse("--mtp-depth", "-1"))
    pt.pretrain(tmp_path / "run", tiny_run_cfg(steps=1), device="cpu")
    args = _parse("--mtp-depth", "0", "--resume")
    args.out = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="differs from the run's 1"):
        pretrain_cmd.resolve_config(args)


# ---- bench/ablations.py: the verdict arithmetic ---------------------------------------------------------------
def _ablations_bench():
    import importlib.util
    import sys
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench_dir))  # it imports text_vs_dense beside it
    spec = importlib.util.spec_from_file_location("ablations", bench_dir / "ablations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ablations_tokens_to_reach_and_floor_rule():
    """tokens_to_reach interpolates the first crossing (bpb 3.0 -> 2.0 between 100 and 200 tokens: 2.5 at 150) or
    says None; a gap counts only above every seed's floor with one sign; compare() takes the floor from the floor
    and bias arms of the same seed; a one-ulp move changes weights but not their shape."""
    ab = _ablations_bench()
    curve = [{"tokens": 0, "val_bpb": 4.0}, {"tokens": 100, "val_bpb": 3.0}, {"tokens": 200, "val_bpb": 2.0}]
    assert ab.tokens_to_reach(curve, 2.5) == pytest.approx(150.0)
    assert ab.tokens_to_reach(curve, 4.0) == 0.0 and ab.tokens_to_reach(curve, 1.9) is None
    assert ab.counts([0.2, 0.3], [0.1, 0.1]) and not ab.counts([0.2, -0.3], [0.1, 0.1])
    assert not ab.counts([0.2, 0.05], [0.1, 0.1]) and not ab.counts([], [])
    runs = [{"arm": a, "seed": s, "final_bpb": v} for a, s, v in
            [("bias", 0, 2.0), ("floor", 0, 2.01), ("aux", 0, 2.05), ("bias", 1, 2.0), ("floor", 1, 1.98),
             ("aux", 1, 2.01)]]
    c = ab.compare(runs, "aux", "bias", "final_bpb")
    assert c["gaps"] == pytest.approx([0.05, 0.01]) and c["floors"] == pytest.approx([0.01, 0.02])
    assert not c["counts"]  # seed 1's gap (0.01) is inside its floor (0.02)
    model = micro_model()
    before = [p.detach().clone() for p in model.parameters()]
    ab.one_ulp(model, 0)
    for b, p in zip(before, model.parameters()):
        assert not torch.equal(b, p) and torch.equal(torch.nextafter(b, p.detach()), p.detach())
