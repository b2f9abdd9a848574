"""A driver that runs requests around engine shards served on sockets: the transport of `exo-medusa bench-ring`
and of the ring fault tests (the shard server: ring_shard.py; shard processes on one machine: ring_local.py).

Topology. On Exo's ring each node forwards a pass to the next one; here a driver relays it (driver -> shard 0 ->
driver -> shard 1 -> ...). Every shard sees the same sequence of `MedusaInferenceEngine.infer_tensor` calls with
the same JSON step state as on Exo's ring (the wire contract in engine.py). The injected one-way link delay is paid
once per ring link, when a hop's input is delivered: shard i-1 -> shard i, and the last shard's tokens going back
to shard 0. An N-shard pass therefore pays N delays, as on a ring of N machines. The relay itself costs a loopback
round trip per hop (wake-ups of the driver and the shard process: 0.3-1 ms a hop on a 2-core VM); each reply says
how long the shard's engine took (`engine_s`), so the benchmark can tell compute from transport.

Wire. A message is one frame: 4-byte big-endian header length, JSON header, 8-byte payload length, the raw bytes
of one numpy array (its dtype and shape in the header). A request names an op (`infer`, `encode`, `release`,
`warm_up`, `status`), the shard (as Exo sends it with every tensor) and a message id that the reply repeats.

Faults. A dead shard (connection refused or closed), a silent one (no reply within `hop_timeout_s`) and a stale
reply (another message's id, or a step state that is not the pass just sent) all raise a `RingError` subclass that
names the request, the pass and the shard. After any error the connection is dropped and reopened on the next
call, so a late reply can never be read as the answer to a later message. The driver releases the request on
every shard it can reach when the request ends, finished or failed, so no KV cache outlives its request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .engine import RingStateError, StepState
from ..model.shard import Shard

log = logging.getLogger(__name__)
HOST = "127.0.0.1"


# -- errors ----------------------------------------------------------------------------------------------------
class RingError(RuntimeError):
    """A request failed on the ring; the message says which request, which pass, which shard and why."""


class ShardUnavailable(RingError):
    """A shard is unreachable, closed the connection (its process died or restarted) or did not answer in time."""


class ShardRefused(RingError):
    """A shard answered with an error (e.g. the engine's RingStateError after a restart lost the request's cache)."""


class StaleReply(RingError):
    """A reply that does not answer the message or the pass just sent (a replayed or late answer)."""


# -- framing ---------------------------------------------------------------------------------------------------
def pack_frame(header: dict, array: np.ndarray | None = None) -> bytes:
    payload = b""
    if array is not None:
        array = np.ascontiguousarray(array)
        header = {**header, "dtype": str(array.dtype), "shape": list(array.shape)}
        payload = array.tobytes()
    head = json.dumps(header).encode()
    return struct.pack(">I", len(head)) + head + struct.pack(">Q", len(payload)) + payload


def frame_array(header: dict, payload: bytes) -> np.ndarray | None:
    if "dtype" not in header:
        return None
    return np.frombuffer(payload, dtype=header["dtype"]).reshape(header["shape"])


async def send_frame(writer: asyncio.StreamWriter, header: dict, array: np.ndarray | None = None) -> None:
    writer.write(pack_frame(header, array))
    await writer.drain()


async def recv_frame(reader: asyncio.StreamReader) -> tuple[dict, np.ndarray | None]:
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    header = json.loads(await reader.readexactly(n))
    (m,) = struct.unpack(">Q", await reader.readexactly(8))
    return header, frame_array(header, await reader.readexactly(m))


def shard_label(shard: Shard) -> str:
    return f"layers {shard.start_layer}..{shard.end_layer}"


# -- client side -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkConfig:
    delay_s: float = 0.0             # injected one-way delay of every ring link
    hop_timeout_s: float = 300.0     # one shard's answer to one pass; the first passes compile kernels (slow on CPU)
    connect_timeout_s: float = 10.0
    release_timeout_s: float = 5.0   # releasing is best effort: a silent shard must not hold up the error report

    def __post_init__(self):
        if self.delay_s < 0:
            raise ValueError(f"link delay must be >= 0, got {self.delay_s}")
        for name in ("hop_timeout_s", "connect_timeout_s", "release_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class RemoteShard:
    """One ring hop served by a shard process: `await hop(request_id, x, state)` is its `infer_tensor`."""

    def __init__(self, port: int, shard: Shard | None, link: LinkConfig = LinkConfig(), host: str = HOST):
        """`shard` travels with every message, as Exo sends it with every tensor (None: the server's own)."""
        self.host, self.port, self.shard, self.link = host, port, shard, link
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.next_id = 0
        self.link_s = 0.0            # delay actually slept (asyncio wakes a little late): the benchmark reports it
        self.engine_s = 0.0          # time the shard's engine spent on the passes, as the shard reports it

    def __repr__(self) -> str:
        return f"shard {shard_label(self.shard) if self.shard else ''} at {self.host}:{self.port}".replace("  ", " ")

    async def __call__(self, request_id: str, x: np.ndarray, state: dict | None):
        if self.link.delay_s:
            t0 = time.perf_counter()
            await asyncio.sleep(self.link.delay_s)
            self.link_s += time.perf_counter() - t0
        header, out = await self.call({"op": "infer", "request_id": request_id, "state": state}, x)
        self.engine_s += float(header.get("engine_s", 0.0))
        return out, header.get("state")

    async def encode_chat(self, messages: list[dict]) -> list[int]:
        _, ids = await self.call({"op": "encode", "messages": messages})
        return ids.reshape(-1).tolist()

    async def release(self, request_id: str) -> bool:
        header, _ = await self.call({"op": "release", "request_id": request_id}, timeout=self.link.release_timeout_s)
        return bool(header.get("held"))

    async def warm_up(self) -> None:
        await self.call({"op": "warm_up"})

    async def status(self) -> dict:
        """{"requests": ids whose KV cache this shard holds, "tree": {"name", "size"}}."""
        header, _ = await self.call({"op": "status"}, timeout=self.link.release_timeout_s)
        return {"requests": header["requests"], "tree": header["tree"]}

    async def live_requests(self) -> list[str]:
        return (await self.status())["requests"]

    async def call(self, header: dict, array: np.ndarray | None = None, timeout: float | None = None):
        timeout = timeout or self.link.hop_timeout_s
        try:
            return await asyncio.wait_for(self._roundtrip(header, array), timeout)
        except asyncio.TimeoutError:
            self.drop()  # its answer may still come: never read it as the answer to the next message
            raise ShardUnavailable(f"{self} did not answer within {timeout:g} s (hung, overloaded or cut off)") from None
        except ConnectionRefusedError:
            self.drop()
            raise ShardUnavailable(f"{self} refused the connection (the shard process is not running)") from None
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            self.drop()
            raise ShardUnavailable(f"{self} closed the connection (the shard process died or restarted): "
                                   f"{type(e).__name__}") from None

    async def _roundtrip(self, header: dict, array: np.ndarray | None):
        if self.writer is None:
            self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port),
                                                              self.link.connect_timeout_s)
        self.next_id += 1
        message_id = self.next_id
        shard = {"shard": self.shard.to_dict()} if self.shard else {}
        await send_frame(self.writer, {**header, "id": message_id, **shard}, array)
        reply, out = await recv_frame(self.reader)
        if reply.get("id") != message_id:
            self.drop()
            raise StaleReply(f"{self} answered message {reply.get('id')} when message {message_id} was sent")
        if "error" in reply:
            raise ShardRefused(f"{self}: {reply['error']}")
        return reply, out

    def drop(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), self.link.release_timeout_s)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                pass
        self.reader = self.writer = None


@dataclass
class RingResult:
    request_id: str
    tokens: list[int]
    finish_reason: str | None
    prompt_s: float                   # the prompt pass (prefill on every shard), first token included
    decode_s: float                   # every later pass: what Medusa changes
    accepted: list[int] = field(default_factory=list)   # tokens emitted by each decode pass (len of its keep)
    link_s: float = 0.0               # injected delay slept during the decode passes
    engine_s: float = 0.0             # the shards' engines during the decode passes (the rest: transport and relay)

    @property
    def decode_passes(self) -> int:
        return len(self.accepted)

    @property
    def decode_tokens(self) -> int:
        return max(len(self.tokens) - 1, 0)  # the first token comes from the prompt pass

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


class Ring:
    """Runs requests around remote shards in order (the first holds layer 0, the last the final layer)."""

    def __init__(self, hops: list[RemoteShard]):
        if not hops:
            raise ValueError("a ring needs at least one shard")
        self.hops = hops
        # releases that failed (a silent or dead shard): retried before every request, because a shard that comes
        # back (thawed, reconnected) still holds those caches
        self.unreleased: list[set[str]] = [set() for _ in hops]

    async def generate(self, request_id: str, prompt_ids: list[int], max_passes: int = 100_000,
                       on_pass: Callable[[int, list[int]], object] | None = None) -> RingResult:
        """Prompt pass, then one pass per step until the last shard sets finish_reason. `on_pass(pass, tokens)`
        runs after each pass (tests use it to strike mid-request). Always releases the request on every shard."""
        if any(self.unreleased):
            await self._release_pending()
        x, state, tokens, accepted = np.array([prompt_ids], dtype=np.int64), None, [], []
        link0 = sum(h.link_s for h in self.hops)
        engine0 = sum(h.engine_s for h in self.hops)
        t0 = time.perf_counter()
        prompt_s, t_decode, finish = 0.0, t0, None
        try:
            for n in range(max_passes):
                x, state, step = await self._pass(request_id, n, x, state)
                emitted = x.reshape(-1).tolist()
                tokens += emitted
                if n == 0:
                    t_decode = time.perf_counter()
                    prompt_s = t_decode - t0
                    link0 = sum(h.link_s for h in self.hops)
                    engine0 = sum(h.engine_s for h in self.hops)
                else:
                    accepted.append(len(step.keep))
                if on_pass is not None:
                    on_pass(n, emitted)
                if step.finish_reason:
                    finish = step.finish_reason
                    break
            decode_s = time.perf_counter() - t_decode
        finally:
            await self.release(request_id)
        return RingResult(request_id, tokens, finish, prompt_s, decode_s, accepted,
                          sum(h.link_s for h in self.hops) - link0, sum(h.engine_s for h in self.hops) - engine0)

    async def _pass(self, request_id: str, n: int, x: np.ndarray, state: dict | None):
        sent = StepState.from_state(state)
        for i, hop in enumerate(self.hops):
            where = f"request {request_id}, pass {n}, {hop}"
            try:
                x, state = await hop(request_id, x, state)
                step = StepState.from_state(state)
            except RingError as e:
                raise type(e)(f"{where}: {e}") from None
            except RingStateError as e:  # a malformed state in the reply
                raise StaleReply(f"{where}: {e}") from None
            expected = n + 1 if hop is self.hops[-1] else (sent.step if sent else 0)
            if step is None or step.step != expected or x is None:
                raise StaleReply(f"{where}: its reply carries step {None if step is None else step.step}, expected "
                                 f"{expected} (a stale or replayed reply)")
        return x, state, step

    async def release(self, request_id: str) -> None:
        """Free the request's KV cache on every shard; one that cannot be reached now is retried later."""
        for pending in self.unreleased:
            pending.add(request_id)
        await self._release_pending()

    async def _release_pending(self) -> None:
        async def flush(hop: RemoteShard, pending: set[str]) -> None:
            for request_id in sorted(pending):
                try:
                    await hop.release(request_id)
                    pending.discard(request_id)
                except RingError as e:
                    log.info("request %s: not released on %s yet: %s", request_id, hop, e)
                    return  # one failure per shard is enough to know it is away
        await asyncio.gather(*(flush(h, p) for h, p in zip(self.hops, self.unreleased)))

    async def encode_chat(self, text: str) -> list[int]:
        return await self.hops[0].encode_chat([{"role": "user", "content": text}])

    async def warm_up(self) -> None:
        await asyncio.gather(*(h.warm_up() for h in self.hops))

    async def close(self) -> None:
        await asyncio.gather(*(h.close() for h in self.hops))
