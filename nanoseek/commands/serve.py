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
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 and /health; repeat it for several keys, "
                        "each a client of its own for the fair shares (default: $NANOSEEK_API_KEY)")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="more API keys, one per line (blank lines and lines starting with # are skipped)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                   help="also answer requests whose Host header is HOST ('name' for any port, or 'name:port'; "
                        "repeatable); by default only localhost, 127.0.0.1, [::1] and --host on --port. "
                        "'*' turns the check off (DNS rebinding)")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="also accept browser requests from ORIGIN (scheme://host[:port], repeatable); by default "
                        "only the server's own origins. '*' turns the check off (cross-site requests)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without --api-key (anyone who can reach it may use it)")
    p.add_argument("--model-name", help="model id the API reports and accepts (default: the run folder's name)")
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


def check_exposure(host: str, api_key: str | tuple[str, ...] | None, insecure: bool) -> None:
    if not is_loopback(host) and not api_key and not insecure:
        raise ConfigError(f"--host {host} exposes the server beyond this machine without an API key: pass "
                          "--api-key KEY (or set $NANOSEEK_API_KEY), or --insecure to serve it open anyway")


def check_key(key: str, where: str) -> str:
    """A key is sent as `Authorization: Bearer KEY`: printable ASCII without spaces (the key is not echoed)."""
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise ConfigError(f"the API key {where} has spaces or characters outside printable ASCII; a key is sent "
                          "as 'Authorization: Bearer KEY'")
    return key


def read_key_file(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--api-key-file {path}: cannot read it ({e})") from None
    keys = [check_key(line.strip(), f"on line {i} of {path}") for i, line in enumerate(lines, 1)
            if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ConfigError(f"--api-key-file {path} holds no key (one per line; # starts a comment)")
    return keys


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """--api-key (each, or $NANOSEEK_API_KEY when none is given) then --api-key-file's; empty ones dropped."""
    given = args.api_key if args.api_key is not None else [os.environ.get("NANOSEEK_API_KEY") or ""]
    keys = [check_key(k, f"given as --api-key number {i}") for i, k in enumerate(given, 1) if k]
    if args.api_key_file:
        keys += read_key_file(args.api_key_file)
    return tuple(dict.fromkeys(keys))


def run(args: argparse.Namespace) -> int:
    import torch

    from nanoseek.engine.server import RequestPolicy, ServeConfig, load_server, serve

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [1, 65535], got {args.port}")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    keys = api_keys(args)
    check_exposure(args.host, keys, args.insecure)
    name = args.model_name or Path(args.run).resolve().name
    cfg = ServeConfig(model_name=name, api_keys=keys, max_slots=args.max_batch, host=args.host, port=args.port,
                      allowed_hosts=tuple(args.allowed_host), allowed_origins=tuple(args.allowed_origin))
    RequestPolicy.of(cfg)  # a malformed allow-list entry fails here, before the model is loaded
    torch.set_num_threads(args.threads)
    server = load_server(args.run, cfg, device=args.device)
    where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(f"serving {name} ({server.batcher.cfg.max_seq_len}-token context, {args.max_batch} slots) "
          f"at {where}  chat page: {where}/  API: {where}/v1"
          + (f"  (API key required: {len(keys)} key(s), each a client of its own)" if keys else ""), flush=True)
    if not is_loopback(args.host) and not keys:
        print(f"WARNING: serving on {args.host} with no API key (--insecure): anyone who can reach this port "
              "can use it", flush=True)
    if "*" in args.allowed_host:
        print("WARNING: --allowed-host '*': any Host header is accepted, so a web page can reach this server "
              "through DNS rebinding" + ("" if keys else " (and it has no API key)"), flush=True)
    if "*" in args.allowed_origin:
        print("WARNING: --allowed-origin '*': requests from any web page's origin are accepted (cross-site "
              "requests)" + ("" if keys else " (and the server has no API key)"), flush=True)
    serve(server)
    return 0
