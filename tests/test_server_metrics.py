"""`GET /metrics` in Prometheus' text format, parsed, around the scripted generator: requests by route and status,
tokens, steps, the tokens-per-step histogram, queue depth; and routes with a query string."""
from __future__ import annotations

import re
import threading
import time
import urllib.request

# the fixtures (gen, make_server, scripted, scripted_session, server) are imported by name: pytest finds them here
from helpers_server import SOCKET_S, call, gen, make_server, scripted_chat, scripted_session, text_of

SAMPLE = re.compile(r"^([a-z_]+)(?:\{([^}]*)\})? (-?[0-9.e+]+|\+Inf)$")


def metrics(port: int) -> dict[tuple[str, tuple], float]:
    """{(name, ((label, value), ...)): value}, checking every line's syntax and that each family is typed."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SOCKET_S) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = response.read().decode()
    typed, out = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            typed[name] = kind
        elif not line.startswith("# HELP "):
            m = SAMPLE.match(line)
            assert m, line
            name, labels, value = m.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name.startswith("exo_medusa_step_tokens") else name
            assert family in typed, f"{name} has no TYPE line"
            pairs = tuple(tuple(p.split("=", 1)) for p in labels.split(",")) if labels else ()
            out[name, tuple((k, v.strip('"')) for k, v in pairs)] = float(value)
    return out


def test_metrics_count_requests_tokens_and_steps(make_server, gen):
    srv, port = make_server()
    gen.reset(["He", "llo", "!"])  # the prefill's token(s), then two verify steps of 3 and 1 tokens
    assert text_of(scripted_chat(port)[1]) == "Hello!"
    assert scripted_chat(port, temperature=-1)[0] == 400
    assert call({"url": f"http://127.0.0.1:{port}"}, "/v1/nowhere?x=1")[0] == 404
    status, models = call({"url": f"http://127.0.0.1:{port}"}, "/v1/models?x=1")  # a query string is not the path
    assert status == 200 and models["data"][0]["id"] == "scripted"
    m = metrics(port)
    assert m["exo_medusa_requests_total", (("route", "/v1/chat/completions"), ("status", "200"))] == 1
    assert m["exo_medusa_requests_total", (("route", "/v1/chat/completions"), ("status", "400"))] == 1
    assert m["exo_medusa_requests_total", (("route", "other"), ("status", "404"))] == 1
    assert m["exo_medusa_requests_total", (("route", "/v1/models"), ("status", "200"))] == 1
    assert m["exo_medusa_generations_total", (("finish", "length"),)] == 1
    assert m["exo_medusa_generated_tokens_total", ()] == 6
    assert m["exo_medusa_steps_total", ()] == 2
    buckets = {dict(labels)["le"]: v for (name, labels), v in m.items() if name == "exo_medusa_step_tokens_bucket"}
    assert buckets["1"] == 1 and buckets["2"] == 1 and buckets["3"] == 2 and buckets["+Inf"] == 2
    assert m["exo_medusa_step_tokens_sum", ()] == 4 and m["exo_medusa_step_tokens_count", ()] == 2
    assert m["exo_medusa_queue_depth", ()] == 0 and m["exo_medusa_generating", ()] == 0
    # the metrics request itself is counted by the next scrape
    assert metrics(port)["exo_medusa_requests_total", (("route", "/metrics"), ("status", "200"))] == 1


def test_metrics_show_the_queue(make_server, gen):
    srv, port = make_server(queue_size=2)
    gen.gate.clear()
    clients = [threading.Thread(target=scripted_chat, args=(port,)) for _ in range(2)]
    clients[0].start()
    assert gen.started.wait(SOCKET_S)
    clients[1].start()
    for _ in range(1000):  # until the second request waits (bounded: 10 s)
        if srv.app.worker.jobs.jobs:
            break
        time.sleep(0.01)
    m = metrics(port)
    assert m["exo_medusa_queue_depth", ()] == 1 and m["exo_medusa_generating", ()] == 1
    gen.gate.set()
    for c in clients:
        c.join(SOCKET_S)
    assert metrics(port)["exo_medusa_generations_total", (("finish", "length"),)] == 2
