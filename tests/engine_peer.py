"""One engine shard in its own process, served on a loopback socket: each message is a JSON header plus the raw
bytes of one numpy array, so tensors and inference_state cross a real process boundary.

    python tests/engine_peer.py MODEL START END N_LAYERS [--medusa-heads DIR] [--medusa-choices TREE]
                                [--max-new-tokens N]

prints `PORT <n>` once it listens on 127.0.0.1 and serves until stdin closes."""
from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exo_tinygrad_medusa.engine import MedusaInferenceEngine  # noqa: E402
from exo_tinygrad_medusa.sampling import GenerationConfig  # noqa: E402
from exo_tinygrad_medusa.session import MedusaOptions  # noqa: E402
from exo_tinygrad_medusa.shard import Shard  # noqa: E402


async def send_frame(writer: asyncio.StreamWriter, header: dict, array: np.ndarray | None = None) -> None:
    payload = b""
    if array is not None:
        array = np.ascontiguousarray(array)
        header = {**header, "dtype": str(array.dtype), "shape": list(array.shape)}
        payload = array.tobytes()
    head = json.dumps(header).encode()
    writer.write(struct.pack(">I", len(head)) + head + struct.pack(">Q", len(payload)) + payload)
    await writer.drain()


async def recv_frame(reader: asyncio.StreamReader) -> tuple[dict, np.ndarray | None]:
    (n,) = struct.unpack(">I", await reader.readexactly(4))
    header = json.loads(await reader.readexactly(n))
    (m,) = struct.unpack(">Q", await reader.readexactly(8))
    payload = await reader.readexactly(m)
    if "dtype" not in header:
        return header, None
    return header, np.frombuffer(payload, dtype=header["dtype"]).reshape(header["shape"])


class RemoteShard:
    """A ring hop served by an engine_peer process."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> "RemoteShard":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def __call__(self, request_id: str, x: np.ndarray, state: dict | None):
        await send_frame(self.writer, {"request_id": request_id, "state": state}, x)
        header, out = await recv_frame(self.reader)
        if "error" in header:
            raise RuntimeError(f"peer: {header['error']}")
        return out, header["state"]

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def serve(engine: MedusaInferenceEngine, shard: Shard) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header, x = await recv_frame(reader)
                try:
                    out, state = await engine.infer_tensor(header["request_id"], shard, x, header["state"])
                    await send_frame(writer, {"state": state}, out)
                except Exception as e:  # reported to the driver, which raises it
                    await send_frame(writer, {"error": f"{type(e).__name__}: {e}"})
        except asyncio.IncompleteReadError:
            writer.close()

    await engine.ensure_shard(shard)
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    # serve until the parent closes our stdin (or dies)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    server.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("start", type=int)
    p.add_argument("end", type=int)
    p.add_argument("n_layers", type=int)
    p.add_argument("--medusa-heads", default=None)
    p.add_argument("--medusa-choices", default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    args = p.parse_args()
    medusa = MedusaOptions(args.medusa_heads is not None, args.medusa_heads, choices=args.medusa_choices)
    engine = MedusaInferenceEngine(medusa, GenerationConfig(max_new_tokens=args.max_new_tokens))
    asyncio.run(serve(engine, Shard(args.model, args.start, args.end, args.n_layers)))


if __name__ == "__main__":
    main()
