"""Generation throughput: nanoseek Engine vs transformers `generate` on the same weights.

The tiny preset is exported with `to_hf` and loaded by transformers; both decode greedily with the same
prompts (32 random tokens each) for exactly 64 new tokens (eos disabled) at batch 1, 16 and 64.
Rounds alternate between the two and the median of each is reported with the ratio ours / transformers.
Optionally (--spec RUN_DIR) measures MTP speculative vs plain decoding at batch 1 on a trained run.

--grpo RUN_DIR: the RL rollout of issue 20 instead. One real GRPO batch at the demo's operating point (the run's
base, `DemoConfig`'s task and difficulty, 16 prompts x G 8, temperature 1.0, <= 64 new tokens, per-row seeds as
`rollout_groups` draws them): `Engine.generate` now vs main's decode loop before the lean step (kept below as
`legacy_generate_batch`, every step through `Transformer.hidden`), alternating round by round in this process;
checks both give the same tokens and log-probs, prints the medians and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.engine import Engine, Generation, SamplingParams  # noqa: E402
from nanoseek.engine.sampling import sample  # noqa: E402
from nanoseek.hf import to_hf  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402


def time_ours(engine: Engine, prompts: list[list[int]], new: int) -> float:
    t0 = time.perf_counter()
    out = engine.generate(prompts, max_new_tokens=new)
    dt = time.perf_counter() - t0
    assert all(len(o.tokens) == new for o in out)
    return len(prompts) * new / dt


def time_hf(hf, prompts: list[list[int]], new: int) -> float:
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new
    return len(prompts) * new / dt


def legacy_generate_batch(self: Engine, ids: list[list[int]], max_new: int, params: SamplingParams,
                          gen, stop=None) -> list[Generation]:
    """main's decode loop before issue 20's lean step (b11a58c^): every step through `Transformer.hidden`."""
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
    cache = self.new_cache(len(first_row), S)
    h = model.hidden(tokens, positions[uniq, :P] if ragged else None, mask[:, None] if ragged else None, cache, 0)
    logits = model.logits(h[:, -1])
    if len(first_row) < B:  # index_select: ~2x faster than advanced indexing on the cache's dim 1
        cache, logits = cache.index_select(1, row_of), logits.index_select(0, row_of)
    out_tokens: list[list[int]] = [[] for _ in range(B)]
    out_logps: list[list[float]] = [[] for _ in range(B)]
    reason = ["length"] * B
    rows = list(range(B))  # original index of each row still in the decode batch
    # per-prompt seeds: row i's k-th token uses the k-th uniform of row i's own generator
    uniforms = torch.stack([torch.rand(max_new, generator=g, device=device) for g in gen]) \
        if isinstance(gen, list) else None
    done = [False] * B  # finished rows may linger in the batch until the next compaction
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
            if tl[j] == self.eos_id or self._hit_stop(out_tokens[i], stop):
                reason[i], done[i] = "stop", True
            else:
                keep.append(j)
        if not keep or step == max_new - 1:
            break
        if len(keep) < len(rows) and len(keep) <= 0.75 * len(rows):  # compact: finished rows stop costing decode work
            sel = torch.tensor(keep, device=device)
            cache, key_valid, positions, tok = (cache.index_select(1, sel), key_valid.index_select(0, sel),
                                                positions.index_select(0, sel), tok.index_select(0, sel))
            rows = [rows[j] for j in keep]
        s = P + step
        h = model.hidden(tok[:, None], positions[:, s:s + 1] if ragged else None,
                         key_valid[:, None, None, :s + 1] if ragged else None, cache, s, absorb=True)
        logits = model.logits(h[:, -1])
    return [Generation(out_tokens[i], out_logps[i], reason[i]) for i in range(B)]


def bench_grpo(run: str, rounds: int, new: int, batches: int) -> None:
    """Interleaved A/B of one GRPO rollout batch: legacy loop vs Engine.generate (see the module docstring)."""
    from nanoseek.recipes.demo import DemoConfig
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import load_run_model
    from nanoseek.train.grpo import GRPOConfig, ProblemSampler, row_seed

    model, _, _ = load_run_model(run)
    model = model.float()
    tok = Tokenizer.load(Path(run) / "tokenizer.json")
    demo = DemoConfig()
    cfg = GRPOConfig(group_size=8, prompts_per_step=16, max_new_tokens=new, task=demo.task,
                     difficulty=demo.difficulty, temperature=1.0).validate()
    sampler = ProblemSampler(cfg)
    engine = Engine(model, tok)
    params = SamplingParams(1.0).validate()
    work = []  # (prompts, seeds) of `batches` consecutive RL steps
    for step in range(1, batches + 1):
        drawn = sampler.draw(cfg.prompts_per_step, step)
        work.append(([tok.prompt_ids(p.prompt) for _, p in drawn for _ in range(cfg.group_size)],
                     [row_seed(step, 0, g, j) for g in range(len(drawn)) for j in range(cfg.group_size)]))

    def legacy(prompts, seeds):
        model.prepare_inference(True)
        try:
            with torch.no_grad():
                return legacy_generate_batch(engine, prompts, new, params, engine._generators(seeds, len(prompts)))
        finally:
            model.prepare_inference(False)

    def ours(prompts, seeds):
        return engine.generate(prompts, max_new_tokens=new, temperature=1.0, seed=seeds)

    same_rows = rows = 0
    worst = 0.0
    for prompts, seeds in work:  # check + warm-up
        a, b = legacy(prompts, seeds), ours(prompts, seeds)
        rows += len(a)
        for x, y in zip(a, b):
            if x.tokens == y.tokens:
                same_rows += 1
                worst = max([worst] + [abs(p - q) for p, q in zip(x.logprobs, y.logprobs)])
    lens = [len(o.tokens) for prompts, seeds in work for o in ours(prompts, seeds)]
    times = {"main (legacy loop)": [], "ours": []}
    for _ in range(rounds):
        for name, fn in (("main (legacy loop)", legacy), ("ours", ours)):
            t0 = time.perf_counter()
            for prompts, seeds in work:
                fn(prompts, seeds)
            times[name].append((time.perf_counter() - t0) / len(work))
    load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    print(f"{run}: {len(work)} GRPO batches of {cfg.prompts_per_step} prompts x G {cfg.group_size} "
          f"({demo.task} difficulty {demo.difficulty}), T 1.0, <= {new} new tokens, per-row seeds; "
          f"{torch.get_num_threads()} threads; load average {' '.join(load)}")
    print(f"completion length mean {sum(lens) / len(lens):.1f}, max {max(lens)}; identical rows "
          f"{same_rows}/{rows}, max |logp diff| {worst:.1e}")
    for name, ts in times.items():
        print(f"{name:>20}  median {statistics.median(ts):.3f} s/batch   rounds: " + " ".join(f"{t:.3f}" for t in ts))
    m0, m1 = (statistics.median(ts) for ts in times.values())
    print(f"ratio main / ours: {m0 / m1:.2f}x")


def bench_speculative(run: str, new: int, rounds: int, n_prompts: int = 16) -> None:
    """Batch-1 decoding of held-out task prompts, greedy, plain vs MTP speculative (same outputs)."""
    from nanoseek.evaluate import test_problems
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.checkpoint import load_run_model

    model, cfg, _ = load_run_model(run)
    tok = Tokenizer.load(Path(run) / "tokenizer.json")
    task = cfg.get("rl", {}).get("task") or cfg.get("data", {}).get("task", "arithmetic")
    prompts = [tok.prompt_ids(p.prompt) for p in test_problems(task, n_prompts, seed=7)]
    engine = Engine(model, tok)
    plain_t, spec_t, n_tok, same = [], [], 0, True
    engine.generate(prompts[:1], new), engine.generate(prompts[:1], new, speculative=True)  # warm-up
    engine.spec_stats = type(engine.spec_stats)()
    for _ in range(rounds):
        t0 = time.perf_counter()
        plain = [engine.generate([p], new)[0] for p in prompts]
        t1 = time.perf_counter()
        spec = [engine.generate([p], new, speculative=True)[0] for p in prompts]
        t2 = time.perf_counter()
        plain_t.append(t1 - t0)
        spec_t.append(t2 - t1)
        n_tok = sum(len(o.tokens) for o in plain)
        same &= all(a.tokens == b.tokens for a, b in zip(plain, spec))
    mp, ms = statistics.median(plain_t), statistics.median(spec_t)
    st = engine.spec_stats
    print(f"{run}: {n_prompts} held-out {task} prompts, batch 1, greedy, up to {new} new tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"plain       {n_tok / mp:8.1f} tok/s")
    print(f"speculative {n_tok / ms:8.1f} tok/s   acceptance {st.acceptance:.1%} "
          f"({st.accepted}/{st.drafted} drafts), identical outputs: {same}")
    print(f"speedup {mp / ms:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="also check both give the same tokens")
    ap.add_argument("--spec", metavar="RUN_DIR", help="instead: MTP speculative vs plain decoding at batch 1 "
                                                      "on a trained run's held-out prompts")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models are overhead-bound)")
    ap.add_argument("--grpo", metavar="RUN_DIR", help="instead: one GRPO rollout batch at the demo's operating "
                                                      "point, main's decode loop vs now (issue 20)")
    ap.add_argument("--grpo-batches", type=int, default=3, help="--grpo: RL steps' batches per round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.grpo:
        return bench_grpo(args.grpo, args.rounds, args.new, args.grpo_batches)
    if args.spec:
        return bench_speculative(args.spec, args.new, args.rounds)
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    model = Transformer(cfg).eval()
    for p in model.parameters():  # a non-degenerate model: random weights at a readable scale
        if p.dim() > 1:
            p.data.normal_(0, 0.05)
    tmp = tempfile.mkdtemp()
    to_hf(model, tmp, include_mtp=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa").eval()
    engine = Engine(model, eos_id=-1)
    print(f"tiny preset, float32, CPU, {torch.get_num_threads()} threads, prompt {args.prompt_len}, "
          f"{args.new} new tokens, greedy")
    print(f"{'batch':>5} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>7}")
    for b in [int(x) for x in args.batches.split(",")]:
        g = torch.Generator().manual_seed(b)
        prompts = torch.randint(3, cfg.vocab_size, (b, args.prompt_len), generator=g).tolist()
        if args.check:
            ours = [o.tokens for o in engine.generate(prompts, max_new_tokens=args.new)]
            with torch.no_grad():
                theirs = hf.generate(torch.tensor(prompts), max_new_tokens=args.new, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)[:, args.prompt_len:].tolist()
            same = sum(a == t for a, t in zip(ours, theirs))
            print(f"      identical greedy outputs: {same}/{b}")
        time_ours(engine, prompts[:1], 4)
        time_hf(hf, prompts[:1], 4)  # warm-up
        o, h = [], []
        for _ in range(args.rounds):
            o.append(time_ours(engine, prompts, args.new))
            h.append(time_hf(hf, prompts, args.new))
        mo, mh = statistics.median(o), statistics.median(h)
        print(f"{b:>5} {mo:>11.0f} {mh:>10.0f} {mo / mh:>6.2f}x")


if __name__ == "__main__":
    main()
