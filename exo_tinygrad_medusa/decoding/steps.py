"""The captured steps of generation on one shard: prefill chunks, tree verification, proposals, KV compaction.

Every step has a fixed shape, so each TinyJit captures once and replays at any start position. Greedy
verification keeps the whole step on the device (verify, accept, propose the next tree) and returns one
small int vector: [accepted candidates, best path, next tree tokens...]."""
from __future__ import annotations

import functools

import numpy as np
from tinygrad import Tensor, TinyJit, UOp, dtypes

from .heads import MedusaHeads
from .tree import PLAIN, MedusaTree
from ..model.transformer import KVCache, Transformer, causal_mask, compact_layers
from ..kernels.ops import take
from .sampling import GenerationConfig, exact_accept, greedy_accept, probabilities, sample, typical_accept
from ..kernels.tinygrad_hooks import device_buffer, host_tensor, read_host, write_host

# prefill chunk sizes: a 512-token prompt runs as four 128-token steps, a 50-token one as two padded 32-token steps
PREFILL_CHUNKS = (128, 32)


def _const(a: np.ndarray, device: str) -> Tensor:
    return host_tensor(a, device)


def chain_accept(tree_tokens: Tensor, pred: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy acceptance of a chain on the device: (drafted tokens accepted, the bonus token pred[accepted]).
    tree_tokens (T,): the root and the draft; pred (T,): the argmax after each. Unrolled (T is small): accepted is the
    sum of the running products of the matches, the bonus pred[0] plus the steps pred[i + 1] - pred[i] of every
    accepted i (tinygrad fails to compile a one-hot pick or a size-1 cumsum here at T = 2)."""
    n_accepted, bonus = Tensor.zeros_like(pred[0]), pred[0]
    if pred.shape[0] > 1:
        ok = (tree_tokens[1:] == pred[:-1]).cast(dtypes.int32)
        alive = n_accepted = ok[0]
        bonus = pred[0] + alive * (pred[1] - pred[0])
        for i in range(1, pred.shape[0] - 1):
            alive = alive * ok[i]
            n_accepted = n_accepted + alive
            bonus = bonus + alive * (pred[i + 1] - pred[i])
    return n_accepted, bonus


class HostInputs:
    """Host values as a captured step's inputs (see __call__), on one device."""

    def __init__(self, device: str):
        self.device, self._buffers = device, {}

    def __call__(self, name: str, values, dtype=dtypes.int32) -> Tensor:
        """A realized device tensor holding `values`: one buffer per (name, shape, dtype), rewritten on every call, so
        a step's inputs skip the scheduler (a Tensor made from an ndarray is scheduled when the step realizes it, and
        the scheduler walks every weight of the model: ~5 ms a decode step on the CPU). Names keep the inputs of one
        call apart; a tensor returned here holds its values until the next call with the same name and shape."""
        values = np.asarray(values)
        key = (name, values.shape, dtype)
        if (buffer := self._buffers.get(key)) is None:
            buffer = self._buffers[key] = device_buffer(values.shape, dtype, self.device)
        return write_host(buffer, values)


class _OnCache:
    """A step captured on one KV cache: called like the plain capture (the layers still passed, and checked), it
    replays with the cache's buffers baked in. TinyJit does per-input bookkeeping on every call, ~2 ms a step for a
    30-layer cache, which a Generator (one cache for its lifetime) has no use for."""

    def __init__(self, fn, cache: KVCache, layers_at: int):
        self.layers, self.layers_at = cache.layers, layers_at
        self.jit = TinyJit(lambda *args: fn(*args[:layers_at], cache.layers, *args[layers_at:]))

    @property
    def captured(self):
        return self.jit.captured

    def __call__(self, *args):
        if args[self.layers_at] is not self.layers:
            raise ValueError("these steps were captured on another KV cache")
        return self.jit(*args[:self.layers_at], *args[self.layers_at + 1:])


class ShardSteps:
    """Captured steps for one model shard and one tree (PLAIN for ordinary decoding). `cache`: the one KV cache
    every call will use (a Generator's), baked into the captures; without it, each call passes its cache's layers
    (the engine keeps one cache per request). `keep_hidden`: greedy verification also keeps the verified nodes'
    hidden states on the device (`last_hidden`, (T, dim)), which a draft head continues from."""

    def __init__(self, model: Transformer, tree: MedusaTree = PLAIN, heads: MedusaHeads | None = None,
                 prefill_chunks: tuple[int, ...] = PREFILL_CHUNKS, cache: KVCache | None = None,
                 keep_hidden: bool = False):
        if tree.size > 1 and model.shard.is_last_layer():  # only the last shard proposes trees
            if heads is None:
                raise ValueError("a Medusa tree needs Medusa heads")
            tree.check_heads(heads.num_heads)
        slack = model.cache_len - model.max_context  # a step near the context end writes this far past it
        for what, size in ((f"tree of {tree.size} nodes", tree.size), *((f"prefill chunk of {C}", C) for C in prefill_chunks)):
            if size > slack:
                raise ValueError(f"{what} exceeds the cache slack of {slack}")
        self.model, self.tree, self.heads, self.keep_hidden = model, tree, heads, keep_hidden
        self.last_hidden: Tensor | None = None
        self.chunks = tuple(sorted(set(prefill_chunks), reverse=True))
        self.device = dev = model.float_weight.device
        self.host = HostInputs(dev)
        self.start_pos = UOp.variable("start_pos", 0, model.max_context)
        self.tree_mask, self.tree_depths = _const(tree.tree_mask, dev), _const(tree.depths, dev)
        def capture(fn, layers_at: int = 1):  # layers_at: where fn takes the cache's layers
            return TinyJit(fn) if cache is None else _OnCache(fn, cache, layers_at)
        # one capture per chunk size: each has its own causal mask and depths
        self.prefill_steps = {C: capture(functools.partial(self._prefill, _const(np.arange(C, dtype=np.int32), dev),
                                                        _const(causal_mask(C), dev))) for C in self.chunks}
        if tree.size > 1:
            K = tree.top_k
            self.paths = _const(tree.retrieve_paths, dev)                                     # (P, D+1)
            steps = np.arange(1, tree.depth + 1, dtype=np.int32)
            self.path_valid = _const(steps[None, :] < tree.path_lengths[:, None], dev)        # (P, D)
            self.path_steps = _const(steps, dev)
            self.node_pick = _const((tree.node_head * K + tree.node_rank)[1:], dev)           # (T-1,) into (H*K,)
        self.verify_greedy = capture(self._verify_greedy)
        self.verify_logits = capture(self._verify_logits)
        self.propose_after_prefill = TinyJit(self._propose)
        self.propose_after_verify = TinyJit(self._propose)
        self.compact = capture(self._compact, layers_at=0)

    def bind(self, pos: int) -> UOp:
        return self.start_pos.bind(pos)

    def prefill_plan(self, n_tokens: int) -> list[tuple[int, int]]:
        """(start, chunk size) for a prompt of n_tokens: the largest chunks while they fill up, then the smallest (the
        last one padded). Large chunks run the products compute-bound; the small one keeps padding short."""
        plan, start, small = [], 0, self.chunks[-1]
        while start < n_tokens:
            size = next((C for C in self.chunks if n_tokens - start >= C), small)
            plan.append((start, size))
            start += size
        return plan

    def prefill(self, x: Tensor, layers: list[Tensor], start_pos: UOp) -> Tensor:
        """One prefill chunk; x holds (1, C) token ids or (1, C, dim) hidden states, C one of self.chunks."""
        return self.prefill_steps[x.shape[1]](x, layers, start_pos)

    def verify(self, x: Tensor, layers: list[Tensor], start_pos: int, tree_tokens: np.ndarray, cfg: GenerationConfig,
               rng: np.random.Generator, logits_out: list | None = None,
               allowed: np.ndarray | None = None) -> tuple[list[int], np.ndarray]:
        """Last shard, one Medusa step: the accepted tree nodes (root first) and the next tree (its root is the
        bonus token). Greedy stays on the device; sampling accepts on the host, then proposes from the last node.
        With logits_out (a list), the logits come to the host also when greedy (accepted there by the device's
        rule) and the rows of the accepted nodes, each predicting the token emitted after it, are appended.
        allowed (T, vocab) bool: a grammar's mask after each node (constraints.py); the model's choice at a node is
        then made among its allowed tokens, on the host (logits_out still gets the unmasked rows)."""
        pos = self.bind(start_pos)
        if cfg.greedy and logits_out is None and allowed is None:
            hidden_input = () if self.model.shard.is_first_layer() else (self.host("tree", tree_tokens),)
            summary = read_host(self.greedy_summary(x, layers, pos, *hidden_input))
            n_accepted, best = int(summary[0]), int(summary[1])
            return self.tree.retrieve_paths[best][:n_accepted + 1].tolist(), summary[2:]
        hidden, logits = self.verify_logits(x, layers, pos)
        logits = read_host(logits)
        chosen = logits if allowed is None else np.where(allowed, logits, -np.inf)
        if cfg.greedy:
            nodes, bonus = greedy_accept(self.tree, tree_tokens, chosen)
        else:
            accept = exact_accept if cfg.medusa_sampling == "exact" or self.tree.size == 1 else typical_accept
            nodes, bonus = accept(self.tree, tree_tokens, chosen, cfg, rng)
        if logits_out is not None:
            logits_out.extend(logits[nodes])
        _, next_tree = self.propose_after_verify(hidden, self.host("node", [nodes[-1]]), self.host("root", [bonus]))
        return [int(n) for n in nodes], read_host(next_tree)

    def greedy_summary(self, x: Tensor, layers: list[Tensor], pos: UOp, *hidden_input: Tensor) -> Tensor:
        """The captured greedy verify; its summary vector (keeping the hidden rows in last_hidden when asked to)."""
        out = self.verify_greedy(x, layers, pos, *hidden_input)
        if self.keep_hidden:
            out, self.last_hidden = out
        return out

    def first_tree(self, hidden: Tensor, row: int, cfg: GenerationConfig, rng: np.random.Generator,
                   logits_out: list | None = None, allowed: np.ndarray | None = None) -> np.ndarray:
        """Last shard, after prefill: the first tree from hidden row `row`; its root is the first generated token
        (the argmax, or sampled from the base logits; among the `allowed` tokens only when a grammar masks them), and
        the heads propose from that root. With logits_out (a list), the logits that chose the root are appended."""
        logits, tree_tokens = self.propose_after_prefill(hidden, self.host("node", [row]), self.host("root", [-1]))
        tree_tokens = read_host(tree_tokens)
        host_choice = not cfg.greedy or allowed is not None
        if logits_out is not None or host_choice:
            logits = read_host(logits).reshape(-1)
            if logits_out is not None:
                logits_out.append(logits)
        if host_choice:
            chosen = logits if allowed is None else np.where(allowed, logits, -np.inf)
            root = int(chosen.argmax()) if cfg.greedy else sample(probabilities(chosen, cfg), rng)
            if root != int(tree_tokens[0]) and self.heads is not None and self.heads.sequential and self.tree.size > 1:
                # sequential heads continue the root: propose again from the chosen one
                _, tree_tokens = self.propose_after_prefill(hidden, self.host("node", [row]), self.host("root", [root]))
                tree_tokens = read_host(tree_tokens)
            tree_tokens[0] = root
        return tree_tokens

    # -- steps (each captured) -------------------------------------------------------------------------------
    def _prefill(self, depths: Tensor, mask: Tensor, x: Tensor, layers: list[Tensor], start_pos: UOp) -> Tensor:
        out = self.model.forward(x, layers, start_pos, depths, mask)
        return (out[0] if isinstance(out, tuple) else out).realize()

    def _verify_logits(self, x: Tensor, layers: list[Tensor], start_pos: UOp):
        """Any shard: a forward over the tree. The last shard returns (hidden, logits) of every node."""
        out = self.model.forward(x, layers, start_pos, self.tree_depths, self.tree_mask)
        if isinstance(out, tuple):
            return out[0][0].realize(), out[1][0].realize()
        return out.realize()

    def _verify_greedy(self, x: Tensor, layers: list[Tensor], start_pos: UOp, tree_tokens: Tensor | None = None) -> Tensor:
        """Last shard: verify, accept the longest path matching the model's argmax, propose the next tree.
        tree_tokens (T,) is needed only when x holds hidden states (a shard that is not also the first)."""
        hidden, logits = self.model.forward(x, layers, start_pos, self.tree_depths, self.tree_mask)
        tree_tokens = x[0] if tree_tokens is None else tree_tokens
        pred = logits[0].argmax(-1).cast(dtypes.int32)                                       # (T,)
        if self.tree.size == 1:
            summary = Tensor.stack(Tensor.zeros_like(pred[0]), Tensor.zeros_like(pred[0]), pred[0])
            return self._with_hidden(summary, hidden)
        if getattr(self.heads, "placeholders", False):  # a draft chain: one path, nothing to propose
            n_accepted, bonus = chain_accept(tree_tokens, pred)
            summary = Tensor.stack(n_accepted.cast(dtypes.int32), Tensor.zeros_like(bonus), bonus).cat(
                Tensor.zeros(self.tree.size - 1, dtype=dtypes.int32, device=bonus.device))
            return self._with_hidden(summary, hidden)
        candidate = take(tree_tokens, self.paths[:, 1:])                                    # (P, D)
        ok = (candidate == take(pred, self.paths[:, :-1])) & self.path_valid
        accepted = (ok.cast(dtypes.int32).cumsum(1) == self.path_steps).cast(dtypes.int32).sum(1)  # (P,)
        best = accepted.argmax().cast(dtypes.int32)
        n_accepted = accepted.max().cast(dtypes.int32)
        last_node = take(self.paths.flatten(), best * (self.tree.depth + 1) + n_accepted)
        row = (Tensor.arange(self.tree.size).unsqueeze(-1) == last_node).where(hidden[0], 0).sum(0)
        next_tree = self._next_tree(row, take(pred, last_node))
        return Tensor.stack(n_accepted, best).cat(next_tree).realize()

    def _with_hidden(self, summary: Tensor, hidden: Tensor):
        if not self.keep_hidden:
            return summary.realize()
        rows = hidden[0].contiguous()
        Tensor.realize(summary, rows)
        return summary, rows

    def _propose(self, hidden: Tensor, node: Tensor, root: Tensor) -> tuple[Tensor, Tensor]:
        """Last shard: from hidden row `node`, the base logits and the next tree whose root is `root` (1,), or the
        argmax where root is negative."""
        row = hidden.reshape(-1, hidden.shape[-1])[node].reshape(-1)
        logits = self.model.logits(row)
        root = (root[0] < 0).where(logits.argmax().cast(dtypes.int32), root[0])
        return logits.realize(), self._next_tree(row, root).realize()

    def _next_tree(self, row: Tensor, root: Tensor) -> Tensor:
        if self.tree.size == 1:
            return root.reshape(1)
        if getattr(self.heads, "placeholders", False):
            # a draft chain's nodes all come from the host: no proposals to pick from (and a gather from a (1, 1)
            # tensor fails tinygrad's kernel verification)
            return root.reshape(1).cat(Tensor.zeros(self.tree.size - 1, dtype=dtypes.int32, device=root.device))
        # each head costs a projection onto its proposal vocabulary: run only as many as the tree is deep
        candidates = self.heads.propose(row, self.tree.top_k, self.tree.depth, root=root.reshape(()))  # (depth, K)
        return root.reshape(1).cat(take(candidates.flatten(), self.node_pick))

    def _compact(self, layers: list[Tensor], start_pos: UOp, keep: Tensor) -> None:
        compact_layers(layers, start_pos, keep)
        Tensor.realize(*layers)
