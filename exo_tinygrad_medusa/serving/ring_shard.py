"""One engine shard served on a loopback socket, the far end of ring.py's `RemoteShard`:

    python -m exo_tinygrad_medusa.serving.ring_shard MODEL START END N_LAYERS [--medusa-heads DIR] ...

loads the shard, prints `PORT <n>` once it listens on 127.0.0.1, and exits when its stdin closes (the parent ended,
whatever the way it ended), so a shard never outlives the process that started it.

The process's one tinygrad thread (its main thread) waits on the sockets itself and runs each message on the
engine's blocking calls (`infer_tensor_now` and the like). An asyncio server would wake its event loop, hand the
pass to the engine thread and wake the loop again for the reply: three wake-ups and asyncio's stream machinery a
hop instead of one (with an engine that does nothing, a two-shard pass took ~1.0 ms that way and ~0.65 ms this way
on a 2-core VM, where a decode step of SmolLM2-135M is ~7 ms). Connections are served in turn, message by message,
as the engine runs one call at a time anyway.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import selectors
import socket
import struct
import sys
import threading
import time

import numpy as np

from ..model.shard import Shard
from .ring import HOST, frame_array, pack_frame, shard_label

log = logging.getLogger(__name__)
SEND_TIMEOUT_S = 30.0   # a reply the driver does not read for this long (it hung): drop the connection


class ShardServer:
    """Serves `engine` for `shard` (the default when a message names none) on the calling thread until `stop()`."""

    def __init__(self, engine, shard: Shard, host: str = HOST, port: int = 0, lock=None):
        """lock: held while a message runs, where several servers share a process (their engines must not run
        tinygrad at once; a ring's hops never overlap, but warm-ups and releases go to every shard together)."""
        self.engine, self.shard = engine, shard
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.listener = socket.create_server((host, port))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._buffers: dict[socket.socket, bytearray] = {}

    def stop(self) -> None:
        """From any thread: `serve` returns after the message it is running."""
        self._wake_w.send(b"x")

    def serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "stop")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "stop":
                        return
                    if key.data == "accept":
                        self._accept(sel)
                    elif not self._read(key.fileobj):
                        self._close(sel, key.fileobj)
        finally:
            for conn in list(self._buffers):
                self._close(sel, conn)
            sel.close()
            self.listener.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        conn.settimeout(SEND_TIMEOUT_S)  # recv runs only when select says readable: the timeout bounds sends
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffers[conn] = bytearray()
        sel.register(conn, selectors.EVENT_READ, "conn")

    def _close(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        sel.unregister(conn)
        self._buffers.pop(conn, None)
        conn.close()

    def _read(self, conn: socket.socket) -> bool:
        """Read what arrived and answer every whole message in it; False when the connection is finished."""
        try:
            chunk = conn.recv(1 << 16)  # below malloc's mmap threshold: no fresh mapping for every message
        except OSError:  # reset by the driver (it dropped the connection after an error)
            return False
        if not chunk:
            return False
        buf = self._buffers[conn]
        buf += chunk
        while (frame := _take_frame(buf)) is not None:
            try:
                header = json.loads(frame[0])
            except ValueError:
                log.info("shard %s: a malformed message header: closing the connection", shard_label(self.shard))
                return False
            with self.lock:
                reply, out = self.handle(header, frame_array(header, frame[1]))
            try:
                conn.sendall(pack_frame(reply, out))
            except OSError:  # the driver went away or stopped reading: it reconnects for its next message
                return False
        return True

    def handle(self, header: dict, x: np.ndarray | None) -> tuple[dict, np.ndarray | None]:
        engine = self.engine
        reply: dict = {"id": header.get("id")}
        out = None
        try:
            target = Shard(**header["shard"]) if header.get("shard") else self.shard
            op = header.get("op", "infer")
            if op == "infer":
                t0 = time.perf_counter()
                out, reply["state"] = engine.infer_tensor_now(header["request_id"], target, x, header.get("state"))
                reply["engine_s"] = time.perf_counter() - t0  # the rest of a hop is the transport's
            elif op == "encode":
                engine.load_now(target)
                out = np.array(engine.tokenizer.encode_chat(header["messages"]), dtype=np.int64)
            elif op == "release":  # no shard load: a shard switch already dropped every cache
                reply["held"] = engine.release_now(header["request_id"])
            elif op == "warm_up":
                engine.warm_up_now(target)
            elif op == "status":  # what the engine holds now, whatever shard it holds
                reply["requests"] = list(engine.requests)
                reply["tree"] = {"name": engine.tree.name, "size": engine.tree.size}
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as e:  # the driver raises it with the request, pass and shard named
            log.info("shard %s: %s: %s", shard_label(self.shard), type(e).__name__, e)
            reply, out = {"id": header.get("id"), "error": f"{type(e).__name__}: {e}"}, None
        return reply, out


def _take_frame(buf: bytearray) -> tuple[bytes, bytes] | None:
    """(header bytes, payload bytes) of the first whole frame in `buf`, removed from it; None while incomplete."""
    if len(buf) < 4:
        return None
    (n,) = struct.unpack_from(">I", buf, 0)
    if len(buf) < 12 + n:
        return None
    (m,) = struct.unpack_from(">Q", buf, 4 + n)
    end = 12 + n + m
    if len(buf) < end:
        return None
    frame = bytes(buf[4:4 + n]), bytes(buf[12 + n:end])
    del buf[:end]
    return frame


def serve_until_stdin_closes(engine, shard: Shard) -> None:
    """Load the shard, print `PORT <n>`, serve on this thread until stdin closes."""
    engine.load_now(shard)
    server = ShardServer(engine, shard)
    print(f"PORT {server.port}", flush=True)

    def watch_stdin() -> None:
        sys.stdin.read()
        server.stop()

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    server.serve()


def build_engine(*, medusa_enabled: bool = False, medusa_heads: str | None = None, medusa_choices: str | None = None,
                 max_new_tokens: int = 128, device: str | None = None, dtype: str | None = None,
                 max_context: int = 2048, max_requests: int = 4):
    """The engine a shard serves, from a shard's options (the command line's, or a ShardSpec's)."""
    from .engine import MedusaInferenceEngine
    from ..decoding.sampling import GenerationConfig
    from ..decoding.session import MedusaOptions

    medusa = MedusaOptions(medusa_enabled or medusa_heads is not None, medusa_heads, choices=medusa_choices)
    return MedusaInferenceEngine(medusa, GenerationConfig(max_new_tokens=max_new_tokens), device=device, dtype=dtype,
                                 max_context=max_context, max_requests=max_requests)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exo_tinygrad_medusa.serving.ring_shard",
                                description="serve one engine shard")
    p.add_argument("model")
    p.add_argument("start", type=int)
    p.add_argument("end", type=int)
    p.add_argument("n_layers", type=int)
    p.add_argument("--medusa-enabled", action="store_true")
    p.add_argument("--medusa-heads", default=None)
    p.add_argument("--medusa-choices", default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--max-requests", type=int, default=4)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s shard {args.start}..{args.end} %(name)s: %(message)s")
    engine = build_engine(medusa_enabled=args.medusa_enabled, medusa_heads=args.medusa_heads,
                          medusa_choices=args.medusa_choices, max_new_tokens=args.max_new_tokens, device=args.device,
                          dtype=args.dtype, max_context=args.max_context, max_requests=args.max_requests)
    serve_until_stdin_closes(engine, Shard(args.model, args.start, args.end, args.n_layers))


if __name__ == "__main__":
    main()
