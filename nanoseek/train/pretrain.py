"""Pretraining loop (V3 report sec. 4, SPEC 2): next-token CE + MTP + sequence balance loss, AdamW (or Muon,
`--optimizer`, nanoseek.train.optim), warmup + cosine, clipping, and the auxiliary-loss-free expert-bias update
(then QK-clip, when on) after every optimizer step.

    loss = L_main + mtp_lambda * L_mtp + balance_alpha * L_bal  [+ aux_alpha * L_aux under --balance aux]

Load balancing (`TrainConfig.balance`, for V3's own ablation, Table 5): `bias` (default) is the auxiliary-loss-free
bias update; `aux` the conventional batch-wise auxiliary loss it replaced (nanoseek.model.moe.batch_balance_loss;
the bias stays frozen); `none` neither. L_bal (V3's complementary sequence-wise loss) stays in every mode.

One optimizer step = `grad_accum` micro-batches of `batch_size` GLOBAL sequences; gradients are averaged over
ranks once per step (common.Dist.average_grads), the expert loads of all micro-batches and ranks are summed
before the bias update, so every rank applies the same bias change and W processes reproduce one process with
the same global batch. Resume is exact: model (incl. gate biases), optimizer, loader position and RNG states
come back from the checkpoint and metrics.jsonl is cut back to the checkpointed step.

Run directory: config.json (model + train + data + optim, resolved), tokenizer.json, metrics.jsonl, checkpoints/,
report.md, plots/. Only rank 0 writes. Simplifications against V3: no constant-lr phase and no batch-size
ramp; gamma stays constant (V3 sets it to 0 for the last 500B tokens); MTP lambda is fixed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanoseek.cli_config import knob
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.data import Loader, eval_batches
from nanoseek.io import atomic_write_text
from nanoseek.model import Transformer
from nanoseek.model.moe import load_summary, mean_max_vio
from nanoseek.parallel.training import check_ep_flags, checkpoint_pair, setup_ep, sync_and_clip
from nanoseek.train import precision as prec
from nanoseek.train.checkpoint import latest_checkpoint, resume_run, save_checkpoint
from nanoseek.train.common import (
    Dist,
    TrainConfig,
    check_compile,
    enable_compile,
    lr_at,
    lr_at_fraction,
    set_lr,
    setup_distributed,
)
from nanoseek.train.metrics import MetricsLogger, ProgressLine, mfu, model_flops_per_token, peak_matmul_flops
from nanoseek.train.optim import OptimConfig, build_optimizer, qk_clip, track_max_logit
from nanoseek.train.pretrain_data import DataConfig, build_rows, prepare_tokenizer, text_rows
from nanoseek.train.sparse_attention import SparseStageConfig, copy_init_tokenizer, start_stage

KILL_ENV = "NANOSEEK_TEST_KILL_AFTER_STEP"  # tests only: SIGKILL this process right after that step


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # `model` was derived with dense_equivalent()
    dense: bool = knob(False, help="dense model with the preset's activated parameter count")
    # applied to `model` by the command (model.n_mtp holds the run's value); kept to record what was asked
    mtp_depth: int | None = knob(None, metavar="D", help="multi-token prediction modules (0 = off; none = the "
                                 "preset's). The main model is the same for every D, so MTP on/off compares at "
                                 "equal main-model FLOPs (V3 Table 4)")
    # sets model.fp8
    precision: str = knob("fp32", choices=prec.PUBLIC, resume="override", help="fp32, bf16 (BF16 compute, FP32 "
                          "master weights) or fp8 (V3's fine-grained FP8 GEMMs, BF16 AdamW moments)")
    # the lr cosine follows the used fraction of train.minutes (steps only a cap): `--minutes` without `--steps`
    time_schedule: bool = False
    stage: SparseStageConfig = field(default_factory=SparseStageConfig)  # --init RUN, V3.2 sparse-attention stages

    def __post_init__(self):
        prec.check(self.precision)
        if self.mtp_depth is not None and self.mtp_depth < 0:
            raise ConfigError(f"--mtp-depth must be >= 0, got {self.mtp_depth}")

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "train": self.train.to_dict(),
                "data": dataclasses.asdict(self.data), "optim": dataclasses.asdict(self.optim), "dense": self.dense,
                "mtp_depth": self.mtp_depth, "precision": self.precision, "time_schedule": self.time_schedule,
                "stage": dataclasses.asdict(self.stage)}

    @classmethod
    def from_dict(cls, d: dict) -> PretrainConfig:
        try:
            model = ModelConfig.from_dict(d["model"])
            return cls(model=model, train=TrainConfig.from_dict(d["train"]), data=DataConfig(**d["data"]),
                       optim=OptimConfig(**d.get("optim", {})), dense=bool(d.get("dense", False)),
                       mtp_depth=d.get("mtp_depth"), precision=d.get("precision", "fp8" if model.fp8 else "fp32"),
                       time_schedule=bool(d.get("time_schedule", False)), stage=SparseStageConfig(**d.get("stage", {})))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"run config is missing or has a bad section: {e}") from None

    @classmethod
    def load(cls, run_dir: str | Path) -> PretrainConfig:
        path = Path(run_dir) / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json in {run_dir}: is it a pretraining run directory?")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None


def dense_equivalent(cfg: ModelConfig) -> ModelConfig:
    """A dense model with (as nearly as an integer inter_dim allows) the same activated parameters per token:
    every layer a SwiGLU whose hidden size absorbs the active experts (routed top-K + shared) and the gate."""
    target = cfg.param_counts()["active"]
    dense = dataclasses.replace(cfg, n_routed_experts=0, n_dense_layers=cfg.n_layers, inter_dim=0)
    base = dense.param_counts()["active"]
    inter = round((target - base) / (cfg.n_layers * 3 * cfg.dim))
    return dataclasses.replace(dense, inter_dim=max(1, inter)).validate()


# ---- steps ---------------------------------------------------------------------------------------------------
def train_step(model: Transformer, optimizer: torch.optim.Optimizer, loader: Loader, cfg: TrainConfig,
               dist: Dist, parallel=None, precision: str = "fp32", qk_clip_tau: float = 0.0) -> dict:
    """One optimizer step over cfg.grad_accum micro-batches; returns the global (rank-averaged) losses,
    the pre-clip grad norm and the per-layer expert loads summed over micro-batches and ranks. `parallel`: an
    ExpertParallel or a Pipeline (nanoseek.parallel) that syncs and clips gradients instead of the DDP average
    (a Pipeline also runs forward and backward through its schedule). cfg.balance picks the load balancing:
    the bias update (bias), the auxiliary loss aux_alpha * L_aux (aux), or neither (none). With the attention
    layers recording logits (optim.track_max_logit) the step's max logit is returned as max_logit, and heads
    above qk_clip_tau (> 0) are clipped after the step (optim.qk_clip)."""
    model.train()
    aux_alpha = cfg.aux_alpha if cfg.balance == "aux" else 0.0
    parts_sum = torch.zeros(6, device=dist.device)
    for _ in range(cfg.grad_accum):
        x, y = (t.to(dist.device) for t in loader.next_batch())
        with prec.autocast(precision, dist.device):
            if hasattr(parallel, "forward_backward"):  # pipeline: the schedule runs forward and backward
                main_mtp_bal_loss = parallel.forward_backward(model, x, y).to(parts_sum) / cfg.grad_accum
                parts_sum[:5] += torch.cat([main_mtp_bal_loss[:3], main_mtp_bal_loss.new_zeros(1),
                                            main_mtp_bal_loss[3:]])
                continue
            _, parts = model(x, y)
        aux = parts.aux if parts.aux is not None else parts.main.new_zeros(())
        loss = parts.main + cfg.mtp_lambda * parts.mtp + cfg.balance_alpha * parts.balance
        if aux_alpha:
            loss = loss + aux_alpha * aux
        kl = parts.indexer if parts.indexer is not None else aux.new_zeros(())  # sparse-attention stages only
        loss = loss + kl
        (loss / cfg.grad_accum).backward()
        parts_sum += torch.stack([parts.main, parts.mtp, parts.balance, aux, loss, kl]).detach() / cfg.grad_accum
    grad_norm = sync_and_clip(model, cfg.grad_clip, dist, parallel)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loads = dist.all_reduce_sum(model.accumulated_loads().clone())
    # resets the load accumulators in every mode; only `bias` moves the bias (aux / none keep it where it is)
    model.update_expert_bias(cfg.bias_gamma if cfg.balance == "bias" else 0.0, loads)
    max_logit = qk_clip(model, qk_clip_tau, dist)
    main, mtp, balance, aux, total, kl = dist.all_reduce_mean(parts_sum).tolist()
    return {"loss": total, "main": main, "mtp": mtp, "balance": balance, "aux": aux, "indexer_kl": kl,
            "grad_norm": grad_norm, "loads": loads, **({"max_logit": max_logit} if max_logit is not None else {})}


@torch.no_grad()
def evaluate(model: Transformer, rows: torch.Tensor, cfg: TrainConfig, dist: Dist,
             precision: str = "fp32", loads: list | None = None) -> float | None:
    """Mean next-token CE over the first cfg.eval_batches held-out batches (eval mode: no load accumulation).
    `loads`: a list that receives each batch's (n_moe_layers, n_experts) expert loads, summed over ranks."""
    model.eval()
    total = torch.zeros(2, device=dist.device)
    for x, y in eval_batches(rows, cfg.batch_size, cfg.eval_batches, dist.rank, dist.world):
        with prec.autocast(precision, dist.device):
            _, parts = model(x.to(dist.device), y.to(dist.device))
        total += torch.stack([parts.main.detach() * x.size(0), torch.tensor(float(x.size(0)), device=dist.device)])
        if loads is not None:
            loads.append(model.expert_loads().clone())
    model.train()
    dist.all_reduce_sum(total)
    if loads:  # every rank reads the same number of batches (eval_batches), so the sums line up
        loads[:] = list(dist.all_reduce_sum(torch.stack(loads).to(dist.device)).unbind(0))
    return (total[0] / total[1]).item() if total[1] > 0 else None


@torch.no_grad()
def evaluate_bpb(model: Transformer, rows, token_bytes: torch.Tensor, cfg: TrainConfig, dist: Dist,
                 precision: str = "fp32") -> float | None:
    """Held-out bits per byte (nanoseek.text.bpb) over the same batches `evaluate` reads."""
    from nanoseek.text.bpb import bits_per_byte, bpb_sums

    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=dist.device)
    for x, y in eval_batches(rows, cfg.batch_size, cfg.eval_batches, dist.rank, dist.world):
        with prec.autocast(precision, dist.device):
            total += bpb_sums(model, x.to(dist.device), y.to(dist.device), token_bytes)
    model.train()
    dist.all_reduce_sum(total)
    return bits_per_byte(total[0].item(), total[1].item()) if total[1] > 0 else None


# ---- the run -------------------------------------------------------------------------------------------------
def _full_pair(model_cfg: ModelConfig, tcfg: TrainConfig, device,
               precision: str) -> tuple[Transformer, torch.optim.Optimizer]:
    """A one-process model and optimizer that an EP or PP run's checkpoint is assembled into."""
    model = prec.configure_model(Transformer(model_cfg).to(device), precision)
    return model, prec.build_optimizer(model, tcfg, precision)  # EP / PP: AdamW only (optim.check_parallel)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pretrain(run_dir: str | Path, cfg: PretrainConfig, resume: bool = False, device: str = "auto",
             dist: Dist | None = None, init_from: str | Path | None = None,
             pace: Callable[[], float] | None = None, ep: int = 1, ep_redundant: int = 0, pp: int = 1,
             pp_schedule: str = "1f1b", pp_microbatches: int = 0) -> dict:
    """Train (or resume) the run in `run_dir`; returns a summary dict (final step, losses, tokens/s).
    `init_from`: a checkpoint step directory whose weights (not optimizer) start a new run, e.g. to continue
    pretraining a base with a fresh schedule.
    `pace`: an outside clock returning the used fraction (0..1) of a budget, read before every step: the lr
    decays with it instead of with the step count and training stops (checkpointed) once it reaches 1, with
    cfg.train.steps only a cap. The demo's control uses it to train exactly as long as GRPO runs beside it.
    `ep` > 1: expert parallelism over groups of `ep` ranks, `ep_redundant` extra physical experts per MoE layer
    placed by EPLB from the run's recorded loads (nanoseek.parallel); `pp` > 1: pipeline parallelism over all
    ranks with schedule `pp_schedule` and `pp_microbatches` micro-batches (0: two per stage). Checkpoints keep
    the one-process layout either way."""
    run_dir = Path(run_dir)
    dist = dist or setup_distributed(device)
    tcfg = cfg.train.validate()
    ckpt_dir = run_dir / "checkpoints"
    ckpt = latest_checkpoint(ckpt_dir)
    if resume and ckpt is None:
        raise ConfigError(f"nothing to resume: {ckpt_dir} holds no checkpoint")
    if not resume and ckpt is not None:
        raise ConfigError(f"{run_dir} already has checkpoints; pass --resume or choose another --out")
    if tcfg.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"seq_len {tcfg.seq_len} exceeds the model's max_seq_len {cfg.model.max_seq_len}")
    if tcfg.batch_size % dist.world and pp == 1:
        raise ConfigError(f"batch size {tcfg.batch_size} must be a multiple of the number of processes ({dist.world})")

    use_ep = check_ep_flags(ep, ep_redundant, dist.world)
    if pp > 1:
        from nanoseek.parallel.pipeline import check_pp

        if ep > 1 or tcfg.grad_accum > 1:
            raise ConfigError("--pp does not combine with --ep or --grad-accum > 1 yet")
        if tcfg.balance == "aux":
            raise ConfigError("--balance aux does not combine with --pp yet (the pipeline's loss has no aux term)")
        pp_microbatches = pp_microbatches or 2 * pp * (1 if pp_schedule == "1f1b" else 2)
        check_pp(pp, dist.world, pp_schedule, pp_microbatches, tcfg.batch_size)
    check_compile(tcfg.compile, ep, pp, cfg.precision)  # before the run directory is made or written
    cfg.optim.check_parallel(ep, pp, tcfg.compile)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        copy_init_tokenizer(cfg.stage, run_dir)
    dist.barrier()
    tokenizer = prepare_tokenizer(run_dir, cfg.data, tcfg.seed, dist)
    cfg.model = prec.model_config(dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size), cfg.precision)
    cfg.model.validate()
    token_bytes = None
    if cfg.data.is_text:
        from nanoseek.text.bpb import token_byte_lengths
        from nanoseek.text.shards import tokenizer_digest

        train_rows, test_rows, manifest = text_rows(run_dir, tokenizer, cfg.data, tcfg.seq_len, dist, ckpt is not None)
        cfg.data.fingerprint = tokenizer_digest(run_dir / "tokenizer.json")
        token_bytes = token_byte_lengths(tokenizer).to(dist.device)
    else:
        train_rows, test_rows = build_rows(tokenizer, cfg.data, tcfg.seq_len, tcfg.seed)

    seed_everything(tcfg.seed)
    model = prec.configure_model(Transformer(cfg.model).to(dist.device), cfg.precision)
    if init_from is not None and ckpt is None:
        from nanoseek.train.checkpoint import load_model_weights

        load_model_weights(init_from, model)
    start_stage(model, cfg.stage, fresh=ckpt is None)  # --init weights; V3.2 stage: indexer mode, warm-up freeze
    dist.broadcast_module(model)
    optimizer = build_optimizer(model, tcfg, cfg.optim, cfg.precision)
    track_max_logit(model, cfg.optim.tracks_logits)
    # a pipeline feeds the whole global batch through the first stage (and its targets to the last)
    loader = Loader(train_rows, tcfg.batch_size, tcfg.seed, *((0, 1) if pp > 1 else (dist.rank, dist.world)))
    metrics = MetricsLogger(run_dir / "metrics.jsonl", enabled=dist.is_main)

    step, elapsed0 = 0, 0.0
    if ckpt is not None:
        step, elapsed0 = resume_run(ckpt, model, optimizer, loader, metrics)
        stored = PretrainConfig.load(run_dir)
        if dist.is_main and (stored.precision, stored.train.compile) != (cfg.precision, tcfg.compile):
            atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    elif dist.is_main:
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    if pace is None and cfg.time_schedule and tcfg.minutes > 0:  # the cosine follows the time budget
        budget_start = time.perf_counter() - elapsed0

        def pace() -> float:
            return (time.perf_counter() - budget_start) / (tcfg.minutes * 60)
    parallel = None
    if use_ep:  # redundant experts placed by this run's recorded loads when resuming
        parallel, optimizer = setup_ep(model, optimizer, ep, ep_redundant, dist.device,
                                       lambda m: prec.build_optimizer(m, tcfg, cfg.precision),
                                       [run_dir] if ckpt is not None else [], dist.is_main)
    if pp > 1:
        from nanoseek.parallel.pipeline import setup_pipeline

        parallel = setup_pipeline(model, pp, pp_schedule, pp_microbatches, tcfg.mtp_lambda, tcfg.balance_alpha,
                                  dist.device)
        optimizer = parallel.shard(model, optimizer, lambda m: prec.build_optimizer(m, tcfg, cfg.precision))

    enable_compile(model, tcfg.compile, ep, pp, cfg.precision)
    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * tcfg.seq_len
    timed = cfg.time_schedule and tcfg.minutes > 0
    progress = ProgressLine(tcfg.steps, start=step, enabled=dist.is_main,
                            print_every=max(1, tcfg.steps // 20) if pace is None else 50,
                            budget_s=tcfg.minutes * 60 if timed else None, elapsed0=elapsed0)
    if ckpt is not None:
        progress.message(f"resumed from {ckpt} (step {step})")
    progress.message(f"{model.num_params():,} parameters, {train_rows.size(0):,} train / {test_rows.size(0):,} "
                     f"held-out sequences of {tcfg.seq_len} tokens, {dist.world} process(es) on {dist.device}, "
                     f"precision {cfg.precision}" + (", torch.compile on (first steps compile)" if tcfg.compile else ""))
    if parallel is not None:
        progress.message(parallel.describe())
    # MFU (train/metrics.py): this process's model FLOPs/s over its measured peak FP32 matmul rate; under
    # --ep / --pp a process computes only part of each token, so it is left out there
    flops_per_token = model_flops_per_token(cfg.model, tcfg.seq_len, mtp=cfg.model.n_mtp > 0)
    if parallel is None and dist.is_main:
        progress.message(f"model FLOPs/token {flops_per_token / 1e6:.2f}M (train/metrics.py), measured peak FP32 "
                         f"matmul {peak_matmul_flops() / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} thread(s)")
    kill_after = int(os.environ.get(KILL_ENV, "-1"))
    loop_start = time.perf_counter()
    tok_rate_ema = None
    record: dict = {}
    eval_loss = val_bpb = None
    try:
        while step < tcfg.steps:
            fraction = pace() if pace is not None else None
            if fraction is not None and dist.world > 1:  # one lr on every rank: the mean of their clocks
                fraction = dist.all_reduce_mean(torch.tensor([fraction], device=dist.device)).item()
            lr = lr_at(step, tcfg) if fraction is None else lr_at_fraction(step, fraction, tcfg)
            set_lr(optimizer, lr)
            t0 = time.perf_counter()
            out = train_step(model, optimizer, loader, tcfg, dist, parallel, cfg.precision, cfg.optim.qk_clip_tau)
            dt = time.perf_counter() - t0
            step += 1
            tok_rate = tokens_per_step / dt
            tok_rate_ema = tok_rate if tok_rate_ema is None else 0.9 * tok_rate_ema + 0.1 * tok_rate
            out_of_time = tcfg.minutes > 0 and time.perf_counter() - loop_start >= tcfg.minutes * 60
            paced_out = pace is not None and pace() >= 1.0
            stop = dist.any_flag(out_of_time or paced_out)
            last = step == tcfg.steps or stop
            record = {"step": step, "loss": out["loss"], "main": out["main"], "mtp": out["mtp"],
                      "balance": out["balance"], "aux": out["aux"], "lr": lr, "grad_norm": out["grad_norm"],
                      "tokens_per_s": tok_rate, "tokens": step * tokens_per_step,
                      **({"indexer_kl": out["indexer_kl"]} if cfg.stage.mode else {}),
                      **({"mfu": mfu(tok_rate, flops_per_token)} if parallel is None else {}),
                      "elapsed_s": elapsed0 + time.perf_counter() - loop_start, **load_summary(out["loads"]),
                      **({"max_logit": out["max_logit"]} if "max_logit" in out else {})}
            if last or (tcfg.eval_interval and step % tcfg.eval_interval == 0):
                if parallel is not None:
                    parallel.prepare_eval(model)
                val_loads: list[torch.Tensor] | None = [] if pp == 1 else None  # a stage holds only its layers
                eval_loss = evaluate(model, test_rows, tcfg, dist, cfg.precision, val_loads)
                record["eval_loss"] = eval_loss
                val_vio = mean_max_vio(val_loads)
                if val_vio is not None:
                    record["val_max_vio"] = val_vio
                if token_bytes is not None:
                    val_bpb = evaluate_bpb(model, test_rows, token_bytes, tcfg, dist, cfg.precision)
                    record["val_bpb"] = val_bpb
            if last or step % tcfg.log_interval == 0 or "eval_loss" in record:
                metrics.log(record)
            if last or (tcfg.ckpt_interval and step % tcfg.ckpt_interval == 0):
                to_save = checkpoint_pair(model, optimizer, parallel,
                                          lambda: _full_pair(cfg.model, tcfg, dist.device, cfg.precision))
                if dist.is_main:
                    save_checkpoint(ckpt_dir, step, *to_save,
                                    {"loader": loader.state_dict(), "elapsed_s": record["elapsed_s"]},
                                    tcfg.keep_last)
                dist.barrier()
            extra = f"eval {eval_loss:.4f}" if eval_loss is not None else ""
            if val_bpb is not None:
                extra += f"  bpb {val_bpb:.3f}"
            if "indexer_kl" in record:
                extra += f"  indexer KL {record['indexer_kl']:.4f}"
            if "max_vio" in record:
                extra = f"maxvio {record['max_vio']:.2f}" + (f"  {extra}" if extra else "")
            if "max_logit" in record:
                extra = f"max logit {record['max_logit']:.1f}" + (f"  {extra}" if extra else "")
            if parallel is None:
                extra = f"MFU {mfu(tok_rate_ema, flops_per_token):.1%}" + (f"  {extra}" if extra else "")
            progress.update(step, out["loss"], lr, tok_rate_ema, extra)
            if step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop:
                why = "the paced budget ran out" if paced_out else f"time limit of {tcfg.minutes:g} min reached"
                progress.message(f"{why} at step {step}; checkpoint saved")
                break
    finally:
        progress.close()

    summary = {"step": step, "loss": record.get("loss"), "eval_loss": eval_loss, "tokens_per_s": tok_rate_ema,
               "run_dir": str(run_dir), **({"val_bpb": val_bpb} if token_bytes is not None else {})}
    if dist.is_main and record:
        from nanoseek.report import write_report

        write_report(run_dir)
    dist.barrier()
    return summary
