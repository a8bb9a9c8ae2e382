"""`pretrain --optimizer muon` and QK-clip (issue 29; nanoseek.train.optim): the Muon update against a written-out
Newton-Schulz loop in float64, Moonlight's RMS-matching scale, which parameters Muon takes, QK-clip against a
from-the-weights logit computation (the clipped head's max becomes tau, other heads bitwise unchanged), the
recorded max logit, and an exact kill-and-resume with Muon's state."""
import math

import pytest
import torch

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.model.attention import MLA
from nanoseek.model.rope import apply_rope, rope_cos_sin
from nanoseek.train.common import Dist, TrainConfig
from nanoseek.train.metrics import read_metrics
from nanoseek.train.optim import MuonAdamW, OptimConfig, build_optimizer, clip_heads, muon_split, qk_clip
from nanoseek.train.pretrain import train_step
from tests.test_ablations import MICRO, micro_model, random_loader, tiny_run_cfg

KJ = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic coefficients


def newton_schulz(G: torch.Tensor, coef=KJ, steps: int = 5) -> torch.Tensor:
    """The quintic iteration written out in float64 (Keller Jordan's muon.py): X <- a X + (b A + c A^2) X,
    A = X X^T, on the wide orientation, starting from G / ||G||_F."""
    a, b, c = coef
    X = G.double()
    tall = X.size(0) > X.size(1)
    X = (X.T if tall else X) / X.norm()
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def muon_reference(W: torch.Tensor, grads: list[torch.Tensor], lr: float, wd: float, mu: float = 0.95) -> torch.Tensor:
    """W after Muon steps, Keller's classic form: B <- mu B + g, update NS(g + mu B) (Nesterov), then Moonlight's
    decoupled decay and RMS-matched scale: W <- W - lr wd W - lr 0.2 sqrt(max(A, B)) NS(...)."""
    W, buf = W.double().clone(), torch.zeros_like(W, dtype=torch.float64)
    for g in grads:
        buf = mu * buf + g.double()
        W = W * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(W.shape)) * newton_schulz(g.double() + mu * buf)
    return W


def test_muon_update_matches_written_out_newton_schulz():
    """Three steps of the optimizer pretrain builds on a wide (24 x 96) hidden matrix equal the float64 reference
    to ~1% (torch runs the iteration in BF16). A wrong coefficient, no Nesterov, momentum 0.9, four iterations
    instead of five or Keller's scale sqrt(max(1, A/B)) instead of Moonlight's miss it by 2-100% (tried)."""
    torch.manual_seed(0)
    W = torch.randn(24, 96)
    grads = [torch.randn(24, 96) for _ in range(3)]
    model = torch.nn.Sequential(torch.nn.Linear(96, 24, bias=False))
    model[0].weight.data.copy_(W)
    tcfg = TrainConfig(lr=0.01, warmup_steps=0, steps=10)
    opt = build_optimizer(model, tcfg, OptimConfig(optimizer="muon"))
    for g in grads:
        model[0].weight.grad = g.clone()
        opt.step()
    ref = muon_reference(W, grads, lr=0.01, wd=tcfg.weight_decay)
    got = model[0].weight.detach().double()
    assert ((got - W) - (ref - W)).norm() / (ref - W).norm() < 0.015


def test_muon_update_rms_matches_adamw_scale():
    """Moonlight's fix: the update's RMS is ~0.2 lr whatever the shape (the NS output's singular values lie in
    ~[0.7, 1.2], so RMS(O) ~ 1 / sqrt(max(A, B))). Keller's original scale sqrt(max(1, A/B)) would give ~0.1 lr on
    this wide 24 x 96 matrix; weight decay off to see the update alone."""
    for shape in [(24, 96), (96, 24), (64, 64)]:
        p = torch.nn.Parameter(torch.randn(shape))
        opt = torch.optim.Muon([p], lr=1.0, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
        before = p.detach().clone()
        p.grad = torch.randn(shape)
        opt.step()
        rms = (p.detach() - before).pow(2).mean().sqrt().item()
        assert 0.15 < rms < 0.25, (shape, rms)


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = micro_model(n_mtp=1)
    hidden, rest = muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in hidden}
    adamw_names = {names[id(p)] for p in rest.parameters()}
    assert muon_names.isdisjoint(adamw_names) and len(muon_names | adamw_names) == len(names)
    assert {"embed.weight", "head.weight", "layers.1.ffn.gate.weight", "norm.weight"} <= adamw_names
    assert {"layers.0.attn.wq.weight", "layers.0.attn.wkv_a.weight", "layers.0.attn.wkv_b.weight",
            "layers.0.attn.wo.weight", "layers.0.ffn.w1.weight", "layers.1.ffn.experts.3.w2.weight",
            "layers.1.ffn.shared_experts.w3.weight", "mtp.0.eh_proj.weight"} <= muon_names
    assert all(p.dim() == 2 for p in hidden) and not any(".gate." in n for n in muon_names)
    opt = build_optimizer(model, TrainConfig(), OptimConfig(optimizer="muon"))
    assert isinstance(opt, MuonAdamW) and len(opt.param_groups) == 3  # muon + AdamW's decay / no_decay


def test_train_steps_with_muon_lower_the_loss_and_state_round_trips():
    model = micro_model()
    cfg = TrainConfig(batch_size=4, lr=1e-2, steps=20, warmup_steps=0)
    opt = build_optimizer(model, cfg, OptimConfig(optimizer="muon"))
    loader = random_loader()
    first = train_step(model, opt, loader, cfg, Dist())["main"]
    for _ in range(15):
        last = train_step(model, opt, loader, cfg, Dist())["main"]
    assert last < first - 0.1  # random tokens: the floor is ~ln(61)
    state = opt.state_dict()
    again = build_optimizer(micro_model(), cfg, OptimConfig(optimizer="muon"))
    again.load_state_dict(state)
    buf = state["muon"]["state"][0]["momentum_buffer"]
    assert torch.equal(again.muon.state_dict()["state"][0]["momentum_buffer"], buf) and buf.abs().sum() > 0
    with pytest.raises(ValueError, match="not a Muon"):
        again.load_state_dict(build_optimizer(micro_model(), cfg).state_dict())


# ---- QK-clip --------------------------------------------------------------------------------------------------
def reference_logits(attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Causal pre-softmax logits (B, H, T, T) computed from the weights: scale * (q_nope . k_nope + q_rope . k_rope)
    with q = W_q x (or W_qb norm(W_qa x)), [c_KV ; k_rope] = W_kva x, k_nope = W_kvb norm(c_KV)."""
    B, T, _ = x.shape
    H, nope, rope = attn.n_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
    q = x @ attn.wq.weight.T if attn.q_lora_rank == 0 else attn.q_norm(x @ attn.wq_a.weight.T) @ attn.wq_b.weight.T
    q = q.view(B, T, H, nope + rope)
    q_nope, q_rope = q[..., :nope], apply_rope(q[..., nope:], cos, sin)
    kv = x @ attn.wkv_a.weight.T
    c, k_rope = attn.kv_norm(kv[..., :attn.kv_lora_rank]), apply_rope(kv[..., attn.kv_lora_rank:], cos, sin)
    k_nope = (c @ attn.wkv_b.weight.T).view(B, T, H, nope + attn.v_head_dim)[..., :nope]
    logits = (torch.einsum("bthd,bshd->bhts", q_nope, k_nope)
              + torch.einsum("bthd,bsd->bhts", q_rope, k_rope)) * attn.softmax_scale
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf"))


def _attn(q_lora_rank: int) -> tuple[MLA, torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = ModelConfig(**{**MICRO, "q_lora_rank": q_lora_rank, "n_heads": 4}).validate()
    torch.manual_seed(1)
    attn = MLA(cfg)
    for p in attn.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():  # make head 2 sharp: its max logit far above the others
        w = (attn.wq if q_lora_rank == 0 else attn.wq_b).weight
        w.view(4, -1, w.size(1))[2] *= 4.0
    cos, sin = rope_cos_sin(cfg, 24)
    return attn, torch.randn(3, 24, cfg.dim), cos[None], sin[None]


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_recorded_max_logit_equals_the_weights_logits(q_lora_rank):
    """The training forward's per-head max (kept only while track_logits is on, and only in train mode) equals the
    max of the logits recomputed from the weights; a second forward keeps the running max."""
    attn, x, cos, sin = _attn(q_lora_rank)
    attn.train()
    attn(x, cos, sin)
    assert attn.max_logit is None
    attn.track_logits = True
    with torch.no_grad():
        ref = reference_logits(attn, x, cos, sin).amax(dim=(0, 2, 3))
    attn(x, cos, sin)
    torch.testing.assert_close(attn.max_logit, ref, rtol=1e-5, atol=1e-5)
    attn(x[:1] * 0.1, cos, sin)  # smaller logits: the running max stays
    torch.testing.assert_close(attn.max_logit, ref, rtol=1e-5, atol=1e-5)
    attn.eval()
    attn.max_logit = None
    attn(x, cos, sin)
    assert attn.max_logit is None


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_qk_clip_brings_the_head_to_tau_and_leaves_the_rest(q_lora_rank):
    """K2's per-head clip: q_nope, k_nope rows by sqrt(gamma) and q_rope rows by gamma multiply that head's every
    logit by gamma (nope and rope parts alike), so its recomputed max equals tau; the other heads' weights (and so
    their logits) and the shared rope key (wkv_a) are bitwise unchanged. Scaling q_rope by sqrt(gamma), or the
    rope key, fails this (tried)."""
    attn, x, cos, sin = _attn(q_lora_rank)
    with torch.no_grad():
        before = reference_logits(attn, x, cos, sin)
    maxima = before.amax(dim=(0, 2, 3))
    assert maxima.argmax().item() == 2
    tau = float(maxima.sort().values[-2] + maxima.max()) / 2  # between head 2 and the runner-up
    weights = {n: p.detach().clone() for n, p in attn.named_parameters()}
    clipped = clip_heads(attn, maxima, tau)
    assert clipped.tolist() == [2]
    with torch.no_grad():
        after = reference_logits(attn, x, cos, sin)
    assert after[:, 2].max().item() == pytest.approx(tau, rel=1e-5)
    torch.testing.assert_close(after[:, 2], before[:, 2] * (tau / maxima[2].item()), rtol=1e-4, atol=1e-5)
    keep = [0, 1, 3]
    assert torch.equal(after[:, keep], before[:, keep])
    assert torch.equal(attn.wkv_a.weight, weights["wkv_a.weight"])
    H = 4
    for name in ("wq.weight" if q_lora_rank == 0 else "wq_b.weight", "wkv_b.weight"):
        w0 = weights[name].view(H, -1, weights[name].size(1))
        w = attn.get_parameter(name).view_as(w0)
        assert torch.equal(w[keep], w0[keep]) and not torch.equal(w[2], w0[2])
    assert clip_heads(attn, maxima, float(maxima.max()) + 1).numel() == 0  # nothing above tau: nothing touched


def test_qk_clip_after_a_train_step_and_logged_max_logit(tmp_path):
    """Through train_step: the step returns the max recorded logit, and with a tau below it the clip ran (the
    recorded maxima are reset for the next step); through pretrain: every metrics line has max_logit."""
    from nanoseek.train.optim import track_max_logit

    model = micro_model()
    track_max_logit(model, True)
    cfg = TrainConfig(batch_size=4, lr=1e-2, steps=5)
    out = train_step(model, build_optimizer(model, cfg, OptimConfig(optimizer="muon")), random_loader(), cfg, Dist(),
                     qk_clip_tau=0.0)
    assert out["max_logit"] > 0 and all(a.max_logit is None for a in model.modules() if isinstance(a, MLA))
    assert qk_clip(model, 1.0) is None  # nothing recorded since
    run_cfg = tiny_run_cfg(steps=3)
    run_cfg.optim = OptimConfig(optimizer="muon", qk_clip_tau=0.05)
    import nanoseek.train.pretrain as pt

    pt.pretrain(tmp_path / "run", run_cfg, device="cpu")
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 3 and all(r["max_logit"] > 0 for r in rows)
    assert pt.PretrainConfig.load(tmp_path / "run").optim == run_cfg.optim


# ---- config, CLI, resume ----------------------------------------------------------------------------------------
def test_optim_config_errors_and_cli():
    from tests.test_ablations import _parse
    from nanoseek.commands import pretrain as pretrain_cmd

    with pytest.raises(ConfigError, match="optimizer must be one of"):
        OptimConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="qk_clip_tau"):
        OptimConfig(qk_clip_tau=-1)
    cfg = pretrain_cmd.resolve_config(_parse("--optimizer", "muon", "--qk-clip-tau", "50", "--muon-momentum", "0.9"))
    assert cfg.optim == OptimConfig(optimizer="muon", muon_momentum=0.9, qk_clip_tau=50.0)
    assert cfg.optim.tracks_logits and not OptimConfig().tracks_logits
    with pytest.raises(ConfigError, match="do not combine with --ep"):
        cfg.optim.check_parallel(ep=2, pp=1, compile=False)
    with pytest.raises(ConfigError, match="--compile"):
        cfg.optim.check_parallel(ep=1, pp=1, compile=True)


@pytest.mark.slow
def test_kill_and_resume_with_muon_is_exact(tmp_path):
    """Interrupted (SIGKILL after step 5, last checkpoint at 4) and resumed equals uninterrupted, with Muon's
    momentum buffers, AdamW's moments and QK-clip in the loop."""
    from nanoseek.train.checkpoint import latest_checkpoint
    from tests.test_train import assert_same_losses, finish, pretrain_args, spawn

    extra = ["--optimizer", "muon", "--qk-clip-tau", "0.004"]  # the micro model's max logit is ~0.0045: it binds
    full = spawn(pretrain_args(tmp_path, "full") + extra)
    killed = spawn(pretrain_args(tmp_path, "killed") + extra, {"NANOSEEK_TEST_KILL_AFTER_STEP": "5"})
    finish(full)
    code, _, _ = finish(killed, ok=False)
    assert code == -9 and latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step_4"
    _, out, _ = finish(spawn(pretrain_args(tmp_path, "killed") + ["--resume"]))
    assert "resumed from" in out
    ref = read_metrics(tmp_path / "full" / "metrics.jsonl")
    got = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert len(ref) == 8
    assert_same_losses(ref, got, rel=0, abs_=0)
    assert [r["max_logit"] for r in ref] == [r["max_logit"] for r in got]
    assert sum(r["max_logit"] > 0.004 for r in ref) >= 2  # the clip fired


@pytest.mark.slow
def test_two_process_ddp_with_muon_and_qk_clip_matches_one_process(tmp_path):
    """Under torchrun the per-head maxima are all-reduced (max) before clipping, so two processes (half the batch
    each) clip as one process over the whole batch does, and the runs agree (without the all-reduce each rank
    clips by its own half-batch maximum and the runs part: tried)."""
    from tests.test_train import assert_same_losses, finish, pretrain_args, spawn

    extra = ["--optimizer", "muon", "--qk-clip-tau", "0.004"]  # the micro model's max logit is ~0.0045: it binds
    ddp = spawn(pretrain_args(tmp_path, "ddp", steps=4) + extra, torchrun=2)
    one = spawn(pretrain_args(tmp_path, "one", steps=4) + extra)
    finish(one)
    finish(ddp)
    ref = read_metrics(tmp_path / "one" / "metrics.jsonl")
    got = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    # looser than the AdamW test's 1e-5: Muon's BF16 Newton-Schulz turns the rounding difference of averaged
    # gradients into ~1e-5 relative differences of the update
    assert_same_losses(ref, got, rel=1e-3, abs_=1e-6)
    assert [r["max_logit"] for r in got] == pytest.approx([r["max_logit"] for r in ref], rel=1e-3)
