"""`exo-medusa serve` as a subprocess on a free loopback port, with a tiny model and random Medusa heads."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from exo_tinygrad_medusa.medusa.heads import random_heads

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tiny_model, tmp_path_factory):
    model = str(tiny_checkpoint("llama"))
    loaded = tiny_model("llama")
    heads = random_heads(loaded.config, loaded.model.lm_head, num_heads=4, num_layers=1, seed=0).save(
        tmp_path_factory.mktemp("server_heads"))
    proc = subprocess.Popen([sys.executable, "-m", "exo_tinygrad_medusa", "serve", model, "--port", "0",
                             "--medusa-enabled", "--medusa-heads", str(heads), "--medusa-choices", "cpu-8",
                             "--max-generate-tokens", "12"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert " at http://127.0.0.1:" in line, f"server did not start: {line!r}"
        yield {"url": line.split(" at ")[1].strip().removesuffix("/v1/chat/completions"), "model": model}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def call(server, path: str, body=None, raw: bytes | None = None):
    """(status, parsed JSON) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(server["url"] + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(server, content: str, **options):
    return call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], **options})


def stream(server, content: str, **options) -> list[dict]:
    body = json.dumps({"messages": [{"role": "user", "content": content}], "stream": True, **options}).encode()
    request = urllib.request.Request(server["url"] + "/v1/chat/completions", data=body)
    events = []
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        for line in response:
            line = line.decode().rstrip("\n")
            if not line:
                continue
            assert line.startswith("data: "), line
            if line == "data: [DONE]":
                return events
            events.append(json.loads(line[len("data: "):]))
    raise AssertionError("the stream ended without [DONE]")


def text_of(response: dict) -> str:
    return response["choices"][0]["message"]["content"]


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


@pytest.mark.parametrize("body, message", [
    (b"{not json", "request body is not valid JSON"),
    (b"[1, 2]", "request body must be a JSON object"),
    ({"model": "gpt-unknown", "messages": [{"role": "user", "content": "hi"}]}, "unknown model 'gpt-unknown'"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, "max_tokens must be >= 1, got -3"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature must be >= 0"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
], ids=["json", "not-object", "model", "empty-messages", "negative-max-tokens", "negative-temperature", "content"])
def test_malformed_requests_get_400_and_the_server_keeps_serving(server, body, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, error = call(server, "/v1/chat/completions", raw=raw)
    assert status == 400
    assert error["error"]["type"] == "invalid_request_error" and message in error["error"]["message"]
    status, response = chat(server, "Still there?", max_tokens=2)
    assert status == 200 and response["usage"]["completion_tokens"] == 2
