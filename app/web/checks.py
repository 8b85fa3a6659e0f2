"""Who may ask `itfits serve`, and in which language to answer.

- Host: a page on another site can make its own name resolve to 127.0.0.1 (DNS rebinding) and then read this
  server's answers as its own; its requests still carry its name in the Host header. Only localhost's names and the
  --host served are taken (a wildcard --host, 0.0.0.0 or ::, takes any IP address too: a rebinding needs a name);
  a request with no Host header (HTTP/1.0; never a browser's) is taken.
- Origin: a cross-site form or fetch can POST here from any page the user visits; browsers say where it comes from
  in the Origin header. A POST with an Origin other than the page's own is refused. Without one (curl, scripts) it
  is taken: such clients can reach the server anyway.
- A JSON request (a JSON body, or an Accept header that prefers application/json) gets JSON, errors included.
"""
from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def wants_json(request: Request) -> bool:
    """Whether to answer in JSON: the body is JSON, or the Accept header ranks application/json at least as high as
    text/html (a browser's navigation asks for text/html first; curl's */* gets the page)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
        return True
    ranks = {}
    for part in request.headers.get("accept", "").split(","):
        kind, *params = [p.strip().lower() for p in part.split(";")]
        q = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            ranks[kind] = float(q)
        except ValueError:
            ranks[kind] = 0.0
    return ranks.get("application/json", 0) > 0 and ranks["application/json"] >= ranks.get("text/html", 0)


def json_error(message: str, status: int) -> Response:
    return Response(json.dumps({"error": message}), status_code=status, media_type="application/json")


def _host_port(netloc: str) -> tuple[str, int | None] | None:
    """(host name in lower case, without IPv6 brackets; port or None) of a Host header, or None if it does not parse."""
    try:
        parts = urlsplit("//" + netloc)
        return (parts.hostname or "", parts.port)
    except ValueError:  # a port that is no number, a bracket not closed
        return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class RequestChecks:
    """ASGI middleware: the Host and Origin checks above, before any route runs; a refusal says what to do."""

    def __init__(self, app, *, host: str = "127.0.0.1"):
        self.app = app
        self.hosts = {*LOCAL_HOSTS, host.strip("[]").lower()}
        self.any_ip = host in WILDCARD_HOSTS

    def problem(self, request: Request) -> tuple[str, int] | None:
        """(message, HTTP status) of a request that is not taken, or None."""
        header = request.headers.get("host")  # every browser sends one; an HTTP/1.0 client may not
        host = _host_port(header or "127.0.0.1")
        if host is None or not (host[0] in self.hosts or self.any_ip and _is_ip(host[0])):
            return (f"this server answers requests for {', '.join(sorted(self.hosts))}, not for the host "
                    f"'{header[:100]}': open it as http://127.0.0.1:PORT/ (or start itfits serve with --host NAME)",
                    421)
        origin = request.headers.get("origin")
        if request.method in SAFE_METHODS or origin is None:
            return None
        try:
            parts = urlsplit(origin)
            theirs = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        except ValueError:
            theirs = None
        scheme = request.url.scheme
        ours = (scheme, host[0], host[1] or (443 if scheme == "https" else 80))
        if theirs != ours:
            return (f"a POST from another site ({origin[:100]}) is refused: use the page this server shows, or a "
                    "client that sends no Origin header (curl)", 403)
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            request = Request(scope)
            refused = self.problem(request)
            if refused is not None:
                message, status = refused
                response = json_error(message, status) if wants_json(request) else PlainTextResponse(message, status)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
