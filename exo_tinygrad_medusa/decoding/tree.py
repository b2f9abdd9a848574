"""Medusa token trees: from `medusa_choices` (paths of top-k ranks per head) to the buffers one verify step needs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

Choice = tuple[int, ...]


@dataclass(frozen=True)
class MedusaTree:
    """Node 0 is the root (the base model's next token); node i > 0 is choices[i - 1] after sorting by depth.

    A node at depth d holds the rank-`choice[-1]` candidate of head d - 1 and sits at position start + d."""
    choices: tuple[Choice, ...]
    name: str = "custom"

    def __post_init__(self):
        choices = tuple(sorted({tuple(int(r) for r in c) for c in self.choices}, key=lambda c: (len(c), c)))
        if any(len(c) == 0 or min(c) < 0 for c in choices):
            raise ValueError("tree paths must be non-empty lists of ranks >= 0")
        present = set(choices)
        for c in choices:
            if len(c) > 1 and c[:-1] not in present:
                raise ValueError(f"tree path {list(c)} has no parent {list(c[:-1])} in the tree")
        object.__setattr__(self, "choices", choices)

    @property
    def size(self) -> int:
        return len(self.choices) + 1

    @property
    def depth(self) -> int:
        """Number of heads the tree needs (0 for the root-only tree of plain decoding)."""
        return max((len(c) for c in self.choices), default=0)

    @property
    def top_k(self) -> int:
        """Candidates each head must supply."""
        return max((c[-1] for c in self.choices), default=-1) + 1

    @cached_property
    def parents(self) -> np.ndarray:
        index = {c: i + 1 for i, c in enumerate(self.choices)}
        return np.array([-1] + [index[c[:-1]] if len(c) > 1 else 0 for c in self.choices], dtype=np.int32)

    @cached_property
    def depths(self) -> np.ndarray:
        return np.array([0] + [len(c) for c in self.choices], dtype=np.int32)

    @cached_property
    def node_head(self) -> np.ndarray:
        """Which head proposes each node (-1 for the root)."""
        return self.depths - 1

    @cached_property
    def node_rank(self) -> np.ndarray:
        return np.array([0] + [c[-1] for c in self.choices], dtype=np.int32)

    @cached_property
    def ancestor_mask(self) -> np.ndarray:
        """(T, T) bool: node i sees node j iff j is i or one of its ancestors."""
        sees = np.eye(self.size, dtype=bool)
        for i in range(1, self.size):
            sees[i] |= sees[self.parents[i]]
        return sees

    @cached_property
    def tree_mask(self) -> np.ndarray:
        """Additive attention mask for the verify step: 0 where visible, -inf elsewhere."""
        return np.where(self.ancestor_mask, 0.0, -np.inf).astype(np.float32)

    @cached_property
    def retrieve_paths(self) -> np.ndarray:
        """(P, depth + 1) node indices of each root-to-leaf path; entries past `path_lengths` repeat the leaf."""
        children = set(self.parents[1:].tolist())
        leaves = [i for i in range(self.size) if i not in children]
        paths = np.zeros((len(leaves), self.depth + 1), dtype=np.int32)
        for p, leaf in enumerate(leaves):
            path = np.flatnonzero(self.ancestor_mask[leaf]).tolist()  # ancestors sorted by index == by depth
            paths[p, :len(path)] = path
            paths[p, len(path):] = leaf
        return paths

    @cached_property
    def path_lengths(self) -> np.ndarray:
        return self.depths[self.retrieve_paths[:, -1]] + 1

    @cached_property
    def is_chain(self) -> bool:
        """Every path is 0, 1, 2, ... : accepted nodes are already in consecutive cache slots."""
        return bool(np.all(self.parents[1:] == np.arange(self.size - 1)))

    def check_heads(self, num_heads: int) -> None:
        if self.depth > num_heads:
            raise ValueError(f"tree {self.name!r} is {self.depth} levels deep but only {num_heads} Medusa heads are loaded")


PLAIN = MedusaTree((), "plain")


def chain(n: int) -> MedusaTree:
    return MedusaTree(tuple((0,) * k for k in range(1, n + 1)), f"chain-{n}")


def presets() -> dict[str, list]:
    data = json.loads(resources.files("exo_tinygrad_medusa").joinpath("data/trees.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _is_path_list(data) -> bool:
    return isinstance(data, list) and all(isinstance(c, list) and all(type(r) is int for r in c) for c in data)


def load_tree(spec: str) -> MedusaTree:
    """A preset name (`chain-N`, `cpu-8`, `mc_sim_7b_63`, ...) or a JSON file holding a list of paths."""
    if spec.startswith("chain-") and spec[6:].isdigit():
        return chain(int(spec[6:]))
    known = presets()
    if spec in known:
        return MedusaTree(tuple(map(tuple, known[spec])), spec)
    path = Path(spec)
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"tree file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"tree file {path} is not valid JSON: {e}") from None
        choices = data.get("choices") if isinstance(data, dict) else data
        if not _is_path_list(choices):
            raise ValueError(f"tree file {path} must hold a JSON list of paths (lists of integer ranks) or an object "
                             f"whose \"choices\" is one")
        return MedusaTree(tuple(map(tuple, choices)), path.stem)
    raise ValueError(f"unknown tree {spec!r}: use chain-N, one of {', '.join(known)}, or a JSON file of paths")
