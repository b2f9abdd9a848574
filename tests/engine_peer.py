"""One engine shard in its own process, served on a loopback socket (the package's ring transport): each message is
a JSON header plus the raw bytes of one numpy array, so tensors and inference_state cross a real process boundary.

    python tests/engine_peer.py MODEL START END N_LAYERS [--medusa-heads DIR] [--medusa-choices TREE]
                                [--max-new-tokens N]

prints `PORT <n>` once it listens on 127.0.0.1 and serves until stdin closes. Same as
`python -m exo_tinygrad_medusa.serving.ring_shard` (started by ring_local.py), kept as a script for the tests that start a peer by path."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exo_tinygrad_medusa.serving import ring, ring_shard  # noqa: E402


class RemoteShard(ring.RemoteShard):
    """A ring hop served by an engine_peer process, for the shard it was started with."""

    @classmethod
    async def connect(cls, port: int, link: ring.LinkConfig = ring.LinkConfig()) -> "RemoteShard":
        hop = cls(port, None, link)
        hop.reader, hop.writer = await asyncio.open_connection(ring.HOST, port)
        return hop


if __name__ == "__main__":
    ring_shard.main()
