"""Drive one request around a ring of engine shards the way Exo's node loop does, without Exo."""
from __future__ import annotations

from typing import Awaitable, Callable

import numpy as np

from exo_tinygrad_medusa.serving.engine import StepState

Hop = Callable[[str, np.ndarray, dict | None], Awaitable[tuple[np.ndarray, dict | None]]]


def local_hop(engine, shard) -> Hop:
    return lambda request_id, x, state: engine.infer_tensor(request_id, shard, x, state)


async def one_pass(hops: list[Hop], request_id: str, x: np.ndarray, state: dict | None):
    for hop in hops:
        x, state = await hop(request_id, x, state)
    return x, state


async def run_ring(hops: list[Hop], prompt_ids: list[int], request_id: str = "req",
                   max_passes: int = 10_000) -> tuple[list[int], list[StepState]]:
    """Prompt first, then the emitted tokens and the state go back to the first shard until the last shard says
    the request finished. Returns every emitted token and the state after each pass."""
    x, state = np.array([prompt_ids], dtype=np.int64), None
    tokens, states = [], []
    for _ in range(max_passes):
        x, state = await one_pass(hops, request_id, x, state)
        step = StepState.from_state(state)
        tokens += x.reshape(-1).tolist()
        states.append(step)
        if step.finish_reason:
            return tokens, states
    raise AssertionError(f"no finish after {max_passes} passes")
