"""The HTTP layer of `exo-medusa serve`, standard library only: one connection's requests, limits, origins, timeouts
(listener.py accepts the connections, counts them and keeps their deadlines).

The handler reads a request, enforces what HTTP itself must bound and hands the body to the OpenAI protocol
(openai.ChatApp); it writes back the JSON or server-sent events the protocol returns, `/metrics` and the chat page
(static/chat.html). Every limit answers with an HTTP status and a JSON error, before any expensive work:
- a body larger than what the context can hold is refused from its Content-Length, unread (413);
- at most `max_connections` connections are open, at most `max_client_connections` of them from one address (503);
- a client has `header_timeout` seconds (short) to send its request line and headers, and `timeout` seconds from
  then on for its body (408 or the connection is closed), so that connections trickling a byte at a time cannot hold
  every slot for long; each write of the reply may block `timeout` seconds; a client that hangs up cancels its
  generation, streamed or not;
- browsers' cross-site requests are refused (403) unless their Origin is allowed, and on a loopback address the
  Host header must name this machine (DNS rebinding).
"""
from __future__ import annotations

import fnmatch
import functools
import ipaddress
import json
import logging
import queue
import select
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Callable, Iterable
from urllib.parse import urlsplit

from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .protocol import BadRequest, HTTPError, error_body, short
from .worker import DEFAULT_QUEUE_SIZE, Job

log = logging.getLogger(__name__)
LINGER_S = 2.0                   # how long a refused body is read and dropped before closing
POLL_S = 0.2                     # how often a waiting handler checks that its client is still there
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
METRICS_PATHS = ("/metrics",)
PAGE_PATHS = ("/", "/index.html")
# the chat page runs its own inline script and talks to this server only; nothing may frame it
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


@functools.cache
def chat_page() -> str:
    return (resources.files(__package__) / "static" / "chat.html").read_text(encoding="utf-8")


@dataclass(frozen=True)
class ServerLimits:
    queue_size: int = DEFAULT_QUEUE_SIZE  # requests that may wait while one generates
    timeout: float = 30.0              # seconds to receive a body once the headers are in; and for each blocking write
    max_connections: int = 64
    allow_origins: tuple[str, ...] = ()   # besides this machine's own pages; fnmatch patterns, "*" allows all
    allow_hosts: tuple[str, ...] = ()     # Host names accepted besides the bound address and localhost
    header_timeout: float = 5.0        # seconds to receive the request line and headers (also an idle keep-alive)
    max_client_connections: int = 32  # open connections from one address

    def __post_init__(self):
        if self.queue_size < 0 or self.max_connections < 1 or self.max_client_connections < 1:
            raise ValueError("--queue-size must be >= 0, --max-connections and --max-client-connections >= 1")
        if not (self.timeout > 0 and self.header_timeout > 0):
            raise ValueError("--timeout and --header-timeout must be > 0")


def _hostname(value: str) -> str:
    """The host part of a Host header or of an origin's netloc, lower-cased, without port or IPv6 brackets."""
    try:
        return (urlsplit("//" + value).hostname or "").lower()
    except ValueError:  # a malformed port or bracket
        return ""


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ChatHandler(BaseHTTPRequestHandler):
    server: "ChatServer"  # listener.py
    server_version = "exo-medusa"
    timed_out = False  # set by the server when the request did not arrive in time
    _next_check = 0.0  # when _next_event next looks at the client's socket

    def setup(self) -> None:
        self.timeout = self.server.limits.timeout  # per blocking read or write on this connection
        super().setup()

    def handle_one_request(self) -> None:
        # each request on a connection (the first, or the next on a kept-alive one) starts with the header deadline
        self.timed_out = False
        self.server.watch(self)
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:  # the request line and headers are in: the body gets the longer deadline
            self.server.headers_received(self)
        return ok

    def finish(self) -> None:
        self.server.unwatch(self)
        try:
            super().finish()
        except OSError:  # the client is gone; nothing left to flush
            pass

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    def log_request(self, code="-", size="-") -> None:
        """Called once per answer, by send_response: counted for /metrics; refusals logged as warnings."""
        super().log_request(code, size)
        if isinstance(code, int):
            path = (getattr(self, "path", None) or "").split("?", 1)[0]
            self.server.app.metrics.request(path, code)
            if code >= 400 and code not in (404, 405):
                log.warning("%s: %d for %s %s", self.client_address[0], code, getattr(self, "command", None) or "-",
                            short(path))

    # -- the stdlib's own errors (bad request line, unknown method, oversized headers) as JSON too
    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True
        if self.timed_out:  # the request line was cut by the header deadline: that, not its syntax, is the fault
            code, message = HTTPStatus.REQUEST_TIMEOUT, self._late_headers()
        if self.request_version == "HTTP/0.9":  # no version parsed from garbage: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        kind = "invalid_request_error" if 400 <= code < 500 else "server_error"
        self._error(status, message or status.phrase, kind)

    def do_GET(self) -> None:
        self._handle(self._get)

    def do_POST(self) -> None:
        self._handle(self._post)

    def do_OPTIONS(self) -> None:
        self._handle(self._options)

    def do_HEAD(self) -> None:
        self._handle(self._method_not_allowed)

    do_PUT = do_DELETE = do_PATCH = do_HEAD

    def _handle(self, route: Callable[[], None]) -> None:
        try:
            if self.timed_out:  # headers trickled in past the deadline: what arrived may be cut anywhere
                self.close_connection = True
                raise HTTPError(HTTPStatus.REQUEST_TIMEOUT, self._late_headers())
            self._check_host_and_origin()
            route()
        except HTTPError as e:
            self._error(e.status, str(e), e.kind)
            if e.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                self._discard_input()
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as e:
            log.info("%s: connection dropped (%s)", self.address_string(), type(e).__name__)
            self.close_connection = True

    def _late_headers(self) -> str:
        return f"the request line and headers did not arrive within {self.server.limits.header_timeout:g} s"

    def _discard_input(self) -> None:
        """Closing on unread input makes the kernel reset the connection, and a client still sending its body
        would see the reset instead of our answer: read and drop what comes, in small pieces, for a moment."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            until = time.monotonic() + LINGER_S
            while time.monotonic() < until and self.connection.recv(1 << 16):
                pass
        except OSError:
            pass

    def _check_host_and_origin(self) -> None:
        limits, bound = self.server.limits, self.server.bound_host
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1:  # which one a proxy or this check reads would be anyone's guess
            raise BadRequest(f"the request has {len(hosts)} Host headers; send one")
        if not hosts and self.request_version == "HTTP/1.1":
            raise BadRequest("an HTTP/1.1 request needs a Host header")
        if any("\x00" in value for value in self.headers.values()):
            raise BadRequest("a header value holds a NUL byte")
        host = self.headers.get("Host")
        if host is not None and bound is not None:  # None: bound to every address, any name may reach it
            name = _hostname(host)
            allowed = is_loopback(name) if is_loopback(bound) else name in (bound, *LOOPBACK_NAMES)
            if not (allowed or name == bound or any(fnmatch.fnmatchcase(name, h.lower()) for h in limits.allow_hosts)):
                raise HTTPError(HTTPStatus.FORBIDDEN, f"Host {short(host)} is not this server's address; "
                                "allow it with --allow-host", "forbidden")
        origin = self.headers.get("Origin")
        if origin is not None and not self.server.origin_allowed(origin):
            raise HTTPError(HTTPStatus.FORBIDDEN, f"requests from the web page at {short(origin)} are not allowed; "
                            "allow its origin with --allow-origin", "forbidden")

    # -- routes: the protocol (ChatApp) says what to answer, this layer how
    def _get(self) -> None:
        self.server.received(self)
        app = self.server.app
        if self.route in METRICS_PATHS:
            return self._text(HTTPStatus.OK, app.metrics_text(), METRICS_CONTENT_TYPE)
        if self.route in PAGE_PATHS:
            return self._text(HTTPStatus.OK, chat_page(), "text/html; charset=utf-8",
                              {"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff",
                               "Cache-Control": "no-cache"})
        self._json(HTTPStatus.OK, app.get(self.route))

    @property
    def route(self) -> str:
        """The request's path without its query string (routes take no query)."""
        return self.path.split("?", 1)[0]

    def _options(self) -> None:
        """CORS preflight: allowed origins (checked above) may POST JSON."""
        self.server.received(self)
        self.send_response(HTTPStatus.NO_CONTENT)
        self.send_header("Allow", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
        self.send_header("Access-Control-Max-Age", "600")
        self._cors_headers()
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _method_not_allowed(self) -> None:
        self.server.received(self)
        self.close_connection = True
        raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} is not allowed: use GET or POST")

    def _post(self) -> None:
        app = self.server.app
        app.check_post(self.route)
        request = app.parse(self._read_body(), self.route)
        job = app.submit(request)
        next_event = functools.partial(self._next_event, job)
        try:
            if request.stream:
                self._stream(app.stream(request, next_event))
            else:
                self._json(HTTPStatus.OK, app.reply(request, next_event))
        finally:
            job.cancelled.set()  # whatever happened here, the worker has nothing left to deliver to

    def _read_body(self) -> bytes:
        app = self.server.app
        if self.headers.get("Transfer-Encoding"):
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
        declared = self.headers.get("Content-Length")
        if declared is None:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "a JSON body with a Content-Length header is required")
        if not declared.strip().isdigit() or len(declared.strip()) > 12:
            raise BadRequest(f"Content-Length must be a byte count, got {short(declared)}")
        length = int(declared)
        if length == 0:
            raise BadRequest("the request needs a JSON body")
        if length > app.max_body_bytes:
            self.close_connection = True  # the body is never read: the connection cannot be reused
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body has {length} bytes; this server takes at "
                            f"most {app.max_body_bytes} (what a context of {app.max_context} tokens can hold)")
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            body, self.timed_out = b"", True
        if not self.server.received(self) or len(body) < length:
            self.close_connection = True
            if self.timed_out:
                raise HTTPError(HTTPStatus.REQUEST_TIMEOUT, f"the body did not arrive within {self.timeout:g} s")
            raise BadRequest(f"the body ended after {len(body)} of its {length} bytes")
        return body

    def _next_event(self, job: Job) -> tuple[str, object]:
        """The worker's next event; raises ConnectionResetError when the client has hung up (checked every POLL_S,
        also while events keep coming: a non-streamed reply writes nothing that could fail before the end)."""
        while True:
            try:
                event = job.events.get(timeout=POLL_S)
            except queue.Empty:
                event = None
            if (now := time.monotonic()) >= self._next_check:
                self._next_check = now + POLL_S
                if self._client_gone():
                    raise ConnectionResetError("the client closed the connection")
            if event is not None:
                return event

    def _client_gone(self) -> bool:
        # the request was read whole: a readable socket now means EOF (or a reset), i.e. the client hung up
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _stream(self, events: Iterable[str]) -> None:
        """Server-sent events, each written as soon as the protocol yields it."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self._cors_headers()
        self.end_headers()
        self.close_connection = True  # the stream ends when the connection does
        for data in events:
            self.wfile.write(b"data: " + data.encode() + b"\n\n")
            self.wfile.flush()

    def _cors_headers(self) -> None:
        headers = getattr(self, "headers", None)  # unset when the stdlib refuses the request line itself
        if headers is not None and (origin := headers.get("Origin")):  # only allowed origins get this far
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")

    def _text(self, status: HTTPStatus, text: str, content_type: str, headers: dict | None = None) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self._cors_headers()
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == HTTPStatus.TOO_MANY_REQUESTS:
            self.send_header("Retry-After", "1")
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET, POST, OPTIONS")
        if status != HTTPStatus.FORBIDDEN:
            self._cors_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str, kind: str = "invalid_request_error") -> None:
        try:
            self._json(status, error_body(status, message, kind))
        except OSError:  # the client left before its answer
            self.close_connection = True
