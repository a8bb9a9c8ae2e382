"""`nanoseek import`: turn a transformers DeepseekV3ForCausalLM checkpoint directory into a nanoseek run.

The run holds what every command reads from a run directory, plus the checkpoint's own tokenizer:

    config.json                      {"model": ModelConfig, "source": provenance of the import}
    checkpoints/step_0/              model.safetensors (nanoseek names, the checkpoint's dtype) + state.json
    tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json
                                     copied as found (generation_config.json derived from config.json's
                                     bos / eos / pad ids when the checkpoint has none)

`load_tokenizer(run)` (nanoseek.hf_tokenizer) sees tokenizer_config.json and gives every command the imported
tokenizer, so generate / sample / chat / serve / eval / traces and the trainers (sft / rl / distill / dpo, whose
runs copy the files on) use the checkpoint's vocabulary, special tokens, chat template and eos ids;
nanoseek.hf_export writes a run back as a transformers directory.

Order of work: everything that can be wrong is checked before a weight is read (config.json and its
architecture, the tokenizer files, the chat template (compiled and test-rendered), the vocabulary against the
embedding, generation_config.json, then every shard's header: names, shapes, dtypes, truncation, in
nanoseek.hf.from_hf). The weights stream as from_hf loads them (peak about the model's size plus one tensor),
and model.safetensors is written tensor by tensor from the loaded parameters (no serialized copy of the whole
model in memory). Everything is written into a temporary directory beside the output, fsynced, and renamed
into place: a failure or a kill leaves no half-written run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.config import ConfigError
from nanoseek.hf import CheckpointError, check_architecture, config_from_hf, from_hf
from nanoseek.hf_tokenizer import TOKENIZER_FILES, ImportedTokenizer
from nanoseek.io import publish_dir

_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory: no whole-model byte copy
    (safetensors' save_file serializes everything into one buffer first). Data in key order, 8-byte aligned
    header, as the format specifies."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for k, t in tensors.items():
        if t.dtype not in _ST_NAMES:
            raise ConfigError(f"cannot write {k}: dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            t = t.detach().contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _generation_config(hf_dir: Path, hf_cfg: dict) -> dict:
    """generation_config.json as found (validated), else the token ids config.json declares."""
    path = hf_dir / "generation_config.json"
    if path.is_file():
        try:
            gen = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is not readable JSON: {e}") from None
        if not isinstance(gen, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        for key, lo, hi in (("temperature", 0.0, 100.0), ("top_p", 0.0, 1.0)):
            v = gen.get(key)
            if v is not None and not (isinstance(v, (int, float)) and lo <= v <= hi):
                raise ConfigError(f"{path}: {key} must be a number in [{lo:g}, {hi:g}], got {v!r}")
        return gen
    return {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_cfg.get(k) is not None}


def check_import(hf_dir: str | Path) -> tuple[dict, ImportedTokenizer, dict]:
    """Every check that needs no weight: (config.json, tokenizer, generation config). Raises ConfigError."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConfigError(f"{hf_dir} is not a directory (expected a transformers checkpoint directory)")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{hf_dir} has no config.json (expected a transformers checkpoint directory)")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_path} is not readable JSON: {e}") from None
    if not isinstance(hf_cfg, dict):
        raise ConfigError(f"{cfg_path} must hold a JSON object")
    check_architecture(hf_cfg)
    model_cfg = config_from_hf(hf_cfg)
    gen = _generation_config(hf_dir, hf_cfg)
    tok = ImportedTokenizer.from_dir(hf_dir, generation=gen)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the embedding only {model_cfg.vocab_size} "
                          "rows (vocab_size in config.json): tokenizer and weights do not belong together")
    for i in tok.stop_ids:
        if i >= model_cfg.vocab_size:
            raise ConfigError(f"eos token id {i} is outside the embedding ({model_cfg.vocab_size} rows)")
    return hf_cfg, tok, gen


def import_checkpoint(hf_dir: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                      verbose: bool = True) -> Path:
    """Import `hf_dir` into the new run directory `out` (which must not exist); returns `out`."""
    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists: choose another --out or delete it first")
    t0 = time.perf_counter()
    hf_cfg, tok, gen = check_import(hf_dir)
    model = from_hf(hf_dir, dtype=dtype, verbose=verbose)  # checks every shard header before reading weights
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.import-"))
    try:
        step_dir = tmp / "checkpoints" / "step_0"
        step_dir.mkdir(parents=True)
        write_safetensors(step_dir / "model.safetensors", model.state_dict())
        weights_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        model_cfg = model.cfg  # n_mtp is 0 when the MTP weights are absent (from_hf drops them)
        del model
        (step_dir / "state.json").write_text(json.dumps({"step": 0, "imported_from": str(hf_dir.resolve())}) + "\n")
        copied = {}
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file() and name != "generation_config.json":
                shutil.copyfile(hf_dir / name, tmp / name)
                copied[name] = _sha256(tmp / name)
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        shards = sorted(p.name for p in hf_dir.glob("*.safetensors"))
        source = {
            "kind": "transformers", "path": str(hf_dir.resolve()), "model_type": hf_cfg.get("model_type"),
            "architectures": hf_cfg.get("architectures"), "config_sha256": _sha256(hf_dir / "config.json"),
            "files_sha256": copied, "shards": {s: (hf_dir / s).stat().st_size for s in shards},
            "weights_dtype": weights_dtype, "tokenizer_vocab": tok.vocab_size,
            "eos_ids": sorted(tok.stop_ids),
            "chat_template": tok.chat_template is not None,
            "imported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": hf_cfg,
        }
        (tmp / "config.json").write_text(json.dumps({"model": model_cfg.to_dict(), "source": source}, indent=2) + "\n")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"imported {hf_dir} -> {out} ({len(shards)} shard(s), {weights_dtype}, tokenizer {tok.vocab_size} "
              f"tokens, chat template: {'yes' if tok.chat_template else 'no'}) in {time.perf_counter() - t0:.1f}s")
    return out

