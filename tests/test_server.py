"""`exo-medusa serve` as a subprocess on a tiny model with random Medusa heads: generation, validation, `stop`,
and what reaches the HTTP layer from outside."""
from __future__ import annotations

import json
import threading

import pytest

# the fixtures (gen, make_server, scripted, scripted_session, server) are imported by name: pytest finds them here
from helpers_server import (TIMEOUT_S, call, chat, post_bytes, raw_http, server, stream, streamed_text, text_of,
                            user)

def test_health_and_models(server):
    assert call(server, "/healthcheck") == (200, {"status": "ok"})
    status, models = call(server, "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [server["model"]]
    status, error = call(server, "/v1/nothing")
    assert status == 404 and error["error"]["type"] == "not_found"


def test_stream_matches_non_stream_at_temperature_zero(server):
    status, response = chat(server, "Tell me a story.", temperature=0, max_tokens=10)
    assert status == 200 and response["object"] == "chat.completion"
    assert response["model"] == server["model"]
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == 10
    assert response["usage"]["total_tokens"] == response["usage"]["prompt_tokens"] + 10
    events = stream(server, "Tell me a story.", temperature=0, max_tokens=10)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events[1:-1]]
    assert pieces and all(pieces)
    assert "".join(pieces) == text_of(response)
    _, default_length = chat(server, "Tell me a story.")  # --max-generate-tokens 12 when max_tokens is absent
    assert default_length["usage"]["completion_tokens"] == 12
    assert text_of(default_length).startswith(text_of(response))


def test_temperature_and_seed_are_honoured(server):
    _, greedy = chat(server, "Tell me a story.", max_tokens=10)
    _, first = chat(server, "Tell me a story.", max_tokens=10, temperature=1.5, seed=7)
    _, again = chat(server, "Tell me a story.", max_tokens=10, temperature=1.5, seed=7)
    assert text_of(first) == text_of(again)
    assert text_of(first) != text_of(greedy)
    # too small to sample (logits / 1e-320 overflows to NaN probabilities): decoded greedily, not a 500
    status, tiny = chat(server, "Tell me a story.", max_tokens=10, temperature=1e-320)
    assert status == 200 and text_of(tiny) == text_of(greedy)


def test_stop_strings_cut_the_text_streamed_or_not(server):
    _, full = chat(server, "Tell me a story.", max_tokens=12)
    text = text_of(full)
    assert len(text) >= 4, text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    expected = text[:text.find(stop)]
    status, cut = chat(server, "Tell me a story.", max_tokens=12, stop=[stop, "never in this text \x00"])
    assert status == 200 and text_of(cut) == expected
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert 1 <= cut["usage"]["completion_tokens"] <= 12
    events = stream(server, "Tell me a story.", max_tokens=12, stop=stop)
    assert streamed_text(events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_clients_each_get_their_own_answer(server):
    prompts = ["What is the sea?", "Name a colour."]
    alone = [text_of(chat(server, p, max_tokens=8)[1]) for p in prompts]
    assert alone[0] != alone[1]
    results: dict[int, str] = {}

    def client(i: int) -> None:
        status, response = chat(server, prompts[i], max_tokens=8)
        results[i] = text_of(response) if status == 200 else f"HTTP {status}"

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert [results.get(0), results.get(1)] == alone


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, message", [
    (b"{not json", "request body is not valid JSON"),
    (b"[1, 2]", "request body must be a JSON object"),
    ({"model": "gpt-unknown", "messages": HI}, "unknown model 'gpt-unknown'"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": HI, "max_tokens": -3}, "max_tokens must be >= 1, got -3"),
    ({"messages": HI, "temperature": -1}, "temperature must be >= 0"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
    ({"messages": HI, "seed": -1}, "seed must be in [0, 2**64), got -1"),
    ({"messages": HI, "n": 2}, "n must be 1"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role 'wizard' is not supported"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', "Infinity is not a JSON number"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}', "top_p must be finite"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1' + b"0" * 400 + b"}",
     "temperature must be finite"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5001 + b"}",
     "request body is not valid JSON"),
    (b'{"messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "request body is nested too deeply"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop takes at most 4 strings, got 5"),
    ({"messages": HI, "stop": [""]}, "each stop string must have 1 to 1000 characters"),
    ({"messages": HI, "stop": 3}, "stop must be a string or a list of strings"),
    ({"messages": HI, "logprobs": 3}, "logprobs must be true or false, got 3"),
    ({"messages": HI, "top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ({"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs must be an integer from 0 to 20, got 21"),
    ({"messages": HI, "tools": [{"type": "function"}]}, "tools is not supported"),
    ({"messages": HI, "stream_options": {"include_usage": True}}, "with stream true"),
    ({"messages": HI, "max_tokens": True}, "max_tokens must be an integer, got True"),
], ids=["json", "not-object", "model", "empty-messages", "negative-max-tokens", "negative-temperature", "content",
        "negative-seed", "n-2", "unknown-role", "infinity", "nan", "overflowing-float", "overflowing-int",
        "5001-digit-int",
        "deep-nesting", "five-stops", "empty-stop", "stop-type", "logprobs-int", "top-logprobs-alone",
        "top-logprobs-21", "tools", "stream-options", "bool-int"])
def test_malformed_requests_get_400_and_the_server_keeps_serving(server, body, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, error = call(server, "/v1/chat/completions", raw=raw)
    assert status == 400
    assert error["error"]["type"] == "invalid_request_error" and message in error["error"]["message"], error
    status, response = chat(server, "Still there?", max_tokens=2)
    assert status == 200 and response["usage"]["completion_tokens"] == 2


def test_huge_bodies_are_refused_before_they_are_read(server):
    # 15 MB declared, 64 kB sent: the answer comes without the rest, so nothing was buffered or tokenised
    status, error, _ = raw_http(server["port"], post_bytes(b'{"messages": [' + b" " * 65536, length=15_000_000))
    assert status == 413 and "this server takes at most" in error["error"]["message"]
    # the 200k-deep nesting is over the body limit of this context: a JSON refusal either way
    status, error = call(server, "/v1/chat/completions", raw=b"[" * 200_000 + b"]" * 200_000)
    assert status in (400, 413) and error["error"]["code"] == status
    assert chat(server, "Still there?", max_tokens=2)[0] == 200


@pytest.mark.parametrize("request_bytes, status", [
    (post_bytes(user("hi"), length="abc"), 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + b"9" * 5001 + b"\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 411),
    (b"PUT /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
    (b"DELETE /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405),
    (b"BREW /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 501),
    (b"NONSENSE\r\n\r\n", 400),
], ids=["content-length-abc", "content-length-5001-digits", "no-content-length", "put", "delete", "unknown-method",
        "bad-request-line"])
def test_malformed_http_gets_a_json_status(server, request_bytes, status):
    got, error, reply = raw_http(server["port"], request_bytes)
    assert got == status, reply[:300]
    assert error["error"]["code"] == status and error["error"]["message"]
    assert b"Content-Type: application/json" in reply


def test_foreign_origins_and_hosts_are_refused(server):
    body = user("hi", max_tokens=2)
    # a web page's "simple" request: text/plain needs no CORS preflight, so the server itself must refuse it
    evil = post_bytes(body, extra="Origin: http://evil.example\r\n").replace(b"application/json", b"text/plain")
    status, error, reply = raw_http(server["port"], evil)
    assert status == 403 and "http://evil.example" in error["error"]["message"]
    assert b"Access-Control-Allow-Origin" not in reply
    # DNS rebinding: the page's own name resolved to 127.0.0.1
    status, error, _ = raw_http(server["port"], post_bytes(body, host=f"evil.example:{server['port']}"))
    assert status == 403 and "Host" in error["error"]["message"]
    # this machine's pages and plain clients are served, with CORS for the page
    status, response, reply = raw_http(server["port"], post_bytes(
        body, host=f"localhost:{server['port']}", extra="Origin: http://localhost:3000\r\n"))
    assert status == 200 and response["usage"]["completion_tokens"] == 2
    assert b"Access-Control-Allow-Origin: http://localhost:3000" in reply
