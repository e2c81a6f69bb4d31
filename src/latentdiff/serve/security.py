"""Safe by default, as an ASGI middleware in front of every route:

- HTTP basic auth when ``--api-auth`` is set (A1111's flag), on the page and the API alike;
- the Host header must name this server (a loopback name, or the bind address, or an
  ``allowed_hosts`` entry), which defeats DNS rebinding: a foreign page that points its
  own name at 127.0.0.1 still sends its own name as Host;
- a request with an Origin header must come from this server's own origin, so a page on
  another site cannot drive the API from a visitor's browser;
- request bodies over ``max_body_bytes`` are refused with 413: by their Content-Length, or, when
  streamed without one, counted as they arrive.
"""

from __future__ import annotations

import base64
import hmac
import json
from urllib.parse import urlsplit

from .config import ServeConfig

LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _host_name(value: str) -> str:
    """``host[:port]`` -> host (IPv6 in brackets kept bracket-less)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware: auth, Host and Origin checks, body cap (see the module docstring)."""

    def __init__(self, app, config: ServeConfig) -> None:
        self.app = app
        self.config = config
        self.hosts = LOOPBACK_NAMES | {h.lower() for h in config.allowed_hosts}
        if config.host not in ("0.0.0.0", "::"):
            self.hosts.add(config.host.lower())
        self.any_host = config.listen  # all interfaces: the client may use any of our names (auth guards)
        self.credentials = [f"{u}:{p}".encode() for u, p in config.api_auth]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._check(headers)
        if problem is not None:
            status, error, detail, extra = problem
            return await _answer(send, status, error, detail, extra)
        declared = headers.get("content-length")
        limit = self.config.max_body_bytes
        if declared is not None:
            if not declared.isdigit():
                return await _answer(send, 400, "BadRequest", "Content-Length is not a number")
            if int(declared) > limit:
                return await _answer(send, 413, "PayloadTooLarge", f"the request body is {declared} bytes; "
                                     f"this server takes at most {limit}")
        if declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body = bytearray()  # streamed without a length: read it (up to the cap) before the app does
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                body += message.get("body", b"")
                if len(body) > limit:
                    return await _answer(send, 413, "PayloadTooLarge", f"the request body is over {limit} bytes")
                if not message.get("more_body", False):
                    break
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        await self.app(scope, receive, send)

    def _check(self, headers: dict[str, str]):
        if self.credentials:
            given = headers.get("authorization", "")
            ok = False
            if given.lower().startswith("basic "):
                try:
                    raw = base64.b64decode(given[6:].strip(), validate=True)
                except ValueError:
                    raw = b""
                ok = any(hmac.compare_digest(raw, c) for c in self.credentials)
            if not ok:
                return 401, "Unauthorized", "this server needs HTTP basic authentication (--api-auth)", \
                    [(b"www-authenticate", b'Basic realm="latentdiff"')]
        host = headers.get("host", "")
        if not self.any_host and _host_name(host) not in self.hosts:
            return 403, "ForbiddenHost", f"Host {host!r} is not this server's name (DNS rebinding guard); " \
                "start with --allowed-host NAME to serve it", []
        origin = headers.get("origin")
        if origin is not None and origin != "null":
            parts = urlsplit(origin)
            if parts.netloc.lower() != host.lower():
                return 403, "ForbiddenOrigin", f"requests from the page at {origin} are refused " \
                    "(only this server's own page may call it)", []
        elif origin == "null":
            return 403, "ForbiddenOrigin", "requests from an opaque origin are refused", []
        return None


async def _answer(send, status: int, error: str, detail: str, extra_headers=()) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
