"""The HTTP server's gatekeepers (nanoseek.engine.server): API keys and the browser-attack guard, both pure ASGI
middleware (not BaseHTTPMiddleware, which hides client disconnects from the app).

* `BearerAuth`: with API keys (one or several), every /v1 and /health request needs `Authorization: Bearer
  KEY` with one of them (401 otherwise); the static page itself holds no data and asks for the key. With
  keys, a request's client (for the server's fair shares and its per-client 429) is its key,
  not its address: clients behind one proxy address, each with its own key, are told apart; and the
  batcher's reserve rows then go to clients (keys) that hold few rows, with no express lane for short
  requests (which serves clients that share an address, and would let one key's flood of short streams in).
* Browser attacks on a local server (CSRF, DNS rebinding; `RequestGuard`, checked before anything else):
  a POST must be `Content-Type: application/json` (415: a cross-site form or `text/plain` fetch cannot send
  that without a CORS preflight, which this server never grants); a request whose `Host` is not one of
  localhost / 127.0.0.1 / [::1] / the bound host on the server's port, nor on the `allowed_hosts` list,
  gets 421 (a rebinding page's requests carry its own domain name as Host; an IP literal cannot be rebound,
  so with a wildcard bind (0.0.0.0, ::) any IP literal on the port is accepted); an `Origin` header, when
  present, must be one of those loopback names or the bound host on the port, the request's own (allowed)
  Host, or on `allowed_origins` (403 otherwise; "null" is foreign). `*` in either list turns that check
  off. Requests without Origin (non-browser clients) or without Host (HTTP/1.0) pass those two checks.
"""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from nanoseek.config import ConfigError
from nanoseek.engine.protocol import APIError

if TYPE_CHECKING:
    from nanoseek.engine.server import ServeConfig


CLIENT_SCOPE_KEY = "nanoseek.client"  # set by BearerAuth: the identity of the key a request authenticated with


class BearerAuth:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which hides client disconnects from the app): /v1/* and
    /health need `Authorization: Bearer KEY` with one of the keys; the request's scope then records which
    key (`key-<i>`, its position: the key itself never leaves this class) as its client."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app, self.expected = app, [f"Bearer {k}".encode() for k in keys]

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1") or path == "/health"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            match = None
            for i, expected in enumerate(self.expected):  # compare with every key: the time says nothing
                if hmac.compare_digest(given, expected):
                    match = i
            if match is None:
                err = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                               code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
            scope[CLIENT_SCOPE_KEY] = f"key-{match}"
        await self.app(scope, receive, send)


# ---- Host / Origin / Content-Type: what a browser page on another site could abuse ---------------------------
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def _name(host: str) -> str:
    """A host name or address as it appears in Host / Origin: lower case, IPv6 literals in brackets."""
    host = host.strip().lower()
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None]:
    """'name[:port]' (a Host header or an allow-list entry) -> (name as `_name` writes it, port or None).
    Raises ValueError on anything else (a path, an unbracketed IPv6 address, a bad port)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        name, rest = value[:end + 1], value[end + 1:]
        if end < 0 or not _is_ip(name) or (rest and not rest.startswith(":")):
            raise ValueError(value)
        port = rest[1:] if rest else None
    else:
        name, _, port = value.partition(":")
        port = port if ":" in value else None
    if not name or any(c in name for c in "/?#@ \t") or (port is not None and not (port.isdigit() and
                                                                                   0 < int(port) < 65536)):
        raise ValueError(value)
    return name, None if port is None else int(port)


def split_origin(value: str) -> tuple[str, str, int]:
    """'scheme://name[:port]' -> (scheme, name, port with the scheme's default filled in). Raises ValueError
    on anything else, "null" (what sandboxed frames and file:// pages send) included."""
    parts = urlsplit(value.strip().lower())
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") or parts.query \
            or parts.fragment or parts.username is not None:
        raise ValueError(value)
    return parts.scheme, _name(parts.hostname), parts.port or DEFAULT_PORTS[parts.scheme]


def _allow_list(entries: tuple[str, ...], split, flag: str, what: str) -> frozenset:
    """The parsed entries of an allow-list ("*" left out); a malformed one is a ConfigError naming it."""
    out = set()
    for e in entries:
        if e != "*":
            try:
                out.add(split(e))
            except ValueError:
                raise ConfigError(f"{flag} {e!r} is not {what}, or *") from None
    return frozenset(out)


@dataclass(frozen=True)
class RequestPolicy:
    """Which Host and Origin headers a server bound to `host:port` accepts (see the module docstring)."""

    port: int
    names: frozenset[str]  # ours on `port`: the loopback names and the bound host
    any_ip: bool  # bound to a wildcard address: reachable at every address of the machine
    hosts: frozenset[tuple[str, int | None]]  # the allow-list: (name, port or None for any port)
    origins: frozenset[tuple[str, str, int]]
    any_host: bool
    any_origin: bool

    @classmethod
    def of(cls, cfg: ServeConfig) -> RequestPolicy:
        """From a ServeConfig; a malformed allow-list entry is a ConfigError naming it."""
        hosts = _allow_list(cfg.allowed_hosts, split_host, "--allowed-host", "a host name or address with an "
                            "optional port (e.g. chat.example.com or 192.168.1.5:8000)")
        origins = _allow_list(cfg.allowed_origins, split_origin, "--allowed-origin", "an origin (scheme://host[:port], "
                              "e.g. https://chat.example.com)")
        bound = _name(cfg.host)
        wildcard = bound in ("0.0.0.0", "[::]", "")
        return cls(cfg.port, LOOPBACK_NAMES | ({bound} if not wildcard else set()), wildcard, hosts, origins,
                   "*" in cfg.allowed_hosts, "*" in cfg.allowed_origins)

    def ours(self, name: str, port: int | None) -> bool:
        return (name in self.names or (self.any_ip and _is_ip(name))) and port in (None, self.port)

    def host_ok(self, host: str | None) -> bool:
        if self.any_host or host is None:
            return True
        try:
            name, port = split_host(host)
        except ValueError:
            return False
        return self.ours(name, port) or (name, None) in self.hosts or (name, port or 80) in self.hosts

    def origin_ok(self, origin: str, host: str | None) -> bool:
        if self.any_origin:
            return True
        try:
            scheme, name, port = split_origin(origin)
        except ValueError:
            return False
        if (scheme, name, port) in self.origins or self.ours(name, port):
            return True
        if self.any_host or host is None:  # without a Host check, "same as Host" would admit a rebinding page
            return False
        try:  # the page was served under the Host this request carries (and that Host passed its check)
            h_name, h_port = split_host(host)
        except ValueError:
            return False
        return (name, port) == (h_name, h_port or DEFAULT_PORTS[scheme]) and self.host_ok(host)


class RequestGuard:
    """Pure ASGI middleware, outermost: refuses a foreign Host (421), a foreign Origin (403), and a POST whose
    body is not declared as JSON (415), each in OpenAI's error shape, before authentication or routing."""

    def __init__(self, app, policy: RequestPolicy):
        self.app, self.policy = app, policy

    def _refusal(self, scope) -> APIError | None:
        headers: dict[bytes, list[bytes]] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.lower(), []).append(v)
        hosts, origins = headers.get(b"host", []), headers.get(b"origin", [])
        if len(hosts) > 1 or len(origins) > 1:
            return APIError(400, "a request carries one Host and at most one Origin header")
        host = hosts[0].decode("latin-1") if hosts else None
        raw_origin = origins[0] if origins else None
        if not self.policy.host_ok(host):
            return APIError(421, f"this server does not answer to Host {host!r} (a DNS-rebinding guard); start "
                                 "it with --allowed-host NAME to accept it", code="host_not_allowed")
        if raw_origin is not None and not self.policy.origin_ok(origin := raw_origin.decode("latin-1"), host):
            return APIError(403, f"requests from Origin {origin!r} are not allowed (a cross-site request guard); "
                                 "start the server with --allowed-origin ORIGIN to accept it",
                            code="origin_not_allowed")
        if scope["method"] == "POST":
            ctype = b",".join(headers.get(b"content-type", [])).decode("latin-1")
            if ctype.split(";")[0].strip().lower() != "application/json":
                return APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                                code="unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (err := self._refusal(scope)) is not None:
            await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)
