"""A ring of shard processes on loopback under faults: a shard killed mid-pass, restarted mid-request, frozen, or
answering a stale step. Each request must fail with a clear error in bounded time, the ring must serve the next
request (token-identical) once the shard is back, and no shard may keep a KV cache of a request that ended."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from exo_tinygrad_medusa.serving.exo_patch import exo_available
from exo_tinygrad_medusa.serving.engine import MedusaInferenceEngine, RingStateError, StepState
from exo_tinygrad_medusa.decoding.heads import random_heads
from exo_tinygrad_medusa.serving.ring import (HOST, LinkConfig, RemoteShard, Ring, ShardRefused, ShardUnavailable,
                                              StaleReply, frame_array, pack_frame, send_frame, recv_frame)
from exo_tinygrad_medusa.serving.ring_shard import ShardServer, _take_frame
from exo_tinygrad_medusa.serving.ring_local import LocalRing, ShardSpec, split_layers
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.decoding.session import MedusaOptions, open_session
from exo_tinygrad_medusa.model.shard import Shard
from ring_driver import local_hop, one_pass

LAYERS = 4
MAX_NEW = 16
BOUND_S = 60.0          # no scenario may take longer than this: a hang fails the test instead of blocking CI
FAST = LinkConfig(hop_timeout_s=30.0, release_timeout_s=2.0)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tiny_model, tmp_path_factory):
    model = str(tiny_checkpoint("llama"))
    heads = str(random_heads(tiny_model("llama").config, tiny_model("llama").model.lm_head, num_heads=4, num_layers=1,
                             seed=0).save(tmp_path_factory.mktemp("ring_heads")))
    session = open_session(model)
    prompt = session.prompt_ids("Tell me about the sea.")
    expected = session.generator.generate(prompt, GenerationConfig(max_new_tokens=MAX_NEW)).generated_ids
    return model, heads, prompt, expected


@pytest.fixture(scope="module")
def local_ring(setup):
    """Two Medusa shard processes (layers 0..1, 2..3), warmed up once; tests leave them running and healthy."""
    model, heads, _, _ = setup
    specs = [ShardSpec(model, a, b, LAYERS, medusa_heads=heads, medusa_choices="cpu-8", max_new_tokens=MAX_NEW)
             for a, b in split_layers(LAYERS, 2)]
    with LocalRing(specs, FAST, start_timeout_s=120) as lr:
        asyncio.run(_warm(lr.ring))
        yield lr


async def _warm(ring: Ring) -> None:
    try:  # warming up compiles every pass kind, draft chains included: longer than a pass on a loaded machine
        await asyncio.gather(*(hop.call({"op": "warm_up"}, timeout=300.0) for hop in ring.hops))
    finally:
        await ring.close()


def run(coro_fn):
    """Run a scenario under a hard bound and close the ring's connections after it (each asyncio.run is a new loop)."""
    def call(ring: Ring):
        async def bounded():
            try:
                return await asyncio.wait_for(coro_fn(ring), BOUND_S)
            finally:
                await ring.close()
        return asyncio.run(bounded())
    return call


async def live(ring: Ring) -> list[list[str]]:
    return [await h.live_requests() for h in ring.hops]


def test_split_layers():
    assert split_layers(30, 2) == [(0, 14), (15, 29)]
    assert split_layers(30, 3) == [(0, 9), (10, 19), (20, 29)]
    assert split_layers(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    with pytest.raises(ValueError, match="cannot split 4 layers into 5 shards"):
        split_layers(4, 5)
    with pytest.raises(ValueError, match="link delay must be >= 0"):
        LinkConfig(delay_s=-1)


def test_engine_release_and_finish_free_the_cache(setup):
    """In process: the last shard frees a request when it finishes; release frees it elsewhere; late passes fail."""
    model, _, prompt, expected = setup
    cfg = GenerationConfig(max_new_tokens=2)
    (a, sa), (b, sb) = [(MedusaInferenceEngine(generation=cfg), Shard(model, s, e, LAYERS)) for s, e in ((0, 1), (2, 3))]
    hops = [local_hop(a, sa), local_hop(b, sb)]

    async def scenario():
        tokens, state = await one_pass(hops, "r", np.array([prompt]), None)
        tokens2, state2 = await one_pass(hops, "r", tokens, state)
        assert tokens.tolist()[0] + tokens2.tolist()[0] == expected[:2]
        assert list(a.requests) == ["r"] and list(b.requests) == []       # finished: the last shard let it go
        assert await a.release("r") is True and list(a.requests) == []
        assert await a.release("r") is False                               # twice, or unknown: harmless
        with pytest.raises(RingStateError, match=r"request r already ended on layers 0..1 \(released\): a pass came "
                                                 "after its end"):
            await a.infer_tensor("r", sa, tokens2, state2)
        late = StepState.from_state(state2)
        late.next_layer = 2
        with pytest.raises(RingStateError, match=r"request r already ended on layers 2..3 \(finished: length\)"):
            await b.infer_tensor("r", sb, np.zeros((1, 1, 64), np.float32), late.to_state())
        again, _ = await one_pass(hops, "r", np.array([prompt]), None)    # the id may start a new request
        assert again.tolist()[0] == expected[:1]

    asyncio.run(scenario())


def test_ring_of_processes_matches_and_frees_everything(setup, local_ring):
    _, _, prompt, expected = setup

    @run
    async def scenario(ring):
        result = await ring.generate("ok", prompt)
        return result, await live(ring)

    result, held = scenario(local_ring.ring)
    assert result.tokens == expected and result.finish_reason == "length"
    # one accepted length per decode pass; the last pass may accept more than the token budget lets out
    assert len(result.accepted) == result.decode_passes and sum(result.accepted) >= result.decode_tokens == MAX_NEW - 1
    assert held == [[], []]


def test_link_delay_is_paid_once_per_link(setup, local_ring):
    _, _, prompt, expected = setup
    delay = 0.01
    local_ring.set_link(LinkConfig(delay_s=delay, hop_timeout_s=30.0, release_timeout_s=2.0))
    try:
        result = run(lambda ring: ring.generate("delayed", prompt))(local_ring.ring)
    finally:
        local_ring.set_link(FAST)
    assert result.tokens == expected
    # two links per pass on a two-shard ring; sleeping is never shorter than asked
    assert result.link_s >= 2 * delay * result.decode_passes
    assert result.decode_s >= result.link_s


def test_killed_shard_fails_the_request_clearly_and_the_ring_serves_after_it_returns(setup, local_ring):
    _, _, prompt, expected = setup
    victim = local_ring.processes[1]

    def strike(n, _tokens):
        if n == 2:  # pass 3 will be in flight at the frozen shard when SIGKILL lands
            victim.freeze()
            asyncio.get_running_loop().call_later(0.3, victim.kill)

    @run
    async def scenario(ring):
        t0 = time.monotonic()
        with pytest.raises(ShardUnavailable, match=r"request lost, pass 3, shard layers 2..3 at 127.0.0.1:\d+: shard "
                                                   r"layers 2..3 at 127.0.0.1:\d+ closed the connection \(the shard "
                                                   r"process died or restarted\)") as err:
            await ring.generate("lost", prompt, on_pass=strike)
        elapsed = time.monotonic() - t0
        survivor = await ring.hops[0].live_requests()
        with pytest.raises(ShardUnavailable, match=r"request next, pass 0, shard layers 2..3 .* refused the "
                                                   r"connection \(the shard process is not running\)"):
            await ring.generate("next", prompt)
        return err, elapsed, survivor

    err, elapsed, survivor = scenario(local_ring.ring)
    assert elapsed < 20 and not victim.alive
    assert survivor == []  # the surviving shard dropped the failed request's cache
    local_ring.restart(1)
    asyncio.run(_warm(local_ring.ring))

    @run
    async def after(ring):
        return await ring.generate("after", prompt), await live(ring)

    result, held = after(local_ring.ring)
    assert result.tokens == expected
    assert held == [[], []]


def test_survivor_serves_alone_when_the_ring_shrinks(setup, local_ring):
    """Like Exo on a topology change: the remaining node takes every layer and serves new requests by itself."""
    model, _, prompt, expected = setup
    alone = Ring([RemoteShard(local_ring.processes[0].port, Shard(model, 0, LAYERS - 1, LAYERS), FAST)])
    result = run(lambda ring: ring.generate("alone", prompt))(alone)
    assert result.tokens == expected
    # and back to its own layers for the other tests (the engine reloads the shard a message names)
    back = run(lambda ring: ring.generate("back", prompt))(local_ring.ring)
    assert back.tokens == expected


def test_shard_restarted_mid_request_is_refused_clearly(setup, local_ring):
    _, _, prompt, expected = setup

    def restart(n, _tokens):
        if n == 1:
            local_ring.restart(1)  # blocks the driver while the new process starts: the request's cache is gone

    @run
    async def scenario(ring):
        with pytest.raises(ShardRefused, match=r"request amnesia, pass 2, shard layers 2..3 .*: RingStateError: "
                                               r"request amnesia is unknown to layers 2..3: its prompt never ran here"):
            await ring.generate("amnesia", prompt, on_pass=restart)

    @run
    async def after_restart(ring):
        after = await ring.generate("after-restart", prompt)
        return after, await live(ring)

    scenario(local_ring.ring)
    # the new process compiles every pass kind (draft chains too) on first use: warm it up as a new ring would be
    asyncio.run(_warm(Ring([local_ring.ring.hops[1]])))
    after, held = after_restart(local_ring.ring)
    assert after.tokens == expected
    assert held == [[], []]


def test_frozen_shard_times_out_then_recovers_without_leaks(setup, local_ring):
    _, _, prompt, expected = setup
    victim = local_ring.processes[1]
    # short enough to keep the test quick, long enough for a warm tiny-model pass on a loaded 2-core CI machine
    local_ring.set_link(LinkConfig(hop_timeout_s=5.0, release_timeout_s=1.0))

    def freeze(n, _tokens):
        if n == 1:
            victim.freeze()

    @run
    async def scenario(ring):
        t0 = time.monotonic()
        with pytest.raises(ShardUnavailable, match=r"request hung, pass 2, shard layers 2..3 .* did not answer within "
                                                   r"5 s \(hung, overloaded or cut off\)"):
            await ring.generate("hung", prompt, on_pass=freeze)
        return time.monotonic() - t0, set().union(*ring.unreleased)

    try:
        elapsed, unreleased = scenario(local_ring.ring)
    finally:
        victim.thaw()
        local_ring.set_link(FAST)
    assert elapsed < 20
    assert unreleased == {"hung"}  # the frozen shard could not be told: retried before the next request

    @run
    async def after(ring):
        return await ring.generate("thawed", prompt), await live(ring), set().union(*ring.unreleased)

    result, held, unreleased = after(local_ring.ring)
    assert result.tokens == expected
    assert held == [[], []] and unreleased == set()


def test_stale_reply_is_refused(setup, local_ring):
    """A shard answering pass 3 with its answer to pass 2 (a replayed message) must not be decoded."""
    _, _, prompt, expected = setup
    ring = local_ring.ring
    last = ring.hops[1]
    replies = []

    class Replaying:
        link_s = engine_s = 0.0

        def __repr__(self):
            return repr(last)

        async def __call__(self, request_id, x, state):
            replies.append(await last(request_id, x, state))
            return replies[-2] if len(replies) == 4 else replies[-1]

        async def release(self, request_id):
            return await last.release(request_id)

        async def close(self):
            await last.close()

    stale = Ring([ring.hops[0], Replaying()])

    @run
    async def scenario(r):
        with pytest.raises(StaleReply, match=r"request replay, pass 3, shard layers 2..3 .*: its reply carries step 3, "
                                             r"expected 4 \(a stale or replayed reply\)"):
            await r.generate("replay", prompt)
        return await r.generate("fresh", prompt), await live(ring)

    result, held = scenario(stale)
    assert result.tokens == expected
    assert held == [[], []]


def test_reply_to_another_message_is_refused():
    """The transport itself: a reply whose id is not the message just sent (a late answer) is never used."""
    async def scenario():
        async def handle(reader, writer):
            header, _ = await recv_frame(reader)
            await send_frame(writer, {"id": header["id"] - 1, "state": None}, np.zeros(1))
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        hop = RemoteShard(server.sockets[0].getsockname()[1], Shard("m", 0, 0, 1), FAST)
        try:
            with pytest.raises(StaleReply, match=r"shard layers 0..0 at 127.0.0.1:\d+ answered message 0 when message 1 "
                                                 "was sent"):
                await hop("r", np.zeros((1, 1), np.int64), None)
            assert hop.writer is None  # the connection is dropped: the next message starts clean
        finally:
            await hop.close()
            server.close()

    asyncio.run(asyncio.wait_for(scenario(), BOUND_S))


class _DoublingEngine:
    """The blocking engine calls ShardServer makes, answered without a model: infer doubles its input."""
    requests = {"held": None}
    tree = SimpleNamespace(name="plain", size=1)

    def load_now(self, shard):
        pass

    def infer_tensor_now(self, request_id, shard, x, state):
        if request_id == "bad":
            raise RingStateError("refused on purpose")
        return x * 2, {"seen": [request_id, shard.start_layer, state]}

    def release_now(self, request_id):
        return request_id in self.requests


def test_shard_server_answers_whole_messages_however_they_arrive():
    """Messages split into 7-byte pieces and run together still get one reply each, in order; an engine error is a
    reply naming it, not a dropped connection; stop() ends serving and closes the port."""
    server = ShardServer(_DoublingEngine(), Shard("m", 0, 0, 2))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection((HOST, server.port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = (pack_frame({"id": 1, "op": "infer", "request_id": "r", "state": {"s": 1},
                                "shard": Shard("m", 1, 1, 2).to_dict()}, np.arange(3, dtype=np.int32))
                    + pack_frame({"id": 2, "op": "infer", "request_id": "bad"}, np.zeros(1))
                    + pack_frame({"id": 3, "op": "release", "request_id": "held"}))
            for i in range(0, len(data), 7):
                sock.sendall(data[i:i + 7])
                time.sleep(0.001)
            buf, replies = bytearray(), []
            while len(replies) < 3:
                chunk = sock.recv(1 << 16)
                assert chunk, f"the server closed the connection after {len(replies)} replies"
                buf += chunk
                while (frame := _take_frame(buf)) is not None:
                    header = json.loads(frame[0])
                    replies.append((header, frame_array(header, frame[1])))
    finally:
        server.stop()
        thread.join(10)
    assert not thread.is_alive()
    (first, out), (second, none), (third, _) = replies
    assert first["id"] == 1 and first["state"] == {"seen": ["r", 1, {"s": 1}]} and first["engine_s"] >= 0
    assert out.dtype == np.int32 and out.tolist() == [0, 2, 4]
    assert second == {"id": 2, "error": "RingStateError: refused on purpose"} and none is None
    assert third == {"id": 3, "held": True}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, server.port), timeout=5)


def test_a_shard_that_cannot_start_says_why(tmp_path):
    lr = LocalRing([ShardSpec(str(tmp_path / "missing"), 0, 0, 1)], FAST, start_timeout_s=60)
    with pytest.raises(ShardUnavailable, match=r"shard process layers 0..0 \(pid \d+\) exited with code 1 while "
                                               r"starting:(\n.*)*missing"):
        lr.start()
    assert not lr.processes[0].alive


def test_bench_ring_command_on_a_tiny_model(setup, tmp_path):
    """`exo-medusa bench-ring` end to end, JSON report. One-shard rings keep it to two processes to compile (the
    two-shard ring is what the fault tests above run)."""
    from exo_tinygrad_medusa.cli import main

    model, heads, _, _ = setup
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Tell me about the sea.", "category": "x", "id": "sea"}\n')
    out = tmp_path / "ring.json"
    code = main(["bench-ring", model, "--medusa-heads", heads, "--medusa-choices", "cpu-8", "--shards", "1",
                 "--link-delays-ms", "0,5", "--prompts", str(prompts), "--max-generate-tokens", "6",
                 "--warmup-tokens", "2", "--hop-timeout-s", "60", "--exo", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["summary"]["identical"] and report["summary"]["tree"] == "cpu-8"
    cells = report["cells"]
    assert [(c["shards"], c["delay_ms"]) for c in cells] == [(1, 0.0), (1, 5.0)]
    assert all(c["plain_passes_per_token"] == 1.0 for c in cells)  # plain decoding: one ring pass per token
    assert cells[1]["link_ms_per_pass"] >= 5.0                          # one link: the shard back to itself
    assert cells[0]["link_ms_per_pass"] == 0.0
    assert {r["plain"]["decode_tokens"] for r in report["runs"]} == {5}
    assert report["model_fit"][0]["shards"] == 1
    # the standalone step beside the ring's pass, on the same prompts
    assert all(c["standalone_ms_per_step"] > 0 and c["plain_pass_per_standalone_step"] > 0 for c in cells)
    # compute per pass splits into the shard's engine (timed by the shard) and the transport around it
    assert all(0 < c["plain_engine_ms_per_pass"] < c["plain_compute_ms_per_pass"] for c in cells)
    assert all(0 < r["plain"]["engine_s"] < r["plain"]["decode_s"] for r in report["runs"])
    assert {r["standalone"]["decode_tokens"] for r in report["runs"]} == {5}
    if not exo_available():
        assert "not importable" in report["exo"]["skipped"]
    else:  # a real two-node classic Exo ring, plain then Medusa, through Exo's API
        assert report["exo"]["identical"] and report["exo"]["ratio"] > 0, report["exo"]


def test_bench_ring_rejects_bad_options(capsys):
    from exo_tinygrad_medusa.cli import main

    assert main(["bench-ring", "--shards", "2,x"]) == 2
    assert "--shards expects comma-separated numbers, got '2,x'" in capsys.readouterr().err
    assert main(["bench-ring", "--link-delays-ms", "-5"]) == 2
    assert "--link-delays-ms must be delays >= 0" in capsys.readouterr().err


def test_a_ring_of_shard_threads_matches_plain_decoding(setup):
    """--shard-threads: the same wire contract over loopback, the shards on threads of this process."""
    model, heads, prompt, expected = setup
    specs = [ShardSpec(model, a, b, LAYERS, medusa_heads=heads, medusa_choices="cpu-8", max_new_tokens=MAX_NEW)
             for a, b in split_layers(LAYERS, 2)]
    with LocalRing(specs, FAST, start_timeout_s=120, threads=True) as lr:
        assert all(shard.alive for shard in lr.processes)

        @run
        async def scenario(ring):
            result = await ring.generate("threads", prompt)
            return result, await live(ring)

        result, held = scenario(lr.ring)
        with pytest.raises(NotImplementedError, match="only shard processes can be killed or frozen"):
            lr.processes[0].freeze()
    assert result.tokens == expected and held == [[], []]
    assert result.engine_s > 0 and not any(shard.alive for shard in lr.processes)  # stopped with the ring


def test_bench_ring_with_shard_threads(setup, tmp_path):
    from exo_tinygrad_medusa.cli import main

    model, heads, _, _ = setup
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Tell me about the sea.", "category": "x", "id": "sea"}\n')
    out = tmp_path / "ring.json"
    assert main(["bench-ring", model, "--medusa-heads", heads, "--medusa-choices", "cpu-8", "--shards", "2",
                 "--link-delays-ms", "0", "--prompts", str(prompts), "--max-generate-tokens", "6",
                 "--warmup-tokens", "2", "--shard-threads", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["summary"]["shards_as"] == "threads" and report["summary"]["identical"]
    assert all(0 < r["plain"]["engine_s"] < r["plain"]["decode_s"] for r in report["runs"])
