"""`nanoseek serve`: the OpenAI-compatible HTTP API with continuous batching and the web chat page."""
from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from nanoseek.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (config.json, checkpoints/, tokenizer.json)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 and /health (default: $NANOSEEK_API_KEY)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without --api-key (anyone who can reach it may use it)")
    p.add_argument("--model-name", help="model id the API reports and accepts (default: the run's folder name)")
    p.add_argument("--max-batch", type=int, default=32, help="cache slots: requests decoded together")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: small models are bound by per-op overhead, and a "
                        "second thread mostly adds synchronisation; raise it for big models)")


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 and ::1; any other name or address (0.0.0.0, ::, a LAN address) is not."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    if not is_loopback(host) and not api_key and not insecure:
        raise ConfigError(f"--host {host} exposes the server beyond this machine without an API key: pass "
                          "--api-key KEY (or set $NANOSEEK_API_KEY), or --insecure to serve it open anyway")


def run(args: argparse.Namespace) -> int:
    import torch

    from nanoseek.engine.server import ServeConfig, load_server, serve

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    check_exposure(args.host, args.api_key, args.insecure)
    torch.set_num_threads(args.threads)
    name = args.model_name or Path(args.run).resolve().name
    server = load_server(args.run, ServeConfig(model_name=name, api_key=args.api_key or None,
                                               max_slots=args.max_batch), device=args.device)
    where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(f"serving {name} ({server.batcher.cfg.max_seq_len}-token context, {args.max_batch} slots) "
          f"at {where}  chat page: {where}/  API: {where}/v1"
          + ("  (API key required)" if args.api_key else ""), flush=True)
    if not is_loopback(args.host) and not args.api_key:
        print(f"WARNING: serving on {args.host} with no API key (--insecure): anyone who can reach this port "
              "can use it", flush=True)
    serve(server, args.host, args.port)
    return 0
