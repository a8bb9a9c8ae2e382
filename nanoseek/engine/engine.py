"""Batched generation over the MLA latent cache (what RL rollouts, evaluation, chat and serving run on).

* Prompts of different lengths are left-padded into one batch; each row keeps its own rope positions
  and a key mask hides its padding, so a row's output does not depend on its neighbours.
* The cache is preallocated: (n_layers, B, prompt_len + max_new_tokens, kv_lora_rank + qk_rope_head_dim),
  i.e. only the normalized latent c_KV and the shared rope key per token per layer; with sparse attention
  (DeepSeek-V3.2, ModelConfig.index_topk > 0) each row also holds the layer's indexer key, and MLA attends
  to the indexer's top-k cached tokens (the lean decoder, engine/decode.py, is dense-only and not used).
* Prefill is one forward over the whole batch (naive attention); each decode step is one forward of one
  token per row with weight-absorbed attention directly on the latent cache.
* Rows finish independently on eos or a stop string; the loop ends when all have finished. "eos" is every id
  in `stop_ids`: the tokenizer's eos, and for an imported checkpoint also generation_config.json's eos ids.
* An imported tokenizer's `sample_vocab` (its vocabulary size) masks the logits of the embedding's padded rows
  (ids >= sample_vocab) to -inf before sampling; nanoseek's own tokenizer has none and nothing is masked.
* `speculative=True` drafts one token with the first MTP module and verifies it with the main model in a
  single two-token forward (Leviathan et al. 2023 acceptance rule when sampling; exact under greedy).
  It runs one sequence at a time (rows advance by different amounts), which is the batch-1 case MTP
  speculation is for.
* Log-probs are those of each token under the distribution it was drawn from: temperature-scaled and,
  with top-k / top-p, renormalized over that support (engine/sampling.py; what GRPO's ratio divides by).
  Speculative decoding emits tokens distributed as the target model's filtered distribution, and reports
  their log-prob under it.
* `seed` is one integer for the batch or one per prompt; per-prompt seeds make each row's sample depend
  on its own seed only, whatever else is in the batch.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from nanoseek.engine import decode
from nanoseek.engine.sampling import SamplingParams, filtered_logits, mask_vocab, sample, sample_probs
from nanoseek.model import Transformer


@dataclass
class Generation:
    tokens: list[int]  # generated tokens (an eos that ended the row is included)
    logprobs: list[float]  # log-prob of each token under the distribution it was sampled from (see above)
    finish_reason: str  # "stop" (eos or stop string) or "length"
    text: str | None = None
    prompt_tokens: int = 0


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    steps: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)


@dataclass
class Engine:
    model: Transformer
    tokenizer: object | None = None
    eos_id: int | None = None
    cache_dtype: torch.dtype | None = None
    spec_stats: SpecStats = field(default_factory=SpecStats)
    # batched decode steps through engine/decode.py's LeanDecoder where the model allows it (same tokens and
    # log-probs up to float rounding); False: through Transformer.hidden, the path every model supports
    lean_decode: bool = True
    # run the lean step through torch.compile (engine/decode_static.py: static shapes, a fixed-capacity cache);
    # opt-in: the first generate call of each new (batch, capacity) kind compiles for seconds to minutes
    compile_decode: bool = False
    compile_backend: str = "inductor"  # "aot_eager": the same traced graph without inductor (tests)
    # the lean step's MLA: W_UK / W_UV applied per token (True) or precomputed absorbed projections (False);
    # None: decode.absorb_at_runtime's choice for the model's shape (the compiled step is absorbed-only)
    runtime_absorb: bool | None = None

    def __post_init__(self) -> None:
        if self.eos_id is None:
            self.eos_id = getattr(self.tokenizer, "eos_id", 1)
        self.stop_ids = frozenset(getattr(self.tokenizer, "stop_ids", ())) | {self.eos_id}
        self.sample_vocab: int | None = getattr(self.tokenizer, "sample_vocab", None)
        self.cfg = self.model.cfg
        self._lean: tuple | None = None  # (the model's fused-weights set, LeanDecoder layers built from it)
        self._workspace: decode.Workspace | None = decode.Workspace()  # the lean decoder's cache memory
        self._workspace_lock = threading.Lock()

    def _claim_workspace(self) -> decode.Workspace | None:
        """Take the cache workspace, reused across calls; a concurrent call on the same engine finds None (and
        decodes in fresh memory). Read and clear under a lock: two threads never hold the same workspace."""
        with self._workspace_lock:
            ws, self._workspace = self._workspace, None
        return ws

    def _return_workspace(self, ws: decode.Workspace | None) -> None:
        """Give a claimed workspace back (a None claim returns nothing, so it cannot drop the one put back)."""
        if ws is None:
            return
        with self._workspace_lock:
            if self._workspace is None:
                self._workspace = ws

    def _lean_layers(self) -> list:
        """The lean decoder's per-layer tensors, rebuilt only when prepare_inference rebuilt the fused weights."""
        key = self.model._fused_cache
        if self._lean is None or self._lean[0] is not key:
            self._lean = (key, decode.build_layers(self.model, self.runtime_absorb))
        return self._lean[1]

    # ---- cache -----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.cache_dtype or next(self.model.parameters()).dtype

    def cache_bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) * n_layers * bytes per number."""
        return self.cfg.kv_cache_numbers_per_token_layer * self.cfg.n_layers * torch.finfo(self.dtype).bits // 8

    def new_cache(self, batch: int, length: int, n_layers: int | None = None) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return torch.zeros(n_layers or self.cfg.n_layers, batch, length, self.cfg.kv_cache_numbers_per_token_layer,
                           dtype=self.dtype, device=device)

    # ---- input handling --------------------------------------------------------------------------
    def _encode(self, prompts) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of prompts (token-id lists or strings)")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need an Engine with a tokenizer")
                p = self.tokenizer.encode(p)
            p = [int(t) for t in p]
            if not p:
                raise ValueError("empty prompt: give at least one token")
            if min(p) < 0 or max(p) >= self.cfg.vocab_size:
                raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
            out.append(p)
        if not out:
            raise ValueError("no prompts given")
        return out

    def _decode_text(self, tokens: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        if tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]
        return self.tokenizer.decode(tokens)

    # ---- public API ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | list[int] | None = None, stop: list[str] | None = None,
                 speculative: bool = False) -> list[Generation]:
        params = SamplingParams(temperature, top_k, top_p).validate()
        ids = self._encode(prompts)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        longest = max(len(p) for p in ids)
        if longest + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model context of {self.cfg.max_seq_len} tokens")
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need an Engine with a tokenizer")
        gen = self._generators(seed, len(ids))
        was_training = self.model.training
        self.model.eval()
        self.model.prepare_inference(True)
        try:
            if speculative:
                if self.cfg.n_mtp < 1:
                    raise ValueError("speculative decoding needs a model with an MTP module (n_mtp >= 1)")
                outs = [self._generate_speculative(p, max_new_tokens, params, gen[i] if isinstance(gen, list) else gen,
                                                   stop) for i, p in enumerate(ids)]
            else:
                ws = self._claim_workspace()  # a concurrent call on the same engine gets None: fresh memory
                try:
                    outs = self._generate_batch(ids, max_new_tokens, params, gen, stop, ws)
                finally:
                    self._return_workspace(ws)
        finally:
            self.model.prepare_inference(False)
            self.model.train(was_training)
        for o, p in zip(outs, ids):
            o.prompt_tokens = len(p)
            o.text = self._finish_text(o, stop)
        return outs

    def _generators(self, seed: int | list[int] | None, n: int) -> torch.Generator | list[torch.Generator] | None:
        """One generator for the batch (int seed), one per prompt (list of n seeds), or None (global RNG)."""
        if seed is None:
            return None
        device = next(self.model.parameters()).device
        if isinstance(seed, int):
            return torch.Generator(device=device).manual_seed(seed)
        seeds = list(seed)
        if len(seeds) != n:
            raise ValueError(f"seed: got {len(seeds)} seeds for {n} prompts (give one integer, or one per prompt)")
        return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def _finish_text(self, o: Generation, stop: list[str] | None) -> str | None:
        text = self._decode_text(o.tokens)
        if text is not None and stop:
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
        return text

    def _hit_stop(self, tokens: list[int], stop: list[str] | None) -> bool:
        if not stop:
            return False
        tail = self.tokenizer.decode(tokens[-32:])
        return any(s in tail for s in stop)

    # ---- plain batched decoding ------------------------------------------------------------------
    def _generate_batch(self, ids: list[list[int]], max_new: int, params: SamplingParams,
                        gen: torch.Generator | list[torch.Generator] | None, stop: list[str] | None,
                        workspace: decode.Workspace | None = None) -> list[Generation]:
        model = self.model
        device = next(model.parameters()).device
        B, P = len(ids), max(len(p) for p in ids)
        pad = torch.tensor([P - len(p) for p in ids], device=device)
        S = P + max_new
        slots = torch.arange(S, device=device)
        key_valid = slots[None, :] >= pad[:, None]  # (B, S): padding slots never attended
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)
        ragged = bool(pad.any())  # equal-length prompts need no masks or per-row positions
        # Prefill each distinct prompt once (a GRPO batch is G copies of every prompt), then give every row
        # its prompt's cache and last logits.
        first_of: dict[tuple[int, ...], int] = {}  # prompt -> its index among the distinct prompts
        first_row: list[int] = []  # distinct prompt -> the first row holding it
        for i, p in enumerate(ids):
            if first_of.setdefault(tuple(p), len(first_of)) == len(first_row):
                first_row.append(i)
        row_of = torch.tensor([first_of[tuple(p)] for p in ids], device=device)
        uniq = torch.tensor(first_row, device=device)
        tokens = torch.zeros(len(first_row), P, dtype=torch.long, device=device)
        for i, r in enumerate(first_row):
            tokens[i, P - len(ids[r]):] = torch.tensor(ids[r])
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        mask = (causal[None] & key_valid[uniq, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)[None]
        lean = self.lean_decode and decode.supported(model, self.dtype)
        cache = self.new_cache(len(first_row), P if lean else S)  # the lean decoder keeps its own caches
        h = model.hidden(tokens, positions[uniq, :P] if ragged else None, mask[:, None] if ragged else None, cache, 0)
        logits = mask_vocab(model.logits(h[:, -1]), self.sample_vocab)
        shared = len(first_row) < B
        if lean:
            dec = decode.LeanDecoder(model, self._lean_layers(), cache, row_of if shared else None, S,
                                     key_valid if ragged else None, positions if ragged else None, workspace,
                                     self.compile_backend if self.compile_decode else None)
            if shared:
                logits = logits.index_select(0, row_of)
        elif shared:  # index_select: ~2x faster than advanced indexing on the cache's dim 1
            cache, logits = cache.index_select(1, row_of), logits.index_select(0, row_of)
        out_tokens: list[list[int]] = [[] for _ in range(B)]
        out_logps: list[list[float]] = [[] for _ in range(B)]
        reason = ["length"] * B
        rows = list(range(B))  # original index of each row still in the decode batch
        # per-prompt seeds: row i's k-th token uses the k-th uniform of row i's own generator
        uniforms = torch.stack([torch.rand(max_new, generator=g, device=device) for g in gen]) \
            if isinstance(gen, list) else None
        done = [False] * B  # finished rows may linger in the batch until the next compaction
        eos = self.stop_ids
        for step in range(max_new):
            u = None if uniforms is None else uniforms[rows, step]
            tok, logp = sample(logits, params, None if uniforms is not None else gen, u)
            tl, ll = tok.tolist(), logp.tolist()
            keep = []
            for j, i in enumerate(rows):
                if done[i]:
                    continue
                out_tokens[i].append(tl[j])
                out_logps[i].append(ll[j])
                if tl[j] in eos or (stop and self._hit_stop(out_tokens[i], stop)):
                    reason[i], done[i] = "stop", True
                else:
                    keep.append(j)
            if not keep or step == max_new - 1:
                break
            if len(keep) < len(rows) and len(keep) <= 0.75 * len(rows):  # compact: finished rows stop costing decode work
                sel = torch.tensor(keep, device=device)
                tok = tok.index_select(0, sel)
                if lean:
                    dec.compact(sel, P + step)
                else:
                    cache, key_valid, positions = (cache.index_select(1, sel), key_valid.index_select(0, sel),
                                                   positions.index_select(0, sel))
                rows = [rows[j] for j in keep]
            s = P + step
            if lean:
                logits = mask_vocab(dec.step(tok, s), self.sample_vocab)
                continue
            h = model.hidden(tok[:, None], positions[:, s:s + 1] if ragged else None,
                             key_valid[:, None, None, :s + 1] if ragged else None, cache, s, absorb=True)
            logits = mask_vocab(model.logits(h[:, -1]), self.sample_vocab)
        return [Generation(out_tokens[i], out_logps[i], reason[i]) for i in range(B)]

    # ---- MTP speculative decoding (one sequence) ---------------------------------------------------
    def _mtp_step(self, h_prev: torch.Tensor, next_tokens: torch.Tensor, cache: torch.Tensor, start: int,
                  absorb: bool) -> torch.Tensor:
        """Run MTP module 1 on positions [start, start + T): inputs h_i and token t_{i+1} (all T fill the MTP
        cache); returns the logits (1, 1, vocab) of the last position, predicting t_{start+T+1}."""
        mtp = self.model.mtp[0]
        T = next_tokens.size(1)
        cos, sin = self.model.rope(None, start, T)
        # mask None: attention itself is causal over the filled part of the MTP cache
        hm = mtp(h_prev, self.model.embed(next_tokens), cos, sin, None, cache[0], start, absorb)
        return mask_vocab(self.model.head(mtp.norm(hm[:, -1:])).float(), self.sample_vocab)  # the last drafts

    def _generate_speculative(self, prompt: list[int], max_new: int, params: SamplingParams,
                              gen: torch.Generator | None, stop: list[str] | None) -> Generation:
        model = self.model
        device = next(model.parameters()).device
        S = len(prompt) + max_new + 2
        cache = self.new_cache(1, S)
        mtp_cache = self.new_cache(1, S, n_layers=1)
        ids = torch.tensor([prompt], device=device)
        n = len(prompt)
        h = model.hidden(ids, cache=cache, start=0)  # positions 0..n-1
        tok, logp = sample(mask_vocab(model.logits(h[:, -1]), self.sample_vocab), params, gen)  # t_n
        out, logps = [int(tok)], [float(logp)]
        # MTP over positions 0..n-1 (h_i, t_{i+1}); the last one drafts t_{n+1}
        mtp_in = torch.cat([ids[:, 1:], tok.view(1, 1)], dim=1)
        draft_logits = self._mtp_step(h, mtp_in, mtp_cache, 0, absorb=False)[:, -1]
        last_pos = n - 1  # main cache valid through this position; `out[-1]` is the token at last_pos + 1
        stats = self.spec_stats
        while len(out) < max_new and out[-1] not in self.stop_ids and not self._hit_stop(out, stop):
            if params.greedy:
                q, draft = None, int(draft_logits.argmax())
            else:
                q = sample_probs(draft_logits, params)[0]
                draft = int(torch.multinomial(q, 1, generator=gen))
            pos = last_pos + 1
            step_ids = torch.tensor([[out[-1], draft]], device=device)
            h2 = model.hidden(step_ids, cache=cache, start=pos, absorb=True)  # positions pos, pos+1
            logits2 = mask_vocab(model.logits(h2)[0], self.sample_vocab)  # [0] predicts the token at pos+1 (the draft), [1] the one after
            stats.drafted += 1
            stats.steps += 1
            if params.greedy:
                p0, target = None, int(logits2[0].argmax())
                accept = draft == target
            else:
                p0 = sample_probs(logits2[0:1], params)[0]
                # accept with probability min(1, p/q); a Bernoulli draw, so a test can enumerate both outcomes
                accept = bool(torch.bernoulli((p0[draft] / q[draft]).clamp(max=1.0), generator=gen))
            # log-probs under the distribution each emitted token follows: the target's filtered one (p0 for
            # the draft position, whether the draft was accepted or resampled from the residual; Leviathan et
            # al. thm. 1), the unscaled model distribution when greedy (engine/sampling.py)
            lp_all = logits2.log_softmax(dim=-1) if params.greedy else filtered_logits(logits2, params).log_softmax(dim=-1)
            if accept:
                stats.accepted += 1
                out.append(draft)
                logps.append(float(lp_all[0, draft]))
                if len(out) >= max_new or draft in self.stop_ids or self._hit_stop(out, stop):
                    break
                bonus = int(logits2[1].argmax()) if params.greedy else int(sample(logits2[1:2], params, gen)[0])
                out.append(bonus)
                logps.append(float(lp_all[1, bonus]))
                # MTP positions pos, pos+1 take (h_pos, draft), (h_pos+1, bonus)
                mtp_in = torch.tensor([[draft, bonus]], device=device)
                draft_logits = self._mtp_step(h2, mtp_in, mtp_cache, pos, absorb=True)[:, -1]
                last_pos = pos + 1
            else:
                if params.greedy:
                    fix = target
                else:
                    resid = (p0 - q).clamp(min=0)
                    fix = int(torch.multinomial(resid / resid.sum(), 1, generator=gen)) if resid.sum() > 0 \
                        else int(torch.multinomial(p0, 1, generator=gen))
                out.append(fix)
                logps.append(float(lp_all[0, fix]))
                mtp_in = torch.tensor([[fix]], device=device)
                draft_logits = self._mtp_step(h2[:, :1], mtp_in, mtp_cache, pos, absorb=True)[:, -1]
                last_pos = pos
        out, logps = out[:max_new], logps[:max_new]
        done = out[-1] in self.stop_ids or self._hit_stop(out, stop)
        return Generation(out, logps, "stop" if done else "length")
