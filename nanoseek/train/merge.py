"""Model merging by weight averaging (Kimi k1.5 arXiv 2501.12599 sec. 2.4, long2short: "averaging the weights
of a long-CoT model and a short-CoT model").

merged[k] = sum_i w_i * state_i[k] / sum_i w_i for every floating-point tensor (weights, norms, MoE routing
biases); a non-floating tensor must be equal in all runs and is copied. All runs must share one model config
(and tokenizer: the first run's is copied). The result is a run directory with one checkpoint (step 0) that
every later stage loads like any other run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from nanoseek.config import ConfigError
from nanoseek.io import atomic_write_text
from nanoseek.train.checkpoint import load_run_model, save_checkpoint


def average_state_dicts(states: list[dict[str, torch.Tensor]], weights: list[float] | None = None
                        ) -> dict[str, torch.Tensor]:
    if not states:
        raise ConfigError("merge needs at least one model")
    weights = [1.0] * len(states) if weights is None else list(weights)
    if len(weights) != len(states) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError("merge weights: one non-negative weight per run, not all zero")
    keys = set(states[0])
    if any(set(s) != keys for s in states[1:]):
        raise ConfigError("the runs do not have the same parameters (different architectures?)")
    total = sum(weights)
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            acc = torch.zeros_like(v, dtype=torch.float64)
            for s, w in zip(states, weights):
                acc += s[k].to(torch.float64) * (w / total)
            out[k] = acc.to(v.dtype)
        else:
            if any(not torch.equal(s[k], v) for s in states[1:]):
                raise ConfigError(f"non-float tensor {k} differs between the runs; cannot average it")
            out[k] = v.clone()
    return out


def merge_runs(runs: list[str | Path], out: str | Path, weights: list[float] | None = None) -> Path:
    """Average `runs` into the run directory `out`; returns its checkpoint directory."""
    runs = [Path(r) for r in runs]
    models, cfgs = [], []
    for r in runs:
        m, c, _ = load_run_model(r)
        models.append(m)
        cfgs.append(c["model"])
    if any(c != cfgs[0] for c in cfgs[1:]):
        raise ConfigError("merge: the runs have different model configs")
    toks = [(r / "tokenizer.json").read_text() for r in runs]
    if any(t != toks[0] for t in toks[1:]):
        raise ConfigError("merge: the runs have different tokenizers")
    merged = models[0]
    merged.load_state_dict(average_state_dicts([m.state_dict() for m in models], weights))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps({"model": cfgs[0], "stage": "merge", "merged": [str(r) for r in runs],
                                                       "weights": weights or [1.0] * len(runs)}, indent=2) + "\n")
    from nanoseek.hf_tokenizer import copy_tokenizer_files

    copy_tokenizer_files(runs[0], out)  # an imported run's tokenizer_config.json and chat template travel too
    return save_checkpoint(out / "checkpoints", 0, merged, None, {})
