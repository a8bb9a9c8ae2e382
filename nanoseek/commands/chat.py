"""`nanoseek chat`: an interactive chat in the terminal. The model's reasoning (inside <think>) is shown
dimmed, the answer plainly. Commands: /temperature X, /reset, /quit.

The tiny models are single-turn reasoners (trained on one user message each), so by default each turn
is answered on its own; the conversation is kept only as context when `--multi-turn` is given.
"""
from __future__ import annotations

import argparse
import re

from rich.console import Console
from rich.text import Text

from nanoseek.commands.generate import load_engine

THINK = re.compile(r"<think>(.*?)(</think>|$)(.*)", re.DOTALL)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (runs/NAME)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--multi-turn", action="store_true", help="keep earlier turns in the context")


def render(text: str) -> Text:
    """Thinking dimmed, the answer (tags stripped) plain."""
    out = Text()
    m = THINK.match(text.strip())
    if m:
        out.append(m.group(1).strip() + "\n", style="dim italic")
        rest = m.group(3)
    else:
        rest = text
    answer = re.sub(r"</?answer>", "", rest).strip()
    out.append(answer, style="bold")
    return out


def run(args: argparse.Namespace) -> int:
    console = Console()
    engine = load_engine(args.run)
    tok = engine.tokenizer
    temperature = args.temperature
    history: list[int] = []
    console.print(f"[dim]nanoseek chat with {args.run}: /temperature X, /reset, /quit[/dim]")
    while True:
        try:
            line = console.input("[bold cyan]you> [/bold cyan]").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history = []
            console.print("[dim]conversation cleared[/dim]")
            continue
        if line.startswith("/temperature"):
            try:
                value = float(line.split()[1])
                if not 0 <= value <= 100:
                    raise ValueError
                temperature = value
                console.print(f"[dim]temperature = {temperature}[/dim]")
            except (IndexError, ValueError):
                console.print("[red]usage: /temperature X   (X >= 0; 0 = greedy)[/red]")
            continue
        if line.startswith("/"):
            console.print("[red]unknown command; use /temperature X, /reset or /quit[/red]")
            continue
        prompt = (history + tok.prompt_ids(line)[1:]) if (args.multi_turn and history) else tok.prompt_ids(line)
        room = engine.cfg.max_seq_len - len(prompt)
        if room < 1:
            console.print("[red]the conversation is longer than the model's context; /reset it[/red]")
            continue
        out = engine.generate([prompt], min(args.max_new_tokens, room), temperature=temperature,
                              top_p=args.top_p if temperature > 0 else None)[0]
        console.print(Text("model> ", style="bold green") + render(out.text))
        if args.multi_turn:
            history = prompt + out.tokens
