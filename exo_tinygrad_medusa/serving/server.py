"""`exo-medusa serve`: an OpenAI-compatible server (chat completions, completions, a chat page, metrics), standard
library HTTP only.

Its parts, each with the guarantees it keeps:
- worker.py: one worker thread owns the model and runs every generation, one at a time, behind a bounded queue;
  it applies the `stop` strings itself, so a streamed reply and a non-streamed one are the same text;
- openai.py, completions.py, protocol.py, logprobs.py: the protocol: a request body -> validated prompt ids and
  GenerationConfig, events -> OpenAI JSON;
- http.py and listener.py: connections, limits, timeouts, origins and Host checks, each answered with an HTTP
  status and a JSON error before any expensive work; metrics.py counts what they and the worker do.
This module starts them (`start`, `exo-medusa serve`) and keeps the names that callers import from it.
"""
from __future__ import annotations

import logging
import signal
import sys
from typing import Callable

from ..decoding.sampling import GenerationConfig
from ..decoding.session import Session
from .http import ChatHandler, ServerLimits
from .listener import ChatServer
from .openai import ChatApp
from .protocol import BadRequest, ChatRequest, HTTPError, StopMatcher
from .worker import Job, JobQueue, ModelWorker

__all__ = ["DEFAULT_PORT", "BadRequest", "ChatApp", "ChatHandler", "ChatRequest", "ChatServer", "HTTPError", "Job",
           "JobQueue", "ModelWorker", "ServerLimits", "StopMatcher", "cmd_serve", "register", "start"]
DEFAULT_PORT = 52415


def start(open_session: Callable[[], Session], defaults: GenerationConfig, host: str = "127.0.0.1",
          port: int = DEFAULT_PORT, limits: ServerLimits = ServerLimits()) -> ChatServer:
    """Load the model on the worker thread, then bind; the caller runs serve_forever()."""
    worker = ModelWorker(open_session, limits.queue_size)
    worker.start()
    worker.ready.wait()
    if worker.load_error is not None:
        raise worker.load_error
    try:
        return ChatServer((host, port), ChatApp(worker, defaults), limits)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_serve(args) -> int:
    from ..options import generation_config, session_from_args
    # operators see one line per generation (tokens, time, tokens a step, how it ended) and warnings for refusals
    # without --verbose
    logging.getLogger(ModelWorker.__module__).setLevel(logging.INFO)
    limits = ServerLimits(args.queue_size, args.timeout, args.max_connections, tuple(args.allow_origin),
                          tuple(args.allow_host), args.header_timeout, args.max_client_connections)
    server = start(lambda: session_from_args(args), generation_config(args), args.host, args.port, limits)
    host, port = server.server_address[:2]
    # kernels compile and steps are captured on first use: without this the first reply looks like a hang
    print("exo-medusa: the first request compiles kernels and captures steps (30-60 s on a first run; cached after)", file=sys.stderr)
    print(f"exo-medusa: serving {server.app.model_id} at http://{host}:{port}/v1/chat/completions", flush=True)
    print(f"exo-medusa: chat page at http://{host}:{port}/, metrics at /metrics", file=sys.stderr)
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
                              help="OpenAI-compatible server: POST /v1/chat/completions and /v1/completions, "
                                   "a chat page at /")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--queue-size", type=int, default=ServerLimits.queue_size,
                   help="requests that may wait while one generates; more get HTTP 429 (default %(default)s)")
    p.add_argument("--timeout", type=float, default=ServerLimits.timeout,
                   help="seconds a client has to send its body once its headers are in, and for each write of the "
                        "reply (default %(default)s)")
    p.add_argument("--header-timeout", type=float, default=ServerLimits.header_timeout,
                   help="seconds a client has to send its request line and headers; also how long an idle "
                        "kept-alive connection stays open (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=ServerLimits.max_connections,
                   help="open connections at once; more get HTTP 503 (default %(default)s)")
    p.add_argument("--max-client-connections", type=int, default=ServerLimits.max_client_connections,
                   help="open connections from one address; more get HTTP 503 (default %(default)s)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://app.example; * and ? patterns; '*' for any) call "
                        "the server; pages on this machine are always allowed, others get HTTP 403. Repeatable")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="accept requests whose Host header is NAME (besides the bound address and localhost). "
                        "Repeatable")
    p.set_defaults(func=cmd_serve)
