"""`nanoseek sample`: continue a chat prompt with a trained run's model (greedy or temperature sampling).

Each new token re-runs the whole sequence (no KV cache): simple and obviously correct, fast enough for tiny
models and short answers. The cached, batched path is nanoseek.engine.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nanoseek.config import ConfigError
from nanoseek.engine.sampling import mask_vocab
from nanoseek.model import Transformer
from nanoseek.train.checkpoint import load_run_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (runs/NAME)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--raw", action=argparse.BooleanOptionalAction, default=None,
                   help="continue the prompt as plain text, not as a chat message (default: on for a model "
                        "pretrained with --data, off otherwise)")


@torch.no_grad()
def generate(model: Transformer, ids: list[int], max_new_tokens: int, temperature: float,
             eos_id: int | frozenset[int], generator: torch.Generator | None = None,
             sample_vocab: int | None = None) -> list[int]:
    """Tokens after `ids` until eos (any of them when a set; included) or max_new_tokens; the context is the last
    max_seq_len tokens. Ids >= sample_vocab (an imported checkpoint's padded embedding rows) are never drawn."""
    stops = frozenset([eos_id]) if isinstance(eos_id, int) else eos_id
    out: list[int] = []
    seq = list(ids)
    for _ in range(max_new_tokens):
        x = torch.tensor([seq[-model.cfg.max_seq_len:]])
        logits = mask_vocab(model(x)[0, -1], sample_vocab)
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator))
        out.append(nxt)
        seq.append(nxt)
        if nxt in stops:
            break
    return out


def is_text_run(run_dir: str | Path) -> bool:
    """Whether a run was pretrained on user text (`pretrain --data`) rather than on a task corpus."""
    import json

    try:
        return bool(json.loads((Path(run_dir) / "config.json").read_text()).get("data", {}).get("data"))
    except (OSError, ValueError, AttributeError):
        return False


def run(args: argparse.Namespace) -> int:
    from nanoseek.hf_tokenizer import load_tokenizer

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    model, _, _ = load_run_model(args.run, args.step)
    tokenizer = load_tokenizer(args.run)
    raw = args.raw if args.raw is not None else is_text_run(args.run)
    # a text model saw each document after a boundary token: open the prompt with one
    prompt = [tokenizer.eos_id, *tokenizer.encode(args.prompt)] if raw else tokenizer.prompt_ids(args.prompt)
    if len(prompt) >= model.cfg.max_seq_len:
        raise ConfigError(f"prompt is {len(prompt)} tokens; the model's context is {model.cfg.max_seq_len}")
    gen = torch.Generator().manual_seed(args.seed)
    stops = frozenset(getattr(tokenizer, "stop_ids", ())) | {tokenizer.eos_id}
    tokens = generate(model, prompt, args.max_new_tokens, args.temperature, stops, gen,
                      getattr(tokenizer, "sample_vocab", None))
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens, skip_special=False)
    print(args.prompt + text if raw else text)
    return 0
