"""The listening side of `exo-medusa serve`: bounded connections (in all, and per client address), the deadlines of
a request's headers and body, and which web pages' origins may call. Each connection runs a ChatHandler (http.py)
on its own thread.
"""
from __future__ import annotations

import fnmatch
import ipaddress
import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from urllib.parse import urlsplit

from .http import ChatHandler, ServerLimits, is_loopback
from .openai import ChatApp
from .protocol import error_body

log = logging.getLogger(__name__)


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], app: ChatApp, limits: ServerLimits = ServerLimits()):
        self.app, self.limits = app, limits
        self.slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._deadlines: dict[ChatHandler, float] = {}
        self._per_client: dict[str, int] = {}    # open connections by client address
        self._lock, self._closed = threading.Lock(), threading.Event()
        super().__init__(address, ChatHandler)
        host = self.server_address[0]
        self.bound_host = None if ipaddress.ip_address(host).is_unspecified else host.lower()
        threading.Thread(target=self._reap, name="request-deadlines", daemon=True).start()

    def origin_allowed(self, origin: str) -> bool:
        if any(fnmatch.fnmatchcase(origin, pattern) for pattern in self.limits.allow_origins):
            return True
        parts = urlsplit(origin) if origin.startswith(("http://", "https://")) else None
        try:
            name = (parts.hostname or "").lower() if parts else ""
        except ValueError:
            return False
        # this machine's own pages (any port): the same trust as a local process
        return bool(name) and (is_loopback(name) or name == self.bound_host)

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    # -- bounded connections: beyond the caps a connection gets 503 at once instead of a thread
    def process_request(self, request, client_address) -> None:
        client = client_address[0]
        if not self.slots.acquire(blocking=False):
            return self._refuse(request, "too many connections; retry later")
        with self._lock:
            if self._per_client.get(client, 0) >= self.limits.max_client_connections:
                refused = True
            else:
                refused, self._per_client[client] = False, self._per_client.get(client, 0) + 1
        if refused:
            self.slots.release()
            log.warning("%s: refused a connection: %d already open from this address", client,
                        self.limits.max_client_connections)
            return self._refuse(request, f"too many connections from {client}; retry later")
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(client)
            raise

    def _refuse(self, request, message: str) -> None:
        self.app.metrics.request("", HTTPStatus.SERVICE_UNAVAILABLE)
        try:
            body = json.dumps(error_body(HTTPStatus.SERVICE_UNAVAILABLE, message, "server_error")).encode()
            request.settimeout(1.0)
            request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            # closing with unread bytes makes the kernel send a reset, which can beat the 503 to the client:
            # drop what has already arrived (without waiting: this runs on the accepting thread)
            while request.recv(1 << 16, socket.MSG_DONTWAIT):
                pass
        except OSError:  # BlockingIOError once nothing more is waiting, or the client is gone
            pass
        self.shutdown_request(request)

    def _release(self, client: str) -> None:
        with self._lock:
            if (left := self._per_client.get(client, 0) - 1) > 0:
                self._per_client[client] = left
            else:
                self._per_client.pop(client, None)
        self.slots.release()

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address[0])

    # -- the request line and headers must arrive within limits.header_timeout, the body then within limits.timeout,
    # however slowly they trickle in
    def watch(self, handler: ChatHandler) -> None:
        with self._lock:
            self._deadlines[handler] = time.monotonic() + self.limits.header_timeout

    def headers_received(self, handler: ChatHandler) -> None:
        with self._lock:
            if handler in self._deadlines:  # else the reaper got there first: the request is being cut off
                self._deadlines[handler] = time.monotonic() + self.limits.timeout

    def received(self, handler: ChatHandler) -> bool:
        """The handler has its whole request; False when its deadline passed first (it is being cut off)."""
        with self._lock:
            return self._deadlines.pop(handler, None) is not None

    def unwatch(self, handler: ChatHandler) -> None:
        with self._lock:
            self._deadlines.pop(handler, None)

    def _reap(self) -> None:
        while not self._closed.wait(min(1.0, self.limits.timeout / 4, self.limits.header_timeout / 4)):
            now = time.monotonic()
            with self._lock:  # flagged under the lock: received() then knows the reaper got there first
                late = [h for h, deadline in self._deadlines.items() if deadline < now]
                for h in late:
                    del self._deadlines[h]
                    h.timed_out = True
            for h in late:
                log.info("%s: request not received in time (or an idle kept-alive connection): closing it",
                         h.client_address[0])
                try:  # a blocked read returns at once with what it has; the answer can still be written
                    h.connection.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
