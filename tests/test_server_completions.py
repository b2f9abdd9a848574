"""`/v1/completions` and log-probabilities on both routes, in process around the scripted generator: the response
shapes, `echo`, token-id prompts, `stop` with log-probabilities (none past the cut, each chunk's tokens spelling its
text), the `medusa_sources` stream extension, and the errors."""
from __future__ import annotations

import json
import urllib.request

import pytest

# the fixtures (gen, make_server, scripted, scripted_session, server) are imported by name: pytest finds them here
from helpers_server import (TIMEOUT_S, byte_tokens, call, gen, make_server, scripted, scripted_chat, scripted_session,
                            scripted_stream, text_of)


def complete(port: int, **body):
    return call({"url": f"http://127.0.0.1:{port}"}, "/v1/completions", body)


def complete_stream(port: int, **body) -> list[dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                     data=json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        lines = [line.decode().strip() for line in response if line.strip()]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_a_completion_continues_the_raw_prompt(scripted, scripted_session, gen):
    _, port = scripted
    status, response = complete(port, prompt="Once upon", max_tokens=5)
    assert status == 200 and response["object"] == "text_completion" and response["id"].startswith("cmpl-")
    assert response["choices"] == [{"text": "Hello", "index": 0, "logprobs": None, "finish_reason": "length"}]
    prompt_ids = scripted_session.tokenizer.encode("Once upon", add_special_tokens=True)
    assert gen.prompts == [prompt_ids]  # no chat template around it
    assert response["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 5,
                                 "total_tokens": len(prompt_ids) + 5}
    assert gen.configs[0].max_new_tokens == 5


def test_token_prompts_and_echo(scripted, gen):
    _, port = scripted
    ids = byte_tokens("Say")
    status, response = complete(port, prompt=ids, echo=True)
    assert status == 200 and response["choices"][0]["text"] == "SayHello" and gen.prompts == [ids]
    gen.reset(["Hel", "lo"])
    events = complete_stream(port, prompt=[ids], echo=True, stream_options={"include_usage": True})
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["Say", "Hel", "lo", ""]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, None, "length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    assert len({e["id"] for e in events}) == 1 and all(e["object"] == "text_completion" for e in events)


@pytest.mark.parametrize("chunks, stop, text", [
    (["Hello wor", "ld! Bye"], ["world"], "Hello "),    # the stop string spans two steps: its tokens never show
    (["ab", "cd", "ef"], None, "abcdef"),
    (["abc", "de"], "cd", "ab"),                        # cut inside a step
], ids=["split-stop", "no-stop", "inside"])
def test_completion_logprobs_stop_where_the_text_stops(scripted, gen, chunks, stop, text):
    _, port = scripted
    gen.reset(chunks)
    status, response = complete(port, prompt="x", logprobs=2, stop=stop)
    assert status == 200 and response["choices"][0]["text"] == text
    logprobs = response["choices"][0]["logprobs"]
    assert logprobs["tokens"] == list(text)  # one byte token per character here
    assert logprobs["token_logprobs"] == pytest.approx([-i / 10 for i in range(len(text))])
    assert logprobs["text_offset"] == list(range(len(text)))
    assert all(len(top) == 1 for top in logprobs["top_logprobs"])  # the scripted alternatives repeat one token
    gen.reset(chunks)
    events = complete_stream(port, prompt="x", logprobs=2, stop=stop)
    for e in events[:-1]:  # each chunk's tokens spell its text
        assert "".join(e["choices"][0]["logprobs"]["tokens"]) == e["choices"][0]["text"]
    assert "".join(e["choices"][0]["text"] for e in events) == text


def test_chat_logprobs_streamed_and_not(scripted, gen):
    _, port = scripted
    gen.reset(["Hel", "lo"])
    status, response = scripted_chat(port, logprobs=True, top_logprobs=3)
    content = response["choices"][0]["logprobs"]["content"]
    assert status == 200 and [c["token"] for c in content] == list("Hello") == list(text_of(response))
    assert content[1] == {"token": "e", "logprob": pytest.approx(-0.1), "bytes": [ord("e")],
                          "top_logprobs": [{"token": "e", "logprob": 0.0, "bytes": [ord("e")]}] * 3}
    assert gen.configs[-1].logprobs == 3
    gen.reset(["Hel", "lo"])
    events = scripted_stream(port, logprobs=True)
    pieces = [e["choices"][0] for e in events[1:-1]]
    assert [[c["token"] for c in p["logprobs"]["content"]] for p in pieces] == [list("Hel"), list("lo")]
    assert all(c["top_logprobs"] == [] for p in pieces for c in p["logprobs"]["content"])
    gen.reset(["Hel", "lo"])
    _, plain = scripted_chat(port)
    assert "logprobs" not in plain["choices"][0] and gen.configs[-1].logprobs is None


def test_step_sources_are_streamed_only_when_asked(scripted, gen):
    _, port = scripted
    gen.reset(["He", "llo", "!"])  # the scripted steps: the prefill's, then heads, context
    events = scripted_stream(port, stream_options={"medusa_sources": True})
    assert [e["medusa_sources"] for e in events[1:-1]] == [
        [{"source": "prefill", "tokens": 2}], [{"source": "heads", "tokens": 3}], [{"source": "context", "tokens": 1}]]
    assert "medusa_sources" not in events[0] and "medusa_sources" not in events[-1]
    gen.reset(["He", "llo", "!"])
    assert all("medusa_sources" not in e for e in scripted_stream(port))
    gen.reset(["He", "llo"])
    events = complete_stream(port, prompt="x", stream_options={"medusa_sources": True})
    assert [e.get("medusa_sources") for e in events] == [[{"source": "prefill", "tokens": 2}],
                                                          [{"source": "heads", "tokens": 3}], None]


@pytest.mark.parametrize("body, message", [
    ({}, "prompt must be a string or a list of token ids, got None"),
    ({"prompt": ""}, "prompt must not be empty"),
    ({"prompt": ["a", "b"]}, "prompt holds 2 prompts; this server answers one per request"),
    ({"prompt": [1, True]}, "prompt must be a string or a list of token ids"),
    ({"prompt": [5] * 64}, "the prompt has 64 tokens but the context holds 64"),
    ({"prompt": "x" * 200}, "the context holds 64"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs must be an integer from 0 to 20, got 21"),
    ({"prompt": "hi", "logprobs": True}, "logprobs must be an integer from 0 to 20, got True"),
    ({"prompt": "hi", "logprobs": 1, "echo": True}, "echo with logprobs is not supported"),
    ({"prompt": "hi", "echo": "yes"}, "echo must be true or false"),
    ({"prompt": "hi", "best_of": 3}, "best_of is not supported"),
    ({"prompt": "hi", "suffix": "end"}, "suffix is not supported"),
    ({"prompt": "hi", "n": 2}, "n must be 1"),
    ({"prompt": "hi", "model": "gpt-3.5-turbo-instruct"}, "unknown model 'gpt-3.5-turbo-instruct'"),
    ({"prompt": "hi", "stop": ["a"] * 5}, "stop takes at most 4 strings, got 5"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens must be >= 1, got 0"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "with stream true"),
], ids=["no-prompt", "empty", "two-prompts", "bool-token", "too-many-tokens", "too-long-text",
        "logprobs-21", "logprobs-bool", "echo-logprobs", "echo-type", "best-of", "suffix", "n", "model", "five-stops",
        "max-tokens", "stream-options"])
def test_bad_completion_requests_get_400(scripted, gen, body, message):
    srv, port = scripted
    status, error = complete(port, **body)
    assert status == 400 and message in error["error"]["message"], error
    assert gen.configs == []
    status, error = complete(port, prompt="x" * (srv.app.max_chars + 1))  # bounded before tokenising
    assert status == 400 and f"more than {srv.app.max_chars} characters" in error["error"]["message"]
