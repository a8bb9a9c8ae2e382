"""Serving throughput: continuous batching vs one request at a time, through `nanoseek serve`.

Starts `nanoseek serve` as a subprocess on a free localhost port, then sends the same N streaming chat
requests (mixed prompt lengths, 16-24 new tokens each, greedy, `ignore_eos` so every request has a fixed
length) twice: one after another, then all at once. Prints aggregate completion tokens/s of each and the
ratio, checks every concurrent output equals its solo run, and also times the batcher alone (no HTTP) to
show how much of the gap the HTTP/SSE layer takes. Without --run the `tiny` preset with random weights
(std 0.05) and a tokenizer trained on the arithmetic corpus is used.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nanoseek.config import ModelConfig
from nanoseek.corpus import corpus_texts
from nanoseek.engine.batcher import Batcher, Request
from nanoseek.engine.protocol import Message, chat_prompt_ids
from nanoseek.model import Transformer
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.checkpoint import load_run_model, save_checkpoint


def make_run(path: Path) -> Path:
    tok = Tokenizer.train(corpus_texts("arithmetic", 300, seed=0), vocab_size=512)
    tok.save(path / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size))
    for p in model.parameters():
        if p.dim() > 1:
            p.data.normal_(0, 0.05)
    (path / "config.json").write_text(json.dumps({"model": model.cfg.to_dict()}))
    save_checkpoint(path / "checkpoints", 1, model, None, {})
    return path


def requests(n: int) -> list[dict]:
    out = []
    for i in range(n):
        ops = " + ".join(str((i * 7 + k) % 20) for k in range(1 + i % 12))
        out.append({"messages": [{"role": "user", "content": f"Compute {ops}."}], "max_tokens": 16 + i % 9,
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}})
    return out


async def stream_one(client: httpx.AsyncClient, body: dict) -> tuple[str, int]:
    text, n = [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
            for c in ev["choices"]:
                d = c["delta"]
                text.append((d.get("reasoning_content") or "") + "|" + (d.get("content") or ""))
    return "".join(text), n


async def http_load(url: str, n: int) -> dict:
    reqs = requests(n)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=n)) as client:
        await stream_one(client, reqs[0])  # warm-up
        t0 = time.perf_counter()
        alone = [await stream_one(client, r) for r in reqs]
        t_seq = time.perf_counter() - t0
        t0 = time.perf_counter()
        together = await asyncio.gather(*(stream_one(client, r) for r in reqs))
        t_conc = time.perf_counter() - t0
    tokens = sum(k for _, k in together)
    assert tokens == sum(r["max_tokens"] for r in reqs), "a request did not complete"
    same = sum(a == b for a, b in zip(alone, together))
    return {"tokens": tokens, "seq_s": t_seq, "conc_s": t_conc, "identical": same}


def batcher_only(run: Path, n: int, threads: int) -> tuple[float, float]:
    """tokens/s of the same requests through the batcher directly: sequential, then all at once."""
    torch.set_num_threads(threads)
    model, _, _ = load_run_model(run)
    tok = Tokenizer.load(run / "tokenizer.json")
    reqs = requests(n)
    prompts = [chat_prompt_ids(tok, [Message(**m) for m in r["messages"]]) for r in reqs]
    b = Batcher(model, tok.eos_id, max_slots=n)

    def run_all(groups: list[list[int]]) -> float:
        t0 = time.perf_counter()
        for g in groups:
            for i in g:
                b.submit(Request(prompts[i], reqs[i]["max_tokens"], ignore_eos=True))
            while b.rows or b.pending:
                b.step()
        return sum(r["max_tokens"] for r in reqs) / (time.perf_counter() - t0)

    run_all([[0]])
    return run_all([[i] for i in range(n)]), run_all([list(range(n))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="run directory to serve (default: tiny preset, random weights)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    run = Path(args.run) if args.run else make_run(Path(tmp.name))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek.cli", "serve", "--run", str(run), "--port", str(port),
                             "--model-name", "bench", "--threads", str(args.threads),
                             "--max-batch", str(args.clients)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise SystemExit("server did not start")
        res = asyncio.run(http_load(url, args.clients))
        health = httpx.get(f"{url}/health").json()
    finally:
        proc.terminate()
        proc.wait(30)
    seq, conc = res["tokens"] / res["seq_s"], res["tokens"] / res["conc_s"]
    b_seq, b_conc = batcher_only(run, args.clients, args.threads)
    cfg = load_run_model(run)[0].cfg
    tok = Tokenizer.load(run / "tokenizer.json")
    lens = [len(chat_prompt_ids(tok, [Message(**m) for m in r["messages"]])) for r in requests(args.clients)]
    print(f"model: {run if args.run else 'tiny preset (random weights)'}: dim={cfg.dim} layers={cfg.n_layers} "
          f"experts={cfg.n_routed_experts}; CPU, {args.threads} torch thread(s); {args.clients} streaming clients, "
          f"prompts {min(lens)}-{max(lens)} tokens, 16-24 new tokens each, greedy")
    print(f"{'':<28} {'sequential tok/s':>17} {'concurrent tok/s':>17} {'ratio':>7}")
    print(f"{'HTTP (nanoseek serve)':<28} {seq:>17.0f} {conc:>17.0f} {conc / seq:>6.1f}x")
    print(f"{'batcher alone (no HTTP)':<28} {b_seq:>17.0f} {b_conc:>17.0f} {b_conc / b_seq:>6.1f}x")
    print(f"{res['tokens']} tokens per pass; concurrent outputs identical to solo runs: "
          f"{res['identical']}/{args.clients}; largest decode batch: {health['max_batch']}")


if __name__ == "__main__":
    main()
