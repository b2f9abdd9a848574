"""Draft planning for the engine's ring passes: each pass runs the heads' tree, a plain one-token step or a chain
of drafted tokens (from the context or the datastore, lookup.DraftPlanner), whichever is expected to emit the most
tokens per unit of pass cost.

Only the last shard plans (it sees every emitted token, and the prompt travels to it with the prompt pass). The
choice travels in the step state as a kind ("tree": the engine's Medusa tree as the heads proposed it; "chain": the
state's tokens are the root and the drafted tokens, so the chain's size is their count, 1 a plain pass) and every
shard runs the pass with its captured steps for that kind (chains made on first use per slot, all on the slot's
cache). A chain's accepted nodes are always consecutive, so a pass after a chain never compacts the cache.

Pass costs. On a ring a pass also pays its links, the relays and serialisation, a fixed cost that makes deeper
steps relatively cheaper than standalone. Until passes are measured, a kind's cost relative to a plain pass is
(compute + F) / (1 + F), compute from `LookupConfig`'s standalone step table and F = `pass_fixed_cost` in plain-step
units. Greedy rings then measure: the last shard times whole passes of each kind (from its answer to one pass of a
request to its answer to the next: every shard's compute, every link and the driver), and those times replace the
table, drifting back to it for kinds not run for a while (as the Generator's step costs do).

Greedy decoding only, where `GenerationConfig.prompt_lookup` asks for drafts (off by default on a ring, see
drafts_on): sampling keeps the heads' tree every pass (a seed must reproduce its tokens, and measured
costs would make the plan depend on the machine's load). Greedy output stays identical to plain greedy decoding:
every kind verifies its tokens against the model's argmax."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tinygrad import Tensor, dtypes

from ..decoding.lookup import DraftPlanner, Grafter, LookupConfig, NoProposals, Plan
from ..decoding.sampling import GenerationConfig
from ..decoding.step_costs import StepCosts
from ..decoding.steps import ShardSteps, chain_accept
from ..decoding.tree import PLAIN, MedusaTree, chain
from ..kernels.ops import take
from ..kernels.tinygrad_hooks import read_host

TREE, CHAIN = "tree", "chain"
# a ring pass's cost beside the compute (links, relays, serialisation) in plain-step units, until passes are timed:
# two shards measured ~2.7 standalone steps of it a pass at 5 ms one-way links, ~0.5 at 0 ms (docs/benchmarks.md)
DEFAULT_PASS_FIXED_COST = 1.0


@dataclass(frozen=True)
class RingDraftConfig:
    lookup: LookupConfig = field(default_factory=LookupConfig)
    pass_fixed_cost: float = DEFAULT_PASS_FIXED_COST
    measure_passes: bool = True  # plan with timed passes once there are some (else the table and fixed cost)

    def __post_init__(self):
        if not self.pass_fixed_cost >= 0:
            raise ValueError(f"pass_fixed_cost must be >= 0, got {self.pass_fixed_cost}")


def drafts_on(generation: GenerationConfig) -> bool:
    """Only where `prompt_lookup` asks for them, greedy only. Off by default on a ring: on a loaded 2-core machine
    they raised tokens a pass (1.31 to 1.54 at 5 ms) but doubled compute a pass, a net loss (bench-ring, 2026-12-02)."""
    if not generation.greedy and generation.prompt_lookup:
        raise ValueError("drafts on a ring (prompt_lookup) need greedy decoding (temperature 0)")
    return bool(generation.prompt_lookup) and generation.greedy


def shard_setup(generation: GenerationConfig, cfg: RingDraftConfig, tree: MedusaTree, loaded, datastore):
    """(chain sizes this shard runs, () with drafts off; the last shard's PassCosts, else None; the datastore, the
    model's shipped one (decoding.session.default_datastore) where `datastore` is "shipped")."""
    if not drafts_on(generation):
        return (), None, datastore
    if not loaded.model.shard.is_last_layer():
        return cfg.lookup.chain_sizes, None, datastore
    if isinstance(datastore, str):
        from ..decoding.session import default_datastore
        datastore = default_datastore(loaded)
    return cfg.lookup.chain_sizes, PassCosts(cfg, tree), datastore


def pass_problem(kind: str, size: int, tree_size: int, chain_sizes: tuple[int, ...]) -> str | None:
    """Why a pass of `kind` over `size` tokens cannot run on a shard (None: it can)."""
    if kind == TREE:
        return None if size == tree_size else f"the state carries {size} tree tokens, the tree has {tree_size} nodes"
    if kind != CHAIN:
        return f"unknown pass kind {kind!r} (expected {TREE!r} or {CHAIN!r})"
    if not chain_sizes:
        return "the ring runs a draft chain but this shard has drafts off: start every node with the same options"
    if size not in chain_sizes:
        return f"a draft chain of {size} tokens is not one of this shard's chain sizes {list(chain_sizes)}"
    return None


class ProposingChain(ShardSteps):
    """Last shard with heads: a draft chain's greedy verify, then the heads propose the engine's tree from the last
    accepted node, so that a tree pass may follow a chain with real proposals (without them a tree pass after a
    chain verifies placeholders: a whole pass for one token). Proposing costs the heads' share of a step (~1 ms on
    the CPU), small against a ring pass. The summary is [accepted, 0, the next tree (root: the bonus token)...]."""

    def __init__(self, model, size: int, heads, tree: MedusaTree, cache):
        self.proposal_tree = tree
        pick = np.ascontiguousarray((tree.node_head * tree.top_k + tree.node_rank)[1:])  # (T-1,) into (depth * K,)
        self.proposal_pick = Tensor(pick, device=model.float_weight.device).realize()
        super().__init__(model, PLAIN if size == 1 else chain(size - 1), NoProposals(size - 1) if size > 1 else None,
                         cache=cache)
        self.heads = heads

    def _verify_greedy(self, x: Tensor, layers: list[Tensor], start_pos, tree_tokens: Tensor | None = None) -> Tensor:
        hidden, logits = self.model.forward(x, layers, start_pos, self.tree_depths, self.tree_mask)
        tree_tokens = x[0] if tree_tokens is None else tree_tokens
        pred = logits[0].argmax(-1).cast(dtypes.int32)                                       # (T,)
        T = self.tree.size
        n_accepted, bonus = chain_accept(tree_tokens, pred)
        row = hidden[0][0] if T == 1 else (Tensor.arange(T).unsqueeze(-1) == n_accepted).where(hidden[0], 0).sum(0)
        tree = self.proposal_tree
        candidates = self.heads.propose(row, tree.top_k, tree.depth, root=bonus.reshape(()))  # (depth, K)
        next_tree = bonus.reshape(1).cat(take(candidates.flatten(), self.proposal_pick))
        return Tensor.stack(n_accepted.cast(dtypes.int32), Tensor.zeros_like(n_accepted)).cast(dtypes.int32).cat(
            next_tree.cast(dtypes.int32)).realize()


def chain_steps(slot, size: int) -> ShardSteps:
    """The slot's captured steps verifying a chain of `size` tokens (1: a plain pass), made on first use on the slot's
    cache; a chain's nodes all come from the state. On the last shard with heads the chain proposes the heads' next
    tree (ProposingChain); elsewhere NoProposals stands in for heads."""
    if size == 1 and slot.steps.tree.size == 1:
        return slot.steps
    if size not in slot.chains:
        steps = slot.steps
        if steps.heads is not None and steps.tree.size > 1 and steps.model.shard.is_last_layer():
            slot.chains[size] = ProposingChain(steps.model, size, steps.heads, steps.tree, slot.cache)
        else:
            slot.chains[size] = ShardSteps(steps.model, PLAIN if size == 1 else chain(size - 1),
                                           NoProposals(size - 1) if size > 1 else None, cache=slot.cache)
    return slot.chains[size]


def capture_pass_kinds(slot, sizes: tuple[int, ...], shard, to_tensor, dim: int) -> None:
    """With drafts (sizes: the chain sizes), compile and capture every chain and the tree on a free slot (TinyJit
    captures on the second call), so no request pays for it mid-stream (a kind first met in a request costs seconds
    of compiling on a CPU): passes of zeros at position 0, which the next prompt rewrites before anything reads them.
    Without drafts every pass runs the tree, which a request's first passes capture."""
    greedy = GenerationConfig()
    for steps in [chain_steps(slot, size) for size in sizes] + ([slot.steps] if sizes else []):
        size = steps.tree.size
        x = np.zeros((1, size), np.int32) if shard.is_first_layer() else np.zeros((1, size, dim), np.float32)
        for _ in range(2):
            xt = to_tensor(x, steps)
            if shard.is_last_layer():
                steps.verify(xt, slot.cache.layers, 0, np.zeros(size, np.int32), greedy, None)
            else:
                read_host(steps.verify_logits(xt, slot.cache.layers, steps.bind(0)))


class PassCosts(StepCosts):
    """The last shard's running mean seconds of a whole ring pass per kind (chain size, or "heads" for the tree),
    and the costs relative to a plain pass that the planner uses; before a kind is timed, its standalone step cost
    from the table with the ring's fixed cost per pass added."""

    def __init__(self, cfg: RingDraftConfig, tree: MedusaTree):
        self.cfg, self.tree = cfg, tree
        super().__init__([*cfg.lookup.chain_sizes, *(["heads"] if tree.size > 1 else [])], self._pass_prior)

    def _pass_prior(self, kind) -> float:
        fixed = self.cfg.pass_fixed_cost
        return (self.cfg.lookup.kind_cost(kind, self.tree.size) + fixed) / (1 + fixed)


class RequestDrafts:
    """The last shard's planner for one request: fed the prompt and every pass's emitted tokens, it picks each next
    pass and times the passes."""

    def __init__(self, cfg: RingDraftConfig, tree: MedusaTree, prompt_ids, datastore, costs: PassCosts):
        self.cfg, self.tree, self.costs = cfg, tree, costs
        heads_tree = (tree.size, tree.depth) if tree.size > 1 else None
        self.planner = DraftPlanner(cfg.lookup, [int(t) for t in prompt_ids], datastore, heads_tree, costs.relative())
        self.grafter = Grafter(tree) if tree.size > 1 else None
        self.proposed: np.ndarray | None = None   # the heads' tree from the last pass, where it ran them
        self.last_answer: float | None = None     # when this shard answered the request's last pass
        self.passes: dict[str, int] = {}          # by plan source: passes planned (tests and logs read it)

    def timed_key(self, kind: str, size: int):
        return "heads" if kind == TREE and self.tree.size > 1 else (1 if kind == TREE else size)

    def first(self, emitted: list[int], tree_tokens: np.ndarray) -> tuple[str, list[int]]:
        """After the prompt pass: the first decode pass (tree_tokens: the first tree, its root the first token)."""
        self.proposed = np.asarray(tree_tokens) if self.tree.size > 1 else None
        return self._next(emitted, tree_tokens)

    def after(self, kind: str, size: int, emitted: list[int], next_tree: np.ndarray,
              timed: bool) -> tuple[str, list[int]]:
        """After a decode pass of `kind` that emitted `emitted` (what followed its root, bonus included): record its
        time (timed: its steps were captured before it ran, so no compile is in it) and plan the next pass."""
        if timed and self.cfg.measure_passes and self.last_answer is not None:
            self.costs.record(self.timed_key(kind, size), time.perf_counter() - self.last_answer)
        matched = None if self.proposed is None else self.grafter.matched(self.proposed, emitted)
        self.planner.observe(emitted, matched)
        # tree passes and, with heads, chain passes (ProposingChain) leave the heads' next tree
        self.proposed = np.asarray(next_tree) if len(next_tree) == self.tree.size > 1 else None
        return self._next(emitted, next_tree)

    def _next(self, emitted: list[int], next_tree: np.ndarray) -> tuple[str, list[int]]:
        self.planner.extend(emitted)
        if self.cfg.measure_passes:
            self.planner.measured = self.costs.relative()
        plan = self.planner.plan()
        self.passes[plan.source] = self.passes.get(plan.source, 0) + 1
        self.last_answer = time.perf_counter()
        return self._tokens(plan, int(next_tree[0]))

    def _tokens(self, plan: Plan, root: int) -> tuple[str, list[int]]:
        if plan.source == "heads":
            if self.proposed is not None:
                return TREE, [int(t) for t in self.proposed]
            # the last pass ran no heads: their places hold placeholders (as the Generator does)
            return TREE, [root] + [0] * (self.tree.size - 1)
        return CHAIN, [root, *(int(t) for t in plan.draft)]
