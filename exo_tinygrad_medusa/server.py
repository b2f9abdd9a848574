"""`exo-medusa serve`: an OpenAI-compatible chat completions server, standard library HTTP only.

One worker thread owns the model: it loads it and runs every generation, so tinygrad stays on one thread and the
single KV cache serves one request at a time. HTTP handler threads validate requests, queue them for the worker and
relay its tokens (one server-sent event per Medusa step when streaming). Concurrent clients wait their turn.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from .sampling import GenerationConfig
from .session import Session
from .tokenizer import StreamDecoder

log = logging.getLogger(__name__)
DEFAULT_PORT = 52415
MAX_BODY_BYTES = 16 << 20


class BadRequest(ValueError):
    """The client's fault: answered with HTTP 400 and a JSON error."""


class _Cancelled(Exception):
    """Raised inside generation when the streaming client went away."""


@dataclass
class ChatRequest:
    prompt_ids: list[int]
    config: GenerationConfig
    stream: bool


@dataclass
class Job:
    request: ChatRequest
    events: queue.Queue            # ("tokens", ids) ..., then ("done", GenerationResult) or ("error", message)
    cancelled: threading.Event


class ModelWorker(threading.Thread):
    """Loads the session on its own thread, then runs queued jobs one at a time."""

    def __init__(self, open_session: Callable[[], Session]):
        super().__init__(name="model-worker", daemon=True)
        self.open_session = open_session
        self.jobs: queue.Queue[Job] = queue.Queue()
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
            self._serve(self.jobs.get())

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():
            return

        def on_tokens(ids: list[int]) -> None:
            if job.cancelled.is_set():
                raise _Cancelled
            job.events.put(("tokens", ids))

        try:
            job.events.put(("done", self.session.generator.generate(job.request.prompt_ids, job.request.config,
                                                                    on_tokens)))
        except _Cancelled:
            log.info("client went away: generation stopped")
        except Exception as e:  # a failed generation must not take the worker down
            log.exception("generation failed")
            job.events.put(("error", f"{type(e).__name__}: {e}"))


class ChatApp:
    """Request validation and OpenAI-shaped responses around one ModelWorker."""

    def __init__(self, worker: ModelWorker, defaults: GenerationConfig):
        self.worker, self.defaults = worker, defaults

    @property
    def session(self) -> Session:
        return self.worker.session

    @property
    def model_id(self) -> str:
        return self.session.loaded.resolved.model_id

    def parse(self, body: bytes) -> ChatRequest:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object")
        model = data.get("model")
        if model is not None and model != self.model_id:
            raise BadRequest(f"unknown model {model!r}: this server serves {self.model_id!r}")
        messages = _messages(data.get("messages"))
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false")
        overrides = {}
        for key, field, kind in (("temperature", "temperature", (int, float)), ("top_p", "top_p", (int, float)),
                                 ("max_tokens", "max_new_tokens", int), ("seed", "seed", int),
                                 ("max_completion_tokens", "max_new_tokens", int)):
            value = data.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, kind):
                raise BadRequest(f"{key} must be a {'number' if kind != int else 'integer'}, got {value!r}")
            overrides[field] = value
        if overrides.get("max_new_tokens", 1) < 1:
            raise BadRequest(f"max_tokens must be >= 1, got {overrides['max_new_tokens']}")
        try:
            config = dataclasses.replace(self.defaults, **overrides)
            prompt_ids = self.session.tokenizer.encode_chat(messages)
            self.session.generator.check_prompt(prompt_ids)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        except Exception as e:  # chat templates raise their own errors on messages they refuse
            raise BadRequest(f"cannot apply the chat template: {e}") from None
        return ChatRequest(prompt_ids, config, stream)

    def submit(self, request: ChatRequest) -> Job:
        job = Job(request, queue.Queue(), threading.Event())
        self.worker.jobs.put(job)
        return job

    def text_ids(self, ids: list[int]) -> list[int]:
        eos = self.session.tokenizer.eos_token_ids
        return [t for t in ids if t not in eos]

    def completion(self, completion_id: str, request: ChatRequest, result) -> dict:
        text = self.session.tokenizer.decode(self.text_ids(result.generated_ids), skip_special_tokens=True)
        n_prompt, n_out = len(request.prompt_ids), len(result.generated_ids)
        return {
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": result.finish_reason}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
            "medusa": {"tree": self.session.tree.name, "steps": result.steps,
                       "mean_accepted": round(result.mean_accepted, 3)},
        }

    def chunk(self, completion_id: str, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise BadRequest(f"messages[{i}] must be an object with a role")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: only text parts carry anything we can use
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


class ChatHandler(BaseHTTPRequestHandler):
    server: "ChatServer"
    server_version = "exo-medusa"

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    def do_GET(self) -> None:
        app = self.server.app
        if self.path in ("/healthcheck", "/health"):
            self._json(HTTPStatus.OK, {"status": "ok"})
        elif self.path in ("/v1/models", "/models"):
            self._json(HTTPStatus.OK, {"object": "list", "data": [
                {"id": app.model_id, "object": "model", "created": 0, "owned_by": "exo-tinygrad-medusa"}]})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route GET {self.path}", "not_found")

    def do_POST(self) -> None:
        if self.path not in ("/v1/chat/completions", "/chat/completions"):
            self._error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}", "not_found")
            return
        app = self.server.app
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY_BYTES:
                raise BadRequest(f"the request needs a JSON body of at most {MAX_BODY_BYTES} bytes")
            request = app.parse(self.rfile.read(length))
        except BadRequest as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        job = app.submit(request)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if request.stream:
            self._stream(app, job, completion_id)
            return
        kind, payload = _next_final(job)
        if kind == "error":
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, payload, "server_error")
        else:
            self._json(HTTPStatus.OK, app.completion(completion_id, request, payload))

    def _stream(self, app: ChatApp, job: Job, completion_id: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        decoder = StreamDecoder(app.session.tokenizer, skip_special_tokens=True)
        try:
            self._event(app.chunk(completion_id, {"role": "assistant", "content": ""}))
            while True:
                kind, payload = job.events.get()
                if kind == "tokens":
                    if text := decoder.feed(app.text_ids(payload)):
                        self._event(app.chunk(completion_id, {"content": text}))
                elif kind == "done":
                    if text := decoder.flush():
                        self._event(app.chunk(completion_id, {"content": text}))
                    self._event(app.chunk(completion_id, {}, payload.finish_reason))
                    break
                else:
                    self._event({"error": {"message": payload, "type": "server_error"}})
                    break
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: HTTPStatus, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind, "code": int(status)}})


def _next_final(job: Job) -> tuple[str, object]:
    while True:
        kind, payload = job.events.get()
        if kind != "tokens":
            return kind, payload


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: ChatApp):
        super().__init__(address, ChatHandler)
        self.app = app


def start(open_session: Callable[[], Session], defaults: GenerationConfig, host: str = "127.0.0.1",
          port: int = DEFAULT_PORT) -> ChatServer:
    """Load the model on the worker thread, then bind; the caller runs serve_forever()."""
    worker = ModelWorker(open_session)
    worker.start()
    worker.ready.wait()
    if worker.load_error is not None:
        raise worker.load_error
    try:
        return ChatServer((host, port), ChatApp(worker, defaults))
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_serve(args) -> int:
    from .options import generation_config, session_from_args
    server = start(lambda: session_from_args(args), generation_config(args), args.host, args.port)
    host, port = server.server_address[:2]
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
    p.set_defaults(func=cmd_serve)
