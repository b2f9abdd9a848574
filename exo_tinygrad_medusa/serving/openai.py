"""The OpenAI chat completions protocol: a request body -> a validated ChatRequest (prompt ids and GenerationConfig),
and the worker's events -> `chat.completion` JSON or `chat.completion.chunk` payloads; errors as OpenAI reports them.

Nothing here knows about sockets: the HTTP layer (http.py) reads bodies and writes what this module returns.

What a request may cost is bounded before any expensive work, each with a JSON error:
- the body must fit what the context can hold (413, enforced by the HTTP layer from `ChatApp.max_body_bytes`), and
  the messages' count and characters too (400), all checked before the chat template is rendered or tokenised;
- OpenAI fields that would change what the reply means and that this server cannot honour are refused (400), not
  silently ignored.
Message contents are text: special-token strings in them are tokenised as characters, never as control tokens
(Tokenizer.encode_chat), so a message cannot forge a turn of another role.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Callable, Iterator

from ..options import check_seed, effective_temperature
from ..decoding.sampling import GenerationConfig

MAX_BODY_BYTES = 16 << 20        # ceiling whatever the context: a body is read into memory whole
BODY_SLACK_BYTES = 64 << 10      # room for the JSON around the messages and the other fields
JSON_BYTES_PER_CHAR = 12         # the most one character can take in JSON: a "\ud83d\ude00" surrogate pair
MAX_STOP_STRINGS = 4             # as OpenAI
MAX_STOP_CHARS = 1000
ROLES = ("system", "developer", "user", "assistant")
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
HEALTH_PATHS = ("/healthcheck", "/health")
MODELS_PATHS = ("/v1/models", "/models")
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


def error_body(status: HTTPStatus, message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "code": int(status)}}


def short(value) -> str:
    """A value quoted in an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class ChatRequest:
    prompt_ids: list[int]
    config: GenerationConfig
    stream: bool
    stop: tuple[str, ...] = ()
    include_usage: bool = False


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


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


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
        raise BadRequest(f"{key} must be {kind}, got {short(value)}")
    if not integer:
        try:  # an integer past float range (1e400 written out) would overflow deep inside sampling
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise BadRequest(f"{key} must be finite, got {short(value)}")
    return value


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
    """Request validation and OpenAI-shaped responses around one ModelWorker (worker.py)."""

    def __init__(self, worker, defaults: GenerationConfig):
        self.worker, self.defaults = worker, defaults
        self.max_context = self.session.loaded.model.max_context
        # no token covers more characters than the vocabulary's longest entry (byte-level entries have one character
        # per byte, and a character takes at least one): text beyond context * that cannot fit, whatever it says
        longest = max(map(len, self.session.tokenizer.tok.get_vocab()), default=1)
        self.max_chars = self.max_context * max(longest, 1)
        self.max_body_bytes = min(MAX_BODY_BYTES, self.max_chars * JSON_BYTES_PER_CHAR + BODY_SLACK_BYTES)

    @property
    def session(self):
        return self.worker.session

    @property
    def model_id(self) -> str:
        return self.session.loaded.resolved.model_id

    # -- routes
    def get(self, path: str) -> dict:
        """The JSON answer to GET `path`."""
        if path in HEALTH_PATHS:
            return {"status": "ok"}
        if path in MODELS_PATHS:
            return {"object": "list", "data": [
                {"id": self.model_id, "object": "model", "created": 0, "owned_by": "exo-tinygrad-medusa"}]}
        raise HTTPError(HTTPStatus.NOT_FOUND, f"no route GET {short(path)}", "not_found")

    @staticmethod
    def check_post(path: str) -> None:
        """Before the body is read: only the chat route takes one."""
        if path not in CHAT_PATHS:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no route POST {short(path)}", "not_found")

    # -- request -> ChatRequest
    def parse(self, body: bytes) -> ChatRequest:
        data = _finite_json(body)
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object")
        model = data.get("model")
        if model is not None and model != self.model_id:
            raise BadRequest(f"unknown model {short(model)}: this server serves {self.model_id!r}")
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
        config = self.config(data)
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

    def config(self, data: dict) -> GenerationConfig:
        """The server's defaults with the request's sampling fields."""
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
            return replace(self.defaults, **overrides)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def messages(self, messages) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages must be a non-empty list")
        # each message costs at least one token and one must be left to generate: counted before anything is
        # rendered, so that a body of many empty messages costs a len(), not a template render and a tokenisation
        if len(messages) >= self.max_context:
            raise BadRequest(f"the request has {len(messages)} messages; a context of {self.max_context} tokens holds "
                             f"at most {self.max_context - 1} (each message takes at least one token)")
        out, chars = [], 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest(f"messages[{i}] must be an object with a role")
            if m["role"] not in ROLES:
                raise BadRequest(f"messages[{i}].role {short(m['role'])} is not supported: use one of {', '.join(ROLES)}")
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

    def submit(self, request: ChatRequest):
        """Queue the request for the model: its Job, or 429 when the queue is full."""
        job = self.worker.submit(request)
        if job is None:
            raise HTTPError(HTTPStatus.TOO_MANY_REQUESTS, f"the server is busy ({self.worker.jobs.waiting} requests "
                            "already wait for the model); retry later", "rate_limit_error")
        return job

    # -- worker events -> responses
    def reply(self, request: ChatRequest, next_event: Callable[[], tuple[str, object]]) -> dict:
        """The whole `chat.completion` once the worker is done; a failed generation is a 500."""
        completion_id, pieces = _completion_id(), []
        while (event := next_event())[0] == "text":
            pieces.append(event[1])
        kind, payload = event
        if kind == "error":
            raise HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, payload, "server_error")
        return self.completion(completion_id, request, "".join(pieces), payload)

    def stream(self, request: ChatRequest, next_event: Callable[[], tuple[str, object]]) -> Iterator[str]:
        """The server-sent events' data, one JSON chunk per worker event (a Medusa step's text), then [DONE]."""
        completion_id = _completion_id()
        yield json.dumps(self.chunk(completion_id, {"role": "assistant", "content": ""}))
        while True:
            kind, payload = next_event()
            if kind == "text":
                yield json.dumps(self.chunk(completion_id, {"content": payload}))
            elif kind == "done":
                yield json.dumps(self.chunk(completion_id, {}, payload["finish_reason"]))
                if request.include_usage:
                    yield json.dumps({**self.chunk(completion_id, {}), "choices": [],
                                      "usage": self.usage(request, payload)})
                break
            else:
                yield json.dumps({"error": {"message": payload, "type": "server_error", "code": 500}})
                break
        yield "[DONE]"

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
