"""`nanoseek chat`: an interactive chat in the terminal. The model's reasoning (inside <think>) is shown
dimmed, the answer plainly. Commands: /temperature X, /reset, /quit.

The tiny models are single-turn reasoners (trained on one user message each), so by default each turn
is answered on its own; the conversation is kept only as context when `--multi-turn` is given.

An imported checkpoint (`nanoseek import`) chats through its own chat template: the conversation is a list of
messages rendered by the template each turn, and its generation_config.json sets the default temperature and
top-p. A template whose generation prompt opens `<think>` (DeepSeek-R1's) has the reply start in the thinking.
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
    p.add_argument("--temperature", type=float, default=None,
                   help="default 0.6 (an imported run: its generation_config.json's temperature)")
    p.add_argument("--top-p", type=float, default=None,
                   help="default 0.95 (an imported run: its generation_config.json's top_p)")
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
    imported = getattr(tok, "imported", False)
    gen = getattr(tok, "generation", {})
    temperature = args.temperature if args.temperature is not None else float(gen.get("temperature", 0.6))
    top_p = args.top_p if args.top_p is not None else gen.get("top_p", 0.95)
    history: list[int] = []
    messages: list[dict] = []  # an imported run's conversation, rendered by its chat template
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
            history, messages = [], []
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
        turn = (messages if args.multi_turn else []) + [{"role": "user", "content": line}]
        if imported:
            prompt = tok.chat_ids(turn)
        else:
            prompt = (history + tok.prompt_ids(line)[1:]) if (args.multi_turn and history) else tok.prompt_ids(line)
        room = engine.cfg.max_seq_len - len(prompt)
        if room < 1:
            console.print("[red]the conversation is longer than the model's context; /reset it[/red]")
            continue
        out = engine.generate([prompt], min(args.max_new_tokens, room), temperature=temperature,
                              top_p=top_p if temperature > 0 else None)[0]
        text = ("<think>" + out.text) if imported and tok.opens_thinking(prompt) else out.text
        console.print(Text("model> ", style="bold green") + render(text))
        if args.multi_turn:
            history = prompt + out.tokens
            messages = turn + [{"role": "assistant", "content": text}]
