"""Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290, eq. 7), as Kimi k1.5 uses it for
long2short (arXiv 2501.12599 sec. 2.4): the shortest correct answer is preferred over a longer one.

Loss, per (prompt x, chosen y_w, rejected y_l) with the policy pi and a frozen reference pi_ref:

    L = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

with log pi(y|x) the SUM of the completion tokens' log-probs (eos included), the form and the
"sigmoid" loss of TRL's DPOTrainer (label smoothing 0). The implicit rewards beta * (log pi - log pi_ref)
of chosen and rejected are logged, and so is the share of pairs where the chosen one's is higher.

Data: JSONL rows `{"prompt", "chosen", "rejected"}` (preference_pairs builds them from a run's samples). On an
imported checkpoint's run (nanoseek.hf_tokenizer) the prompt goes through its chat template and the log-probs are
over the tokenizer's vocabulary only (an embedding padded past it keeps its never-sampled rows out).

Simplifications: the reference log-probs are computed once at the start (the reference is frozen, so this
is exact and keeps no second model in memory); batches are drawn with replacement by a step-seeded
generator (so a resumed run draws the same batches); constant lr after a linear warmup; the MoE routing
bias is frozen; no MTP loss.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.cli_config import knob
from nanoseek.config import ConfigError
from nanoseek.io import atomic_write_text
from nanoseek.model.transformer import IGNORE
from nanoseek.train.checkpoint import load_checkpoint, load_run_model, save_checkpoint
from nanoseek.train.common import clip_grads, set_lr
from nanoseek.train.loop import load_mask, open_run, read_jsonl_rows, write_run_files
from nanoseek.train.sft import encode_examples, trim
from nanoseek.train.metrics import MetricsLogger, ProgressLine

MAX_PAIRS = 1_000_000


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO sigmoid loss and the implicit rewards of chosen and rejected, from sequence log-probs."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * logits)
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def sequence_logps(model, ids: torch.Tensor, targets: torch.Tensor, pad_id: int = 2, vocab: int | None = None
                   ) -> torch.Tensor:
    """Sum of log p(target) over the positions whose target is not IGNORE; ids (B, L + 1), targets (B, L).
    `vocab`: the softmax over the first `vocab` logits only (an imported checkpoint's padded embedding rows)."""
    ids, targets = trim(ids, targets)
    mask = targets != IGNORE
    with load_mask(model, ids[:, :-1] != pad_id):
        logits = model.logits(model.hidden(ids[:, :-1]))[..., :vocab]
    logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


@dataclass
class DPOConfig:
    init: str = knob("", help="the run to fine-tune; also the frozen reference")
    data: str = knob("", help='JSONL of {"prompt", "chosen", "rejected"}')
    beta: float = knob(0.1, help="DPO beta: strength of the implicit KL to the reference")
    lr: float = knob(5e-5, help="learning rate")
    warmup_steps: int = 5
    steps: int = knob(100, resume="override", help="optimizer steps in the whole run")
    batch_size: int = knob(16, help="pairs per step")
    seq_len: int = knob(128, help="longest prompt + completion in tokens; longer pairs are skipped")
    grad_clip: float = 1.0
    seed: int = knob(0, help="seed of the pair order (and of --make-pairs sampling)")
    ckpt_every: int = 50
    keep_last: int = 2

    def validate(self) -> DPOConfig:
        if not self.init or not self.data:
            raise ConfigError("DPO needs --init RUN and --data PAIRS.jsonl")
        if self.beta <= 0 or self.lr <= 0:
            raise ConfigError("beta and lr must be positive")
        if min(self.steps, self.batch_size, self.seq_len, self.ckpt_every, self.keep_last) < 1:
            raise ConfigError("steps, batch_size, seq_len, ckpt_every and keep_last must be >= 1")
        return self


def read_pairs(path: str | Path) -> list[dict]:
    return read_jsonl_rows(path, MAX_PAIRS, "DPO", "pairs",
                           lambda row: isinstance(row, dict)
                           and all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected")),
                           '{"prompt": str, "chosen": str, "rejected": str}')


def encode_pairs(pairs: list[dict], tokenizer, seq_len: int):
    """(chosen ids, chosen targets, rejected ids, rejected targets, skipped): both sides of a pair are kept
    or skipped together."""
    fits = [p for p in pairs if max(len(tokenizer.document_ids(p["prompt"], p[k])) for k in ("chosen", "rejected"))
            <= seq_len + 1]
    cw, ct, _ = encode_examples([{"prompt": p["prompt"], "completion": p["chosen"]} for p in fits], tokenizer, seq_len)
    rw, rt, _ = encode_examples([{"prompt": p["prompt"], "completion": p["rejected"]} for p in fits], tokenizer, seq_len)
    return cw, ct, rw, rt, len(pairs) - len(fits)


def preference_pairs(run: str | Path, task_name: str, n_problems: int, samples: int, temperature: float = 1.0,
                     max_new_tokens: int = 64, seed: int = 0, difficulty: int | None = None) -> list[dict]:
    """Pairs from a run's own samples on train-split problems (Kimi k1.5 long2short DPO): chosen = the shortest
    correct completion, rejected = the longest of the wrong ones and the correct ones longer than the chosen.
    Problems without a correct sample or without a rejected candidate give no pair."""
    from nanoseek.engine import Engine
    from nanoseek.tasks import get_task
    from nanoseek.hf_tokenizer import load_tokenizer

    if n_problems * samples > MAX_PAIRS or samples < 2:
        raise ConfigError("need samples >= 2 and problems x samples <= 1,000,000")
    task = get_task(task_name)
    d = task.check_difficulty(difficulty)
    model, _, _ = load_run_model(run)
    tok = load_tokenizer(run)  # nanoseek's own or an imported checkpoint's
    engine = Engine(model, tok)
    rng = random.Random(seed)
    problems = [task.sample_split(rng, d, "train") for _ in range(n_problems)]
    jobs = [p for p in problems for _ in range(samples)]
    gens, prompts = [], [tok.prompt_ids(p.prompt) for p in jobs]
    for c in range(0, len(jobs), 512):
        gens += engine.generate(prompts[c:c + 512], max_new_tokens, temperature=temperature, seed=seed * 1_000_003 + c)
    scores = task.score_batch(jobs, [tok.completion_text(q, g.text) for q, g in zip(prompts, gens)],
                              [g.finish_reason == "length" for g in gens])
    pairs = []
    for i, problem in enumerate(problems):
        group = [(g, s) for g, s in zip(gens[i * samples:(i + 1) * samples], scores[i * samples:(i + 1) * samples])]
        good = [(len(g.tokens), g.text) for g, s in group if s.correct and s.format_ok and g.finish_reason != "length"]
        if not good:
            continue
        n_w, chosen = min(good)
        bad = [(len(g.tokens), g.text) for g, s in group if not (s.correct and s.format_ok)
               or (g.finish_reason != "length" and len(g.tokens) > n_w)]
        bad = [b for b in bad if b[1] != chosen]
        if not bad:
            continue
        n_l, rejected = max(bad)
        pairs.append({"prompt": problem.prompt, "chosen": chosen, "rejected": rejected, "chosen_tokens": n_w,
                      "rejected_tokens": n_l, "answer": problem.answer})
    return pairs


def write_pairs(pairs: list[dict], path: str | Path) -> None:
    atomic_write_text(Path(path), "".join(json.dumps(p) + "\n" for p in pairs))


def _batched_logps(model, ids, tgt, pad_id: int, vocab: int | None, chunk: int = 64) -> torch.Tensor:
    return torch.cat([sequence_logps(model, ids[i:i + chunk], tgt[i:i + chunk], pad_id, vocab)
                      for i in range(0, ids.size(0), chunk)])


def train_dpo(out: str | Path, cfg: DPOConfig | None, resume: bool = False, quiet: bool = False,
              steps: int | None = None) -> dict:
    """Train (or resume) the DPO run in `out` on CPU; returns the last metrics. On resume the stored config is
    authoritative (`cfg` may be None and is ignored); `steps`, when given, changes the total (to extend a run)."""
    from nanoseek.hf_tokenizer import load_tokenizer

    out, ckpt_dir, ckpt, saved = open_run(out, resume, "dpo")
    if saved is not None:
        cfg = DPOConfig(**{**saved, **({"steps": steps} if steps is not None else {})})
    elif cfg is None:
        raise ConfigError(f"{out} holds no dpo run to resume; start one with --init and --data")
    elif steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    cfg.validate()
    init = Path(cfg.init)
    model, _, _ = load_run_model(init)
    tok = load_tokenizer(init)  # nanoseek's own or an imported checkpoint's (prompts through its chat template)
    pairs = read_pairs(cfg.data)
    cw, ct, rw, rt, skipped = encode_pairs(pairs, tok, cfg.seq_len)
    n = cw.size(0)
    if n == 0:
        raise ConfigError(f"none of the {len(pairs)} pairs fits --seq-len {cfg.seq_len}")
    with torch.no_grad():  # the frozen reference is the init model: its log-probs once, before any update
        ref_c, ref_r = (_batched_logps(model, cw, ct, tok.pad_id, tok.sample_vocab),
                        _batched_logps(model, rw, rt, tok.pad_id, tok.sample_vocab))
    for m in model.moe_layers():
        m.load_accum.zero_()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    step = 0
    if ckpt is not None:
        step = int(load_checkpoint(ckpt, model, optimizer)["step"])
    else:
        run_cfg = {"model": model.cfg.to_dict(), "dpo": dataclasses.asdict(cfg), "init": str(init), "stage": "dpo",
                   "data": {"pairs": len(pairs), "kept": n, "skipped_too_long": skipped}}
        write_run_files(out, run_cfg, init)
    metrics = MetricsLogger(out / "metrics.jsonl")
    metrics.truncate_after(step)
    progress = ProgressLine(cfg.steps, start=step, enabled=not quiet, print_every=max(1, cfg.steps // 10),
                            description="dpo")
    last: dict = {}
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
            set_lr(optimizer, lr)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen)
            model.train()
            pc = sequence_logps(model, cw[idx], ct[idx], tok.pad_id, tok.sample_vocab)
            pr = sequence_logps(model, rw[idx], rt[idx], tok.pad_id, tok.sample_vocab)
            losses, rew_c, rew_r = dpo_loss(pc, pr, ref_c[idx], ref_r[idx], cfg.beta)
            loss = losses.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_grads(model, cfg.grad_clip)
            optimizer.step()
            for m in model.moe_layers():  # routing bias frozen: drop the loads counted in this step
                m.load_accum.zero_()
            step += 1
            last = {"step": step, "loss": loss.item(), "reward_chosen": float(rew_c.mean()),
                    "reward_rejected": float(rew_r.mean()), "reward_accuracy": float((rew_c > rew_r).float().mean()),
                    "margin": float((rew_c - rew_r).mean()), "grad_norm": grad_norm, "lr": lr,
                    "step_s": round(time.perf_counter() - t0, 3)}
            metrics.log(last)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save_checkpoint(ckpt_dir, step, model, optimizer, {}, cfg.keep_last)
            progress.update(step, last["loss"], lr, 0.0, f"margin {last['margin']:.3f} acc {last['reward_accuracy']:.2f}")
    finally:
        progress.close()
    return {**last, "step": step, "pairs": n, "skipped": skipped}
