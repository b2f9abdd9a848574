"""Inside classic Exo: our engine in Exo's nodes (one and two, gRPC on loopback) must print what `exo-medusa run`
prints at temperature 0. Skipped when Exo is not importable (CI); run with the Exo venv's python."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from exo_tinygrad_medusa.serving.exo_patch import exo_available
from exo_tinygrad_medusa.decoding.heads import random_heads
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.decoding.session import MedusaOptions, open_session

requires_exo = pytest.mark.skipif(not exo_available(), reason="classic Exo is not importable")
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Tell me about the sea."
MAX_TOKENS = 12
EXO_COMMAND = Path(sys.executable).with_name("exo")  # Exo's own console script, beside the venv's python


@pytest.fixture(scope="module")
def model(tiny_checkpoint, tiny_model, tmp_path_factory):
    """A tiny model with random heads, and what standalone `exo-medusa run` prints for PROMPT."""
    directory = str(tiny_checkpoint("llama"))
    loaded = tiny_model("llama")
    heads = str(random_heads(loaded.config, loaded.model.lm_head, num_heads=4, num_layers=1, seed=0).save(
        tmp_path_factory.mktemp("exo_heads")))
    medusa = ["--medusa-enabled", "--medusa-heads", heads, "--medusa-choices", "cpu-8"]
    out = subprocess.run([sys.executable, "-m", "exo_tinygrad_medusa", "run", directory, "--prompt", PROMPT,
                          "--max-generate-tokens", str(MAX_TOKENS), "--json", *medusa], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=900).stdout
    return {"dir": directory, "heads": heads, "medusa": medusa, "standalone": json.loads(out)}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def own_capabilities() -> dict:
    """What an Exo node on this machine reports about itself. A manual ring config's capabilities must equal it: Exo
    partitions by memory from the config until it has asked each peer, and a node that partitions before asking
    (under load it does) would otherwise split the layers differently from its peer, and the ring stalls."""
    from exo.topology.device_capabilities import device_capabilities
    return asyncio.run(device_capabilities()).to_dict()


def ring_config(tmp_path: Path, ports: list[int]) -> Path:
    caps = own_capabilities()
    peers = {f"node{i + 1}": {"address": "127.0.0.1", "port": p, "device_capabilities": caps}
             for i, p in enumerate(ports)}
    path = tmp_path / f"ring{len(ports)}.json"
    path.write_text(json.dumps({"peers": peers}))
    return path


def exo_node(model, config: Path, node: int, port: int, api_port: int, *command: str) -> list[str]:
    # --default-model: Exo's API serves only models it has cards for and answers any other name with its default
    # model; a node started without `run MODEL` knows a local directory only as that default
    return [sys.executable, "-m", "exo_tinygrad_medusa", *command, "--inference-engine", "tinygrad", *model["medusa"],
            "--default-model", model["dir"],
            "--disable-tui", "--discovery-module", "manual", "--discovery-config-path", str(config),
            "--node-id", f"node{node}", "--node-host", "127.0.0.1", "--node-port", str(port),
            "--chatgpt-api-port", str(api_port), "--max-generate-tokens", str(MAX_TOKENS), "--default-temp", "0",
            "--wait-for-peers", str(len(json.loads(config.read_text())["peers"]) - 1), "--verbose"]


def generated_text(stdout: str) -> str:
    assert "Generated response:\n" in stdout, stdout[-2000:]
    return stdout.split("Generated response:\n", 1)[1]


@pytest.mark.exo
@requires_exo
def test_engine_is_an_exo_inference_engine():
    from exo.inference.inference_engine import InferenceEngine

    from exo_tinygrad_medusa.serving.engine import MedusaInferenceEngine
    assert issubclass(MedusaInferenceEngine, InferenceEngine)
    engine = MedusaInferenceEngine(shard_downloader=object())
    assert engine.shard is None and engine.tokenizer is None


@pytest.mark.exo
@requires_exo
def test_in_process_ring_of_exo_nodes(model, tmp_path):
    """Two Exo nodes in one process talking gRPC: the Medusa ring state crosses Exo's own serialisation."""
    from exo.download.shard_download import NoopShardDownloader
    from exo.inference.shard import Shard
    from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
    from exo.networking.grpc.grpc_server import GRPCServer
    from exo.networking.manual.manual_discovery import ManualDiscovery
    from exo.orchestration.node import Node
    from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy

    from exo_tinygrad_medusa.serving.engine import MedusaInferenceEngine
    from exo_tinygrad_medusa.serving.exo_patch import apply_patches, register_model

    apply_patches()
    register_model(model["dir"])
    ports = free_ports(2)
    config = ring_config(tmp_path, ports)
    options = MedusaOptions(True, model["heads"], choices="cpu-8")
    cfg = GenerationConfig(max_new_tokens=MAX_TOKENS)

    async def scenario():
        nodes = []
        for i, port in enumerate(ports):
            discovery = ManualDiscovery(str(config), f"node{i + 1}", create_peer_handle=lambda pid, addr, desc, caps:
                                        GRPCPeerHandle(pid, addr, desc, caps))
            node = Node(f"node{i + 1}", None, MedusaInferenceEngine(options, cfg), discovery, NoopShardDownloader(),
                        partitioning_strategy=RingMemoryWeightedPartitioningStrategy(), max_generate_tokens=MAX_TOKENS)
            node.server = GRPCServer(node, "127.0.0.1", port)
            nodes.append(node)
        await asyncio.gather(*(n.start(wait_for_peers=1) for n in nodes))
        for n in nodes:
            await n.collect_topology(set())
        tokens, done, request_id = [], asyncio.Event(), str(uuid.uuid4())

        def on_token(rid, new_tokens, finished):
            if rid == request_id:
                tokens.extend(new_tokens)
                if finished:
                    done.set()

        nodes[0].on_token.register("test").on_next(on_token)
        tokenizer = open_session(model["dir"]).tokenizer
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
        try:
            await nodes[0].process_prompt(Shard(model["dir"], 0, 0, 4), prompt, request_id=request_id)
            await asyncio.wait_for(done.wait(), 600)
            # every node releases the finished request (its cache slot then serves the next one, captures kept)
            for _ in range(100):
                if not any(n.inference_engine.requests for n in nodes):
                    break
                await asyncio.sleep(0.05)
            live = [list(n.inference_engine.requests) for n in nodes]
        finally:
            for n in nodes:
                await n.stop()
        shards = sorted((n.inference_engine.shard.start_layer, n.inference_engine.shard.end_layer) for n in nodes)
        for task in asyncio.all_tasks() - {asyncio.current_task()}:
            task.cancel()
        return tokens, shards, live

    tokens, shards, live = asyncio.run(scenario())
    assert shards == [(0, 1), (2, 3)] and live == [[], []]
    assert tokens == model["standalone"]["generated_ids"]


@pytest.mark.exo
@requires_exo
def test_exos_own_command_on_one_node_matches_standalone(model, tmp_path):
    """Exo's own `exo run MODEL --inference-engine tinygrad --medusa-enabled ...`: the package's .pth hook patches
    exo.main as it loads, so Exo's command runs our engine with Medusa and prints what `exo-medusa run` prints."""
    assert EXO_COMMAND.exists(), f"classic Exo is importable but its command {EXO_COMMAND} is missing"
    node_port, api_port = free_ports(2)
    config = ring_config(tmp_path, [node_port])
    argv = exo_node(model, config, 1, node_port, api_port, "run", model["dir"], "--prompt", PROMPT)
    out = subprocess.run([str(EXO_COMMAND), *argv[3:]], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert generated_text(out.stdout).startswith(model["standalone"]["text"] + "\n")
    assert f"engine: {model['dir']} layers 0..3 of 4, tree cpu-8 (8 nodes), Medusa heads" in out.stderr, \
        out.stderr[-3000:]


@pytest.mark.exo
@requires_exo
def test_exo_hook_engages_only_with_a_medusa_flag(tmp_path):
    """Exo without a Medusa flag keeps its own engine; the hook changes nothing else in any process."""
    show = ("import sys; sys.argv[1:] = {argv!r}; import exo.main as m; "
            "print('ENGINE', type(m.node.inference_engine).__name__)")
    common = ["--inference-engine", "tinygrad", "--disable-tui", "--node-host", "127.0.0.1",
              "--chatgpt-api-port", str(free_ports(1)[0])]
    engines = {}
    for name, flags in (("plain", []), ("medusa", ["--medusa-enabled"])):
        out = subprocess.run([sys.executable, "-c", show.format(argv=common + flags)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        engines[name] = re.findall(r"^ENGINE (\w+)$", out.stdout, re.M)
    assert engines == {"plain": ["TinygradDynamicShardInferenceEngine"], "medusa": ["MedusaInferenceEngine"]}


def test_exo_hook_reads_only_medusa_flags():
    from exo_tinygrad_medusa.serving.exo_hook import wants_medusa
    assert wants_medusa(["run", "m", "--medusa-enabled"]) and wants_medusa(["--medusa-heads=x"])
    assert wants_medusa(["--inference-engine", "medusa"]) and wants_medusa(["--inference-engine=medusa"])
    assert not wants_medusa(["--inference-engine", "tinygrad", "--prompt", "medusa"])
    assert not wants_medusa(["--prompt", "--medusa-enabled is a flag"])


@pytest.mark.exo
@requires_exo
def test_exo_two_node_ring_matches_standalone(model, tmp_path):
    """node2 serves Exo's API, node1 runs the prompt: the model is split across the two processes."""
    ports = free_ports(4)
    config = ring_config(tmp_path, ports[:2])
    log = (tmp_path / "node2.log").open("w")
    node2 = subprocess.Popen(exo_node(model, config, 2, ports[1], ports[3]), cwd=ROOT, stdout=log,
                             stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(2)
        out = subprocess.run(exo_node(model, config, 1, ports[0], ports[2], "run", model["dir"], "--prompt", PROMPT),
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        node2.terminate()
        node2.wait(timeout=60)
        log.close()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert generated_text(out.stdout).startswith(model["standalone"]["text"] + "\n")
    held = set(re.findall(r"engine: (\S+ layers \d+\.\.\d+ of \d+)", out.stderr))
    assert held in ({f"{model['dir']} layers 0..1 of 4"}, {f"{model['dir']} layers 2..3 of 4"}), out.stderr[-3000:]


@pytest.mark.skipif(exo_available(), reason="classic Exo is installed")
def test_without_exo_its_command_line_points_to_the_standalone_commands():
    out = subprocess.run([sys.executable, "-m", "exo_tinygrad_medusa", "--inference-engine", "tinygrad",
                          "--medusa-enabled"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1
    assert "needs classic Exo" in out.stderr
    assert "exo-medusa run MODEL" in out.stderr and "exo-medusa serve" in out.stderr
