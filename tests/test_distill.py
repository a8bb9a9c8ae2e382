"""On-policy distillation: the reverse KL against hand-computed values and its closed-form gradient, the masked
token mean, the packed training step's loss and gradient against per-sequence forwards and a hand-written KL,
one clear error for a tokenizer mismatch, and a short run that lowers the KL and resumes exactly."""
import json
import math

import pytest
import torch

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.corpus import corpus_texts
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import save_checkpoint
from nanoseek.train.common import TrainConfig
from nanoseek.engine import Generation
from nanoseek.train.distill import (DistillConfig, distill_loss, distill_step, fused_reverse_kl, pack, reverse_kl,
                                     train_distill)
from nanoseek.train.metrics import read_metrics


def test_reverse_kl_matches_a_hand_computation_on_a_toy_distribution():
    p_s, p_t = [0.9, 0.05, 0.05], [0.3, 0.3, 0.4]
    hand = sum(a * math.log(a / b) for a, b in zip(p_s, p_t))  # KL(student || teacher) = 0.9 ln 3 + 0.05 ln(1/6) + 0.05 ln(1/8)
    forward = sum(b * math.log(b / a) for a, b in zip(p_s, p_t))
    s_logits = torch.tensor([p_s]).log() + 3.0  # logits are defined up to a constant
    t_logits = torch.tensor([p_t]).log() - 1.0
    got = reverse_kl(s_logits, t_logits).item()
    assert got == pytest.approx(hand, rel=1e-5) and got == pytest.approx(0.795191, abs=1e-5)
    assert abs(got - forward) > 0.2  # it is the reverse KL, not the forward one
    # temperature: both softmaxes at T
    hand_t2 = [x ** 0.5 for x in p_s], [x ** 0.5 for x in p_t]
    ps2 = [x / sum(hand_t2[0]) for x in hand_t2[0]]
    pt2 = [x / sum(hand_t2[1]) for x in hand_t2[1]]
    assert reverse_kl(s_logits, t_logits, 2.0).item() == pytest.approx(
        sum(a * math.log(a / b) for a, b in zip(ps2, pt2)), rel=1e-5)


def test_reverse_kl_gradient_is_the_closed_form():
    torch.manual_seed(0)
    s = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 11, dtype=torch.float64)
    reverse_kl(s, t).sum().backward()
    logp, logq = s.detach().log_softmax(-1), t.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1, keepdim=True)
    torch.testing.assert_close(s.grad, logp.exp() * (logp - logq - kl))  # d KL / d z_v = p_v (log p_v/q_v - KL)


def test_distill_loss_is_the_masked_token_mean():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kl = reverse_kl(s, t)
    assert distill_loss(s, t, mask, 3.0).item() == pytest.approx((kl[0, 1] + kl[0, 2] + kl[1, 0]).item() / 3)


def test_fused_reverse_kl_value_and_gradient_equal_the_reference():
    torch.manual_seed(0)
    z = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 13, dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float64)  # an upstream gradient that is not all ones
    for temperature in (1.0, 0.7):
        ref = reverse_kl(z, t, temperature)
        (g_ref,) = torch.autograd.grad((ref * w).sum(), z)
        got = fused_reverse_kl(z, (t / temperature).log_softmax(-1), temperature)
        (g_got,) = torch.autograd.grad((got * w).sum(), z)
        torch.testing.assert_close(got, ref.detach())
        torch.testing.assert_close(g_got, g_ref)


def test_pack_fits_sequences_into_rows_without_splitting_any():
    seqs = [[5] * 9, [6] * 4, [7] * 5, [8] * 3, [9] * 2]  # inputs of 8, 3, 4, 2, 1 tokens in rows of width 8
    pk = pack(seqs, [2, 2, 2, 1, 1])
    assert pk.ids.shape == (3, 8)  # 18 input tokens: [8], [3 4 1], [2] (best fit, longest first)
    assert int(pk.real.sum()) == 18
    for row, pos, real in zip(pk.ids.tolist(), pk.positions.tolist(), pk.real.tolist()):
        toks = [t for t, r in zip(row, real) if r]
        starts = [j for j, r in enumerate(real) if r and pos[j] == 0]
        assert all(len({t for t in toks[a:b]}) == 1 for a, b in zip(starts, starts[1:] + [len(toks)]))
    # targets: the inputs predicting a completion token: len - prompt_len per sequence
    assert pk.targets.numel() == sum(len(s) - p for s, p in zip(seqs, [2, 2, 2, 1, 1]))
    m = pk.mask[:, 0]
    assert pk.ids[1].tolist() == [6, 6, 6, 7, 7, 7, 7, 9] and pk.positions[1].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert not m[1, 3, 2] and m[1, 3, 3] and not m[1, 2, 3] and m[1, 6, 3]  # causal within a sequence only


class _Spy:
    """Optimizer stand-in that records the gradients distill_step hands it."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters()}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


@pytest.mark.parametrize("gen_lens,rows", [((9, 2, 13, 0, 5), 4), ((6, 7, 6, 8, 7), 5)])  # packed / one per row
def test_packed_step_equals_per_sequence_hand_computed_reverse_kl(gen_lens, rows):
    torch.manual_seed(0)
    kw = dict(vocab_size=40, dim=32, n_heads=2, max_seq_len=64, original_seq_len=64)
    teacher = Transformer(ModelConfig.preset("tiny", n_layers=2, n_dense_layers=1, n_mtp=0, **kw)).eval()
    student = Transformer(ModelConfig.preset("tiny-dense", inter_dim=48, n_layers=2, n_dense_layers=2, **kw))
    for p in teacher.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 40, (n,), generator=g).tolist() for n in (5, 7, 4, 6, 5)]
    gens = [Generation(torch.randint(3, 40, (n,), generator=g).tolist() + [1], [], "stop") for n in gen_lens]
    assert pack([p + x.tokens for p, x in zip(prompts, gens)], [len(p) for p in prompts]).ids.size(0) == rows
    cfg = DistillConfig(teacher="-", student="-", temperature=0.8, micro_batch=2,
                        train=TrainConfig(grad_clip=0.0, weight_decay=0.0))
    spy = _Spy(student)
    got = distill_step(student, teacher, spy, prompts, gens, cfg)
    # reference: each sequence alone, float64 softmaxes, sum_v p log(p / q) written out
    ref_model = Transformer(student.cfg)
    ref_model.load_state_dict(student.state_dict())
    total, n = 0.0, sum(len(x.tokens) for x in gens)
    for pr, ge in zip(prompts, gens):
        ids = torch.tensor([pr + ge.tokens])[:, :-1]
        with torch.no_grad():
            q = (teacher(ids)[0, len(pr) - 1:].double() / 0.8).softmax(-1)
        p = (ref_model(ids)[0, len(pr) - 1:].double() / 0.8).softmax(-1)
        total = total + (p * (p.log() - q.log())).sum() / n
    total.backward()
    assert got["tokens"] == n and got["loss"] == pytest.approx(total.item(), rel=1e-5)
    for name, p in ref_model.named_parameters():
        torch.testing.assert_close(spy.grads[name], p.grad.float(), rtol=1e-4, atol=1e-6)


def make_run(path, tok, seed, n_layers=1):
    cfg = ModelConfig.preset("tiny-dense", vocab_size=tok.vocab_size, dim=64, inter_dim=128, n_layers=n_layers,
                             n_dense_layers=n_layers, n_heads=2, max_seq_len=96, original_seq_len=96)
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
    tok.save(path / "tokenizer.json")
    torch.manual_seed(seed)
    save_checkpoint(path / "checkpoints", 1, Transformer(cfg), None, {})
    return path


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(corpus_texts("arithmetic", 200, seed=0), vocab_size=300)


def test_tokenizer_mismatch_is_one_clear_error(tmp_path, tok):
    other = Tokenizer.train(corpus_texts("countdown", 200, seed=0), vocab_size=300)
    teacher = make_run(tmp_path / "t", tok, 0)
    student = make_run(tmp_path / "s", other, 1)
    cfg = DistillConfig(teacher=str(teacher), student=str(student))
    with pytest.raises(ConfigError, match="different tokenizers") as e:
        train_distill(tmp_path / "out", cfg)
    assert "\n" not in str(e.value)


def test_short_run_lowers_the_kl_and_resumes_exactly_after_ctrl_c(tmp_path, tok, monkeypatch):
    teacher = make_run(tmp_path / "t", tok, 0, n_layers=2)
    student = make_run(tmp_path / "s", tok, 1)

    def cfg():
        return DistillConfig(teacher=str(teacher), student=str(student), prompts_per_step=8, max_new_tokens=24,
                             ckpt_every=3, train=TrainConfig(lr=3e-3, steps=12, warmup_steps=1, weight_decay=0.0))

    train_distill(tmp_path / "full", cfg(), quiet=True)
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert len(full) == 12
    first, last = sum(r["loss"] for r in full[:3]) / 3, sum(r["loss"] for r in full[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    from nanoseek.train import distill

    real_step, calls = distill.distill_step, []

    def interrupted(*a, **kw):  # Ctrl-C during step 8: the checkpoint of step 6 is the last one
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    monkeypatch.setattr(distill, "distill_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_distill(tmp_path / "part", cfg(), quiet=True)
    monkeypatch.setattr(distill, "distill_step", real_step)
    train_distill(tmp_path / "part", None, resume=True, quiet=True)
    part = read_metrics(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in part] == list(range(1, 13))
    for a, b in zip(full, part):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["accuracy"] == b["accuracy"]
