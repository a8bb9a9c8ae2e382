"""GRPO and its refinements: RL from verifiable rewards (R1-Zero; SPEC section 3). The config and the loop.

One step: sample `prompts_per_step` problems, let the engine roll out `group_size` completions each, score
them with the task's program and shape the rewards (nanoseek.train.grpo_rollout), compute group advantages,
then take `mu` AdamW steps on the clipped surrogate (+ beta * k3 KL to a frozen reference when beta > 0;
nanoseek.train.grpo_update, the loss a pure function in nanoseek.train.rl_math). Each of those modules lists
its own departures from the papers; the loop's are:
- No reference copy of the model is kept when beta == 0 (the default; DAPO and Dr. GRPO drop the KL).
- torchrun: every rank runs the same loop on the same sampler; a rank may train zero groups and still joins
  every collective, so two processes compute the same global batch and update as one
  (tests/test_grpo_runs.py). With --ep the update shards the routed experts and rollouts run on a full copy
  of the weights refreshed before each step (nanoseek.parallel.training; tests/test_parallel_train.py).
- Ctrl-C: a step's rollouts move only the sampler, which is restored when interrupted there; from the
  policy update to the step's metrics and checkpoint an interrupt waits for the step to finish. On
  KeyboardInterrupt the state of the last finished step is saved, unless that step already has a
  checkpoint (an existing checkpoint is never overwritten); resuming continues exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek import sandbox
from nanoseek.cli_config import knob
from nanoseek.config import ConfigError
from nanoseek.engine import Engine
from nanoseek.engine.sampling import SamplingParams
from nanoseek.io import atomic_write_text
from nanoseek.model import Transformer
from nanoseek.parallel.training import RolloutCopy, check_ep_flags, checkpoint_pair, setup_ep
from nanoseek.tasks.reflection import reflection_stats
from nanoseek.hf_tokenizer import copy_tokenizer_files, load_tokenizer
from nanoseek.train import precision as prec
from nanoseek.train.checkpoint import latest_checkpoint, load_checkpoint, load_run_model, save_checkpoint
from nanoseek.train.common import check_compile, enable_compile, setup_distributed
from nanoseek.train.grpo_rollout import (GroupResult, ProblemSampler, Rollout, gather_lists, rollout_groups,
                                         row_seed, shaped_rewards, shard)
from nanoseek.train.grpo_update import (batch_tensors, count_expert_loads, make_optimizer, packed_logprobs,
                                        policy_update, target_logprobs, token_logprobs)
from nanoseek.train.metrics import MetricsLogger, ProgressLine
from nanoseek.train.partial_rollouts import PartialRollouts, check_partial_rollouts
from nanoseek.train.rl_math import AGGREGATIONS, group_advantages

__all__ = ["GRPOConfig", "train_grpo", "DeferredInterrupt", "GroupResult", "ProblemSampler", "Rollout",
           "gather_lists", "rollout_groups", "row_seed", "shaped_rewards", "shard", "batch_tensors",
           "count_expert_loads", "make_optimizer", "packed_logprobs", "policy_update", "target_logprobs",
           "token_logprobs"]


@dataclass
class GRPOConfig:
    """Every RL knob, with its default and where it comes from."""

    task: str = knob("arithmetic", help="task whose problems and reward program are used (nanoseek.tasks)")
    difficulty: int | None = knob(None, help="task difficulty (none = the task's default)")
    steps: int = knob(200, resume="override", help="RL steps (rollouts + update) in the whole run")
    minutes: float | None = knob(None, resume="override", help="wall-clock limit; checkpoints and stops")
    group_size: int = knob(8, help="G samples per prompt (R1: 16)")
    prompts_per_step: int = knob(16, help="groups per step over all processes")
    max_new_tokens: int = knob(64, help="longest completion in tokens")
    temperature: float = knob(1.0, help="rollout temperature (R1: 1.0)")
    top_p: float | None = knob(None, help="rollout nucleus; the importance ratio uses the same renormalized "
                               "support (module docstring)")
    top_k: int | None = knob(None, help="rollout top-k (same support in the ratio)")
    # 2e-4 collapsed a weak tiny base in the prototype; 1e-4 was stable
    lr: float = knob(1e-4, help="learning rate")
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    micro_batch: int = 64  # sequences per training forward (memory bound only; the loss is the same)
    mu: int = knob(1, help="policy updates per rollout batch (GRPO's mu)")
    advantage: str = knob("grpo", choices=("grpo", "dr_grpo"),
                          help="grpo (divide by the group's std) or dr_grpo (mean only)")
    loss_agg: str = knob("grpo", choices=AGGREGATIONS, help="loss aggregation over tokens and samples")
    eps_low: float = knob(0.2, help="lower clip of the importance ratio")
    eps_high: float = knob(0.2, help="upper clip of the importance ratio (DAPO clip-higher uses 0.28)")
    beta: float = knob(0.0, help="KL weight (k3; R1: 0.001); 0 keeps no reference model")
    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    dynamic_sampling: bool = knob(False, help="DAPO: drop groups whose accuracy is all 0 or all 1, resample")
    max_sampling_rounds: int = 3
    overlong_cache: int = knob(0, help="DAPO soft overlong punishment interval L_cache (0 = off)")
    mask_truncated: bool = knob(False, help="DAPO: truncated samples contribute no loss")
    length_weight: float = knob(0.0, help="Kimi k1.5 length reward weight (0 = off)")
    length_warmup_steps: int = knob(0, help="length reward off during these first steps")
    prioritized: bool = knob(False, help="Kimi k1.5: sample problems by 1 - success rate")
    pool_size: int = knob(2000, help="prioritized pool: problems per difficulty level")
    curriculum: bool = knob(False, help="raise difficulty over the run (with --prioritized: by priority within "
                            "each level)")
    curriculum_start: int = 1
    bias_update: bool = knob(True, help="auxiliary-loss-free MoE bias update during RL (--no-bias-update "
                             "freezes the selection bias)")
    # Pretraining's 1e-3 moves the routing more than RL's ~40x smaller lr moves the weights (greedy accuracy
    # fell 6-8 points in two demo pilots); 1e-4 keeps loads balanced without that drift, 0 freezes the bias.
    bias_gamma: float = knob(1e-4, help="bias update speed per step")
    seed: int = knob(0, help="seed of problems, rollouts and init")
    ckpt_every: int = knob(50, help="steps between checkpoints")
    keep_last: int = 2
    partial_rollout_tokens: int = knob(0, metavar="N", help="Kimi k1.5 partial rollouts: at most N new tokens per "
                                       "trajectory per step; unfinished ones continue in the next step (0 = off)")
    # fp32 | bf16 | fp8 (nanoseek.train.precision): the training forwards run under its autocast, fp8 turns the
    # model's FP8 linears on (rollouts use them too) and keeps AdamW's moments in BF16; rollouts run unautocast
    precision: str = knob("fp32", choices=prec.PUBLIC, resume="override",
                          help="training forwards in fp32, bf16 or fp8 (docs/precision.md)")
    # torch.compile the update's training forwards (nanoseek.train.common.enable_compile); rollouts stay eager.
    # A speed knob: the same update to float rounding; a resume may switch it
    compile: bool = knob(False, resume="override", help="torch.compile the update's training forwards "
                         "(docs/grpo_bench.md); rollouts stay eager")
    # --unsafe-no-sandbox: score code/proof/math answers without bubblewrap where it cannot run (nanoseek.sandbox);
    # recorded here so a run says whether its rewards came from unconfined model code. A resume takes the new choice
    unsafe_no_sandbox: bool = knob(False, resume="override", help="score code/proof/math answers even where the "
                                   "sandbox (bubblewrap, prlimit) cannot run: model output then runs with NO file-system "
                                   "isolation (also NANOSEEK_UNSAFE_NO_SANDBOX=1)")

    def validate(self) -> "GRPOConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.group_size >= 2, f"group_size must be >= 2 (advantages compare samples), got {self.group_size}")
        need(self.prompts_per_step >= 1, "prompts_per_step must be >= 1")
        need(self.steps >= 1 and self.max_new_tokens >= 1 and self.mu >= 1, "steps, max_new_tokens and mu must be >= 1")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(self.temperature > 0, "rollout temperature must be > 0 (log-probs of a greedy policy are undefined)")
        need(self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        need(self.advantage in ("grpo", "dr_grpo"), f"advantage must be grpo or dr_grpo, got {self.advantage!r}")
        need(self.loss_agg in AGGREGATIONS, f"loss_agg must be one of {AGGREGATIONS}, got {self.loss_agg!r}")
        need(0 <= self.eps_low < 1 and self.eps_high >= 0, "need 0 <= eps_low < 1 and eps_high >= 0")
        need(self.beta >= 0, "beta must be >= 0")
        need(self.bias_gamma >= 0, f"bias_gamma must be >= 0, got {self.bias_gamma}")
        need(self.minutes is None or self.minutes > 0, "minutes must be positive")
        need(self.max_sampling_rounds >= 0, f"max_sampling_rounds must be >= 0, got {self.max_sampling_rounds}")
        need(not self.prioritized or self.pool_size >= 1, f"pool_size must be >= 1, got {self.pool_size}")
        need(self.ckpt_every >= 1 and self.keep_last >= 1, "ckpt_every and keep_last must be >= 1")
        need(self.partial_rollout_tokens >= 0 and not (self.partial_rollout_tokens and self.dynamic_sampling),
             "partial_rollout_tokens must be >= 0 and cannot be combined with dynamic sampling")
        prec.check(self.precision)
        return self

    def sampling(self) -> SamplingParams:
        """The rollout distribution; the trainer's log-probs are taken under the same one."""
        return SamplingParams(self.temperature, self.top_k, self.top_p).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)




# ---- Ctrl-C -----------------------------------------------------------------------------------------
class DeferredInterrupt:
    """Within the block a SIGINT is only recorded; it takes effect (the previous handler runs, by default
    raising KeyboardInterrupt) when the block ends. For state changes that must finish once begun. A no-op
    outside the main thread, where Python never delivers SIGINT anyway."""

    def __enter__(self) -> "DeferredInterrupt":
        self.hit = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.hit = True

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            if self.hit and exc_type is None and callable(self.previous):
                self.previous(signal.SIGINT, None)
        return False


# ---- the run ----------------------------------------------------------------------------------------
def _mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


def train_grpo(init: str | Path, out: str | Path, cfg: GRPOConfig, resume: bool = False, device: str = "auto",
               quiet: bool = False, on_step: Callable[[int], None] | None = None, ep: int = 1,
               ep_redundant: int = 0, precision: str | None = None, compile: bool | None = None) -> dict:
    """Run GRPO from the model in run directory `init`, writing run directory `out`. Returns the last metrics.
    `on_step(step)` is called after every finished (and, when due, checkpointed) step. On resume the stored
    config holds (steps and minutes from `cfg`); `precision` / `compile`, when given, override its own. `ep` > 1: the
    update runs with expert parallelism over groups of `ep` ranks (`ep_redundant` extra experts placed by the init
    run's recorded loads) and rollouts run on a full copy of the weights (nanoseek.parallel.training)."""
    cfg.validate()
    dist = setup_distributed(device)
    use_ep = check_ep_flags(ep, ep_redundant, dist.world)
    out = Path(out)
    init = Path(init)
    ckpt_dir = out / "checkpoints"
    if resume:
        if latest_checkpoint(ckpt_dir) is None:
            raise ConfigError(f"--resume: {out} has no checkpoint to resume from")
        saved = json.loads((out / "config.json").read_text())
        stored = saved["rl"].get("precision", "fp32")
        cfg = GRPOConfig(**{**saved["rl"], "steps": cfg.steps, "minutes": cfg.minutes,
                            "precision": precision or stored,
                            "compile": saved["rl"].get("compile", False) if compile is None else compile,
                            "unsafe_no_sandbox": cfg.unsafe_no_sandbox}).validate()
        init = Path(saved["init"])
    elif latest_checkpoint(ckpt_dir) is not None:
        raise ConfigError(f"{out} already holds an RL run: pass --resume to continue it, or choose another --out")
    check_partial_rollouts(cfg.partial_rollout_tokens, dist.world)
    check_compile(cfg.compile, ep, 1, cfg.precision)  # before any work or write
    model, init_cfg, _ = load_run_model(init, device=dist.device)
    if cfg.bias_update and model.cfg.score_func == "softmax":  # DeepSeek-V2's softmax gate has no selection bias
        cfg = dataclasses.replace(cfg, bias_update=False)      # (an imported V2 stays exportable: nanoseek.hf)
    model = prec.apply(model, cfg.precision)
    tokenizer = load_tokenizer(init)  # nanoseek's own, or an imported checkpoint's (its chat template's prompts)
    sandbox.check_for_task(cfg.task, cfg.unsafe_no_sandbox)  # no sandbox and no opt-out: refuse before any write
    ref_model = None
    if cfg.beta > 0:
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)
    def build_optimizer(m) -> torch.optim.AdamW:
        return make_optimizer(m, cfg)

    optimizer = build_optimizer(model)
    sampler = ProblemSampler(cfg)
    metrics = MetricsLogger(out / "metrics.jsonl", enabled=dist.is_main)
    start = 0
    if resume:
        step_dir = latest_checkpoint(ckpt_dir)
        state = load_checkpoint(step_dir, model, optimizer)
        sampler.load(state["sampler"])
        carried = state.get("partial")
        if cfg.partial_rollout_tokens and carried is None:
            raise ConfigError(f"{step_dir} holds no partial-rollout state (a checkpoint from before it was saved):"
                              " it cannot be resumed exactly; start a new run in another --out")
        start = int(state["step"])
        metrics.truncate_after(start)
        if dist.is_main and (stored != cfg.precision or saved["rl"].get("unsafe_no_sandbox", False) != cfg.unsafe_no_sandbox):
            # resumed in another precision or sandbox choice: the run's is now this one
            saved["rl"]["precision"], saved["model"] = cfg.precision, model.cfg.to_dict()
            saved["rl"]["unsafe_no_sandbox"] = cfg.unsafe_no_sandbox
            atomic_write_text(out / "config.json", json.dumps(saved, indent=2) + "\n")
    elif dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        run_cfg = {"model": model.cfg.to_dict(), "rl": cfg.to_dict(), "init": str(init), "stage": "grpo"}
        atomic_write_text(out / "config.json", json.dumps(run_cfg, indent=2) + "\n")
        copy_tokenizer_files(init, out)
    parallel = rollout_copy = None
    if use_ep:  # the update shards the experts; rollouts run on a full copy refreshed before each step
        parallel, optimizer = setup_ep(model, optimizer, ep, ep_redundant, dist.device, build_optimizer,
                                       [out if resume else None, init], dist.is_main)
        rollout_copy = RolloutCopy(parallel, lambda: prec.configure_model(Transformer(model.cfg).to(dist.device),
                                                                          cfg.precision))
        progress_note = parallel.describe() + "; rollouts on a full copy of the weights"
    enable_compile(model, cfg.compile, ep, 1, cfg.precision)
    engine = Engine(model if rollout_copy is None else rollout_copy.model, tokenizer)
    partial = PartialRollouts(cfg.partial_rollout_tokens) if cfg.partial_rollout_tokens else None
    if partial is not None and resume:  # the unfinished trajectories continue where they stopped
        partial.load(carried)
    progress = ProgressLine(cfg.steps, start=start, enabled=dist.is_main and not quiet,
                            print_every=5, description="grpo")
    t_start = time.time()
    last = {}
    done = start  # the last step whose whole update (sampler, weights, optimizer, metrics) is in memory
    sampler_at_done: dict | None = None  # while rollouts run: the sampler as it was at `done`
    partial_at_done: dict | None = None  # ... and the carried partial rollouts

    if parallel is not None:
        progress.message(progress_note)

    def save(step: int) -> None:  # collective under --ep (the single-model layout is gathered on rank 0)
        to_save = checkpoint_pair(model, optimizer, parallel, lambda: (lambda m: (m, build_optimizer(m)))(
            Transformer(model.cfg).to(dist.device)))
        if dist.is_main:
            state = {"sampler": sampler.state(), **({"partial": partial.state()} if partial is not None else {})}
            save_checkpoint(ckpt_dir, step, *to_save, state, cfg.keep_last)

    try:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.time()
            if rollout_copy is not None:
                rollout_copy.refresh(model)
            sampler_at_done = sampler.state()
            partial_at_done = partial.state() if partial is not None else None
            gen = partial.step if partial is not None else rollout_groups  # partial: Kimi k1.5 sec. 2.6.2
            rollouts, st = gen(engine, sampler, cfg, cfg.prompts_per_step, step, seed=cfg.seed * 100003 + step,
                               dist=dist)
            t_gen = time.time() - t0
            with DeferredInterrupt():  # from the first weight change to the checkpoint, the step completes
                sampler_at_done = partial_at_done = None
                rec = {"step": step, "reward": _mean(st["reward"]), "accuracy": _mean(st["correct"]),
                       "format_rate": _mean(st["format"]), "response_len_mean": _mean(st["len"]),
                       "response_len_max": max(st["len"]) if st["len"] else 0, "truncated": _mean(st["truncated"]),
                       "zero_spread_groups": _mean(st["zero_spread"]),
                       "uniform_accuracy_groups": _mean(st["uniform_accuracy"]), "sampling_rounds": st["rounds"],
                       "groups_trained": st["groups_kept"], "verify_s": round(st.get("verify_s", 0.0), 3),
                       "checks_per_s": round(st.get("checks", 0) / max(st.get("verify_s", 0.0), 1e-9), 1)}
                rec.update(reflection_stats(st["texts"]))  # check rate, check-changed rate (issue 14)
                if partial is not None:
                    rec.update({"carried": st["carried"], "gen_tokens": st["gen_tokens"]})
                t1 = time.time()
                if st["groups_kept"]:  # global: every rank takes the same branch
                    rewards = torch.tensor([r.reward for r in rollouts])
                    adv = group_advantages(rewards, cfg.group_size, scale=cfg.advantage == "grpo")
                    for it in range(cfg.mu):
                        rec.update(policy_update(model, ref_model, optimizer, rollouts, adv, cfg, dist,
                                                 first=it == 0, parallel=parallel, vocab=tokenizer.sample_vocab))
                t_train = time.time() - t1
                gen_tokens = sum(st["len"])
                rec.update({"gen_s": round(t_gen, 3), "train_s": round(t_train, 3),
                            "tokens_per_s": gen_tokens / max(time.time() - t0, 1e-9), "lr": cfg.lr,
                            "elapsed_s": round(time.time() - t_start, 1)})
                metrics.log(rec)
                last = rec
                done = step
                timed_out = cfg.minutes is not None and dist.any_flag(time.time() - t_start > cfg.minutes * 60)
                if step % cfg.ckpt_every == 0 or step == cfg.steps or timed_out:
                    save(step)
            progress.update(step, rec.get("loss", 0.0), cfg.lr, rec["tokens_per_s"],
                            extra=f"reward {rec['reward']:.3f} acc {rec['accuracy']:.2f} fmt {rec['format_rate']:.2f} "
                                  f"len {rec['response_len_mean']:.0f} ent {rec.get('entropy', 0):.2f}")
            if on_step is not None:
                on_step(step)
            if timed_out:
                break
    except KeyboardInterrupt:
        if sampler_at_done is not None:  # interrupted during rollouts: that step never happened
            sampler.load(sampler_at_done)
        if partial_at_done is not None:
            partial.load(partial_at_done)
        # (not under --ep: the gather is a collective the other ranks may not reach; the periodic one stands)
        if dist.is_main and parallel is None and done > start and not (ckpt_dir / f"step_{done}").exists():
            save(done)
        raise
    finally:
        progress.close()
        dist.close()
    return last
