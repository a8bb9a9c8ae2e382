"""`nanoseek export --hf`: a run (imported, fine-tuned, RL'd or trained from scratch) as a transformers directory.

The weights and config.json are nanoseek.hf.to_hf's (DeepseekV3ForCausalLM, or DeepseekV2ForCausalLM for a
softmax-gated model; transformers loads them with the same logits). The tokenizer travels with them:

- a run made from an imported checkpoint (it holds tokenizer_config.json; nanoseek.hf_tokenizer) carries the
  checkpoint's own files as the run holds them: tokenizer.json, tokenizer_config.json, the chat template
  (chat_template.jinja / .json), special_tokens_map.json and generation_config.json (its eos ids and sampling
  defaults replace to_hf's placeholder); config.json's bos / eos / pad ids are the tokenizer's;
- a run with nanoseek's own tokenizer gets its tokenizer.json, a tokenizer_config.json naming the special
  tokens (`PreTrainedTokenizerFast`) and NATIVE_TEMPLATE, the Jinja form of nanoseek's chat format
  (nanoseek.tokenizer.Tokenizer.chat_document), so `AutoTokenizer.apply_chat_template(messages,
  add_generation_prompt=True)` gives the ids nanoseek prompts with (tests/test_hf_import_train.py).

The directory is built in a temporary folder beside `out`, fsynced and renamed into place: a failure leaves
nothing. Simplification: the original checkpoint's config.json is not copied (its fields nanoseek does not model,
e.g. `initializer_range`, are transformers' defaults again; none changes the forward pass).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from nanoseek.config import ConfigError
from nanoseek.hf import to_hf
from nanoseek.hf_import import DTYPES
from nanoseek.hf_tokenizer import TOKENIZER_FILES, is_imported, load_tokenizer
from nanoseek.io import publish_dir

# nanoseek's chat format (tokenizer.py) as a chat template: <|bos|>, each message as its role token + content,
# an assistant turn closed by eos; the generation prompt is <|assistant|>
NATIVE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{% elif m['role'] == 'assistant' %}<|assistant|>"
    "{% elif m['role'] in ('system', 'developer') %}<|system|>"
    "{% else %}{{ raise_exception('role must be system, developer, user or assistant, got ' + m['role']) }}{% endif %}"
    "{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _native_tokenizer_files(run: Path, out: Path) -> None:
    shutil.copyfile(run / "tokenizer.json", out / "tokenizer.json")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
           "pad_token": "<|pad|>", "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False,
           "chat_template": NATIVE_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def export_run(run: str | Path, out: str | Path, step: int | None = None, dtype: str = "auto",
               max_shard_bytes: int | None = None, verbose: bool = True) -> Path:
    """Write run `run` (its latest checkpoint, or `step`) as the new transformers directory `out`; returns it."""
    from nanoseek.train.checkpoint import load_run_model

    run, out = Path(run), Path(out)
    if not run.is_dir():
        raise ConfigError(f"run directory {run} does not exist")
    if out.exists():
        raise ConfigError(f"{out} already exists: choose another --hf directory or delete it first")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tok = load_tokenizer(run)  # before any weight is read: a broken tokenizer or template fails here
    imported = is_imported(run)
    model, _, step_dir = load_run_model(run, step)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        to_hf(model, tmp, max_shard_bytes=max_shard_bytes, dtype=DTYPES[dtype])
        weights = DTYPES[dtype] or next(model.parameters()).dtype
        del model
        hf_cfg = json.loads((tmp / "config.json").read_text())
        hf_cfg.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                      torch_dtype=str(weights).removeprefix("torch."))
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        if imported:
            for name in TOKENIZER_FILES:
                if (run / name).is_file():
                    shutil.copyfile(run / name, tmp / name)
        else:
            _native_tokenizer_files(run, tmp)
            (tmp / "generation_config.json").write_text(json.dumps(
                {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}, indent=2) + "\n")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        files = ", ".join(sorted(p.name for p in out.iterdir()))
        print(f"exported {step_dir} -> {out} ({'imported' if imported else 'nanoseek'} tokenizer, "
              f"{str(weights).removeprefix('torch.')}): {files}")
    return out
