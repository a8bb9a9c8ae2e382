"""Supervised fine-tuning on prompt / completion pairs (DeepSeek-R1 arXiv 2501.12948 sec. 2.3.1 cold start,
2.3.3 SFT on rejection-sampled traces, 2.4 distillation by plain SFT).

Data: a JSONL file, one `{"prompt": str, "completion": str, ...}` per line (other keys are metadata and are
ignored here), or OpenAI-format conversations `{"messages": [{"role": "system"|"user"|"assistant", "content":
str}, ...]}`, multi-turn; both kinds may share a file. A prompt/completion row is rendered with the chat
template as `prompt_ids(prompt) + encode(completion) + [eos]` (tokenizer.document_ids), so the model learns to
end its answer; a conversation is `tokenizer.chat_document(messages)`, every assistant turn followed by eos.
An imported checkpoint's run (nanoseek.hf_tokenizer) renders both through ITS chat template: a prompt is the
template's generation prompt for one user message, a conversation's trained tokens are found by rendering
prefixes (ImportedTokenizer.chat_document: what follows each assistant turn's generation prompt, up to the next
message), and the softmax runs over the tokenizer's vocabulary only (an embedding padded past it keeps its
padded rows out of the loss, as the engine keeps them out of sampling).

Loss: next-token cross-entropy over the completion tokens and the eos only (for a conversation: the content and
eos of EVERY assistant turn, not only the last); prompt, system and user tokens, role tokens and padding get
target IGNORE and therefore exactly zero gradient. Over one optimizer step the loss is the SUM over every
completion token of the GLOBAL batch divided by that batch's completion-token count (each token weighs the
same whichever row or rank holds it), so W data-parallel processes reproduce one process with the same
global batch (gradients averaged by common.Dist.average_grads; with --ep the routed experts are sharded over
the ranks instead and nanoseek.parallel.training syncs them).

Rows: one example per row, right-padded to `seq_len + 1` (no packing: a completion is never cut and never
sees another example's tokens); each micro-batch is trimmed to its longest row, which changes nothing (the
attention is causal and padding is at the right). An example longer than `seq_len + 1` tokens is counted and
skipped, never truncated.

Schedule: the shared warmup + cosine (train/common.py) over `steps`, or, with `budget_s`, over wall-clock
time: the cosine follows the fraction of the budget used (checkpointed elapsed time included, so a resumed
run keeps the same budget) and training stops, checkpointed, when the budget is spent.

Precision (`precision`: fp32 | bf16 | fp8, nanoseek.train.precision): the forward and loss run under that
mode's autocast, fp8 turns the model's FP8 linears on and keeps AdamW's moments in BF16; recorded in
config.json, and a resumed run keeps it unless `precision` is passed again (then config.json is rewritten).

Simplifications: no MTP loss and no balance loss during SFT (the MoE routing bias still moves by the
auxiliary-loss-free rule, on non-padding tokens, when the model has experts); no held-out loss (the stages
that use SFT evaluate task accuracy instead).
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.cli_config import knob
from nanoseek.config import PRESETS, ConfigError, ModelConfig
from nanoseek.data import Loader
from nanoseek.model import Transformer
from nanoseek.model.transformer import IGNORE
from nanoseek.train.checkpoint import resume_run, save_checkpoint
from nanoseek.parallel.training import check_ep_flags, checkpoint_pair, setup_ep, sync_and_clip
from nanoseek.train import precision as prec
from nanoseek.train.common import Dist, TrainConfig, check_compile, enable_compile, set_lr, setup_distributed
from nanoseek.train.loop import HasTrainConfig, RunClock, finish_run, load_mask, open_run, read_jsonl_rows, write_run_files
from nanoseek.train.metrics import MetricsLogger, ProgressLine

KILL_ENV = "NANOSEEK_TEST_KILL_AFTER_STEP"  # tests only: SIGKILL this process right after that step
MAX_ROWS = 2_000_000  # bound on the examples one run reads


@dataclass
class SFTConfig(HasTrainConfig):
    data: str = knob("", help='JSONL of {"prompt": ..., "completion": ...} rows')
    init: str | None = knob(None, help="a run directory to fine-tune (its latest checkpoint and tokenizer)")
    preset: str | None = knob(None, help=f"or a freshly initialised model: {', '.join(PRESETS)} (needs --tokenizer)")
    tokenizer: str | None = knob(None, help="tokenizer.json (or a run directory holding one) for --preset")
    epochs: float = knob(0.0, help="passes over the data instead of --steps (> 0: steps = ceil(epochs * examples "
                         "/ batch size))")
    budget_s: float = 0.0  # > 0: wall-clock budget (lr cosine over time, stop at the end); steps is a cap
    precision: str = knob("fp32", choices=prec.PUBLIC, resume="override",
                          help="fp32, bf16 or fp8 (nanoseek.train.precision; docs/precision.md)")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, steps=200, batch_size=32, seq_len=64,
                                                                  warmup_steps=10, eval_interval=0,
                                                                  ckpt_interval=50, bias_gamma=0.0))

    def validate(self) -> SFTConfig:
        if not self.data:
            raise ConfigError("--data FILE.jsonl is required")
        if (self.init is None) == (self.preset is None):
            raise ConfigError("give exactly one of --init RUN or --preset P")
        if self.preset is not None and not self.tokenizer:
            raise ConfigError("--preset needs --tokenizer (a tokenizer.json or a run directory holding one)")
        if self.epochs < 0 or self.budget_s < 0:
            raise ConfigError("epochs and budget must be >= 0")
        prec.check(self.precision)
        self.train.validate()
        return self


# ---- data ----------------------------------------------------------------------------------------------
def read_examples(path: str | Path) -> list[dict]:
    """The JSONL rows; a bad line is one ConfigError naming its line number."""
    return read_jsonl_rows(path, MAX_ROWS, "SFT", "examples", _valid_example,
                           '{"prompt": str, "completion": str} or {"messages": [{"role", "content"}, ...]} '
                           "with at least one assistant turn")


def _valid_example(row: object) -> bool:
    from nanoseek.tokenizer import message_role_content

    if not isinstance(row, dict):
        return False
    if isinstance(row.get("messages"), list):
        try:
            roles = [message_role_content(m, i)[0] for i, m in enumerate(row["messages"])]
        except ConfigError:
            return False
        return "assistant" in roles
    return isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str)


def example_ids(ex: dict, tokenizer) -> tuple[list[int], list[bool]]:
    """(ids, trained-token mask) of one example row (see the module docstring)."""
    if "messages" in ex and isinstance(ex["messages"], list):
        return tokenizer.chat_document(ex["messages"])
    prompt = tokenizer.prompt_ids(ex["prompt"])
    seq = tokenizer.document_ids(ex["prompt"], ex["completion"])
    return seq, [i >= len(prompt) for i in range(len(seq))]


def encode_examples(examples: list[dict], tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids (N, seq_len + 1) right-padded with pad, targets (N, seq_len) with IGNORE on prompt and padding,
    number of skipped examples that did not fit)."""
    width = seq_len + 1
    ids_rows, tgt_rows, skipped = [], [], 0
    for n, ex in enumerate(examples, 1):
        try:
            seq, mask = example_ids(ex, tokenizer)
        except ConfigError as e:
            raise ConfigError(f"example {n}: {e}") from None
        if len(seq) > width:
            skipped += 1
            continue
        ids = seq + [tokenizer.pad_id] * (width - len(seq))
        # position t predicts ids[t + 1]: trained iff that token is assistant content or its eos
        tgt = [ids[t + 1] if t + 1 < len(seq) and mask[t + 1] else IGNORE for t in range(seq_len)]
        ids_rows.append(ids)
        tgt_rows.append(tgt)
    if not ids_rows:
        return torch.zeros(0, width, dtype=torch.long), torch.zeros(0, seq_len, dtype=torch.long), skipped
    return torch.tensor(ids_rows), torch.tensor(tgt_rows), skipped


# ---- loss ----------------------------------------------------------------------------------------------
def completion_loss(model: Transformer, ids: torch.Tensor, targets: torch.Tensor, n_tokens: float,
                    vocab: int | None = None) -> torch.Tensor:
    """Summed CE over targets != IGNORE divided by `n_tokens` (the global batch's completion-token count).
    ids (B, L + 1) with targets (B, L): inputs are ids[:, :-1]. `vocab`: the softmax runs over the first `vocab`
    logits only (an imported checkpoint's padded embedding rows, never sampled, are left out)."""
    logits = model(ids[:, :-1])[..., :vocab]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum") / n_tokens


def trim(ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns past the longest row's last target (right padding only)."""
    live = (targets != IGNORE).any(dim=0).nonzero()
    width = int(live.max()) + 1 if live.numel() else 1
    return ids[:, :width + 1], targets[:, :width]


def sft_step(model: Transformer, optimizer, ids_all: torch.Tensor, tgt_all: torch.Tensor, loader: Loader,
             tcfg: TrainConfig, dist: Dist, pad_id: int = 2, parallel=None, precision: str = "fp32",
             vocab: int | None = None) -> dict:
    """One optimizer step over cfg.grad_accum global batches; returns loss (per completion token) and grad norm.
    `parallel`: an ExpertParallel (nanoseek.parallel) whose gradient sync replaces the DDP average."""
    model.train()
    loss_sum, n_total = 0.0, 0.0
    moe = bool(model.moe_layers())
    for _ in range(tcfg.grad_accum):
        idx = torch.from_numpy(loader.next_global_indices())
        n_tokens = float((tgt_all[idx] != IGNORE).sum()) * tcfg.grad_accum  # global: every rank counts it alike
        mine = idx[dist.rank::dist.world]
        ids, tgt = trim(ids_all[mine], tgt_all[mine])
        ids, tgt = ids.to(dist.device), tgt.to(dist.device)
        with load_mask(model, ids[:, :-1] != pad_id), prec.autocast(precision, dist.device):
            loss = completion_loss(model, ids, tgt, n_tokens, vocab)
        (loss * dist.world).backward()  # average_grads divides by world
        loss_sum += float(loss.detach()) * n_tokens
        n_total += n_tokens / tcfg.grad_accum
    grad_norm = sync_and_clip(model, tcfg.grad_clip, dist, parallel)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if moe:
        loads = dist.all_reduce_sum(model.accumulated_loads().clone())
        model.update_expert_bias(tcfg.bias_gamma, loads)
    loss_global = dist.all_reduce_sum(torch.tensor([loss_sum], device=dist.device)).item() / max(n_total, 1.0)
    return {"loss": loss_global, "grad_norm": grad_norm, "tokens": n_total}


# ---- the run -------------------------------------------------------------------------------------------
def _full_pair(model_cfg: ModelConfig, tcfg: TrainConfig, device,
               precision: str) -> tuple[Transformer, torch.optim.Optimizer]:
    """A one-process model and optimizer that an --ep run's checkpoint is assembled into."""
    model = prec.apply(Transformer(model_cfg).to(device), precision)
    return model, prec.build_optimizer(model, tcfg, precision)


def _load_tokenizer(path: str | Path):
    """nanoseek's own tokenizer, or an imported checkpoint's (nanoseek.hf_tokenizer)."""
    from nanoseek.hf_tokenizer import load_tokenizer

    return load_tokenizer(path)


def _record_precision(out: Path, precision: str, model: Transformer) -> None:
    """Rewrite config.json with the precision a resumed run continues in (and the model's fp8 flag)."""
    import json

    from nanoseek.io import atomic_write_text

    run_cfg = json.loads((out / "config.json").read_text())
    run_cfg["sft"]["precision"] = precision
    run_cfg["model"] = model.cfg.to_dict()
    atomic_write_text(out / "config.json", json.dumps(run_cfg, indent=2) + "\n")


def train_sft(out: str | Path, cfg: SFTConfig | None, resume: bool = False, device: str = "auto",
              dist: Dist | None = None, quiet: bool = False, steps: int | None = None,
              minutes: float | None = None, budget_s: float | None = None, ep: int = 1,
              ep_redundant: int = 0, precision: str | None = None, compile: bool | None = None) -> dict:
    """Train (or resume) the SFT run in `out`; returns a summary (step, loss, examples, skipped, elapsed_s).
    On resume the stored config is authoritative (`cfg` may be None); `steps`, `minutes`, `budget_s` and
    `precision` (and `compile`, the torch.compile switch: nanoseek.train.common.enable_compile) override it when given. `ep` > 1: expert parallelism over groups of `ep` ranks with `ep_redundant` extra
    experts per MoE layer placed by the recorded loads of this run or of the init run (nanoseek.parallel);
    checkpoints keep the one-process layout, so any --ep resumes any other."""
    out, ckpt_dir, ckpt, saved = open_run(out, resume, "sft")
    if saved is not None:
        cfg = SFTConfig.from_dict(saved)
    if cfg is None:
        raise ConfigError("train_sft needs a config for a fresh run")
    changes = {k: v for k, v in (("steps", steps), ("minutes", minutes), ("compile", compile)) if v is not None}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes),
                              budget_s=cfg.budget_s if budget_s is None else budget_s,
                              precision=cfg.precision if precision is None else precision)
    cfg.validate()
    tcfg = cfg.train
    own_dist = dist is None  # a process group made here is torn down here (gloo aborts at exit otherwise)
    dist = dist or setup_distributed(device)
    if tcfg.batch_size % dist.world:
        raise ConfigError(f"batch size {tcfg.batch_size} must be a multiple of the number of processes ({dist.world})")
    use_ep = check_ep_flags(ep, ep_redundant, dist.world)
    check_compile(tcfg.compile, ep, 1, cfg.precision)  # before any work or write

    if cfg.init is not None:
        init = Path(cfg.init)
        from nanoseek.train.checkpoint import load_run_model

        model, _, init_step = load_run_model(init, device=dist.device)
        tok_path = init / "tokenizer.json"
    else:
        tok_path = Path(cfg.tokenizer)
        tok_path = tok_path if tok_path.suffix == ".json" else tok_path / "tokenizer.json"
        init_step = None
    tokenizer = _load_tokenizer(tok_path)
    if cfg.init is None:
        torch.manual_seed(tcfg.seed)
        model = Transformer(ModelConfig.preset(cfg.preset, vocab_size=tokenizer.vocab_size)).to(dist.device)
    elif model.cfg.vocab_size != tokenizer.vocab_size and not (tokenizer.imported
                                                              and tokenizer.vocab_size < model.cfg.vocab_size):
        raise ConfigError(f"{tok_path} has {tokenizer.vocab_size} tokens but the model of {cfg.init} has "
                          f"{model.cfg.vocab_size}")  # (an imported checkpoint may pad its embedding)
    if tcfg.seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"seq_len {tcfg.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    model = prec.apply(model, cfg.precision)
    dist.broadcast_module(model)

    examples = read_examples(cfg.data)
    ids_all, tgt_all, skipped = encode_examples(examples, tokenizer, tcfg.seq_len)
    if ids_all.size(0) == 0:
        raise ConfigError(f"none of the {len(examples)} examples fits --seq-len {tcfg.seq_len}")
    if cfg.epochs > 0 and not resume and steps is None:
        tcfg = cfg.train = dataclasses.replace(tcfg, steps=max(1, math.ceil(cfg.epochs * ids_all.size(0)
                                                                             / (tcfg.batch_size * tcfg.grad_accum))))
    optimizer = prec.build_optimizer(model, tcfg, cfg.precision)
    loader = Loader(ids_all, tcfg.batch_size, tcfg.seed, 0, 1)  # global indices; ranks slice them
    metrics = MetricsLogger(out / "metrics.jsonl", enabled=dist.is_main)
    step, elapsed0 = 0, 0.0
    if ckpt is not None:
        step, elapsed0 = resume_run(ckpt, model, optimizer, loader, metrics)
        if dist.is_main and saved.get("precision", "fp32") != cfg.precision:  # resumed in another precision
            _record_precision(out, cfg.precision, model)
    parallel = None
    enable_compile(model, tcfg.compile, ep, 1, cfg.precision)
    if use_ep:
        parallel, optimizer = setup_ep(model, optimizer, ep, ep_redundant, dist.device,
                                       lambda m: prec.build_optimizer(m, tcfg, cfg.precision),
                                       [out if ckpt else None, cfg.init], dist.is_main)
    if ckpt is None and dist.is_main:
        run_cfg = {"model": model.cfg.to_dict(), "sft": cfg.to_dict(), "train": tcfg.to_dict(),
                   "init": cfg.init, "init_checkpoint": str(init_step) if init_step else None,
                   "data": {"task": "sft", "file": str(cfg.data), "examples": len(examples),
                            "kept": int(ids_all.size(0)), "skipped_too_long": skipped},
                   "dense": not model.moe_layers(), "stage": "sft"}
        write_run_files(out, run_cfg, tok_path)
    dist.barrier()

    progress = ProgressLine(tcfg.steps, start=step, enabled=dist.is_main and not quiet,
                            print_every=max(1, tcfg.steps // 20), description="sft")
    progress.message(f"{model.num_params():,} parameters; {ids_all.size(0):,} examples kept, {skipped:,} skipped "
                     f"(longer than --seq-len {tcfg.seq_len}); {dist.world} process(es) on {dist.device}, "
                     f"precision {cfg.precision}")
    if ckpt is not None:
        progress.message(f"resumed from {ckpt} (step {step})")
    if parallel is not None:
        progress.message(parallel.describe())
    kill_after = int(os.environ.get(KILL_ENV, "-1"))
    clock = RunClock(elapsed0, cfg.budget_s)
    record: dict = {}
    seen = step * tcfg.batch_size * tcfg.grad_accum
    try:
        while step < tcfg.steps:
            if cfg.budget_s > 0 and dist.any_flag(clock.spent()):
                break
            lr = clock.lr(step, tcfg)
            set_lr(optimizer, lr)
            t0 = time.perf_counter()
            res = sft_step(model, optimizer, ids_all, tgt_all, loader, tcfg, dist, tokenizer.pad_id, parallel,
                           cfg.precision, tokenizer.sample_vocab)
            dt = time.perf_counter() - t0
            step += 1
            seen += tcfg.batch_size * tcfg.grad_accum
            out_of_time = (tcfg.minutes > 0 and clock.since_start() >= tcfg.minutes * 60) or clock.spent()
            stop = dist.any_flag(out_of_time)
            last = step == tcfg.steps or stop
            record = {"step": step, "loss": res["loss"], "main": res["loss"], "mtp": 0.0, "balance": 0.0, "lr": lr,
                      "grad_norm": res["grad_norm"], "completion_tokens": res["tokens"], "examples_seen": seen,
                      "epoch": seen / ids_all.size(0), "tokens_per_s": res["tokens"] / dt, "elapsed_s": clock.elapsed()}
            if last or step % tcfg.log_interval == 0:
                metrics.log(record)
            if last or (tcfg.ckpt_interval and step % tcfg.ckpt_interval == 0):
                to_save = checkpoint_pair(model, optimizer, parallel, lambda: _full_pair(model.cfg, tcfg, dist.device,
                                                                                    cfg.precision))
                if dist.is_main:
                    save_checkpoint(ckpt_dir, step, *to_save,
                                    {"loader": loader.state_dict(), "elapsed_s": record["elapsed_s"]}, tcfg.keep_last)
                dist.barrier()
            progress.update(step, res["loss"], lr, record["tokens_per_s"], f"epoch {record['epoch']:.2f}")
            if step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop:
                progress.message(f"time budget reached at step {step}; checkpoint saved")
                break
    finally:  # Ctrl-C: the next run resumes from the last periodic checkpoint (its elapsed time included)
        progress.close()
    finish_run(out, record, dist.is_main)
    dist.barrier()
    if own_dist:
        dist.close()
    return {"step": step, "loss": record.get("loss"), "examples": int(ids_all.size(0)), "skipped": skipped,
            "elapsed_s": record.get("elapsed_s", elapsed0), "examples_seen": seen, "run_dir": str(out)}
