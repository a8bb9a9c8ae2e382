"""Training precision modes (DeepSeek-V3 report sec. 3.3, SPEC 1.5): `--precision fp32 | bf16 | fp8`.

* fp32: everything in FP32 (the default).
* bf16: BF16 compute with FP32 master weights: the forward runs under `torch.autocast(bfloat16)`, so matmuls
  (linears, attention) take BF16 copies of the FP32 weights; gradients land on the FP32 parameters and AdamW
  updates them in FP32. Kept in FP32: the MoE gate (autocast is switched off inside it), every RMSNorm
  (computed on an FP32 upcast), the residual stream (the FP32 embedding output plus BF16 branch outputs
  promotes to FP32), RoPE, the softmax of attention (SDPA's CPU kernel accumulates BF16 inputs in FP32) and
  the losses (logits are cast to FP32 before the cross-entropy).
* fp8: the bf16 mode plus V3's FP8 recipe (nanoseek.model.fp8) for every Linear in the attention
  projections and the FFNs/experts (fprop, dgrad and wgrad in E4M3 with 1x128 / 128x128 scales, FP8-stored
  activations), and AdamW moments stored in BF16 (`AdamW` below); the embedding, the output head, the gate,
  norms and the attention core stay in BF16/FP32 as in the report.
* fp8-tensor: an ablation only (bench/precision.py): fp8 with one scale per tensor instead of per tile.

Simplifications: no FP8 kernels (CPU: accuracy and memory are measured, not speed); activation gradients
between layers are not stored in FP8 (only the Linear inputs saved for backward are); the master weights'
gradients are FP32 (V3 accumulates some in BF16).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from nanoseek.config import ConfigError, ModelConfig

PRECISIONS = ("fp32", "bf16", "fp8", "fp8-tensor")
PUBLIC = PRECISIONS[:3]  # what the CLI offers; fp8-tensor is the bench's ablation


def check(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PUBLIC)}, got {precision!r}")
    return precision


def uses_fp8(precision: str) -> bool:
    return check(precision).startswith("fp8")


def model_config(cfg: ModelConfig, precision: str) -> ModelConfig:
    """The model config a run in `precision` builds: fp8 turns the FP8 linears on (and off for the others)."""
    return dataclasses.replace(cfg, fp8=uses_fp8(precision))


def configure_model(model: nn.Module, precision: str) -> nn.Module:
    """Set the per-tensor ablation flag on every FP8 linear (fp8-tensor); the fp8 flag itself comes from the
    model config (model_config)."""
    from nanoseek.model.fp8 import Linear

    for m in model.modules():
        if isinstance(m, Linear):
            m.per_tensor = check(precision) == "fp8-tensor"
    return model


def apply(model: nn.Module, precision: str) -> nn.Module:
    """A loaded model in `precision`: the same weights and buffers (gate biases), rebuilt when its config's fp8
    flag differs (a fine-tuning run's precision is its own, not its init run's), with configure_model applied.
    For sft and rl, whose model comes from a run directory."""
    from nanoseek.model import Transformer

    cfg = model_config(model.cfg, precision)
    if cfg.fp8 != model.cfg.fp8:
        device = next(model.parameters()).device
        rebuilt = Transformer(cfg).to(device)
        rebuilt.load_state_dict(model.state_dict())
        rebuilt.train(model.training)
        model = rebuilt
    return configure_model(model, precision)


def autocast(precision: str, device: torch.device | str = "cpu"):
    """The context every training/eval forward of a run in `precision` runs under."""
    if check(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) whose moments are stored in `state_dtype` (BF16 for
    fp8 runs, as V3 does) while the update math and the master weights stay FP32. With
    state_dtype=torch.float32 it computes what torch.optim.AdamW(foreach=False) computes (tested)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, state_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.state_dtype = state_dtype

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # torch casts floating state to the parameter's dtype: undo it
        for st in self.state.values():  # exact: the stored values are state_dtype values
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    st[k] = st[k].to(self.state_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                st["step"] += 1
                t = float(st["step"])
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        return loss


def build_optimizer(model: nn.Module, cfg, precision: str) -> torch.optim.Optimizer:
    """common.build_optimizer for fp32/bf16; the BF16-moment AdamW (same groups and hyper-parameters) for fp8."""
    from nanoseek.train.common import build_optimizer as fp32_adamw
    from nanoseek.train.common import lr_at, param_groups

    if not uses_fp8(precision):
        return fp32_adamw(model, cfg)
    return AdamW(param_groups(model, cfg.weight_decay), lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), eps=1e-8)
