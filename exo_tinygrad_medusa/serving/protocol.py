"""What the OpenAI routes share: errors, the validated request, the worker's text pieces, the `stop` matcher and the
checks of request fields (numbers, stop strings, sampling settings, streaming options, log-probabilities, the
response format).

Nothing here knows about sockets or about one route's JSON shapes (openai.py: chat; completions.py: completions).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from http import HTTPStatus

from typing import Callable

from ..decoding.constraints import ResponseFormat
from ..decoding.sampling import MAX_TOP_LOGPROBS, GenerationConfig, TokenLogprob
from ..options import check_seed, effective_temperature

MAX_STOP_STRINGS = 4             # as OpenAI
MAX_STOP_CHARS = 1000
# OpenAI fields that change what the reply means: refused rather than silently ignored unless they ask for nothing
UNSUPPORTED = {
    "tools": lambda v: v in (None, []), "functions": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none"), "function_call": lambda v: v in (None, "none"),
    "logit_bias": lambda v: v in (None, {}), "frequency_penalty": lambda v: v in (None, 0),
    "presence_penalty": lambda v: v in (None, 0),
    "suffix": lambda v: v in (None, ""), "best_of": lambda v: v in (None, 1),
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
    """A validated request of either route: what to generate and how to answer."""
    prompt_ids: list[int]
    config: GenerationConfig
    stream: bool
    stop: tuple[str, ...] = ()
    include_usage: bool = False
    kind: str = "chat"            # "chat" (/v1/chat/completions) or "text" (/v1/completions)
    echo: str = ""                # text put before the completion (completions' `echo`: the prompt)
    sources: bool = False         # stream each piece's Medusa step sources (the `medusa_sources` extension)

    @property
    def logprobs(self) -> int | None:
        return self.config.logprobs


@dataclass
class Piece:
    """Text the worker releases (after `stop` matching), with what the client may have asked to know about it."""
    text: str
    # the released tokens' log-probabilities, each with the offset of its text in the whole reply
    logprobs: list[tuple[TokenLogprob, int]] = field(default_factory=list)
    # how the step(s) behind this text came: [(source, tokens emitted)], source "plain", "heads", "context",
    # "datastore" (a step's bonus token counted with its drafts), when the request asked for them
    sources: list[tuple[str, int]] = field(default_factory=list)


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


def finite_json(body: bytes):
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


def check_text(text: str, where: str) -> None:
    """JSON may escape half a surrogate pair ("\\ud800"): not text, and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{where} holds a lone surrogate (half of a \\ud83d\\ude00 pair): it is not text") from None


def number(data: dict, key: str, integer: bool = False):
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


def stops(value) -> tuple[str, ...]:
    if value is None:
        return ()
    found = [value] if isinstance(value, str) else value
    if not isinstance(found, list) or not all(isinstance(s, str) for s in found):
        raise BadRequest("stop must be a string or a list of strings")
    if len(found) > MAX_STOP_STRINGS:
        raise BadRequest(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(found)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in found):
        raise BadRequest(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
    return tuple(dict.fromkeys(found))


def top_logprobs(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"{key} must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {short(value)}")
    return value


def check_common(data: dict, model_id: str) -> None:
    """The fields both routes check the same way, before any expensive work."""
    model = data.get("model")
    if model is not None and model != model_id:
        raise BadRequest(f"unknown model {short(model)}: this server serves {model_id!r}")
    for key, accepted in UNSUPPORTED.items():
        if not accepted(data.get(key)):
            raise BadRequest(f"{key} is not supported by this server")
    if (n := number(data, "n", integer=True)) not in (None, 1):
        raise BadRequest(f"n must be 1 (one choice per request), got {n}")


def streaming(data: dict) -> tuple[bool, bool, bool]:
    """(stream, include_usage, medusa_sources) from `stream` and `stream_options`."""
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    options = data.get("stream_options")
    if options is None:
        return stream, False, False
    if not stream or not isinstance(options, dict) or any(
            not isinstance(options.get(k, False), bool) for k in ("include_usage", "medusa_sources")):
        raise BadRequest('stream_options must be an object like {"include_usage": true}, with stream true')
    return stream, bool(options.get("include_usage")), bool(options.get("medusa_sources"))


def generation_config(defaults: GenerationConfig, data: dict, logprobs: int | None) -> GenerationConfig:
    """The server's defaults with the request's sampling fields."""
    overrides = {"logprobs": logprobs}
    if (t := number(data, "temperature")) is not None:
        if t < 0:
            raise BadRequest(f"temperature must be >= 0, got {t}")
        overrides["temperature"] = effective_temperature(t)
    if (top_p := number(data, "top_p")) is not None:
        overrides["top_p"] = top_p
    tokens = [v for v in (number(data, "max_completion_tokens", True), number(data, "max_tokens", True))
              if v is not None]
    if tokens:
        if tokens[0] < 1:
            raise BadRequest(f"max_tokens must be >= 1, got {tokens[0]}")
        overrides["max_new_tokens"] = tokens[0]
    try:
        if (seed := number(data, "seed", integer=True)) is not None:
            overrides["seed"] = check_seed(seed)
        return replace(defaults, **overrides)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def response_format(data: dict, stop: tuple[str, ...], vocabulary: Callable[[], object]) -> ResponseFormat | None:
    """The request's `response_format` (None: text), its grammar compiled against the model's vocabulary (`vocabulary`
    builds or returns it): a schema llguidance cannot compile is the client's error, answered before the request
    waits for the model."""
    try:
        fmt = ResponseFormat.from_openai(data.get("response_format"))
        if fmt is not None:
            fmt.check(vocabulary())
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if fmt is not None and stop:
        # a stop string inside the JSON (a key, a value) would cut it before it closes: the reply would not parse
        raise BadRequest("stop cannot be combined with response_format: a stop string could cut the JSON before it "
                         "closes (the reply ends by itself once the JSON is complete)")
    return fmt
