"""Drafts from the context (prompt lookup): when the last n tokens (n = 3, 2, 1, longest first) occurred earlier in
the prompt or the output, the tokens that followed their most recent occurrence are a draft of what comes next.

Drafts enter a Medusa step by overwriting the tokens of one root-to-leaf chain of the fixed-shape tree on the host,
just before the verify call: the tree's shape, mask and depths stay as captured, so nothing recompiles. Verification
is unchanged, so greedy output stays identical to plain greedy decoding. For exact sampling a draft is a
deterministic proposal (a function of the tokens so far, like the heads' top-k), and grafting never puts the same
token on two siblings, so `sampling.exact_accept` stays distribution-preserving.

Drafts are verified as chains sized to what they are expected to return (`DraftPlanner`): one captured step per
size in `LookupConfig.chain_sizes`, all on the generator's KV cache, whose nodes all come from the draft (`NoProposals`
stands in for the heads the captured steps call; its placeholders are always overwritten or unused). A step with no
promising draft is a plain one-token step, or the heads' tree where heads are loaded."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor, dtypes

from .tree import MedusaTree


# Relative cost of a verify step over T tokens (T = 1: a plain step) on a 2-core CPU with the hand-written kernels
# (exo-medusa bench --cost-sizes, SmolLM2-135M Q4_1, 2026-12-02); sizes between two entries are interpolated.
DEFAULT_STEP_COSTS = ((1, 1.0), (2, 1.04), (3, 1.12), (4, 1.3), (5, 1.5), (6, 1.75), (8, 2.5))
# what running the heads adds to a step (proposals over the heads' vocabulary): chain-1 hydra heads measured 1.29
# accepted a step at 1.08x plain with a 2-token verify
DEFAULT_HEAD_COST = 0.14
SOURCES = ("context", "datastore", "heads", "grammar", "draft head")


@dataclass(frozen=True)
class LookupConfig:
    max_ngram: int = 8         # longest context suffix looked up (longer matches predict better, and are told apart)
    min_ngram: int = 1         # shortest suffix that still counts as a match
    # tokens verified by the draft steps (root + drafted tokens), one captured step each; 1 is a plain step
    chain_sizes: tuple[int, ...] = (1, 2, 4, 8)
    # weight of the past in the running per-depth acceptance of each source: ~1 / (1 - decay) observations
    score_decay: float = 0.9
    step_costs: tuple[tuple[int, float], ...] = DEFAULT_STEP_COSTS
    head_cost: float = DEFAULT_HEAD_COST
    # greedy decoding plans with the step times the generator measures (the device's own cost curve, under its
    # current load) once they exist; sampling keeps the table, so a seed reproduces its tokens
    measure_costs: bool = True
    store_min_match: int = 1   # shortest context suffix the datastore is queried with (1: its bigram counts)

    def __post_init__(self):
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        if not 0 <= self.score_decay < 1:
            raise ValueError(f"prompt lookup score_decay must be in [0, 1), got {self.score_decay}")
        if not self.chain_sizes or min(self.chain_sizes) < 1:
            raise ValueError(f"prompt lookup chain_sizes must be >= 1, got {self.chain_sizes}")
        object.__setattr__(self, "chain_sizes", tuple(sorted(set(int(T) for T in self.chain_sizes))))
        if not self.step_costs or any(c <= 0 for _, c in self.step_costs):
            raise ValueError("prompt lookup step_costs must be positive")

    @property
    def max_draft(self) -> int:
        return self.chain_sizes[-1] - 1

    def cost(self, size: int) -> float:
        """Relative cost of verifying `size` tokens, interpolated (and extrapolated linearly past the table)."""
        return _table_cost(self.step_costs, size)

    def kind_cost(self, kind, tree_size: int) -> float:
        """The table's cost of a kind of step: a chain size, or "heads" (the heads' tree of tree_size nodes)."""
        return self.cost(tree_size) + self.head_cost if kind == "heads" else self.cost(kind)


@functools.lru_cache(maxsize=256)
def _table_cost(step_costs: tuple[tuple[int, float], ...], size: int) -> float:
    table = sorted(step_costs)
    sizes, costs = [T for T, _ in table], [c for _, c in table]
    if size >= sizes[-1] and len(sizes) > 1:
        slope = (costs[-1] - costs[-2]) / (sizes[-1] - sizes[-2])
        return costs[-1] + slope * (size - sizes[-1])
    return float(np.interp(size, sizes, costs))


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


class AcceptStats:
    """Running acceptance of one kind of draft, per depth: rate[d] = P(draft token d is right | tokens < d were).
    Updated from what the model emitted after each step, whether or not the draft was verified; depths past what
    the model emitted are unknown and left alone. Expected accepted tokens of a k-token draft:
    sum over d < k of prod over j <= d of rate[j]."""

    def __init__(self, prior: list[float], depth: int, decay: float, weight: float = 2.0):
        prior = list(prior) + [prior[-1]] * max(depth - len(prior), 0)
        self.hits = np.array(prior[:depth], dtype=np.float64) * weight
        self.tries = np.full(depth, weight, dtype=np.float64)
        self.prior_hits, self.prior_tries = self.hits.copy(), self.tries.copy()
        self.decay = decay

    def relax(self, keep: float) -> None:
        """Move `1 - keep` of the way back to the prior: for a source that was not observed this step."""
        self.hits = keep * self.hits + (1 - keep) * self.prior_hits
        self.tries = keep * self.tries + (1 - keep) * self.prior_tries

    def expected(self) -> np.ndarray:
        """(depth + 1,): expected accepted tokens of a draft of 0..depth tokens."""
        return np.concatenate([[0.0], np.cumsum(np.cumprod(self.hits / self.tries))])

    def update(self, draft: list[int], truth: list[int]) -> None:
        self.update_matched(common_prefix(draft, truth), len(draft), len(truth))

    def update_matched(self, matched: int, length: int, known: int) -> None:
        """A draft of `length` tokens whose first `matched` were right, against `known` tokens of the truth."""
        for d in range(min(length, known, len(self.tries))):
            self.hits[d] = self.decay * self.hits[d] + (d < matched)
            self.tries[d] = self.decay * self.tries[d] + 1
            if d >= matched:
                break


# priors of the per-depth acceptance (first token, deeper tokens) by source and length of the matched suffix,
# from offline replays on the model's own answers: a context match predicts better the longer it is
_PRIORS = {("context", 1): [0.2, 0.5], ("context", 2): [0.3, 0.6], ("context", 3): [0.4, 0.7],
           ("context", 4): [0.5, 0.8], ("datastore", 1): [0.15, 0.4], ("datastore", 2): [0.2, 0.5], ("datastore", 3): [0.25, 0.55],
           ("datastore", 4): [0.3, 0.6],
           # a grammar's forced tokens (constraints.py): the text is certain, only its tokenisation may differ
           ("grammar", 1): [0.9, 0.9],
           # the feature-level draft head (draft_steps.py): held-out first-token accuracy of the shipped one ~0.45
           ("draft head", 1): [0.45, 0.6]}
HEADS_PRIOR = [0.35, 0.5]  # a little above what the shipped SmolLM2 heads score (0.29 first-token acceptance)
HEADS_RELAX = 0.99  # per step without the heads' proposals: ~100 steps to forget what they scored
MATCH_BUCKETS = 4  # suffix matches of 4 or more tokens share statistics
SURE_SHARE = 0.5   # a datastore draft whose first token continued at least this share of the matches


@dataclass
class Plan:
    """One step: `source` "plain" (the root alone), "heads" (the Medusa tree as the heads proposed it), or a chain of
    `size` tokens (the root and size - 1 drafted ones) from "context" or "datastore"."""
    source: str
    size: int
    draft: list[int]
    value: float  # expected emitted tokens per unit of step cost


class DraftPlanner:
    """Each step, drafts from the context (NgramIndex) and the datastore, and the choice of the step that is expected
    to emit the most tokens per unit of cost: a chain of one of `cfg.chain_sizes` fed by one source, the heads' tree
    (`heads_tree`: its size and depth, None without heads), or a plain step. Every choice depends only on the tokens emitted
    so far, so drafts stay deterministic proposals (exact sampling stays distribution-preserving)."""

    def __init__(self, cfg: LookupConfig, prompt_ids, datastore=None, heads_tree: tuple[int, int] | None = None,
                 measured: dict | None = None):
        self.cfg, self.datastore, self.heads_tree = cfg, datastore, heads_tree  # heads_tree: (size, depth)
        # measured relative step costs (size -> cost, "heads" -> the heads' step): override the table where present
        self.measured = measured if measured is not None else {}
        self.index = NgramIndex(cfg, prompt_ids)
        self.stats: dict[tuple[str, int], AcceptStats] = {}
        # heads are scored only on steps that ran them (their proposals come from the last step); while unobserved
        # their statistics relax back to a hopeful prior, so heads that got better with the text are tried again
        self.heads = AcceptStats(HEADS_PRIOR, max(cfg.max_draft, 1), cfg.score_decay)
        self.drafts: dict[str, tuple[list[int], tuple]] = {}  # source -> (draft, statistics key)
        # drafts made outside the planner for the next step, by source (a draft head's, set before each plan)
        self.external: dict[str, list[int]] = {}

    def _stats(self, key: tuple) -> AcceptStats:
        if key not in self.stats:
            self.stats[key] = AcceptStats(_PRIORS[key[:2]], self.cfg.max_draft, self.cfg.score_decay)
        return self.stats[key]

    def extend(self, tokens) -> None:
        self.index.extend(tokens)

    def _draft(self) -> dict[str, tuple[list[int], tuple]]:
        n = self.cfg.max_draft
        out = {}
        if n < 1:
            return out
        for source, tokens in self.external.items():
            if tokens:
                out[source] = (list(tokens[:n]), (source, 1))
        tokens, match = self.index.draft(n)
        if tokens:
            out["context"] = (tokens, ("context", min(match, MATCH_BUCKETS)))
        if self.datastore is not None:
            from .datastore import MAX_MATCH
            d = self.datastore.draft(self.index.tokens[-MAX_MATCH:], n, min_match=self.cfg.store_min_match)
            if d.tokens:  # statistics apart for a continuation most matches agree on
                out["datastore"] = (d.tokens, ("datastore", min(d.match, MATCH_BUCKETS), d.shares[0] >= SURE_SHARE))
        return out

    def plan(self, forced: list[int] | None = None) -> Plan:
        """The step to run next (ties: the cheaper kind, plain first). forced: the tokens a grammar forces next
        (a JSON schema's property name, punctuation), a draft source of their own ("grammar")."""
        cfg, measured = self.cfg, self.measured
        cost = {T: measured.get(T) or cfg.cost(T) for T in cfg.chain_sizes}
        self.drafts = self._draft()
        if forced and cfg.max_draft >= 1:
            self.drafts["grammar"] = (list(forced[:cfg.max_draft]), ("grammar", 1))
        options = []
        if 1 in cfg.chain_sizes or self.heads_tree is None:
            options.append(Plan("plain", 1, [], 1.0 / (measured.get(1) or cfg.cost(1))))
        if self.heads_tree is not None:
            size, depth = self.heads_tree
            gain = self.heads.expected()[min(depth, len(self.heads.tries))]
            options.append(Plan("heads", size, [], (1 + gain) / (measured.get("heads") or cfg.kind_cost("heads", size))))
        for source, (tokens, key) in self.drafts.items():
            expected = self._stats(key).expected()
            for size in cfg.chain_sizes:
                if size >= 2:
                    k = min(size - 1, len(tokens))
                    options.append(Plan(source, size, (tokens + tokens[-1:] * size)[:size - 1],
                                        (1 + expected[k]) / cost[size]))
        return max(options, key=lambda p: p.value)

    def observe(self, emitted: list[int], heads_matched: int | None = None) -> None:
        """After a step: `emitted` is what followed the root (accepted tokens and the bonus); heads_matched: how many
        of them the heads' tree as proposed for that step held along one path (None when no proposals existed)."""
        for tokens, key in self.drafts.values():
            self._stats(key).update(tokens, emitted)
        if heads_matched is not None and self.heads_tree is not None:
            self.heads.update_matched(heads_matched, self.heads_tree[1], len(emitted))
        elif self.heads_tree is not None:
            self.heads.relax(HEADS_RELAX)


class NoProposals:
    """Stands in for Medusa heads when every non-root node of a chain comes from the lookup: the captured steps ask
    for proposals and get placeholders (token 0) that the host overwrites before each verify."""

    sequential = False  # placeholders do not continue the root
    placeholders = True  # the captured steps skip proposing (ShardSteps._next_tree)

    def __init__(self, num_heads: int):
        self.num_heads = num_heads

    def propose(self, hidden: Tensor, k: int, num_heads: int | None = None, root: Tensor | None = None) -> Tensor:
        n = self.num_heads if num_heads is None else num_heads
        return Tensor.zeros(n, k, dtype=dtypes.int32, device=hidden.device).contiguous()
