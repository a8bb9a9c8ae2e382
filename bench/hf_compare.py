"""A transformers directory against a nanoseek run (docs/hf.md, README "Bring a checkpoint"): the chat prompt
transformers renders vs nanoseek's, the logits of both models on it, and 32 greedy tokens of each.

    python bench/hf_compare.py exported/tiny-r1-rl runs/tiny-r1-rl ["Compute 7 * 6."]
"""
from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanoseek.commands.generate import load_engine


def main(hf_dir: str, run: str, text: str = "Compute 7 * 6.") -> None:
    msgs = [{"role": "user", "content": text}]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    engine = load_engine(run)
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    print(f"prompt: {len(prompt)} tokens, identical: {prompt == engine.tokenizer.chat_ids(msgs)}")
    with torch.no_grad():
        theirs, ours = model(torch.tensor([prompt])).logits, engine.model.float()(torch.tensor([prompt]))
    print(f"logits: max relative difference {float((theirs - ours).abs().max() / ours.abs().max()):.1e}")
    greedy = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    mine = engine.generate([prompt], 32)[0]
    print(f"greedy: {len(greedy)} tokens, identical: {greedy == mine.tokens}; transformers says "
          f"{tok.decode(greedy, skip_special_tokens=True)!r}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python bench/hf_compare.py HF_DIR RUN [USER_TEXT]")
    main(*sys.argv[1:])
