"""What the GGUF export keeps, measured in llama.cpp (bench/llamacpp_runner.py) against nanoseek on a trained run.

On --n held-out problems of the run's task (nanoseek.evaluate.test_problems, the seed `nanoseek eval` uses):
- top-1 agreement of the first answer token: llama.cpp f32 and q8_0 vs nanoseek's argmax;
- greedy accuracy (<= 64 new tokens, stop at eos) and pass@1 (R1's setting: temperature 0.6, top-p 0.95, --samples
  per problem, sampled here from llama.cpp's logits with numpy) of nanoseek (its own Engine / evaluate) and of the
  f32 and q8_0 files in llama.cpp;
- tokenization: llama.cpp's tokenize (tokenizer.ggml.pre chosen by the exporter) vs nanoseek's encode on held-out
  strings: the task's prompts + worked solutions for a "task"-style tokenizer, and for the "text" style a
  tokenizer trained on half of the Python standard library's files and tested on lines of the other half.

    .venv/bin/python bench/gguf_check.py --run runs/demo/rl
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.llamacpp_runner import LlamaCpp  # noqa: E402
from nanoseek.engine import Engine  # noqa: E402
from nanoseek.evaluate import test_problems  # noqa: E402
from nanoseek.gguf_export import write_gguf  # noqa: E402
from nanoseek.hf_tokenizer import load_tokenizer  # noqa: E402
from nanoseek.tasks import get_task  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train.checkpoint import load_run_model  # noqa: E402


def sample_top_p(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.cumsum(p[order]) - p[order] < top_p  # the smallest prefix whose mass reaches top_p
    q = np.zeros_like(p)
    q[order[keep]] = p[order[keep]]
    return int(rng.choice(len(p), p=q / q.sum()))


def llama_generate(llm: LlamaCpp, prompts: list[list[int]], new: int, eos: int, temperature: float = 0.0,
                   rng: np.random.Generator | None = None) -> list[list[int]]:
    """One continuation per prompt, the prompts as parallel sequences (at most llm.n_seq at a time); each stops at
    eos (included) or `new` tokens. Finished rows keep decoding (ignored) so every sequence stays in step."""
    out: list[list[int]] = []
    for c in range(0, len(prompts), llm.n_seq):
        chunk = prompts[c:c + llm.n_seq]
        llm.reset()
        logits = llm.prefill(chunk)
        done: list[list[int]] = [[] for _ in chunk]
        live = set(range(len(chunk)))
        for _ in range(new):
            nxt = [int(row.argmax()) if temperature <= 0 else sample_top_p(row, temperature, 0.95, rng)
                   for row in logits]
            for i in list(live):
                done[i].append(nxt[i])
                if nxt[i] == eos or len(done[i]) >= new:
                    live.discard(i)
            if not live:
                break
            logits = llm.step(nxt)
        out += done
    return out


def score(task, problems, completions_per_problem, tok) -> float:
    """Mean accuracy; a completion that never reached eos counts as truncated (wrong), as nanoseek.evaluate."""
    hits = [task.score(p, tok.decode([t for t in c if t != tok.eos_id]), truncated=c[-1] != tok.eos_id).correct
            for p, cs in zip(problems, completions_per_problem) for c in cs]
    return float(np.mean(hits))


def task_checks(run: str, n: int, samples: int, threads: int, skip_eval: bool = False) -> None:
    model, cfg, step = load_run_model(run)
    tok = load_tokenizer(run)
    task_name = cfg.get("data", {}).get("task", "arithmetic") if isinstance(cfg.get("data"), dict) else "arithmetic"
    task = get_task(task_name)
    problems = test_problems(task_name, n)
    prompts = [tok.prompt_ids(p.prompt) for p in problems]
    torch.set_num_threads(threads)
    with torch.no_grad():
        ours_top1 = [int(model(torch.tensor([p]))[0, -1].argmax()) for p in prompts]
    # nanoseek's greedy continuations: llama.cpp's argmax is compared at every one of their positions
    ours_greedy = [o.tokens for o in Engine(model, tokenizer=tok).generate(prompts, max_new_tokens=64)]
    from nanoseek.evaluate import evaluate

    print(f"run {step}, task {task_name}, {n} held-out problems, {threads} threads")
    if not skip_eval:
        ev = evaluate(model, tok, task_name, n=n, samples=samples, max_new_tokens=64)
        print(f"nanoseek          : greedy {ev.greedy:.3f}  pass@1 {ev.pass1:.3f} (T=0.6, top-p 0.95, {samples} "
              "samples per problem)", flush=True)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for dtype in ("f32", "q8_0"):
            path = write_gguf(model, Path(run) / "tokenizer.json", Path(d) / f"{dtype}.gguf", dtype, verbose=False)
            llm = LlamaCpp(str(path), n_threads=threads, n_seq=50, n_ctx_seq=max(map(len, prompts)) + 64)
            try:
                top1, pos_agree = [], []
                for c in range(0, n, 50):
                    llm.reset()
                    top1 += llm.prefill(prompts[c:c + 50]).argmax(-1).tolist()
                    seqs = [p + g[:-1] for p, g in zip(prompts[c:c + 50], ours_greedy[c:c + 50])]
                    for p, g, lg in zip(prompts[c:c + 50], ours_greedy[c:c + 50], llm.all_logits(seqs)):
                        pos_agree += (lg[len(p) - 1:].argmax(-1) == np.array(g)).tolist()
                greedy = [[g] for g in llama_generate(llm, prompts, 64, tok.eos_id)]
                flat = llama_generate(llm, [p for p in prompts for _ in range(samples)], 64, tok.eos_id, 0.6, rng)
                sampled = [flat[i * samples:(i + 1) * samples] for i in range(n)]
            finally:
                llm.close()
            agree = np.mean(np.array(top1) == np.array(ours_top1))
            print(f"llama.cpp {dtype:<5}  : greedy {score(task, problems, greedy, tok):.3f}  pass@1 "
                  f"{score(task, problems, sampled, tok):.3f}  first-token top-1 agreement with nanoseek "
                  f"{agree:.3f} ({int(agree * n)}/{n}); top-1 agreement at every position of nanoseek's greedy "
                  f"continuations {np.mean(pos_agree):.4f} ({sum(pos_agree)}/{len(pos_agree)})", flush=True)


def tokenization_agreement(llm_path: Path, tok: Tokenizer, texts: list[str], label: str) -> None:
    llm = LlamaCpp(str(llm_path), n_threads=1)
    try:
        same = [llm.tokenize(t) == tok.encode(t) for t in texts]
    finally:
        llm.close()
    bad = [t for t, s in zip(texts, same) if not s][:3]
    print(f"tokenization {label}: {sum(same)}/{len(texts)} strings identical" + (f"; e.g. {bad!r}" if bad else ""))


def tokenizer_checks(run: str, n: int) -> None:
    from nanoseek.model import Transformer
    from nanoseek.config import ModelConfig

    tok = load_tokenizer(run)
    task, rng = get_task("arithmetic"), random.Random(0)
    texts = [p.prompt + " " + task.solution(p, rng) for p in test_problems("arithmetic", n, seed=7)]
    with tempfile.TemporaryDirectory() as d:
        def tiny_gguf(t: Tokenizer, name: str) -> Path:
            f = t.save(Path(d) / name / "tokenizer.json")
            m = Transformer(ModelConfig(vocab_size=t.vocab_size, n_mtp=0))
            return write_gguf(m, f, Path(d) / f"{name}.gguf", verbose=False)

        tokenization_agreement(tiny_gguf(tok, "task"), tok, texts, f"task style (smollm), {run}'s tokenizer")
        import sysconfig

        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        train = [f.read_text(errors="replace") for f in files[0::2]]
        held = [line for f in files[1::2][:40] for line in f.read_text(errors="replace").splitlines() if line.strip()]
        text_tok = Tokenizer.train(train, vocab_size=2048, style="text")
        tokenization_agreement(tiny_gguf(text_tok, "text"), text_tok, held[:2000],
                               "text style (qwen2), stdlib-trained, held-out stdlib lines")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-task", action="store_true", help="tokenization only")
    ap.add_argument("--skip-tokenization", action="store_true")
    ap.add_argument("--skip-eval", action="store_true", help="skip nanoseek's own evaluate (greedy, pass@1)")
    args = ap.parse_args()
    if not args.skip_tokenization:
        tokenizer_checks(args.run, args.n)
    if not args.skip_task:
        task_checks(args.run, args.n, args.samples, args.threads, args.skip_eval)


if __name__ == "__main__":
    main()
