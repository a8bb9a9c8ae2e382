"""Seconds per on-policy distillation step: nanoseek's `distill` vs TRL's `GKDTrainer` (lmbda=1, beta=1: reverse
KL on the student's own samples) on the same teacher, student and prompts.

Teacher and student (run directories given with --teacher / --student, or fresh `tiny` / `tiny-dense` presets
sharing one tokenizer) are exported with `to_hf` and loaded by transformers for TRL; nanoseek trains separate
copies of the same initial weights. Both sides see the same train-split arithmetic prompts in the same order
(the problems nanoseek's distill draws for each step), as identical token ids (checked). Settings on both sides:
32 prompts per step, one sample each, up to 64 new tokens, temperature 1.0 (no top-k / top-p) for sampling and
for the KL, lr 5e-4 constant, AdamW (0.9, 0.95), no weight decay, grad clip 1.0, one optimizer step per batch,
float32 on CPU. The loss functions are checked equal on one batch of logits.

The sides run alternately in one process: TRL's `trainer.train()` drives and a callback runs one nanoseek step
after each TRL step. A TRL step is timed from the end of the previous callback to `on_step_end` (collate,
student generation, teacher and student forwards, backward, optimizer); a nanoseek step is problem drawing +
engine sampling + the update. A third side, `padded`, is nanoseek's previous update (every sample in its own
right-padded row, teacher and student heads and an autograd KL over every position; kept here as
`padded_distill_step`) on the same student samples as ours, with its own copy of the student, so the gain of
the packed step is measured beside it. The first `--warmup` steps of each are not counted; medians over the
rest are reported.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.config import ModelConfig
from nanoseek.corpus import corpus_texts
from nanoseek.engine import Engine
from nanoseek.hf import to_hf
from nanoseek.model import Transformer
from nanoseek.tasks import get_task
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import load_run_model
from nanoseek.train.common import TrainConfig, build_optimizer, clip_grads, set_lr
from nanoseek.train.distill import DistillConfig, distill_loss, distill_step, pack, reverse_kl, step_problems


def padded_distill_step(student, teacher, optimizer, prompts, gens, cfg: DistillConfig) -> dict:
    """nanoseek's distill step before packing (commit 608e177): one right-padded row per sample, both heads
    over every position, the autograd reverse KL masked to completion positions. Dense students only."""
    seqs = [p + g.tokens for p, g in zip(prompts, gens)]
    L = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), L), 2, dtype=torch.long)
    mask = torch.zeros(len(seqs), L - 1)
    for i, (p, x) in enumerate(zip(prompts, seqs)):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, len(p) - 1:len(x) - 1] = 1.0
    n_tokens = max(float(mask.sum()), 1.0)
    student.train()
    with torch.no_grad():
        t_logits = teacher.logits(teacher.hidden(ids[:, :-1]))
    loss = distill_loss(student.logits(student.hidden(ids[:, :-1])), t_logits, mask, n_tokens, cfg.temperature)
    loss.backward()
    clip_grads(student, cfg.train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss.detach())}


def build_models(teacher: str | None, student: str | None, seed: int, tmp: Path):
    if teacher and student:
        t, _, t_step = load_run_model(teacher)
        s, _, s_step = load_run_model(student)
        return t.float(), s.float(), Path(student) / "tokenizer.json", f"teacher {teacher} ({t_step.name}), student {student} ({s_step.name})"
    tok = Tokenizer.train(corpus_texts("arithmetic", 2000, seed=0))
    tok_file = tok.save(tmp / "tokenizer.json")
    torch.manual_seed(seed)
    t = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, n_mtp=0))
    s = Transformer(ModelConfig.preset("tiny-dense", vocab_size=tok.vocab_size))
    return t, s, tok_file, f"fresh tiny teacher and tiny-dense student (random init, vocab {tok.vocab_size})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=None, help="teacher run directory (with --student)")
    ap.add_argument("--student", default=None, help="student run directory (with --teacher)")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps per side before those")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per step")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    P, total = args.prompts, args.warmup + args.steps
    tmp = Path(tempfile.mkdtemp(prefix="distill_vs_trl_"))
    teacher, student, tok_file, desc = build_models(args.teacher, args.student, args.seed, tmp)
    tok = Tokenizer.load(tok_file)
    hf_t = AutoModelForCausalLM.from_pretrained(to_hf(teacher, tmp / "hf_t", include_mtp=False, tokenizer_file=tok_file),
                                                dtype=torch.float32)
    s_dir = to_hf(student, tmp / "hf_s", include_mtp=False, tokenizer_file=tok_file)
    hf_s = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float32)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(s_dir / "tokenizer.json"), bos_token="<|bos|>",
                                     eos_token="<|eos|>", pad_token="<|pad|>", padding_side="left")

    # ---- the same prompts, in the order nanoseek's distill draws them ---------------------------
    train = TrainConfig(lr=args.lr, steps=total, warmup_steps=0, weight_decay=0.0, seed=args.seed, min_lr_ratio=1.0)
    cfg = DistillConfig(teacher="-", student="-", prompts_per_step=P, max_new_tokens=args.max_new_tokens,
                        temperature=1.0, micro_batch=P, train=train).validate()
    task = get_task(cfg.task)
    difficulty = task.check_difficulty(cfg.difficulty)
    plan = [step_problems(task, cfg, difficulty, step) for step in range(total)]
    prompt_ids = [tok.prompt_ids(p.prompt) for step in plan for p in step]
    for p in prompt_ids[:P]:
        if hf_tok(tok.decode(p))["input_ids"] != p:
            raise SystemExit("prompt token ids differ between nanoseek and transformers")
    with torch.no_grad():
        ids = torch.tensor([prompt_ids[0]])
        logit_diff = max((teacher.eval()(ids) - hf_t.eval()(ids).logits).abs().max().item(),
                         (student.eval()(ids) - hf_s.eval()(ids).logits).abs().max().item())
        a, b = torch.randn(4, 9, tok.vocab_size), torch.randn(4, 9, tok.vocab_size)
        labels = torch.zeros(4, 9, dtype=torch.long)
        loss_diff = abs(GKDTrainer.generalized_jsd_loss(a, b, labels, beta=1.0).item() - reverse_kl(a, b).mean().item())

    # ---- TRL side --------------------------------------------------------------------------------
    # TRL computes num_items_in_batch (its loss normalizer) from the collated labels BEFORE on-policy generation
    # replaces the batch, so the collator carries an off-policy completion too (the task's worked solution):
    # with all-masked labels the normalizer is 0 and the first update turns the student into NaN.
    import random as _random

    gold_rng = _random.Random(args.seed)
    completion_ids = [tok.encode(task.solution(p, gold_rng)) + [tok.eos_id] for step in plan for p in step]

    def collate(rows):
        L = max(len(r["prompt_ids"]) for r in rows)
        W = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
        prompts = torch.full((len(rows), L), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        ids = torch.full((len(rows), W), tok.pad_id, dtype=torch.long)
        ids_mask = torch.zeros(len(rows), W, dtype=torch.long)
        labels = torch.full((len(rows), W), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            p, c = r["prompt_ids"], r["completion_ids"]
            prompts[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1
            ids[i, W - len(p) - len(c):] = torch.tensor(p + c)
            ids_mask[i, W - len(p) - len(c):] = 1
            labels[i, W - len(c):] = torch.tensor(c)
        return {"input_ids": ids, "attention_mask": ids_mask, "labels": labels, "prompts": prompts,
                "prompt_attention_mask": mask}

    trl_cfg = GKDConfig(
        output_dir=str(tmp / "trl"), use_cpu=True, bf16=False, fp16=False, seed=args.seed, lmbda=1.0, beta=1.0,
        temperature=1.0, max_new_tokens=args.max_new_tokens, per_device_train_batch_size=P,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, max_steps=total,
        logging_strategy="no", save_strategy="no", report_to=[], push_to_hub=False, disable_tqdm=True,
        dataloader_num_workers=0, gradient_checkpointing=False)
    dataset = Dataset.from_dict({"prompt_ids": prompt_ids, "completion_ids": completion_ids})

    # ---- nanoseek side, run from a callback after each TRL step ----------------------------------
    padded_student = copy.deepcopy(student)
    padded_opt = build_optimizer(padded_student, train)
    set_lr(padded_opt, args.lr)
    engine = Engine(student, tok)
    optimizer = build_optimizer(student, train)
    set_lr(optimizer, args.lr)
    ours: list[dict] = []
    padded: list[dict] = []

    def our_step(step: int) -> None:
        t0 = time.perf_counter()
        problems = step_problems(task, cfg, difficulty, step)
        prompts = [tok.prompt_ids(p.prompt) for p in problems]
        gens = engine.generate(prompts, cfg.max_new_tokens, temperature=1.0, seed=args.seed * 1_000_003 + step)
        t1 = time.perf_counter()
        timed = {}
        for name in (("ours", "padded") if step % 2 == 0 else ("padded", "ours")):  # alternate the order
            t2 = time.perf_counter()
            if name == "ours":
                res = distill_step(student, teacher, optimizer, prompts, gens, cfg)
            else:
                old = padded_distill_step(padded_student, teacher, padded_opt, prompts, gens, cfg)
            timed[name] = time.perf_counter() - t2
        ours.append({"s": t1 - t0 + timed["ours"], "gen_s": t1 - t0, "loss": res["loss"],
                     "len": sum(len(g.tokens) for g in gens) / len(gens)})
        padded.append({"s": t1 - t0 + timed["padded"], "gen_s": t1 - t0, "loss": old["loss"]})
        seqs = [p + g.tokens for p, g in zip(prompts, gens)]
        pk = pack(seqs, [len(p) for p in prompts])
        ours[-1].update(rows=pk.ids.size(0), slots=pk.ids.numel(), real=int(pk.real.sum()),
                        padded_slots=len(seqs) * (max(len(x) for x in seqs) - 1))

    trl_s: list[float] = []
    trl_gen_s: list[float] = []
    generate = hf_s.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        trl_gen_s.append(time.perf_counter() - t0)
        return out

    hf_s.generate = timed_generate

    class Interleave(TrainerCallback):
        mark = 0.0

        def on_train_begin(self, a, state, control, **kw):
            self.mark = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            trl_s.append(time.perf_counter() - self.mark)
            bad = [n for n, p in hf_s.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                raise SystemExit(f"TRL's student has non-finite weights after step {state.global_step}: {bad[:3]}")
            our_step(state.global_step - 1)
            self.mark = time.perf_counter()

    trainer = GKDTrainer(model=hf_s, teacher_model=hf_t, args=trl_cfg, train_dataset=dataset, data_collator=collate,
                         processing_class=hf_tok, callbacks=[Interleave()])
    trainer.remove_callback(PrinterCallback)
    trainer.args.dataloader_drop_last = False
    load0 = os.getloadavg()
    trainer.train()
    load1 = os.getloadavg()

    w = args.warmup
    if len(trl_s) != total or len(ours) != total:
        raise SystemExit(f"expected {total} steps per side, got TRL {len(trl_s)}, ours {len(ours)}")
    m_trl, m_ours = statistics.median(trl_s[w:]), statistics.median([o["s"] for o in ours[w:]])
    m_pad = statistics.median([o["s"] for o in padded[w:]])
    g_trl, g_ours = statistics.median(trl_gen_s[w:]), statistics.median([o["gen_s"] for o in ours[w:]])
    print(f"models: {desc}; teacher {sum(p.numel() for p in hf_t.parameters()) / 1e6:.2f}M, student "
          f"{sum(p.numel() for p in hf_s.parameters()) / 1e6:.2f}M params")
    print(f"task arithmetic, {P} prompts x 1 sample/step, <= {args.max_new_tokens} new tokens, lr {args.lr}, "
          f"GKD lmbda 1 beta 1 (reverse KL), T 1.0; float32 CPU, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"load average {load0[0]:.1f} before, {load1[0]:.1f} after ({os.cpu_count()} CPUs)")
    print(f"checks: prompt token ids identical; max |logit diff| nanoseek vs HF export {logit_diff:.1e}; "
          f"|TRL generalized_jsd_loss(beta=1) - nanoseek reverse_kl| {loss_diff:.1e}")
    print(f"{args.steps} measured steps each after {w} warm-up, alternating, medians:")
    print(f"{'':>10} {'s/step':>8} {'gen s':>7} {'rest s':>7}")
    for name, m, g in (("TRL GKD", m_trl, g_trl), ("padded", m_pad, g_ours), ("nanoseek", m_ours, g_ours)):
        print(f"{name:>10} {m:>8.2f} {g:>7.2f} {m - g:>7.2f}")
    print(f"packing: {statistics.median(o['rows'] for o in ours)} rows for {P} samples (median); input tokens / slots "
          f"{sum(o['real'] for o in ours) / sum(o['slots'] for o in ours):.0%} packed vs "
          f"{sum(o['real'] for o in ours) / sum(o['padded_slots'] for o in ours):.0%} padded; mean completion "
          f"{statistics.mean(o['len'] for o in ours):.1f} tokens")
    print("per step (s)  TRL:", " ".join(f"{x:.2f}" for x in trl_s))
    print("per step (s) ours:", " ".join(f"{o['s']:.2f}" for o in ours))
    print("per step (s) padded (same samples, gen counted once for both):", " ".join(f"{o['s']:.2f}" for o in padded))
    print(f"loss of the first step: ours {ours[0]['loss']:.6f}, padded {padded[0]['loss']:.6f} (same weights, same "
          f"samples); update time padded / ours: {(m_pad - g_ours) / (m_ours - g_ours):.2f}x")
    print(f"ratio TRL / nanoseek seconds per step: {m_trl / m_ours:.2f}x (target >= 2x: "
          f"{'met' if m_trl / m_ours >= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
