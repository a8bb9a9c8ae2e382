"""Checkpoints: `<run>/checkpoints/step_N/` = model.safetensors + optimizer.pt + state.json.

* model.safetensors: the full state dict, including the MoE gate selection biases (persistent buffers).
* optimizer.pt: the optimizer's state_dict (loaded with weights_only=True: no pickled code runs).
* state.json: step, the data loader position, elapsed seconds, any trainer extras, and every RNG state
  (python, numpy, torch CPU, CUDA when present; byte states base64-encoded) so a resumed run continues
  exactly as the uninterrupted one would.

A step directory is written whole into a temp directory beside it, each file fsynced, then renamed into place,
so a kill leaves either the old set of checkpoints or the new one, never a half-written step. Only the
newest `keep_last` are kept. `latest_checkpoint` scans for complete step directories; anything unreadable
raises ConfigError naming the directory.
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nanoseek.config import ConfigError

STEP_RE = re.compile(r"^step_(\d+)$")
FILES = ("model.safetensors", "optimizer.pt", "state.json")


# ---- RNG ---------------------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Every RNG this process uses, as JSON-serializable values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        states = [_unb64(s) for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


# ---- discovery ---------------------------------------------------------------------------------------------
def step_dirs(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete step directories (those holding state.json), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "state.json").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = step_dirs(ckpt_dir)
    return found[-1][1] if found else None


# ---- save --------------------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(ckpt_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict, keep_last: int = 2) -> Path:
    """Write checkpoints/step_<step>/ atomically and prune to the newest `keep_last`. `state` is merged into
    state.json next to step and the RNG states. Returns the step directory."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_dir, prefix=f".tmp_step_{step}_"))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        full_state = {"step": step, **state, "rng": rng_state()}
        (tmp / "state.json").write_text(json.dumps(full_state) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one out of the way first
            trash = Path(tempfile.mkdtemp(dir=ckpt_dir, prefix=".trash_"))
            os.replace(final, trash / final.name)
            shutil.rmtree(trash)
        os.replace(tmp, final)
        _fsync(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in step_dirs(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in ckpt_dir.glob(".tmp_step_*"):  # from a process killed mid-save
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


# ---- load --------------------------------------------------------------------------------------------------
def read_state(step_dir: str | Path) -> dict:
    path = Path(step_dir) / "state.json"
    try:
        state = json.loads(path.read_text())
        int(state["step"])
        return state
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {step_dir} has no state.json") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise ConfigError(f"checkpoint {step_dir} is corrupted (unreadable state.json); "
                          "delete that step directory to fall back to an older one") from None


def load_model_weights(step_dir: str | Path, model: nn.Module) -> None:
    """Load model.safetensors into `model` strictly (shapes and names must match)."""
    path = Path(step_dir) / "model.safetensors"
    if not path.exists():
        raise ConfigError(f"checkpoint {step_dir} has no model.safetensors")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"checkpoint {step_dir} is corrupted (model.safetensors: {e}); "
                          "delete that step directory to fall back to an older one") from None
    device = next(model.parameters()).device
    try:
        model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"checkpoint {step_dir} does not fit this model config: "
                          f"{first[1].strip() if len(first) > 1 else first[0]}") from None


def load_checkpoint(step_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict:
    """Restore model (and optimizer, RNG) from a step directory; returns its state.json dict."""
    step_dir = Path(step_dir)
    state = read_state(step_dir)
    load_model_weights(step_dir, model)
    if optimizer is not None:
        path = step_dir / "optimizer.pt"
        try:
            opt_state = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
            optimizer.load_state_dict(opt_state)
        except FileNotFoundError:
            raise ConfigError(f"checkpoint {step_dir} has no optimizer.pt") from None
        except (RuntimeError, EOFError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
            raise ConfigError(f"checkpoint {step_dir} is corrupted (optimizer.pt: {type(e).__name__}); "
                              "delete that step directory to fall back to an older one") from None
    if restore_rng and "rng" in state:
        try:
            set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError):
            raise ConfigError(f"checkpoint {step_dir} is corrupted (bad RNG state in state.json)") from None
    return state



def resume_run(step_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, loader, metrics) -> tuple[int, float]:
    """Resume a data-loader run (pretrain, sft) from a step directory: weights, optimizer, RNG, the loader's
    position, and metrics.jsonl cut back to that step; returns (step, elapsed seconds)."""
    state = load_checkpoint(step_dir, model, optimizer)
    loader.load_state_dict(state["loader"])
    step = int(state["step"])
    metrics.truncate_after(step)
    return step, float(state.get("elapsed_s", 0.0))

def load_run_model(run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu"):
    """(model in eval mode, run config dict, step directory) from a run directory's config.json and its
    latest (or given) checkpoint: what sampling, evaluation and the next training stage start from."""
    from nanoseek.config import ModelConfig
    from nanoseek.model import Transformer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    cfg_path = run_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
        model_cfg = ModelConfig.from_dict(cfg["model"])
    except FileNotFoundError:
        raise ConfigError(f"no config.json in {run_dir}: is it a run directory?") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{cfg_path} is unreadable: {e}") from None
    if step is None:
        step_dir = latest_checkpoint(run_dir / "checkpoints")
        if step_dir is None:
            raise ConfigError(f"{run_dir} has no checkpoint yet")
    else:
        step_dir = run_dir / "checkpoints" / f"step_{step}"
        if not (step_dir / "state.json").exists():
            have = ", ".join(str(s) for s, _ in step_dirs(run_dir / "checkpoints")) or "none"
            raise ConfigError(f"no checkpoint for step {step} in {run_dir} (have: {have})")
    model = Transformer(model_cfg).to(device)
    load_model_weights(step_dir, model)
    return model.eval(), cfg, step_dir
