"""The OpenAI protocol: a request body -> a validated ChatRequest (prompt ids and GenerationConfig), and the worker's
events -> JSON or server-sent event payloads; errors as OpenAI reports them. Chat (`/v1/chat/completions`) here,
completions (`/v1/completions`) in completions.py, what both share in protocol.py.

Nothing here knows about sockets: the HTTP layer (http.py) reads bodies and writes what this module returns.

What a request may cost is bounded before any expensive work, each with a JSON error:
- the body must fit what the context can hold (413, enforced by the HTTP layer from `ChatApp.max_body_bytes`), and
  the messages' count and characters too (400), all checked before the chat template is rendered or tokenised;
- OpenAI fields that would change what the reply means and that this server cannot honour are refused (400), not
  silently ignored; a `response_format` whose schema cannot be compiled is refused (400) before the request waits.
Message contents are text: special-token strings in them are tokenised as characters, never as control tokens
(Tokenizer.encode_chat), so a message cannot forge a turn of another role.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from http import HTTPStatus
from typing import Callable, Iterator

from ..decoding.constraints import vocabulary
from ..decoding.sampling import GenerationConfig
from . import completions
from .logprobs import TokenTexts
from .protocol import (BadRequest, ChatRequest, HTTPError, Piece, check_common, check_text, error_body,
                       finite_json, generation_config, response_format, short, stops, streaming, top_logprobs)

MAX_BODY_BYTES = 16 << 20        # ceiling whatever the context: a body is read into memory whole
BODY_SLACK_BYTES = 64 << 10      # room for the JSON around the messages and the other fields
JSON_BYTES_PER_CHAR = 12         # the most one character can take in JSON: a "\ud83d\ude00" surrogate pair
ROLES = ("system", "developer", "user", "assistant")
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
HEALTH_PATHS = ("/healthcheck", "/health")
MODELS_PATHS = ("/v1/models", "/models")
NextEvent = Callable[[], tuple[str, object]]


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


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
        self.texts = TokenTexts(self.session.tokenizer)
        self.metrics = worker.metrics

    def metrics_text(self) -> str:
        waiting, generating = self.worker.jobs.depth()
        return self.metrics.render(waiting, generating)

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
        """Before the body is read: only the chat and completions routes take one."""
        if path not in CHAT_PATHS + completions.PATHS:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no route POST {short(path)}", "not_found")

    # -- request -> ChatRequest
    def parse(self, body: bytes, path: str = CHAT_PATHS[0]) -> ChatRequest:
        data = finite_json(body)
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object")
        check_common(data, self.model_id)
        if path in completions.PATHS:
            return completions.parse(self, data)
        if data.get("logprobs") not in (None, False, True):
            raise BadRequest(f"logprobs must be true or false, got {short(data['logprobs'])}")
        n_top = data.get("top_logprobs")
        if n_top is not None and not data.get("logprobs"):
            raise BadRequest("top_logprobs needs logprobs: true")
        logprobs = (top_logprobs(n_top, "top_logprobs") if n_top is not None else 0) if data.get("logprobs") else None
        messages = self.messages(data.get("messages"))
        stream, include_usage, sources = streaming(data)
        config = generation_config(self.defaults, data, logprobs)
        stop = stops(data.get("stop"))
        config = replace(config, response_format=response_format(data, stop, self.vocabulary))
        try:
            prompt_ids = self.session.tokenizer.encode_chat(messages)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        except Exception as e:  # chat templates raise their own errors on messages they refuse
            raise BadRequest(f"cannot apply the chat template: {e}") from None
        self.check_prompt(prompt_ids)
        return ChatRequest(prompt_ids, config, stream, stop, include_usage, sources=sources)

    def vocabulary(self):
        """The model's vocabulary as llguidance reads it (built on the first request with a response_format)."""
        return vocabulary(self.session.tokenizer)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        try:
            self.session.generator.check_prompt(prompt_ids)
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
            check_text(content, f"messages[{i}].content")
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
    def reply(self, request: ChatRequest, next_event: NextEvent) -> dict:
        """The whole answer once the worker is done; a failed generation is a 500."""
        pieces: list[Piece] = []
        while (event := next_event())[0] == "text":
            pieces.append(event[1])
        kind, payload = event
        if kind == "error":
            raise HTTPError(HTTPStatus.INTERNAL_SERVER_ERROR, payload, "server_error")
        if request.kind == "text":
            return completions.reply(self, request, pieces, payload)
        text = "".join(p.text for p in pieces)
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": payload["finish_reason"]}
        if request.logprobs is not None:
            choice["logprobs"] = self.texts.chat([e for p in pieces for e in p.logprobs])
        return {"id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
                "model": self.model_id, "choices": [choice], "usage": self.usage(request, payload),
                "medusa": self.medusa_stats(payload)}

    def stream(self, request: ChatRequest, next_event: NextEvent) -> Iterator[str]:
        """The server-sent events' data, one JSON chunk per worker event (a Medusa step's text), then [DONE]."""
        if request.kind == "text":
            yield from completions.stream(self, request, next_event)
            return
        completion_id = _completion_id()
        yield json.dumps(self.chunk(completion_id, {"role": "assistant", "content": ""}))
        while True:
            kind, payload = next_event()
            if kind == "text":
                chunk = self.chunk(completion_id, {"content": payload.text})
                if request.logprobs is not None:
                    chunk["choices"][0]["logprobs"] = self.texts.chat(payload.logprobs)
                yield json.dumps(self.with_sources(request, chunk, payload))
            elif kind == "done":
                yield json.dumps(self.chunk(completion_id, {}, payload["finish_reason"]))
                if request.include_usage:
                    yield json.dumps({**self.chunk(completion_id, {}), "choices": [],
                                      "usage": self.usage(request, payload)})
                break
            else:
                yield json.dumps(error_body(HTTPStatus.INTERNAL_SERVER_ERROR, payload, "server_error"))
                break
        yield "[DONE]"

    def medusa_stats(self, done: dict) -> dict:
        return {"tree": self.session.tree.name, "steps": done["steps"], "mean_accepted": done["mean_accepted"]}

    @staticmethod
    def with_sources(request: ChatRequest, chunk: dict, piece: Piece) -> dict:
        """The `medusa_sources` extension, only for clients that asked for it: how this text's steps came."""
        if request.sources:
            chunk["medusa_sources"] = [{"source": s, "tokens": n} for s, n in piece.sources]
        return chunk

    @staticmethod
    def usage(request: ChatRequest, done: dict) -> dict:
        n_prompt, n_out = len(request.prompt_ids), done["completion_tokens"]
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def chunk(self, completion_id: str, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
