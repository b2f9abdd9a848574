"""`exo-medusa serve`: an OpenAI-compatible chat completions server, standard library HTTP only.

One worker thread owns the model: it loads it and runs every generation, so tinygrad stays on one thread and the
single KV cache serves one request at a time. HTTP handler threads validate requests, queue them for the worker and
relay its text (one server-sent event per Medusa step when streaming). The worker decodes the tokens and applies the
`stop` strings itself, so a streamed reply and a non-streamed one are the same text.

Every limit answers with an HTTP status and a JSON error, before any expensive work:
- the body must fit what the context can hold (413), the messages' characters too (400), checked before tokenising;
- at most `queue_size` requests wait while one generates (429), at most `max_connections` connections are open (503);
- a client has `timeout` seconds to send its whole request (408 or the connection is closed) and each write of the
  reply may block that long; a client that hangs up cancels its generation, streamed or not;
- browsers' cross-site requests are refused (403) unless their Origin is allowed, and on a loopback address the
  Host header must name this machine (DNS rebinding).
"""
from __future__ import annotations

import collections
import fnmatch
import ipaddress
import json
import logging
import math
import queue
import select
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

from ..options import check_seed, effective_temperature
from ..decoding.sampling import GenerationConfig
from ..decoding.session import Session
from ..model.tokenizer import StreamDecoder

log = logging.getLogger(__name__)
DEFAULT_PORT = 52415
MAX_BODY_BYTES = 16 << 20        # ceiling whatever the context: a body is read into memory whole
BODY_SLACK_BYTES = 64 << 10      # room for the JSON around the messages and the other fields
JSON_BYTES_PER_CHAR = 12         # the most one character can take in JSON: a "\ud83d\ude00" surrogate pair
MAX_STOP_STRINGS = 4             # as OpenAI
MAX_STOP_CHARS = 1000
ROLES = ("system", "developer", "user", "assistant")
LINGER_S = 2.0                   # how long a refused body is read and dropped before closing
POLL_S = 0.2                     # how often a waiting handler checks that its client is still there
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# OpenAI fields that change what the reply means: refused rather than silently ignored unless they ask for nothing
UNSUPPORTED = {
    "logprobs": lambda v: v in (None, False), "top_logprobs": lambda v: v in (None, 0),
    "tools": lambda v: v in (None, []), "functions": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"), "function_call": lambda v: v in (None, "none"),
    "logit_bias": lambda v: v in (None, {}), "frequency_penalty": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
}


class HTTPError(Exception):
    """The client's fault (or a limit): answered with this status and a JSON error."""

    def __init__(self, status: HTTPStatus, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


class BadRequest(HTTPError):
    def __init__(self, message: str):
        super().__init__(HTTPStatus.BAD_REQUEST, message)


class _Cancelled(Exception):
    """Raised inside generation when the client went away."""


class _StopFound(Exception):
    """Raised inside generation when the text reached one of the request's stop strings."""


@dataclass(frozen=True)
class ServerLimits:
    queue_size: int = 8                # requests that may wait while one generates
    timeout: float = 30.0              # seconds to receive a whole request; and for each blocking write
    max_connections: int = 64
    allow_origins: tuple[str, ...] = ()   # besides this machine's own pages; fnmatch patterns, "*" allows all
    allow_hosts: tuple[str, ...] = ()     # Host names accepted besides the bound address and localhost

    def __post_init__(self):
        if self.queue_size < 0 or self.max_connections < 1 or not self.timeout > 0:
            raise ValueError("--queue-size must be >= 0, --max-connections >= 1 and --timeout > 0")


@dataclass
class ChatRequest:
    prompt_ids: list[int]
    config: GenerationConfig
    stream: bool
    stop: tuple[str, ...] = ()
    include_usage: bool = False


@dataclass
class Job:
    request: ChatRequest
    # ("text", str) ..., then ("done", stats) or ("error", message)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class StopMatcher:
    """Cuts text at the first stop string and holds back any tail that could still become one, so that text once
    released never turns out to be part of a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.pending = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:n])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class JobQueue:
    """The worker's queue with admission control: a job is admitted while fewer than `waiting` others wait
    (the one generating not counted); jobs whose client left are dropped without running."""

    def __init__(self, waiting: int):
        self.waiting, self.jobs, self.busy = waiting, collections.deque(), False
        self.cond = threading.Condition()

    def submit(self, job: Job) -> bool:
        with self.cond:
            self.jobs = collections.deque(j for j in self.jobs if not j.cancelled.is_set())
            if len(self.jobs) + self.busy > self.waiting:
                return False
            self.jobs.append(job)
            self.cond.notify()
            return True

    def take(self) -> Job:
        with self.cond:
            while True:
                while self.jobs:
                    job = self.jobs.popleft()
                    if not job.cancelled.is_set():
                        self.busy = True
                        return job
                self.cond.wait()

    def done(self) -> None:
        with self.cond:
            self.busy = False


class ModelWorker(threading.Thread):
    """Loads the session on its own thread, then runs queued jobs one at a time."""

    def __init__(self, open_session: Callable[[], Session], queue_size: int = ServerLimits.queue_size):
        super().__init__(name="model-worker", daemon=True)
        self.open_session = open_session
        self.jobs = JobQueue(queue_size)
        self.ready = threading.Event()
        self.session: Session | None = None
        self.load_error: BaseException | None = None

    def run(self) -> None:
        try:
            self.session = self.open_session()
        except BaseException as e:  # handed to the main thread, which reports it like any CLI error
            self.load_error = e
            return
        finally:
            self.ready.set()
        while True:
            job = self.jobs.take()
            try:
                self._serve(job)
            finally:
                self.jobs.done()

    def _serve(self, job: Job) -> None:
        tokenizer = self.session.tokenizer
        eos = set(tokenizer.eos_token_ids)
        decoder, stopper = StreamDecoder(tokenizer, skip_special_tokens=True), StopMatcher(job.request.stop)
        counted = {"tokens": 0, "calls": 0}

        def release(text: str) -> bool:
            out, found = stopper.feed(text)
            if out:
                job.events.put(("text", out))
            return found

        def on_tokens(ids: list[int]) -> None:
            if job.cancelled.is_set():
                raise _Cancelled
            counted["tokens"] += len(ids)
            counted["calls"] += 1
            if release(decoder.feed([t for t in ids if t not in eos])):
                raise _StopFound

        try:
            result = self.session.generator.generate(job.request.prompt_ids, job.request.config, on_tokens)
            if release(decoder.flush()):
                finish = "stop"
            else:
                if tail := stopper.flush():
                    job.events.put(("text", tail))
                finish = result.finish_reason
            job.events.put(("done", {"finish_reason": finish, "completion_tokens": len(result.generated_ids),
                                     "steps": result.steps, "mean_accepted": round(result.mean_accepted, 3)}))
        except _StopFound:
            # the first call carries the prefill's token; each later one is a verify step and what it accepted
            steps = counted["calls"] - 1
            job.events.put(("done", {"finish_reason": "stop", "completion_tokens": counted["tokens"], "steps": steps,
                                     "mean_accepted": round((counted["tokens"] - 1) / steps, 3) if steps else 1.0}))
        except _Cancelled:
            log.info("client went away: generation stopped after %d tokens", counted["tokens"])
        except Exception:  # a failed generation must not take the worker down; the log has the traceback
            log.exception("generation failed")
            job.events.put(("error", "generation failed; the server log has the details"))


def _finite_json(body: bytes):
    def refuse(name: str):
        raise BadRequest(f"{name} is not a JSON number: numbers must be finite")
    try:
        return json.loads(body, parse_constant=refuse)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and ints past Python's 4300-digit limit
        raise BadRequest(f"request body is not valid JSON: {e}") from None


def _number(data: dict, key: str, integer: bool = False):
    value = data.get(key)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise BadRequest(f"{key} must be {kind}, got {_short(value)}")
    if not integer:
        try:  # an integer past float range (1e400 written out) would overflow deep inside sampling
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise BadRequest(f"{key} must be finite, got {_short(value)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _stops(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("stop must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise BadRequest(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
    return tuple(dict.fromkeys(stops))


class ChatApp:
    """Request validation and OpenAI-shaped responses around one ModelWorker."""

    def __init__(self, worker: ModelWorker, defaults: GenerationConfig, limits: ServerLimits = ServerLimits()):
        self.worker, self.defaults, self.limits = worker, defaults, limits
        self.max_context = self.session.loaded.model.max_context
        # no token covers more characters than the vocabulary's longest entry (byte-level entries have one character
        # per byte, and a character takes at least one): text beyond context * that cannot fit, whatever it says
        longest = max(map(len, self.session.tokenizer.tok.get_vocab()), default=1)
        self.max_chars = self.max_context * max(longest, 1)
        self.max_body_bytes = min(MAX_BODY_BYTES, self.max_chars * JSON_BYTES_PER_CHAR + BODY_SLACK_BYTES)

    @property
    def session(self) -> Session:
        return self.worker.session

    @property
    def model_id(self) -> str:
        return self.session.loaded.resolved.model_id

    def parse(self, body: bytes) -> ChatRequest:
        data = _finite_json(body)
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object")
        model = data.get("model")
        if model is not None and model != self.model_id:
            raise BadRequest(f"unknown model {_short(model)}: this server serves {self.model_id!r}")
        for key, accepted in UNSUPPORTED.items():
            if not accepted(data.get(key)):
                raise BadRequest(f"{key} is not supported by this server")
        if (n := _number(data, "n", integer=True)) not in (None, 1):
            raise BadRequest(f"n must be 1 (one choice per request), got {n}")
        messages = self.messages(data.get("messages"))
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false")
        stream_options = data.get("stream_options")
        if stream_options is not None and (not stream or not isinstance(stream_options, dict)
                                           or not isinstance(stream_options.get("include_usage", False), bool)):
            raise BadRequest("stream_options must be an object like {\"include_usage\": true}, with stream true")
        overrides = {}
        if (t := _number(data, "temperature")) is not None:
            if t < 0:
                raise BadRequest(f"temperature must be >= 0, got {t}")
            overrides["temperature"] = effective_temperature(t)
        if (top_p := _number(data, "top_p")) is not None:
            overrides["top_p"] = top_p
        tokens = [v for v in (_number(data, "max_completion_tokens", True), _number(data, "max_tokens", True))
                  if v is not None]
        if tokens:
            if tokens[0] < 1:
                raise BadRequest(f"max_tokens must be >= 1, got {tokens[0]}")
            overrides["max_new_tokens"] = tokens[0]
        try:
            if (seed := _number(data, "seed", integer=True)) is not None:
                overrides["seed"] = check_seed(seed)
            config = replace(self.defaults, **overrides)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        stops = _stops(data.get("stop"))
        try:
            prompt_ids = self.session.tokenizer.encode_chat(messages)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        except Exception as e:  # chat templates raise their own errors on messages they refuse
            raise BadRequest(f"cannot apply the chat template: {e}") from None
        try:
            self.session.generator.check_prompt(prompt_ids)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        return ChatRequest(prompt_ids, config, stream, stops, bool((stream_options or {}).get("include_usage")))

    def messages(self, messages) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        out, chars = [], 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest(f"messages[{i}] must be an object with a role")
            if m["role"] not in ROLES:
                raise BadRequest(f"messages[{i}].role {_short(m['role'])} is not supported: use one of {', '.join(ROLES)}")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI's content parts: only text parts carry anything we can use
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise BadRequest(f"messages[{i}].content: only text parts are supported")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")
            chars += len(content)
            if chars > self.max_chars:  # before tokenising: what cannot fit is refused at the cost of a len()
                raise BadRequest(f"the messages hold more than {self.max_chars} characters, more than a context of "
                                 f"{self.max_context} tokens can hold")
            # "developer" is OpenAI's newer name for the system message; chat templates know only "system"
            out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
        return out

    def submit(self, request: ChatRequest) -> Job:
        job = Job(request)
        if not self.worker.jobs.submit(job):
            raise HTTPError(HTTPStatus.TOO_MANY_REQUESTS, f"the server is busy ({self.limits.queue_size} requests "
                            "already wait for the model); retry later", "rate_limit_error")
        return job

    def completion(self, completion_id: str, request: ChatRequest, text: str, done: dict) -> dict:
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": done["finish_reason"]}],
            "usage": self.usage(request, done),
            "medusa": {"tree": self.session.tree.name, "steps": done["steps"], "mean_accepted": done["mean_accepted"]},
        }

    @staticmethod
    def usage(request: ChatRequest, done: dict) -> dict:
        n_prompt, n_out = len(request.prompt_ids), done["completion_tokens"]
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def chunk(self, completion_id: str, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def _hostname(value: str) -> str:
    """The host part of a Host header or of an origin's netloc, lower-cased, without port or IPv6 brackets."""
    try:
        return (urlsplit("//" + value).hostname or "").lower()
    except ValueError:  # a malformed port or bracket
        return ""


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ChatHandler(BaseHTTPRequestHandler):
    server: "ChatServer"
    server_version = "exo-medusa"
    timed_out = False  # set by the server when the request did not arrive in time
    _next_check = 0.0  # when _next_event next looks at the client's socket

    def setup(self) -> None:
        self.timeout = self.server.limits.timeout  # per blocking read or write on this connection
        super().setup()
        self.server.watch(self)

    def finish(self) -> None:
        self.server.unwatch(self)
        try:
            super().finish()
        except OSError:  # the client is gone; nothing left to flush
            pass

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    # -- the stdlib's own errors (bad request line, unknown method, oversized headers) as JSON too
    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True
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
                raise HTTPError(HTTPStatus.REQUEST_TIMEOUT, f"the request did not arrive within {self.timeout:g} s")
            self._check_host_and_origin()
            route()
        except HTTPError as e:
            self._error(e.status, str(e), e.kind)
            if e.status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                self._discard_input()
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as e:
            log.info("%s: connection dropped (%s)", self.address_string(), type(e).__name__)
            self.close_connection = True

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
        host = self.headers.get("Host")
        if host is not None and bound is not None:  # None: bound to every address, any name may reach it
            name = _hostname(host)
            allowed = _is_loopback(name) if _is_loopback(bound) else name in (bound, *LOOPBACK_NAMES)
            if not (allowed or name == bound or any(fnmatch.fnmatchcase(name, h.lower()) for h in limits.allow_hosts)):
                raise HTTPError(HTTPStatus.FORBIDDEN, f"Host {_short(host)} is not this server's address; "
                                "allow it with --allow-host", "forbidden")
        origin = self.headers.get("Origin")
        if origin is not None and not self.server.origin_allowed(origin):
            raise HTTPError(HTTPStatus.FORBIDDEN, f"requests from the web page at {_short(origin)} are not allowed; "
                            "allow its origin with --allow-origin", "forbidden")

    def _get(self) -> None:
        self.server.received(self)
        app = self.server.app
        if self.path in ("/healthcheck", "/health"):
            self._json(HTTPStatus.OK, {"status": "ok"})
        elif self.path in ("/v1/models", "/models"):
            self._json(HTTPStatus.OK, {"object": "list", "data": [
                {"id": app.model_id, "object": "model", "created": 0, "owned_by": "exo-tinygrad-medusa"}]})
        else:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no route GET {_short(self.path)}", "not_found")

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

    def _read_body(self) -> bytes:
        app = self.server.app
        if self.headers.get("Transfer-Encoding"):
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
        declared = self.headers.get("Content-Length")
        if declared is None:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "a JSON body with a Content-Length header is required")
        if not declared.strip().isdigit() or len(declared.strip()) > 12:
            raise BadRequest(f"Content-Length must be a byte count, got {_short(declared)}")
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

    def _post(self) -> None:
        if self.path not in ("/v1/chat/completions", "/chat/completions"):
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no route POST {_short(self.path)}", "not_found")
        app = self.server.app
        request = app.parse(self._read_body())
        job = app.submit(request)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        try:
            if request.stream:
                self._stream(app, request, job, completion_id)
                return
            pieces = []
            while (event := self._next_event(job))[0] == "text":
                pieces.append(event[1])
            kind, payload = event
            if kind == "error":
                raise HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, payload, "server_error")
            self._json(HTTPStatus.OK, app.completion(completion_id, request, "".join(pieces), payload))
        finally:
            job.cancelled.set()  # whatever happened here, the worker has nothing left to deliver to

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

    def _stream(self, app: ChatApp, request: ChatRequest, job: Job, completion_id: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self._cors_headers()
        self.end_headers()
        self.close_connection = True  # the stream ends when the connection does
        self._event(app.chunk(completion_id, {"role": "assistant", "content": ""}))
        while True:
            kind, payload = self._next_event(job)
            if kind == "text":
                self._event(app.chunk(completion_id, {"content": payload}))
            elif kind == "done":
                self._event(app.chunk(completion_id, {}, payload["finish_reason"]))
                if request.include_usage:
                    self._event({**app.chunk(completion_id, {}), "choices": [], "usage": app.usage(request, payload)})
                break
            else:
                self._event({"error": {"message": payload, "type": "server_error", "code": 500}})
                break
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def _cors_headers(self) -> None:
        headers = getattr(self, "headers", None)  # unset when the stdlib refuses the request line itself
        if headers is not None and (origin := headers.get("Origin")):  # only allowed origins get this far
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")

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
            self._json(status, {"error": {"message": message, "type": kind, "code": int(status)}})
        except OSError:  # the client left before its answer
            self.close_connection = True


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], app: ChatApp):
        self.app, self.limits = app, app.limits
        self.slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._deadlines: dict[ChatHandler, float] = {}
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
        return bool(name) and (_is_loopback(name) or name == self.bound_host)

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()

    # -- bounded connections: beyond max_connections a connection gets 503 at once instead of a thread
    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                body = json.dumps({"error": {"message": "too many connections; retry later", "type": "server_error",
                                             "code": 503}}).encode()
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
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    # -- a whole request (headers and body) must arrive within limits.timeout, however slowly it trickles in
    def watch(self, handler: ChatHandler) -> None:
        with self._lock:
            self._deadlines[handler] = time.monotonic() + self.limits.timeout

    def received(self, handler: ChatHandler) -> bool:
        """The handler has its whole request; False when its deadline passed first (it is being cut off)."""
        with self._lock:
            return self._deadlines.pop(handler, None) is not None

    def unwatch(self, handler: ChatHandler) -> None:
        with self._lock:
            self._deadlines.pop(handler, None)

    def _reap(self) -> None:
        while not self._closed.wait(min(1.0, self.limits.timeout / 4)):
            now = time.monotonic()
            with self._lock:  # flagged under the lock: received() then knows the reaper got there first
                late = [h for h, deadline in self._deadlines.items() if deadline < now]
                for h in late:
                    del self._deadlines[h]
                    h.timed_out = True
            for h in late:
                log.info("%s: request not received in %.0f s", h.client_address[0], self.limits.timeout)
                try:  # a blocked read returns at once with what it has; the answer can still be written
                    h.connection.shutdown(socket.SHUT_RD)
                except OSError:
                    pass


def start(open_session: Callable[[], Session], defaults: GenerationConfig, host: str = "127.0.0.1",
          port: int = DEFAULT_PORT, limits: ServerLimits = ServerLimits()) -> ChatServer:
    """Load the model on the worker thread, then bind; the caller runs serve_forever()."""
    worker = ModelWorker(open_session, limits.queue_size)
    worker.start()
    worker.ready.wait()
    if worker.load_error is not None:
        raise worker.load_error
    try:
        return ChatServer((host, port), ChatApp(worker, defaults, limits))
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_serve(args) -> int:
    from ..options import generation_config, session_from_args
    limits = ServerLimits(args.queue_size, args.timeout, args.max_connections, tuple(args.allow_origin),
                          tuple(args.allow_host))
    server = start(lambda: session_from_args(args), generation_config(args), args.host, args.port, limits)
    host, port = server.server_address[:2]
    # kernels compile and steps are captured on first use: without this the first reply looks like a hang
    print("exo-medusa: the first request compiles kernels and captures steps (30-60 s on a first run; cached after)", file=sys.stderr)
    print(f"exo-medusa: serving {server.app.model_id} at http://{host}:{port}/v1/chat/completions", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a clean exit lets tinygrad release its semaphores
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def register(subparsers, model_args, generation_args) -> None:
    p = subparsers.add_parser("serve", parents=[model_args(), generation_args()],
                              help="OpenAI-compatible chat completions server (POST /v1/chat/completions)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--queue-size", type=int, default=ServerLimits.queue_size,
                   help="requests that may wait while one generates; more get HTTP 429 (default %(default)s)")
    p.add_argument("--timeout", type=float, default=ServerLimits.timeout,
                   help="seconds a client has to send its whole request, and for each write of the reply "
                        "(default %(default)s)")
    p.add_argument("--max-connections", type=int, default=ServerLimits.max_connections,
                   help="open connections at once; more get HTTP 503 (default %(default)s)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://app.example; * and ? patterns; '*' for any) call "
                        "the server; pages on this machine are always allowed, others get HTTP 403. Repeatable")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="accept requests whose Host header is NAME (besides the bound address and localhost). "
                        "Repeatable")
    p.set_defaults(func=cmd_serve)
