"""Who may talk to `serve`: Host names it answers to (against DNS rebinding), POSTs only from its own page (against
cross-site requests), and security headers on every answer (no framing, no sniffing, nothing loaded from elsewhere)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import re
from http.cookies import SimpleCookie
from urllib.parse import unquote, urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
TOKEN_COOKIE = "lookalike_token"  # where the page keeps the token it asked for (sent with thumbnails too)
OPEN_PATHS = ("/", "/healthz", "/favicon.ico")  # the page (it asks for the token), the liveness probe, the icon


def is_loopback(host: str) -> bool:
    return host.lower().strip("[]") in LOCAL_HOSTS


def allowed_hosts(host: str, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """Loopback names, the address serve binds to (unless it binds every interface) and the names added."""
    names = set(LOCAL_HOSTS) | set(extra)
    if host not in ("0.0.0.0", "::", ""):
        names.add(host)
    return frozenset(name.lower().strip("[]") for name in names)


def content_security_policy(page: str) -> str:
    """default-src 'self', with the page's own inline script and style allowed by their sha256, no framing."""
    def digests(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (f"default-src 'self'; script-src 'self' {digests('script')}; style-src 'self' {digests('style')}; "
            "img-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def presented_token(headers: Headers) -> str | None:
    """The token a request carries: `Authorization: Bearer T`, or the page's cookie."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # noqa: BLE001 - a malformed cookie header is no token
        return None
    return unquote(cookie[TOKEN_COOKIE].value) if TOKEN_COOKIE in cookie else None


class Guard:
    """ASGI middleware: 400 for a Host not in `hosts`, 403 for a POST whose Origin is another site, 401 without the
    access token (when there is one), and security headers on every response."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str], csp: str, token: str | None = None):
        self.app = app
        self.hosts = hosts
        self.token = token
        self.headers = [(b"content-security-policy", csp.encode()), (b"x-content-type-options", b"nosniff"),
                        (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        hostname = (urlsplit(f"//{host}").hostname or "").lower()
        if hostname not in self.hosts:
            return await self._refuse(400, f"host {host[:80]!r} is not one this server answers to "
                                           "(serve --allowed-host adds names)", scope, receive, send)
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin is not None:
            if urlsplit(origin).netloc.lower() != host.lower():
                return await self._refuse(403, f"a request from {origin[:80]!r}: only this server's own page may "
                                               "send queries", scope, receive, send)
        if self.token is not None and scope["path"] not in OPEN_PATHS:
            given = presented_token(headers)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return await self._refuse(401, "this server needs its access token (serve --token): send "
                                               "'Authorization: Bearer TOKEN'", scope, receive, send)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + self.headers
            await send(message)

        await self.app(scope, receive, with_headers)

    async def _refuse(self, status: int, message: str, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse({"error": message}, status, headers={key.decode(): value.decode()
                                                                      for key, value in self.headers})
        await response(scope, receive, send)
