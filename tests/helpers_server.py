"""Shared by the server tests: the real `exo-medusa serve` on a tiny model (a subprocess), the same server classes
in process around a scripted generator, and small HTTP clients (urllib and raw sockets)."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from exo_tinygrad_medusa.decoding.heads import random_heads
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig, TokenLogprob
from exo_tinygrad_medusa.model.tokenizer import Tokenizer
from exo_tinygrad_medusa.serving.server import ServerLimits, start
from helpers_tokenizer import BYTE_OFFSET, write_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600
SOCKET_S = 20  # raw-socket reads: the server answers or closes well before this


@contextlib.contextmanager
def serve_tiny(tiny_checkpoint, tiny_model, tmp_path_factory):
    """`exo-medusa serve` as a subprocess on the tiny Llama with random Medusa heads: yields {url, model, port}."""
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
        url = line.split(" at ")[1].strip().removesuffix("/v1/chat/completions")
        yield {"url": url, "model": model, "port": int(url.rsplit(":", 1)[1])}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tiny_model, tmp_path_factory):
    with serve_tiny(tiny_checkpoint, tiny_model, tmp_path_factory) as running:
        yield running


def call(server, path: str, body=None, raw: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(server["url"] + path, data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
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


def streamed_text(events: list[dict]) -> str:
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])


def text_of(response: dict) -> str:
    return response["choices"][0]["message"]["content"]


def raw_http(port: int, data: bytes, read: bool = True) -> tuple[int | None, dict | None, bytes]:
    """Send bytes as they are; (status, JSON body, raw reply). status None: closed without a reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_S) as s:
        s.sendall(data)
        reply = b""
        while read and (piece := s.recv(1 << 16)):
            reply += piece
    if not reply:
        return None, None, reply
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, (json.loads(body) if body else None), reply


def post_bytes(body: bytes, *, host: str = "127.0.0.1", extra: str = "", length: int | str | None = None) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n{extra}\r\n").encode() + body


def user(content: str, **options) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], **options}).encode()



def byte_tokens(text: str) -> list[int]:
    return [BYTE_OFFSET + b for b in text.encode()]


class ScriptedGenerator:
    """Stands in for Generator: emits `chunks` (one on_tokens call each, like Medusa steps), optionally waiting for
    `gate` before each, or dots until cancelled when `endless`."""

    def __init__(self, max_context: int):
        self.model = SimpleNamespace(max_context=max_context)
        self.abort = threading.Event()  # set at teardown: nothing scripted outlives the module
        self.reset()

    def reset(self, chunks: list[str] = ("Hello",), endless: bool = False) -> None:
        self.chunks, self.endless = [byte_tokens(c) for c in chunks], endless
        self.gate, self.started, self.cancelled = threading.Event(), threading.Event(), threading.Event()
        self.gate.set()
        self.configs: list[GenerationConfig] = []
        self.prompts: list[list[int]] = []

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if len(prompt_ids) >= self.model.max_context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the context holds {self.model.max_context}")

    def generate(self, prompt_ids, cfg, on_tokens, on_logprobs=None, on_step=None):
        self.configs.append(cfg)
        self.prompts.append(list(prompt_ids))
        self.started.set()
        generated = []
        try:
            for i in range(100_000):
                if i >= len(self.chunks) and not self.endless or self.abort.is_set():
                    break
                assert self.gate.wait(SOCKET_S), "the test never opened the gate"
                chunk = self.chunks[i] if i < len(self.chunks) else byte_tokens(".")
                generated += chunk
                if on_step is not None:  # the first chunk stands for the prefill's token, the rest for Medusa steps
                    on_step("prefill" if i == 0 else ("heads", "context")[(i - 1) % 2])
                if on_logprobs is not None:  # a made-up log-probability per token: -(its place in the reply) / 10
                    on_logprobs([TokenLogprob(t, -(len(generated) - len(chunk) + k) / 10, ((t, 0.0),) * cfg.logprobs)
                                 for k, t in enumerate(chunk)])
                on_tokens(chunk)
                if self.endless:
                    self.abort.wait(0.002)  # a step's worth of work; ends at once at teardown
        except Exception as e:
            if type(e).__name__ == "_Cancelled":
                self.cancelled.set()
            raise
        return SimpleNamespace(generated_ids=generated, finish_reason="length", steps=max(len(self.chunks) - 1, 0),
                               mean_accepted=1.0)


@pytest.fixture(scope="module")
def scripted_session(tmp_path_factory):
    generator = ScriptedGenerator(max_context=64)
    session = SimpleNamespace(
        tokenizer=Tokenizer.from_dir(write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))),
        generator=generator, tree=SimpleNamespace(name="scripted"),
        loaded=SimpleNamespace(model=generator.model, resolved=SimpleNamespace(model_id="scripted")))
    yield session
    generator.abort.set()


@pytest.fixture(scope="module")
def make_server(scripted_session):
    """make_server(**ServerLimits fields) -> (server, port), serving the scripted session on a free port."""
    servers = []

    def make(**limits):
        srv = start(lambda: scripted_session, GenerationConfig(max_new_tokens=16), "127.0.0.1", 0, ServerLimits(**limits))
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv, srv.server_address[1]

    yield make
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def gen(scripted_session):
    scripted_session.generator.reset()
    yield scripted_session.generator
    scripted_session.generator.gate.set()


@pytest.fixture(scope="module")
def scripted(make_server):
    return make_server(timeout=1.0, header_timeout=1.0)


def scripted_chat(port: int, content: str = "hi", **options):
    return call({"url": f"http://127.0.0.1:{port}"}, "/v1/chat/completions",
                {"messages": [{"role": "user", "content": content}], **options})


def scripted_stream(port: int, content: str = "hi", **options) -> list[dict]:
    return stream({"url": f"http://127.0.0.1:{port}"}, content, **options)
