"""`exo-medusa bench-ring --exo`: the same prompt on a two-node classic Exo ring (Exo's own gRPC and API, our
engine inside), plain and Medusa, with a one-way delay injected in Exo's transport.

    python -m exo_tinygrad_medusa.bench.bench_ring_exo --exo-node-with-link-delay-ms D EXO_ARGS...

runs one such node (the benchmark starts two)."""
from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .bench_ring import RingBenchConfig


# Classic Exo's node flags, gRPC peer handle and ChatGPT-compatible API (run for real in the Exo venv).
EXO_NODE_FLAG = "--exo-node-with-link-delay-ms"
EXO_SETTLE_S = 3.0  # one more topology refresh (Exo polls every 2 s) after both views agree


def run_exo_comparison(cfg: RingBenchConfig, delay_ms: float, timeout_s: float = 1800.0) -> dict:
    """The first prompt on a two-node Exo ring (two processes, Exo's gRPC on loopback, our engine inside), plain
    then Medusa: decode seconds from the first streamed chunk to the last, and whether the texts agree."""
    from ..serving.exo_patch import exo_available
    if not exo_available():
        return {"skipped": "classic Exo (github.com/exo-explore/exo) is not importable here; install it beside this "
                           "package as the README says and rerun with --exo"}
    prompt = cfg.prompts[0]
    runs = {name: _exo_ring_request(cfg, prompt.text, medusa, delay_ms, timeout_s)
            for name, medusa in (("plain", False), ("medusa", True))}
    p, m = runs["plain"], runs["medusa"]
    return {"delay_ms": delay_ms, "prompt": prompt.id, "plain": p, "medusa": m, "identical": p["text"] == m["text"],
            "ratio": p["decode_s"] / m["decode_s"] if m["decode_s"] > 0 and p["decode_s"] > 0 else None}


def _exo_ring_request(cfg: RingBenchConfig, text: str, medusa: bool, delay_ms: float, timeout_s: float) -> dict:
    import socket
    import subprocess
    import tempfile
    import urllib.request

    socks = [socket.socket() for _ in range(4)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    caps = {"model": "bench", "chip": "bench", "memory": 1000, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "ring.json"
        config.write_text(json.dumps({"peers": {f"node{i + 1}": {"address": "127.0.0.1", "port": ports[i],
                                                                 "device_capabilities": caps} for i in range(2)}}))
        flags = (["--medusa-enabled"] + (["--medusa-heads", cfg.medusa_heads] if cfg.medusa_heads else [])
                 + (["--medusa-choices", cfg.medusa_choices] if cfg.medusa_choices else [])) if medusa else []
        nodes = []
        try:
            for i in range(2):
                argv = [sys.executable, "-m", "exo_tinygrad_medusa.bench.bench_ring_exo", EXO_NODE_FLAG, str(delay_ms),
                        "--inference-engine", "tinygrad", *flags, "--disable-tui", "--discovery-module", "manual",
                        "--discovery-config-path", str(config), "--node-id", f"node{i + 1}", "--node-host",
                        "127.0.0.1", "--node-port", str(ports[i]), "--chatgpt-api-port", str(ports[2 + i]),
                        "--max-generate-tokens", str(cfg.max_new_tokens), "--default-temp", "0", "--default-model",
                        cfg.model, "--wait-for-peers", "1"]
                nodes.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                              stderr=(Path(tmp) / f"node{i + 1}.log").open("w")))
            api = f"http://127.0.0.1:{ports[2]}"
            deadline = time.monotonic() + cfg.start_timeout_s
            # each node partitions the layers from its own view of the topology (the peers' memory included): a
            # request sent before both views agree crosses mismatched shards, which the engine refuses
            while (views := [_topology(f"http://127.0.0.1:{port}") for port in ports[2:]])[0] is None \
                    or len(views[0]) < 2 or views[0] != views[1]:
                if time.monotonic() > deadline or any(n.poll() is not None for n in nodes):
                    logs = "\n".join((Path(tmp) / f"node{i + 1}.log").read_text()[-2000:] for i in range(2))
                    raise RuntimeError(f"the Exo ring did not come up:\n{logs}") from None
                time.sleep(1)
            time.sleep(EXO_SETTLE_S)
            body = {"model": cfg.model, "messages": [{"role": "user", "content": text}], "temperature": 0,
                    "stream": True}
            _stream(api, body, timeout_s)  # warm-up: loads the shards and compiles
            return _stream(api, body, timeout_s)
        finally:
            for n in nodes:
                n.terminate()
            for n in nodes:
                try:
                    n.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    n.kill()
                    n.wait(timeout=30)


def _topology(api: str) -> dict | None:
    """The node's view of the ring: node id -> its capabilities, or None while its API does not answer."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"{api}/v1/topology", timeout=5) as response:
            return json.loads(response.read()).get("nodes", {})
    except (OSError, ValueError):
        return None


def _stream(api: str, body: dict, timeout_s: float) -> dict:
    import urllib.request
    request = urllib.request.Request(f"{api}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    pieces, first, finish = [], None, None
    t0 = time.perf_counter()
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choice = json.loads(line[5:])["choices"][0]
            finish = choice.get("finish_reason") or finish
            delta = choice.get("delta", {}).get("content") or ""
            if delta:
                first = first or time.perf_counter()
                pieces.append(delta)
    end = time.perf_counter()
    if finish is None:  # Exo's API closes a stream that timed out without saying so
        raise RuntimeError(f"the Exo ring's answer ended without a finish_reason after {len(pieces)} chunks "
                           "(Exo's API timed out: see --chatgpt-api-response-timeout)")
    return {"text": "".join(pieces), "chunks": len(pieces), "first_chunk_s": round((first or end) - t0, 4),
            "decode_s": round(end - (first or end), 4)}


def exo_node_main(argv: list[str]) -> int:
    """An Exo node whose gRPC sends wait `delay_ms` first: the one-way link delay, injected in Exo's transport."""
    delay_s = float(argv[0]) / 1e3
    from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle

    from ..serving.exo_patch import run_exo

    def delayed(send):
        async def send_after_delay(self, *args, **kwargs):
            await asyncio.sleep(delay_s)
            return await send(self, *args, **kwargs)
        return send_after_delay

    GRPCPeerHandle.send_prompt = delayed(GRPCPeerHandle.send_prompt)
    GRPCPeerHandle.send_tensor = delayed(GRPCPeerHandle.send_tensor)
    return run_exo(argv[1:])


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == EXO_NODE_FLAG:
        sys.exit(exo_node_main(sys.argv[2:]))
    sys.exit("usage: exo-medusa bench-ring --exo [options] (this module runs Exo nodes for it)")
