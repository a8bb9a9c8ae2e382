"""`nanoseek rl`: GRPO-family RL from verifiable rewards on top of a pretrained run.

    nanoseek rl --init runs/demo/base --out runs/rl --task arithmetic
    torchrun --nproc_per_node=2 -m nanoseek.cli rl --init runs/demo/base --out runs/rl_ep --ep 2
"""
from __future__ import annotations

import argparse
import dataclasses

from nanoseek import sandbox
from nanoseek.parallel.training import add_ep_arguments
from nanoseek.train.grpo import GRPOConfig, train_grpo
from nanoseek.train.precision import PUBLIC as PRECISIONS


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = GRPOConfig()
    p.add_argument("--init", required=True, help="run directory of the starting model (e.g. runs/base)")
    p.add_argument("--out", required=True, help="run directory to write (runs/NAME)")
    p.add_argument("--task", default=d.task)
    p.add_argument("--difficulty", type=int, default=None)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock limit; checkpoints and stops")
    p.add_argument("--group-size", type=int, default=d.group_size, help="G samples per prompt")
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=None,
                   help="rollout nucleus; the importance ratio uses the same renormalized support")
    p.add_argument("--top-k", type=int, default=None, help="rollout top-k (same support in the ratio)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--mu", type=int, default=d.mu, help="policy updates per rollout batch")
    p.add_argument("--advantage", choices=["grpo", "dr_grpo"], default=d.advantage)
    p.add_argument("--loss-agg", choices=["grpo", "dapo", "dr_grpo"], default=d.loss_agg)
    p.add_argument("--eps-low", type=float, default=d.eps_low)
    p.add_argument("--eps-high", type=float, default=d.eps_high, help="DAPO clip-higher uses 0.28")
    p.add_argument("--beta", type=float, default=d.beta, help="KL weight (k3); 0 keeps no reference model")
    p.add_argument("--dynamic-sampling", action="store_true", help="DAPO: drop zero-spread groups, resample")
    p.add_argument("--overlong-cache", type=int, default=d.overlong_cache, help="DAPO soft overlong interval")
    p.add_argument("--mask-truncated", action="store_true")
    p.add_argument("--length-weight", type=float, default=d.length_weight, help="Kimi k1.5 length reward weight")
    p.add_argument("--length-warmup-steps", type=int, default=d.length_warmup_steps)
    p.add_argument("--prioritized", action="store_true", help="sample problems by 1 - success rate")
    p.add_argument("--pool-size", type=int, default=d.pool_size, help="prioritized pool: problems per difficulty")
    p.add_argument("--curriculum", action="store_true",
                   help="raise difficulty over the run (with --prioritized: by priority within each level)")
    p.add_argument("--no-bias-update", action="store_true", help="freeze the MoE selection bias during RL")
    p.add_argument("--bias-gamma", type=float, default=d.bias_gamma, help="bias update speed per step")
    p.add_argument("--partial-rollout-tokens", type=int, default=d.partial_rollout_tokens, metavar="N",
                   help="Kimi k1.5 partial rollouts: at most N new tokens per trajectory per step; unfinished ones "
                        "continue in the next step (0 = off)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", choices=PRECISIONS, help="fp32 (default), bf16 or fp8 training forwards "
                   "(docs/precision.md); on --resume the run's own precision unless given")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the update's training forwards (docs/grpo_bench.md); rollouts stay eager; on "
                        "--resume the stored choice unless given")
    p.add_argument("--resume", action="store_true")
    sandbox.add_unsafe_argument(p)
    add_ep_arguments(p)


def config_from_args(a: argparse.Namespace) -> GRPOConfig:
    return dataclasses.replace(
        GRPOConfig(), task=a.task, difficulty=a.difficulty, steps=a.steps, minutes=a.minutes,
        group_size=a.group_size, prompts_per_step=a.prompts_per_step, max_new_tokens=a.max_new_tokens,
        temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, lr=a.lr, mu=a.mu, advantage=a.advantage, loss_agg=a.loss_agg,
        eps_low=a.eps_low, eps_high=a.eps_high, beta=a.beta, dynamic_sampling=a.dynamic_sampling,
        overlong_cache=a.overlong_cache, mask_truncated=a.mask_truncated, length_weight=a.length_weight,
        length_warmup_steps=a.length_warmup_steps, prioritized=a.prioritized, pool_size=a.pool_size,
        curriculum=a.curriculum, bias_update=not a.no_bias_update, bias_gamma=a.bias_gamma, seed=a.seed,
        ckpt_every=a.ckpt_every, partial_rollout_tokens=a.partial_rollout_tokens,
        precision=a.precision or "fp32", compile=bool(a.compile), unsafe_no_sandbox=a.unsafe_no_sandbox).validate()


def run(args: argparse.Namespace) -> int:
    last = train_grpo(args.init, args.out, config_from_args(args), resume=args.resume, device=args.device,
                      ep=args.ep, ep_redundant=args.ep_redundant,
                      precision=args.precision, compile=args.compile)
    if last:
        print(f"done: step {last['step']}, reward {last['reward']:.3f}, accuracy {last['accuracy']:.2f}; "
              f"metrics: {args.out}/metrics.jsonl")
    return 0
