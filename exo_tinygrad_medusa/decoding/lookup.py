"""Drafts from the context (prompt lookup): when the last n tokens (n = 3, 2, 1, longest first) occurred earlier in
the prompt or the output, the tokens that followed their most recent occurrence are a draft of what comes next.

Drafts enter a Medusa step by overwriting the tokens of one root-to-leaf chain of the fixed-shape tree on the host,
just before the verify call: the tree's shape, mask and depths stay as captured, so nothing recompiles. Verification
is unchanged, so greedy output stays identical to plain greedy decoding. For exact sampling a draft is a
deterministic proposal (a function of the tokens so far, like the heads' top-k), and grafting never puts the same
token on two siblings, so `sampling.exact_accept` stays distribution-preserving.

Without heads, lookup drives plain decoding through a chain tree whose nodes all come from the lookup
(`NoProposals` stands in for the heads the captured steps call; its placeholders are always overwritten or unused)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor, dtypes

from .tree import MedusaTree


@dataclass(frozen=True)
class LookupConfig:
    max_ngram: int = 3         # longest suffix looked up
    min_ngram: int = 1         # shortest suffix that still counts as a match
    chain_tokens: int = 4      # draft length of the lookup-only chain tree (plain decoding with lookup)
    # weight of the past in the running scores of heads and drafts (SourceScores): ~1 / (1 - decay) steps of memory
    score_decay: float = 0.8

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        if not 0 <= self.score_decay < 1:
            raise ValueError(f"prompt lookup score_decay must be in [0, 1), got {self.score_decay}")
        if self.chain_tokens < 1:
            raise ValueError(f"prompt lookup chain_tokens must be >= 1, got {self.chain_tokens}")


class NgramIndex:
    """A growing token sequence and, per n-gram, where the token after its most recent occurrence sits.

    An n-gram is indexed only once a token follows it, so the current suffix never matches itself."""

    def __init__(self, cfg: LookupConfig = LookupConfig(), tokens=()):
        self.cfg = cfg
        self.tokens: list[int] = []
        self.follow: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self.extend(tokens)

    def extend(self, tokens) -> None:
        lo, hi = self.cfg.min_ngram, self.cfg.max_ngram
        seq = self.tokens
        for t in tokens:
            i = len(seq)
            for n in range(lo, min(hi, i) + 1):
                self.follow[tuple(seq[i - n:i])] = i  # later occurrences overwrite: the most recent one wins
            seq.append(int(t))

    def draft(self, length: int) -> tuple[list[int], int]:
        """`length` tokens predicted to follow, and the n of the suffix that matched (0: no match, no tokens).

        The continuation may run into the suffix itself (a repeating pattern): then it repeats with the period the
        match implies, which is what the model does while it loops."""
        seq = self.tokens
        for n in range(min(self.cfg.max_ngram, len(seq)), self.cfg.min_ngram - 1, -1):
            start = self.follow.get(tuple(seq[len(seq) - n:]))
            if start is None:
                continue
            out: list[int] = []
            for k in range(length):
                j = start + k
                out.append(seq[j] if j < len(seq) else out[j - len(seq)])  # (seq + out)[j]; j - len(seq) < k
            return out, n
        return [], 0


class Grafter:
    """Writes a draft into a tree's tokens along one root-to-leaf chain, keeping the tree's shape.

    From the root, draft token i goes to a child of the node holding token i - 1: a child that already holds it is
    followed as it is (no duplicate siblings, and the heads' subtree under it stays useful); otherwise one child is
    overwritten: the one whose chain hosts most of the rest of the draft, among those the least likely to be
    accepted (highest rank, i.e. the heads' weakest guess), so the heads' best proposals survive when they can."""

    def __init__(self, tree: MedusaTree):
        self.tree = tree
        self.children: list[list[int]] = [[] for _ in range(tree.size)]
        for i in range(1, tree.size):
            self.children[int(tree.parents[i])].append(i)
        self.height = np.zeros(tree.size, dtype=np.int64)  # levels below each node
        for i in range(tree.size - 1, 0, -1):  # nodes are sorted by depth: children come after their parent
            p = int(tree.parents[i])
            self.height[p] = max(self.height[p], self.height[i] + 1)

    def _host(self, node: int, remaining: int) -> int:
        def key(c: int):
            return (min(remaining, int(self.height[c]) + 1), int(self.tree.node_rank[c]), c)
        return max(self.children[node], key=key)

    def graft(self, tree_tokens: np.ndarray, draft: list[int]) -> tuple[np.ndarray, int]:
        """A copy of tree_tokens with the draft grafted below the root, and how many draft tokens it holds."""
        out = np.array(tree_tokens, copy=True)
        node, placed = 0, 0
        for i, tok in enumerate(draft):
            kids = self.children[node]
            if not kids:
                break
            same = [c for c in kids if int(out[c]) == tok]
            if same:
                node = min(same, key=lambda c: int(self.tree.node_rank[c]))
            else:
                node = self._host(node, len(draft) - i)
                out[node] = tok
            placed += 1
        return out, placed

    def matched(self, tree_tokens: np.ndarray, truth: list[int]) -> int:
        """How many leading tokens of `truth` (what followed the root) lie along one path of the tree."""
        node, n = 0, 0
        for tok in truth:
            node = next((c for c in self.children[node] if int(tree_tokens[c]) == tok), -1)
            if node < 0:
                break
            n += 1
        return n


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SourceScores:
    """Which source of proposals to trust in the next step: the heads' tree as proposed, or the tree with the
    context's draft grafted in. Both are scored after every step that had a draft, on the tokens the step emitted
    (the model's own continuation, whichever source was used): the number of leading tokens each got right,
    averaged with exponential decay. The draft is grafted only while it scores strictly higher, so heads that
    predict well are never displaced by a weaker draft, and weak heads give way to the context where it repeats.
    The choice depends only on tokens already emitted, so drafts stay deterministic proposals."""

    def __init__(self, decay: float):
        self.decay, self.heads, self.lookup = decay, 0.0, 0.0

    @property
    def prefer_lookup(self) -> bool:
        return self.lookup > self.heads

    def update(self, heads: int, lookup: int) -> None:
        self.heads = self.decay * self.heads + (1 - self.decay) * heads
        self.lookup = self.decay * self.lookup + (1 - self.decay) * lookup


class NoProposals:
    """Stands in for Medusa heads when every non-root node of a chain comes from the lookup: the captured steps ask
    for proposals and get placeholders (token 0) that the host overwrites before each verify."""

    sequential = False  # placeholders do not continue the root

    def __init__(self, num_heads: int):
        self.num_heads = num_heads

    def propose(self, hidden: Tensor, k: int, num_heads: int | None = None, root: Tensor | None = None) -> Tensor:
        n = self.num_heads if num_heads is None else num_heads
        return Tensor.zeros(n, k, dtype=dtypes.int32, device=hidden.device).contiguous()
