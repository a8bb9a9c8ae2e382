"""Seconds per GRPO step: nanoseek's GRPO vs TRL's `GRPOTrainer` on the same model, task and settings.

The model (a run directory given with --init, or a fresh tiny preset) is exported with `to_hf` (tokenizer
included) and loaded by transformers for TRL; nanoseek trains a separate copy of the same initial weights.
Both sides see the same problems in the same order (`--task` / `--difficulty`, train split; by default
the demo's: `DemoConfig.task` and `DemoConfig.difficulty`, the operating point where RL is actually run), as
identical prompt token ids (`<|bos|><|user|>...<|assistant|>`, checked), and are scored by the same task
checker (accuracy 1.0 + format 0.1; a completion that hits the token budget earns no accuracy). Settings on
both sides: G = 8 completions per prompt, 16 prompts per step (128 completions), up to 64 new tokens,
temperature `--temperature` (default 1.0; no top-k / top-p), lr 1e-4 constant, AdamW (0.9, 0.95), no weight decay, grad clip 1.0, beta = 0 (no reference
model), eps 0.2, per-sequence mean loss ("grpo"), group-std advantages, one policy update per batch, two
training micro-batches of 64, float32 on CPU.

The two run alternately in one process: TRL's own training loop (`trainer.train()`) drives, and a callback
runs one nanoseek step after each TRL step. A TRL step is timed from the end of the previous callback to
`on_step_end` (data, generation, reward, forward/backward, optimizer); a nanoseek step is rollout + scoring +
advantages + update. The first `--warmup` steps of each are not counted; medians over the rest are reported.

nanoseek skips the forward/backward of zero-advantage rows (exact: they add nothing to the gradient); TRL
computes them. So that the ratio is not only that skip, a third copy of the same weights runs the same
nanoseek step with skipping disabled (`policy_update(..., skip_zero_advantage=False)`, same rollout seeds)
right after, and its ratio is printed as a second line (`--no-skip-off` drops it).

`--compile`: nanoseek's update runs its training forwards under torch.compile (`GRPOConfig.compile`,
`Transformer.compile_training`; rollouts unchanged, eager). The compile happens in the warm-up step (its seconds are
printed); use --warmup 2 or more so that the one recompile a new shape class may need is not measured either.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.recipes.demo import DemoConfig
from nanoseek.config import ModelConfig
from nanoseek.corpus import corpus_texts
from nanoseek.engine import Engine
from nanoseek.hf import to_hf
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import load_run_model
from nanoseek.train.common import Dist
from nanoseek.train.grpo import GRPOConfig, ProblemSampler, make_optimizer, policy_update, rollout_groups
from nanoseek.train.rl_math import group_advantages


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def build_model(init: str | None, seed: int, tmp: Path, task: str) -> tuple[Transformer, Path, str]:
    """(float32 model, tokenizer.json path, description)."""
    if init:
        model, _, step_dir = load_run_model(init)
        return model.float(), Path(init) / "tokenizer.json", f"{init} ({step_dir.name})"
    tok = Tokenizer.train(corpus_texts(task, 2000, seed=0))
    tok_file = tok.save(tmp / "tokenizer.json")
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size))
    return model, tok_file, f"fresh tiny preset (random init, vocab {tok.vocab_size})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", default=None, help="nanoseek run directory to start from (default: fresh tiny model)")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps per side before those")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=64, help="sequences per training forward, both sides")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    demo = DemoConfig()
    ap.add_argument("--task", default=demo.task, help=f"task, both sides (default: the demo's, {demo.task})")
    ap.add_argument("--difficulty", type=int, default=demo.difficulty,
                    help=f"difficulty, both sides (default: the demo's, {demo.difficulty})")
    ap.add_argument("--temperature", type=float, default=1.0, help="rollout temperature, both sides")
    ap.add_argument("--no-skip-off", dest="skip_off", action="store_false",
                    help="do not also time nanoseek with zero-advantage skipping disabled")
    ap.add_argument("--compile", action="store_true", help="nanoseek's update under torch.compile (rollouts eager)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    G, P, total = args.group_size, args.prompts, args.warmup + args.steps
    if (P * G) % args.micro_batch:
        raise SystemExit(f"--micro-batch must divide prompts x group size ({P * G})")
    tmp = Path(tempfile.mkdtemp(prefix="grpo_vs_trl_"))

    # ---- one model, two copies -------------------------------------------------------------------
    model, tok_file, desc = build_model(args.init, args.seed, tmp, args.task)
    tok = Tokenizer.load(tok_file)
    hf_dir = to_hf(model, tmp / "hf", include_mtp=False, tokenizer_file=tok_file)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), bos_token="<|bos|>",
                                     eos_token="<|eos|>", pad_token="<|pad|>", padding_side="left")

    # ---- the same problems, in the order nanoseek's sampler draws them ---------------------------
    cfg = GRPOConfig(group_size=G, prompts_per_step=P, max_new_tokens=args.max_new_tokens, lr=args.lr, mu=1,
                     micro_batch=args.micro_batch, steps=total, seed=args.seed, task=args.task,
                     difficulty=args.difficulty, temperature=args.temperature, compile=args.compile).validate()
    plan = ProblemSampler(cfg)
    problems = [p for step in range(1, total + 1) for _, p in plan.draw(P, step)]
    task = plan.task
    prompt_texts = [tok.decode(tok.prompt_ids(p.prompt)) for p in problems]
    for p, text in zip(problems, prompt_texts):
        if hf_tok(text)["input_ids"] != tok.prompt_ids(p.prompt):
            raise SystemExit(f"prompt token ids differ between nanoseek and transformers for {text!r}")
    with torch.no_grad():  # the export computes the same function: compare logits on one real prompt
        ids = torch.tensor([tok.prompt_ids(problems[0].prompt)])
        logit_diff = (model.eval()(ids) - hf_model.eval()(ids).logits).abs().max().item()

    # ---- TRL side --------------------------------------------------------------------------------
    trl_stats: list[dict] = []
    trl_pids: list[list[int]] = []  # problem indices TRL scored per step (each should appear G times)
    trl_gen_s: list[float] = []

    def reward_fn(prompts, completions, completion_ids, pid, **kw):
        # TRL decodes completions with skip_special_tokens=True, which would drop <think>/<answer> (special
        # tokens here); decode the ids exactly as nanoseek's engine does (trailing eos removed, specials kept).
        trl_pids.append(sorted(pid))
        scores, lens, trunc = [], [], []
        for ids, i in zip(completion_ids, pid):
            truncated = not ids or ids[-1] != tok.eos_id
            text = tok.decode(ids if truncated else ids[:-1])
            scores.append(task.score(problems[i], text, truncated=truncated))
            lens.append(len(ids))
            trunc.append(float(truncated))
        trl_stats.append({"reward": _mean([s.reward for s in scores]), "accuracy": _mean([s.correct for s in scores]),
                          "format": _mean([s.format_ok for s in scores]), "len": _mean(lens), "truncated": _mean(trunc)})
        return [s.reward for s in scores]

    generate = hf_model.generate

    def timed_generate(*a, **kw):  # TRL calls model.generate once per step; time it for the breakdown
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        trl_gen_s.append(time.perf_counter() - t0)
        return out

    hf_model.generate = timed_generate
    trl_cfg = TRLConfig(
        output_dir=str(tmp / "trl"), use_cpu=True, bf16=False, fp16=False, seed=args.seed,
        num_generations=G, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=P * G // args.micro_batch,  # -> steps_per_generation = same: one generation per step
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95,
        weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False, max_steps=total,
        shuffle_dataset=False, logging_strategy="no", save_strategy="no", report_to=[], push_to_hub=False,
        disable_tqdm=True, dataloader_num_workers=0)
    assert trl_cfg.generation_batch_size == P * G and trl_cfg.steps_per_generation == trl_cfg.gradient_accumulation_steps
    dataset = Dataset.from_dict({"prompt": prompt_texts, "pid": list(range(len(problems)))})

    # ---- nanoseek side(s), run from a callback after each TRL step --------------------------------
    import copy

    dist = Dist()

    def nano_side(m: Transformer, skip: bool):
        """One nanoseek GRPO step per call on its own model copy, sampler and optimizer."""
        engine, sampler = Engine(m, tok), ProblemSampler(cfg)
        optimizer = make_optimizer(m, cfg)
        rows: list[dict] = []
        served: list[list[str]] = []  # the prompts the sampler drew per step

        def step_fn(step: int) -> None:
            t0 = time.perf_counter()
            rollouts, st = rollout_groups(engine, sampler, cfg, P, step, seed=cfg.seed * 100003 + step)
            t1 = time.perf_counter()
            adv = group_advantages(torch.tensor([r.reward for r in rollouts]), G, scale=cfg.advantage == "grpo")
            upd = policy_update(m, None, optimizer, rollouts, adv, cfg, dist, first=True, skip_zero_advantage=skip)
            t2 = time.perf_counter()
            served.append(sorted(tok.decode(r.prompt) for r in rollouts[::G]))
            rows.append({"s": t2 - t0, "gen_s": t1 - t0, "reward": _mean(st["reward"]),
                         "accuracy": _mean(st["correct"]), "format": _mean(st["format"]), "len": _mean(st["len"]),
                         "truncated": _mean(st["truncated"]), "rows_trained": upd["rows_trained"],
                         "rows": len(rollouts), "zero_adv": int((adv == 0).sum())})
        return step_fn, rows, served

    if cfg.compile:
        model.compile_training()
    model_off = copy.deepcopy(model) if args.skip_off else None  # before any update: the same initial weights
    step_on, ours, served = nano_side(model, True)
    step_off, ours_off, served_off = nano_side(model_off, False) if args.skip_off else (None, [], [])

    def our_step(step: int) -> None:
        step_on(step)
        if step_off:
            step_off(step)

    trl_s: list[float] = []

    class Interleave(TrainerCallback):
        mark = 0.0

        def on_train_begin(self, a, state, control, **kw):
            self.mark = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            trl_s.append(time.perf_counter() - self.mark)
            our_step(state.global_step)
            self.mark = time.perf_counter()

    trainer = GRPOTrainer(model=hf_model, reward_funcs=reward_fn, args=trl_cfg, train_dataset=dataset,
                          processing_class=hf_tok, callbacks=[Interleave()])
    trainer.remove_callback(PrinterCallback)  # no end-of-training log dict
    load0 = os.getloadavg()
    trainer.train()
    load1 = os.getloadavg()

    # ---- report ----------------------------------------------------------------------------------
    planned = [sorted(prompt_texts[i * P:(i + 1) * P]) for i in range(total)]
    same_prompts = sum(ours_p == plan_p and trl_p == [j for j in range(i * P, (i + 1) * P) for _ in range(G)]
                       for i, (ours_p, plan_p, trl_p) in enumerate(zip(served, planned, trl_pids)))
    w = args.warmup
    if args.skip_off:
        same_prompts = min(same_prompts, sum(a == b for a, b in zip(served_off, planned)))
    if len(trl_s) != total or len(trl_stats) != total or len(ours) != total or (args.skip_off and len(ours_off) != total):
        raise SystemExit(f"expected {total} steps per side, got TRL {len(trl_s)} (rewards {len(trl_stats)}), ours {len(ours)}")
    m_trl, m_ours = statistics.median(trl_s[w:]), statistics.median([o["s"] for o in ours[w:]])
    g_trl, g_ours = statistics.median(trl_gen_s[w:]), statistics.median([o["gen_s"] for o in ours[w:]])

    def avg(rows, key):
        return _mean([r[key] for r in rows[w:]])

    print(f"model: {desc}; {sum(p.numel() for p in hf_model.parameters()) / 1e6:.2f}M params (MTP not used)")
    print(f"task {args.task}, difficulty {args.difficulty}, temperature {args.temperature}, {P} prompts x G {G} = {P * G} completions/step, <= {args.max_new_tokens} new tokens, "
          f"lr {args.lr}, mu 1, beta 0, micro-batch {args.micro_batch}; float32 CPU, {torch.get_num_threads()} threads, "
          f"HF attention {hf_model.config._attn_implementation}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"load average {load0[0]:.1f} before, {load1[0]:.1f} after ({os.cpu_count()} CPUs)")
    print(f"checks: prompt token ids identical; same problems per step on both sides {same_prompts}/{total}; "
          f"max |logit diff| nanoseek vs HF export {logit_diff:.1e}")
    if cfg.compile:
        print("nanoseek's update under torch.compile; warm-up step(s) (including the compile): "
              + " ".join(f"{o['s']:.1f} s" for o in ours[:w]))
    print(f"{args.steps} measured steps each after {w} warm-up, alternating, medians:")
    print(f"{'':>10} {'s/step':>8} {'gen s':>7} {'rest s':>7} {'reward':>7} {'acc':>6} {'format':>7} {'len':>6} {'trunc':>6}")
    sides = [("TRL", m_trl, g_trl, trl_stats), ("nanoseek", m_ours, g_ours, ours)]
    if args.skip_off:
        m_off = statistics.median([o["s"] for o in ours_off[w:]])
        sides.append(("skip off", m_off, statistics.median([o["gen_s"] for o in ours_off[w:]]), ours_off))
    for name, m, g, rows in sides:
        print(f"{name:>10} {m:>8.2f} {g:>7.2f} {m - g:>7.2f} {avg(rows, 'reward'):>7.3f} {avg(rows, 'accuracy'):>6.3f} "
              f"{avg(rows, 'format'):>7.3f} {avg(rows, 'len'):>6.1f} {avg(rows, 'truncated'):>6.2f}")
    print("per step (s)  TRL:", " ".join(f"{x:.2f}" for x in trl_s))
    print("per step (s) ours:", " ".join(f"{o['s']:.2f}" for o in ours))
    if args.skip_off:
        print("per step (s)  off:", " ".join(f"{o['s']:.2f}" for o in ours_off))
    zero = sum(o["zero_adv"] for o in ours[w:]) / max(sum(o["rows"] for o in ours[w:]), 1)
    print(f"zero-advantage (skipped) rows: {100 * zero:.1f}% of nanoseek's rows over the measured steps")
    print(f"ratio TRL / nanoseek seconds per step: {m_trl / m_ours:.2f}x (target >= 3x: "
          f"{'met' if m_trl / m_ours >= 3 else 'NOT met'})")
    if args.skip_off:
        print(f"ratio TRL / nanoseek seconds per step, zero-advantage skipping disabled: {m_trl / m_off:.2f}x "
              f"(target >= 2x: {'met' if m_trl / m_off >= 2 else 'NOT met'})")
    print("reward = mean over the measured steps of accuracy (1.0) + format (0.1) per completion")
    print(f"nanoseek's update trained {avg(ours, 'rows_trained'):.1f} of {avg(ours, 'rows'):.0f} rows per step: the rest "
          "had zero advantage (all rewards in their group equal), which adds nothing to the gradient, so their "
          "forward/backward is skipped; TRL computes every row")
    if not args.init:
        print("caveat: random-init model, so both rewards are ~0 and the reward comparison means nothing; "
              "pass --init RUN_DIR (a pretrained base) for that")


if __name__ == "__main__":
    main()
