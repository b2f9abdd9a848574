"""A node lost mid-request inside classic Exo: its API must end the request within a bounded time and serve the next
request once the node is back. Skipped when classic Exo is not importable (run it with the Exo venv's python)."""
from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from exo_tinygrad_medusa.serving.exo_patch import exo_available
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.decoding.session import open_session
from test_exo import ROOT, exo_node, free_ports, model, ring_config  # noqa: F401 (model: the fixture)

requires_exo = pytest.mark.skipif(not exo_available(), reason="classic Exo is not importable")
PROMPT = "Tell me about the sea."
RESPONSE_TIMEOUT_S = 20   # Exo's own bound on a request (--chatgpt-api-response-timeout)
BOUND_S = RESPONSE_TIMEOUT_S + 40


def chat(api_port: int, model_dir: str, timeout_s: float, on_chunk=None) -> tuple[str, str | None]:
    """Stream one chat request; returns (text, error) where error describes how it failed, if it did. A stream that
    ends without a finish_reason failed too: when Exo's API times out after the stream started, it just closes it."""
    body = {"model": model_dir, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "stream": True}
    request = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    pieces, finish = [], None
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            for raw in response:
                line = raw.decode().strip()
                if line.startswith("data:") and line != "data: [DONE]":
                    choice = json.loads(line[5:])["choices"][0]
                    pieces.append(choice.get("delta", {}).get("content") or "")
                    finish = choice.get("finish_reason") or finish
                    if on_chunk:
                        on_chunk(len(pieces))
    except (urllib.error.URLError, OSError, ValueError) as e:
        return "".join(pieces), f"{type(e).__name__}: {e}"
    return "".join(pieces), None if finish else f"the stream ended without a finish_reason after {len(pieces)} chunks"


def complete_chat(api_port: int, model_dir: str, deadline_s: float) -> tuple[str, list[str]]:
    """The first complete answer within deadline_s, and the errors of the attempts before it. A cold ring compiles
    its kernels inside the first requests, which can take longer than Exo's per-chunk response timeout on a busy
    2-core machine; the timed-out request keeps running in the ring, so the kernels are ready for the next one."""
    deadline, errors = time.monotonic() + deadline_s, []
    while True:
        text, error = chat(api_port, model_dir, max(deadline - time.monotonic(), 1))
        if error is None:
            return text, errors
        errors.append(error)
        assert time.monotonic() < deadline, f"no complete answer in {deadline_s:.0f} s: {errors}"
        time.sleep(2)


@pytest.mark.exo
@requires_exo
def test_exo_ring_survives_a_lost_node(model, tmp_path):
    ports = free_ports(4)
    config = ring_config(tmp_path, ports[:2])
    extra = ["--chatgpt-api-response-timeout", str(RESPONSE_TIMEOUT_S)]

    def start(node: int) -> subprocess.Popen:
        argv = exo_node(model, config, node, ports[node - 1], ports[node + 1]) + extra
        argv[argv.index("--max-generate-tokens") + 1] = "200"  # long enough to strike mid-request
        return subprocess.Popen(argv, cwd=ROOT, stdout=(tmp_path / f"node{node}.log").open("a"),
                                stderr=subprocess.STDOUT)

    session = open_session(model["dir"])
    result = session.generator.generate(session.prompt_ids(PROMPT), GenerationConfig(max_new_tokens=200))
    expected = session.tokenizer.decode([t for t in result.generated_ids if t not in session.tokenizer.eos_token_ids],
                                        skip_special_tokens=True)
    nodes = [start(1), start(2)]
    try:
        deadline = time.monotonic() + 300
        while True:  # the API answers once node1 runs; the ring settles within Exo's topology refresh
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ports[2]}/healthcheck", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "node1.log").read_text()[-3000:]
                time.sleep(1)
        time.sleep(5)
        warm, _ = complete_chat(ports[2], model["dir"], 300)
        assert warm == expected

        def strike(chunks: int) -> None:
            if chunks == 2 and nodes[1].poll() is None:
                nodes[1].kill()

        t0 = time.monotonic()
        text, error = chat(ports[2], model["dir"], BOUND_S + 60, strike)
        elapsed = time.monotonic() - t0
        assert nodes[1].poll() is not None, "the request finished before node2 could be killed"
        assert elapsed < BOUND_S, f"the API took {elapsed:.0f} s to give up on a lost node"
        assert error is not None or text != expected, "a request that lost a node mid-way returned the full answer"

        nodes[1] = start(2)
        time.sleep(10)  # rediscovery: Exo's manual discovery polls its peers every few seconds
        again, _ = complete_chat(ports[2], model["dir"], 300)
        assert again == expected
    finally:
        for n in nodes:
            n.terminate()
        for n in nodes:
            try:
                n.wait(timeout=60)
            except subprocess.TimeoutExpired:
                n.kill()
                n.wait(timeout=60)
