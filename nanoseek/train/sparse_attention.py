"""Training DeepSeek Sparse Attention into a dense model, as DeepSeek-V3.2-Exp did (report sec. 2.1.1):

1. dense warm-up: the main model frozen, attention still dense; only the lightning indexers learn, each by the
   KL divergence from its layer's main attention distribution (summed over heads, L1-normalized) to the
   softmax of its index scores (`Transformer.set_indexer_training("warmup")`, LossParts.indexer);
2. sparse stage: attention restricted to each query's top-k keys, everything trained: the main model by the
   language-model loss, the indexer by the KL over the selected set only, its input detached from the main
   graph (`set_indexer_training("sparse")`; loss = main + mtp/balance terms + indexer).

`add_indexers` turns a dense checkpoint into a sparse model (fresh indexers, every other weight copied);
`indexer_recall` measures what the warm-up is for: the share of the dense attention mass that falls inside the
indexer's top-k; `oracle_recall` is its ceiling (the dense attention's own top-k).

`pretrain --init RUN --sparse-attention warmup|sparse --index-topk K` runs either stage as an ordinary
pretraining run (resume, checkpoints, metrics, DDP): `SparseStageConfig` holds the knobs (a section of
PretrainConfig), `continuation` / `stage_model` resolve the run's config from RUN's, `copy_init_tokenizer` and
`start_stage` are the trainer's two hooks. `train_stage` is the same thing as a small library loop (benches).
Simplifications: DeepSeek's warm-up learning rate and token counts are not reproduced at this size; the KL is
averaged over queries (DeepSeek sums); no pipeline parallelism or torch.compile for the stages yet.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.cli_config import knob
from nanoseek.config import ConfigError, ModelConfig
from nanoseek.model import Transformer
from nanoseek.model.attention import MLA
from nanoseek.model.rope import apply_rope


def add_indexers(dense: Transformer, index_topk: int, index_n_heads: int = 4, index_head_dim: int = 32,
                 seed: int = 0) -> Transformer:
    """A sparse-attention copy of a dense model: the same weights plus freshly initialized indexers."""
    cfg = ModelConfig.from_dict({**dense.cfg.to_dict(), "index_topk": index_topk, "index_n_heads": index_n_heads,
                                 "index_head_dim": index_head_dim})
    torch.manual_seed(seed)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
    if unexpected or any(".indexer." not in k for k in missing):
        raise ValueError(f"not a dense twin: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.to(next(dense.parameters()).dtype)


def indexer_parameters(model: Transformer) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".indexer." in n]


def freeze_all_but_indexers(model: Transformer, frozen: bool = True) -> list[torch.nn.Parameter]:
    """requires_grad off for every non-indexer parameter (the warm-up's frozen main model); returns the indexers'."""
    for n, p in model.named_parameters():
        p.requires_grad_(".indexer." in n or not frozen)
    return indexer_parameters(model)


@torch.no_grad()
def _layer_recall(attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: int) -> torch.Tensor:
    """(B, T) share of the dense attention mass (heads' mean) inside the indexer's top-k of each query."""
    T = x.size(1)
    q_lat = attn.q_norm(attn.wq_a(x))
    lat = attn.latent(x, cos, sin)
    m = attn.kv_lora_rank + attn.qk_rope_head_dim
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
    p = _layer_probs(attn, x, cos, sin)
    saved, attn.indexer.topk = attn.indexer.topk, k
    try:
        keep = attn.indexer.select(attn.indexer.scores(x, q_lat, cos, sin, lat[..., m:]), causal)
    finally:
        attn.indexer.topk = saved
    return (p * keep[:, 0]).sum(dim=-1)


@torch.no_grad()
def _layer_probs(attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    q_nope, q_pe = attn.wq_b(attn.q_norm(attn.wq_a(x))).view(B, T, attn.n_heads, -1).split(
        [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    lat = attn.latent(x, cos, sin)[..., :attn.kv_lora_rank + attn.qk_rope_head_dim]
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
    return attn.attention_probs(q_nope, apply_rope(q_pe, cos, sin), lat, causal).mean(dim=1)


def _layer_inputs(model: Transformer, ids: torch.Tensor) -> list[tuple]:
    """Each main layer's attention input (x, cos, sin) of a dense forward (warm-up mode)."""
    captured: list[tuple] = []
    hooks = [layer.attn.register_forward_hook(lambda mod, args, out: captured.append(args[:3]))
             for layer in model.layers]
    mode = next((m.indexer_train for m in model.modules() if isinstance(m, MLA)), None)
    if model.cfg.sparse_attention:
        model.set_indexer_training("warmup")
    try:
        model.hidden(ids)
    finally:
        if model.cfg.sparse_attention:
            model.set_indexer_training(mode)
        for h in hooks:
            h.remove()
    return captured


@torch.no_grad()
def oracle_recall(model: Transformer, ids: torch.Tensor, k: int) -> list[float]:
    """The best any selection of k keys can do: per main layer, the mean over queries t >= k of the dense
    attention mass (heads' mean) in its k largest entries (the ceiling for indexer_recall)."""
    return [_layer_probs(layer.attn, *args).topk(k, dim=-1).values.sum(-1)[:, k:].mean().item()
            for layer, args in zip(model.layers, _layer_inputs(model, ids))]


@torch.no_grad()
def indexer_recall(model: Transformer, ids: torch.Tensor, k: int) -> list[float]:
    """Per main layer: the mean over queries that see more than k keys (t >= k) of the share of the dense
    attention distribution (heads' mean) that the indexer's top-k holds. Attention runs dense (warm-up mode)
    so every layer's input is the dense model's."""
    return [_layer_recall(layer.attn, *args, k)[:, k:].mean().item()
            for layer, args in zip(model.layers, _layer_inputs(model, ids))]


def batches(rows: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Endless random batches of rows (N, L + 1) of a token tensor."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield rows[torch.randint(0, rows.size(0), (batch_size,), generator=g)]


def train_stage(model: Transformer, stage: str, data: Iterable[torch.Tensor], steps: int, lr: float,
                indexer_lr: float | None = None, mtp_lambda: float = 0.0) -> list[dict]:
    """Run `steps` AdamW steps of stage "warmup" (only the indexers, KL loss) or "sparse" (all parameters:
    main (+ mtp_lambda * MTP) loss plus the indexers' KL). Returns per-step {"main", "indexer"} losses."""
    if stage not in ("warmup", "sparse"):
        raise ValueError(f"stage must be 'warmup' or 'sparse', got {stage!r}")
    model.train()
    model.set_indexer_training(stage)
    params = freeze_all_but_indexers(model, frozen=stage == "warmup")
    groups = [{"params": params, "lr": indexer_lr or lr}]
    if stage == "sparse":
        groups.append({"params": [p for n, p in model.named_parameters() if ".indexer." not in n], "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    log = []
    it = iter(data)
    try:
        for _ in range(steps):
            rows = next(it)
            _, parts = model(rows[:, :-1], rows[:, 1:])
            loss = parts.indexer if stage == "warmup" else parts.main + mtp_lambda * parts.mtp + parts.indexer
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            log.append({"main": parts.main.item(), "indexer": parts.indexer.item()})
    finally:
        model.set_indexer_training(None)
        freeze_all_but_indexers(model, frozen=False)
        model.eval()
    return log


# ---- the stages as `pretrain` runs ------------------------------------------------------------------------
STAGES = ("off", "warmup", "sparse")
DEFAULT_INDEX_HEADS, DEFAULT_INDEX_DIM = 4, 32  # for a dense --init run (DeepSeek-V3.2: 64 x 128)


@dataclass
class SparseStageConfig:
    """Continue another pretraining run (`--init`) and, optionally, train DeepSeek Sparse Attention into it
    (V3.2 report sec. 2.1.1). A section of PretrainConfig; every field is a `pretrain` option."""

    init: str = knob("", metavar="RUN", help="start from this pretraining run: its latest checkpoint's weights "
                     "(not its optimizer), its model, tokenizer, data and training options (options given on top "
                     "win; --steps / --minutes are this run's own)")
    sparse_attention: str = knob("off", choices=STAGES, help="V3.2 training stage for --init: warmup (attention "
                                 "dense, the main model frozen, gate biases included: only the lightning indexers "
                                 "learn the main attention by KL), sparse (attention over each query's top-k, "
                                 "everything trained, the indexer's KL over the selected keys), off (a plain "
                                 "continuation)")
    index_topk: int = knob(0, help="keys each query attends to under --sparse-attention (0 = the --init run's own; "
                           "required for a dense one)")
    index_n_heads: int | None = knob(None, help=f"indexer heads added to a dense --init run (none = "
                                     f"{DEFAULT_INDEX_HEADS}; a sparse --init run keeps its own)")
    index_head_dim: int | None = knob(None, help=f"indexer head size added to a dense --init run (none = "
                                      f"{DEFAULT_INDEX_DIM}; at least qk_rope_head_dim)")

    def __post_init__(self):
        if self.sparse_attention not in STAGES:
            raise ConfigError(f"--sparse-attention must be one of {', '.join(STAGES)}, got {self.sparse_attention!r}")
        if self.index_topk < 0:
            raise ConfigError(f"--index-topk must be >= 0, got {self.index_topk}")
        if not self.init and (self.sparse_attention != "off" or self.index_topk or self.index_n_heads
                              or self.index_head_dim):
            raise ConfigError("--sparse-attention and --index-* continue a dense run: add --init RUN")
        if self.sparse_attention == "off" and (self.index_topk or self.index_n_heads or self.index_head_dim):
            raise ConfigError("--index-* need --sparse-attention warmup or sparse")

    @property
    def mode(self) -> str | None:
        """Transformer.set_indexer_training's mode."""
        return None if self.sparse_attention == "off" else self.sparse_attention


def init_checkpoint(init: str | Path) -> Path:
    """The latest checkpoint step directory of run `init` (ConfigError naming the fix when there is none)."""
    from nanoseek.train.checkpoint import latest_checkpoint

    run = Path(init)
    if not (run / "config.json").exists():
        raise ConfigError(f"--init {init}: no config.json there; give a pretraining run directory")
    ckpt = latest_checkpoint(run / "checkpoints")
    if ckpt is None:
        raise ConfigError(f"--init {init}: the run has no checkpoint yet")
    return ckpt


def continuation(base, init: str | Path):
    """The starting point of a run continuing `base` (run `init`'s PretrainConfig, modified in place and
    returned): a fresh stage section, the step / time budget reset to the defaults (the new run's options
    set them), and text shards read from `init`'s shard directory."""
    from nanoseek.train.common import TrainConfig

    init_checkpoint(init)
    base.stage = SparseStageConfig()
    default = TrainConfig()
    base.train = dataclasses.replace(base.train, steps=default.steps, minutes=default.minutes)
    base.time_schedule = False
    if base.data.is_text and not base.data.shard_dir:
        base.data = dataclasses.replace(base.data, shard_dir=str(Path(init) / "shards"))
    return base


def apply_stage(cfg):
    """The continued run's PretrainConfig `cfg` (options applied) finished: the model per `stage_model`, and in
    the warm-up load balancing off (the gate biases are main-model state, frozen like the weights)."""
    cfg.model = stage_model(cfg.model, cfg.stage)
    if cfg.stage.mode == "warmup":
        cfg.train = dataclasses.replace(cfg.train, balance="none")
    return cfg


def stage_model(model: ModelConfig, stage: SparseStageConfig) -> ModelConfig:
    """The continued run's model: `model` (the --init run's) with indexers added for a sparse-attention stage
    (or its top-k changed). Shapes of an existing indexer cannot change: its weights come from the checkpoint."""
    if stage.mode is None:
        return model
    if model.sparse_attention:
        for name in ("index_n_heads", "index_head_dim"):
            given = getattr(stage, name)
            if given is not None and given != getattr(model, name):
                raise ConfigError(f"--{name.replace('_', '-')} {given}: the --init run's indexers have "
                                  f"{getattr(model, name)}; drop the option")
        topk = stage.index_topk or model.index_topk
        return dataclasses.replace(model, index_topk=topk).validate()
    if not stage.index_topk:
        raise ConfigError("--sparse-attention on a dense --init run needs --index-topk K (e.g. seq_len / 8)")
    if not model.q_lora_rank:
        raise ConfigError("the --init run's model has no query latent (q_lora_rank 0): V3.2's indexer reads it; "
                          "pretrain the dense model with q_lora_rank > 0 (a --config JSON)")
    return dataclasses.replace(model, index_topk=stage.index_topk,
                               index_n_heads=stage.index_n_heads or DEFAULT_INDEX_HEADS,
                               index_head_dim=stage.index_head_dim or DEFAULT_INDEX_DIM).validate()


def copy_init_tokenizer(stage: SparseStageConfig, run_dir: Path) -> None:
    """Trainer hook (rank 0, before the tokenizer is read): a fresh continued run gets --init's tokenizer.json,
    byte for byte (its shards and token ids are the --init run's)."""
    dst = Path(run_dir) / "tokenizer.json"
    if not stage.init or dst.exists():
        return
    src = Path(stage.init) / "tokenizer.json"
    if not src.exists():
        raise ConfigError(f"--init {stage.init} has no tokenizer.json")
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".tokenizer.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(src.read_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_init_weights(step_dir: Path, model: Transformer) -> None:
    """--init's weights into `model`; only indexers may be missing (a dense run entering a sparse stage: they
    keep their seeded fresh initialization)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(step_dir / "model.safetensors"))
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--init checkpoint {step_dir} is unreadable: {e}") from None
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise ConfigError(f"--init checkpoint {step_dir} does not fit the model: {str(e).splitlines()[-1].strip()}"
                          ) from None
    if unexpected or any(".indexer." not in k for k in missing):
        raise ConfigError(f"--init checkpoint {step_dir} does not fit the model (missing {missing[:2]}, unexpected "
                          f"{unexpected[:2]})")


def start_stage(model: Transformer, stage: SparseStageConfig, fresh: bool) -> None:
    """Trainer hook, after the model is built and before its optimizer: on a fresh run load --init's weights,
    then (fresh or resumed) enter the stage: the indexer-training mode, and in the warm-up every non-indexer
    parameter frozen, so the optimizer holds the indexers only."""
    if stage.init and fresh:
        load_init_weights(init_checkpoint(stage.init), model)
    if stage.mode is not None:
        model.set_indexer_training(stage.mode)
        freeze_all_but_indexers(model, frozen=stage.mode == "warmup")
