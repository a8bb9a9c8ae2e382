"""A small transformers DeepSeek-V3 checkpoint built from scratch, as a user would find one on the Hub: random
`DeepseekV3ForCausalLM` weights saved with `save_pretrained`, a `PreTrainedTokenizerFast` around a byte-level BPE
trained here on a few kB of text, DeepSeek-style special tokens, a DeepSeek-R1-style chat template (system turn,
think blocks stripped from earlier assistant turns, generation prompt opening `<think>`) and a
generation_config.json with a list of eos ids.

Used by tests/test_hf_import*.py; `python tests/hf_fixture.py DIR [r1|v3]` writes one for the docs (docs/hf.md).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT, EOT = "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁turn｜>"
SPECIALS = [BOS, EOS, PAD, USER, ASSISTANT, EOT]

# written over lines with indented tags, as Hub templates are: trim_blocks / lstrip_blocks decide its output
TEMPLATE = """{% if not add_generation_prompt is defined %}
  {% set add_generation_prompt = false %}
{% endif %}
{% set ns = namespace(system='') %}
{% for m in messages %}
  {% if m['role'] == 'system' %}
    {% set ns.system = m['content'] %}
  {% endif %}
{% endfor %}
{{ bos_token }}{{ ns.system }}
{% for m in messages %}
  {% if m['role'] == 'user' %}
    {{- '<｜User｜>' + m['content'] }}
  {% elif m['role'] == 'assistant' %}
    {% set content = m['content'] %}
    {% if '</think>' in content %}
      {% set content = content.split('</think>')[-1] | trim %}
    {% endif %}
    {{- '<｜Assistant｜>' + content + eos_token }}
  {% elif m['role'] != 'system' %}
    {{- raise_exception('unknown role ' + m['role']) }}
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}
  {{- '<｜Assistant｜><think>\n' }}
{% endif %}"""

# DeepSeek-V3-style: the generation prompt is the assistant role token alone and every assistant turn renders as
# it followed by the content and eos, so a conversation's assistant tokens can be found by rendering prefixes
# (what `sft` on `messages` needs; the R1-style template above breaks that on purpose)
TEMPLATE_V3 = """{% set ns = namespace(system='') %}
{% for m in messages %}
  {% if m['role'] == 'system' %}
    {% set ns.system = m['content'] %}
  {% endif %}
{% endfor %}
{{ bos_token }}{{ ns.system }}
{% for m in messages %}
  {% if m['role'] == 'user' %}
    {{- '<｜User｜>' + m['content'] -}}
  {% elif m['role'] == 'assistant' %}
    {{- '<｜Assistant｜>' + m['content'] + eos_token -}}
  {% elif m['role'] != 'system' %}
    {{- raise_exception('unknown role ' + m['role']) -}}
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}
  {{- '<｜Assistant｜>' -}}
{% endif %}"""

TEXT = ("The quick brown fox jumps over the lazy dog while 12 + 30 = 42 and 7 * 6 = 42. "
        "Think step by step: first read the question, then check every digit, then answer. "
        "Ünïcödé text, emoji ☃ and CJK 你好 keep the byte-level BPE honest. ") * 12

MESSAGES = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "<think>\n12 + 30 = 42\n</think>\n\nThe answer is 42."},
    {"role": "user", "content": "And 7 * 6? Think first."},
]


def build_tokenizer(vocab_size: int = 320, template: str = TEMPLATE):
    """PreTrainedTokenizerFast: byte-level BPE trained on TEXT, DeepSeek specials, `<think>` / `</think>` as
    (non-special) added tokens, `template` as its chat template (R1-style by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    tok.add_tokens(["<think>", "</think>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.chat_template = template
    return fast


def hf_model_config(vocab_size: int, arch: str = "v3", **kw):
    from transformers import DeepseekV2Config, DeepseekV3Config

    base = {"vocab_size": vocab_size, "hidden_size": 48, "intermediate_size": 80, "moe_intermediate_size": 16,
            "num_hidden_layers": 2, "first_k_dense_replace": 1, "num_attention_heads": 3,
            "num_key_value_heads": 3, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
            "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "q_lora_rank": 24,
            "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12,
            "max_position_embeddings": 256, "num_nextn_predict_layers": 0, "tie_word_embeddings": False}
    if arch == "v2":  # softmax gate, group-limited greedy over 4 groups of 4, top-3 from the best group only
        del base["num_nextn_predict_layers"]
        base.update(n_routed_experts=16, n_group=4, topk_group=1, num_experts_per_tok=3,
                    topk_method="group_limited_greedy", routed_scaling_factor=1.0)
    base.update(kw)
    return (DeepseekV2Config if arch == "v2" else DeepseekV3Config)(**base)


def build_checkpoint(path: str | Path, pad_rows: int = 0, seed: int = 0, arch: str = "v3", template: str = TEMPLATE,
                     **config) -> Path:
    """Write the checkpoint into `path`: embedding rows = the tokenizer's vocabulary + `pad_rows`; arch "v3"
    (DeepseekV3ForCausalLM) or "v2" (DeepseekV2ForCausalLM); `template` the chat template."""
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, GenerationConfig

    path = Path(path)
    tok = build_tokenizer(template=template)
    n = len(tok)
    torch.manual_seed(seed)
    cfg = hf_model_config(n + pad_rows, arch, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **config)
    model = (DeepseekV2ForCausalLM if arch == "v2" else DeepseekV3ForCausalLM)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.15)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
        if pad_rows:  # make the padded rows win the argmax unless they are masked
            model.lm_head.weight[n:] *= 8
    eot = tok.convert_tokens_to_ids(EOT)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, eot],
                                               pad_token_id=tok.pad_token_id, do_sample=True, temperature=0.6,
                                               top_p=0.95)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_train_data(out: str | Path, n: int = 512, seed: int = 0) -> None:
    """The README's fine-tuning data: `sft.jsonl`, n train-split `arithmetic` problems (difficulty 1) as
    {"prompt", "completion"} rows whose completion continues R1's open think block, and `chats.jsonl`, one
    two-turn conversation with a system message."""
    import random

    from nanoseek.tasks import get_task

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task, rng, rows = get_task("arithmetic"), random.Random(seed), []
    for _ in range(n):
        p = task.sample_split(rng, 1, "train")
        expr = p.prompt.removeprefix("Compute ").rstrip(".")
        rows.append({"prompt": p.prompt, "completion": f"{expr} = {p.answer}</think><answer>{p.answer}</answer>"})
    (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = [*MESSAGES, {"role": "assistant", "content": "<think>\n7 * 6 = 42\n</think>\n\n42."}]
    (out / "chats.jsonl").write_text(json.dumps({"messages": chat}) + "\n")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["r1"], ["v3"], ["data"]):
        sys.exit("usage: python tests/hf_fixture.py OUT_DIR [r1|v3|data]   (a checkpoint with an R1-style chat "
                 "template, the default, or a V3-style one; or the README's sft.jsonl and chats.jsonl)")
    if sys.argv[2:] == ["data"]:
        write_train_data(sys.argv[1])
        sys.exit(0)
    out = build_checkpoint(sys.argv[1], template=TEMPLATE_V3 if sys.argv[2:] == ["v3"] else TEMPLATE)
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    print(json.dumps(json.loads((out / "generation_config.json").read_text())))
