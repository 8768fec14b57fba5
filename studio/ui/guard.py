"""The web server's front door: which requests reach the studio at all, and the login.

A studio on localhost is reachable by every web page the user's browser opens. Two
checks keep those pages out:

- Host: bound to a loopback address, the server answers only requests addressed to a
  loopback name. A page on ``evil.example`` that re-points its own name at 127.0.0.1
  (DNS rebinding) still sends ``Host: evil.example`` and is refused.
- Origin: a browser names the page that made a request; a request from any other origin
  than the studio's own (or ``null``) is refused, so another site cannot drive the API.

Clients that are not browsers (gradio_client, curl) send no Origin and pass; on a
non-loopback address they need the password. Failed logins wait, longer each time.
"""
from __future__ import annotations

import asyncio
import hmac
from urllib.parse import unquote, urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
LOGIN_DELAY, LOGIN_DELAY_CAP = 1.0, 16.0  # seconds after the first failure; doubles up to the cap
FILE_ROUTES = ("/gradio_api/file=", "/file=")


def host_name(netloc: str) -> str:
    """``127.0.0.1:7860`` -> ``127.0.0.1``; ``[::1]:7860`` -> ``::1``."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


class RequestGuard:
    """ASGI middleware refusing foreign Host and Origin headers, and file= URL fetches."""

    def __init__(self, app, bound_host: str = "127.0.0.1", allow_hosts: tuple[str, ...] = ()):
        self.app = app
        loopback = bound_host in LOOPBACK_NAMES
        # Bound elsewhere, the names the machine is reached by are not known here: any
        # Host passes (the password guards), the Origin check still applies.
        self.hosts = {*LOOPBACK_NAMES, *(h.lower() for h in allow_hosts)} if loopback else None
        self.allow_hosts = {h.lower() for h in allow_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            why = self.refusal(scope)
            if why:
                await self._refuse(scope, receive, send, why)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return (f"requests addressed to {host!r} are refused: this studio answers on its loopback address only "
                    "(the operator can add a name with --allow-host).")
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            same = parts.netloc.lower() == host.lower() and parts.scheme in ("http", "https")
            if not same and host_name(parts.netloc) not in self.allow_hosts:
                return f"requests from another site ({origin!r}) are refused."
        path = unquote(scope.get("path", ""))
        for route in FILE_ROUTES:
            if path.startswith(route) and "://" in path[len(route):]:
                return "the studio does not fetch URLs for its callers."
        return None

    async def _refuse(self, scope, receive, send, why: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = why.encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def slow_login(user: str, password: str, sleep=asyncio.sleep):
    """Gradio's ``auth`` callable: checks in constant time, and after each failure waits
    (doubling up to LOGIN_DELAY_CAP) while holding the one lock, so guesses come one at a
    time at that pace. ``login.failures`` counts the failures since the last success."""
    lock = asyncio.Lock()

    async def login(username: str, given: str) -> bool:
        async with lock:
            ok = hmac.compare_digest(username.encode(), user.encode())
            ok &= hmac.compare_digest(given.encode(), password.encode())
            if ok:
                login.failures = 0
                return True
            login.failures += 1
            await sleep(login_delay(login.failures))
            return False

    login.failures = 0
    return login


def login_delay(failures: int) -> float:
    return min(LOGIN_DELAY * 2 ** max(failures - 1, 0), LOGIN_DELAY_CAP)
