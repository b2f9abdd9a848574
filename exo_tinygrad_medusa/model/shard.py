"""Exo's layer shard: a model instance holds layers start_layer..end_layer (inclusive) of n_layers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int

    def __post_init__(self):
        if not 0 <= self.start_layer <= self.end_layer < self.n_layers:
            raise ValueError(f"invalid shard layers {self.start_layer}..{self.end_layer} of {self.n_layers}")

    @classmethod
    def whole(cls, model_id: str, n_layers: int) -> "Shard":
        return cls(model_id, 0, n_layers - 1, n_layers)

    @classmethod
    def of(cls, shard) -> "Shard":
        """Accept Exo's Shard (or anything with the same four fields)."""
        return shard if isinstance(shard, cls) else cls(shard.model_id, shard.start_layer, shard.end_layer, shard.n_layers)

    def is_first_layer(self) -> bool:
        return self.start_layer == 0

    def is_last_layer(self) -> bool:
        return self.end_layer == self.n_layers - 1

    def get_layer_count(self) -> int:
        return self.end_layer - self.start_layer + 1

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "start_layer": self.start_layer, "end_layer": self.end_layer, "n_layers": self.n_layers}
