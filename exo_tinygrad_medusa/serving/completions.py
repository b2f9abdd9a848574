"""The completions route (`/v1/completions`): a raw prompt, no chat template, answered as `text_completion`.

The prompt is one string (tokenised with the model's special tokens read as such: the client writes the whole
prompt, template included if it wants one) or one list of token ids. `echo` puts the prompt before the completion;
`logprobs` (0 to 20 alternatives) gives the completion's tokens' log-probabilities in the route's older shape.
`response_format` (an extension of this route, as some servers offer) constrains the completion as in chat.
Limits and errors are the chat route's (protocol.py): the same fields refused, the same bounds before tokenising.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from http import HTTPStatus
from typing import Callable, Iterator

from .protocol import (BadRequest, ChatRequest, Piece, check_text, error_body, generation_config, response_format,
                       short, stops, streaming, top_logprobs)

PATHS = ("/v1/completions", "/completions")


def _prompt(app, value) -> tuple[list[int], str]:
    """(prompt ids, the prompt as text) from a string, a list of ids, or a one-element list of either."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise BadRequest("prompt must not be empty")
        if len(value) > app.max_chars:  # before tokenising: what cannot fit is refused at the cost of a len()
            raise BadRequest(f"the prompt holds more than {app.max_chars} characters, more than a context of "
                             f"{app.max_context} tokens can hold")
        check_text(value, "prompt")
        return app.session.tokenizer.encode(value, add_special_tokens=True), value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        app.check_prompt(value)  # its length and id range, before anything is decoded
        return list(value), app.session.tokenizer.decode(value)
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        raise BadRequest(f"prompt holds {len(value)} prompts; this server answers one per request")
    raise BadRequest(f"prompt must be a string or a list of token ids, got {short(value)}")


def parse(app, data: dict) -> ChatRequest:
    echo = data.get("echo", False)
    if not isinstance(echo, bool):
        raise BadRequest("echo must be true or false")
    logprobs = data.get("logprobs")
    if logprobs is not None:
        logprobs = top_logprobs(logprobs, "logprobs")
        if echo:
            raise BadRequest("echo with logprobs is not supported: the prompt's log-probabilities are not computed")
    stream, include_usage, sources = streaming(data)
    config = generation_config(app.defaults, data, logprobs)
    stop = stops(data.get("stop"))
    fmt = response_format(data, stop, app.vocabulary)
    if fmt is not None and echo:
        raise BadRequest("echo cannot be combined with response_format: the prompt before the JSON would not parse")
    config = replace(config, response_format=fmt)
    prompt_ids, prompt_text = _prompt(app, data.get("prompt"))
    app.check_prompt(prompt_ids)
    return ChatRequest(prompt_ids, config, stream, stop, include_usage, kind="text", echo=prompt_text if echo else "",
                       sources=sources)


def _choice(app, request: ChatRequest, text: str, pieces: list[Piece], finish: str | None) -> dict:
    entries = [e for p in pieces for e in p.logprobs]
    logprobs = app.texts.legacy(entries, len(request.echo)) if request.logprobs is not None else None
    return {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}


def _body(app, completion_id: str, choices: list[dict]) -> dict:
    return {"id": completion_id, "object": "text_completion", "created": int(time.time()), "model": app.model_id,
            "choices": choices}


def reply(app, request: ChatRequest, pieces: list[Piece], done: dict) -> dict:
    text = request.echo + "".join(p.text for p in pieces)
    return {**_body(app, f"cmpl-{uuid.uuid4().hex[:24]}", [_choice(app, request, text, pieces, done["finish_reason"])]),
            "usage": app.usage(request, done), "medusa": app.medusa_stats(done)}


def stream(app, request: ChatRequest, next_event: Callable[[], tuple[str, object]]) -> Iterator[str]:
    completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
    if request.echo:
        yield json.dumps(_body(app, completion_id, [_choice(app, request, request.echo, [], None)]))
    while True:
        kind, payload = next_event()
        if kind == "text":
            chunk = _body(app, completion_id, [_choice(app, request, payload.text, [payload], None)])
            yield json.dumps(app.with_sources(request, chunk, payload))
        elif kind == "done":
            yield json.dumps(_body(app, completion_id, [_choice(app, request, "", [], payload["finish_reason"])]))
            if request.include_usage:
                yield json.dumps({**_body(app, completion_id, []), "usage": app.usage(request, payload)})
            break
        else:
            yield json.dumps(error_body(HTTPStatus.INTERNAL_SERVER_ERROR, payload, "server_error"))
            break
    yield "[DONE]"
