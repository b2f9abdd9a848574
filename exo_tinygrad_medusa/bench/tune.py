"""`exo-medusa tune-tree`: the Medusa tree that maximises expected tokens per second on this device.

Two measurements feed it: this device's verify-cost curve t(T)/t(1) and the heads' per-rank accuracies
acc[k][r] = P(head k's rank-r candidate is the greedy token k + 2 ahead), taken from plain greedy runs on
calibration prompts. The tree grows as in the Medusa paper's sparse-tree construction: always add the node
whose whole path is most likely accepted (the product of acc along it, assuming heads err independently).
A tree of n nodes is expected to yield 1 + sum(path probabilities) tokens per step at a cost t(n)/t(1) plus
the fixed cost of proposing candidates (the heads and their top-k), so the tree keeps the prefix of that order
with the best ratio; when none beats plain decoding, the tree is the root alone. The best prefix, not the first
local maximum: cost curves have steps (kernels switch tiling at some sizes), and the ratio can dip, then rise."""
from __future__ import annotations

import heapq
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tinygrad import Tensor, TinyJit

from .bench import COST_SIZES, load_prompts, measure_cost_curve, measure_head_cost, package_prompts_path, parse_sizes
from ..decoding.generate import Generator
from ..decoding.heads import MedusaHeads, load_heads_for
from ..decoding.sampling import GenerationConfig
from ..decoding.session import MedusaOptions, open_session, resolve_heads_path

log = logging.getLogger(__name__)
TOP_K = 10
TreePath = tuple[int, ...]


# -- tree construction -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TunedTree:
    choices: list[TreePath]
    expected_accept: float     # expected tokens per verify step
    expected_speedup: float    # expected_accept / relative cost of a step: speedup over plain decoding, leaving
                               # out what neither curve measures (KV compaction, host work)

    @property
    def size(self) -> int:
        return len(self.choices) + 1


def grow_order(acc: np.ndarray, max_choices: int) -> list[tuple[TreePath, float]]:
    """Tree nodes in the order the greedy construction adds them, with their path-acceptance probabilities.

    A child's probability never exceeds its parent's, so every prefix of this order is a valid tree.
    Equal probabilities go to the shorter, then lower-ranked path."""
    num_heads, top_k = acc.shape
    frontier = [(-float(acc[0][r]), (r,)) for r in range(top_k)]
    heapq.heapify(frontier)
    order = []
    while frontier and len(order) < max_choices:
        neg_p, path = heapq.heappop(frontier)
        if neg_p >= 0:  # nothing left that could ever be accepted
            break
        order.append((path, -neg_p))
        if len(path) < num_heads:
            for r in range(top_k):
                heapq.heappush(frontier, (neg_p * float(acc[len(path)][r]), path + (r,)))
    return order


def build_tree(acc, cost_curve: dict[int, float], max_size: int | None = None, head_cost: float = 0.0) -> TunedTree:
    """acc: (heads, top_k) accuracies; cost_curve: {T: t(T)/t(1)} with T = 1 present, made non-decreasing before
    use. Sizes between the measured ones are interpolated linearly; trees larger than the largest measured size
    (or max_size) are not considered. head_cost: proposing candidates (heads + top-k), relative to t(1), paid by
    every tree but the root-only one (plain decoding)."""
    acc = np.asarray(acc, dtype=np.float64)
    if acc.ndim != 2 or acc.size == 0 or acc.min() < 0 or acc.max() > 1:
        raise ValueError("accuracies must be a non-empty (heads, top_k) array of probabilities")
    curve = {int(T): float(c) for T, c in cost_curve.items()}
    if 1 not in curve:
        raise ValueError("the cost curve must include T = 1")
    sizes = sorted(curve)
    # a bigger verify never really costs less than a smaller one: dips in a measured curve are timing noise
    costs = np.maximum.accumulate([max(curve[T] / curve[1], 1.0) for T in sizes])
    limit = min(max_size or sizes[-1], sizes[-1])
    order = grow_order(acc, limit - 1)
    expected, best = 1.0, (0, 1.0, 1.0)  # (number of choices, expected accept, speed)
    for n, (_, p) in enumerate(order, 1):
        expected += p
        speed = expected / (float(np.interp(n + 1, sizes, costs)) + head_cost)
        if speed > best[2]:
            best = (n, expected, speed)
    n, expected, speed = best
    return TunedTree([path for path, _ in order[:n]], expected, speed)


# -- head accuracies -----------------------------------------------------------------------------------------------
def count_hits(topk: np.ndarray, seq: np.ndarray, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """topk (heads, N, K): each head's candidates read at each row of seq (N tokens). Row t of head k is scored
    against seq[t + k + 2] for rows from first_row (the last prompt token) on. Returns hits (heads, K) and the
    number of scored rows per head."""
    num_heads, n, top_k = topk.shape
    hits, counts = np.zeros((num_heads, top_k)), np.zeros(num_heads)
    for k in range(num_heads):
        rows = np.arange(first_row, n - k - 2)
        if rows.size:
            hits[k] = (topk[k, rows] == seq[rows + k + 2, None]).sum(0)
            counts[k] = rows.size
    return hits, counts


class HeadScorer:
    """Re-reads a finished greedy sequence through the plain generator's captured prefill and ranks every head's
    top-k candidates at every position."""

    def __init__(self, plain: Generator, heads: MedusaHeads, top_k: int = TOP_K):
        self.plain, self.heads, self.top_k = plain, heads, top_k
        # one capture per prefill chunk size
        self.rank = {C: TinyJit(lambda hidden, root: heads.propose(hidden, top_k, root=root).realize())
                     for C in plain.steps.chunks}

    def candidates(self, ids: list[int]) -> np.ndarray:
        steps = self.plain.steps
        out = []
        for start, C in steps.prefill_plan(len(ids)):
            chunk = ids[start:start + C]
            hidden = steps.prefill(steps.host("tokens", [chunk + [0] * (C - len(chunk))]), self.plain.cache.layers,
                                   steps.bind(start))
            # a copy: the captured prefill hands back the same buffer on every call
            # the root at each position is the next token of the sequence (sequential heads continue it)
            root = Tensor((ids[start + 1:start + C + 1] + [0] * C)[:C], dtype="int32")
            out.append(self.rank[C](hidden[0].contiguous().realize(), root).numpy()[:, :len(chunk)])
        return np.concatenate(out, axis=1)

    def accuracies(self, prompts_ids: list[list[int]], cfg: GenerationConfig) -> tuple[np.ndarray, np.ndarray]:
        hits, counts = np.zeros((self.heads.num_heads, self.top_k)), np.zeros(self.heads.num_heads)
        for i, prompt_ids in enumerate(prompts_ids):
            result = self.plain.generate(prompt_ids, cfg)
            seq = list(prompt_ids) + result.generated_ids
            h, c = count_hits(self.candidates(seq), np.array(seq), len(prompt_ids) - 1)
            hits, counts = hits + h, counts + c
            log.info("calibration prompt %d/%d: %d tokens", i + 1, len(prompts_ids), len(result.generated_ids))
        return hits / np.maximum(counts, 1)[:, None], counts


# -- command ---------------------------------------------------------------------------------------------------------
def tuned_tree_path(heads_path: str, device: str) -> Path:
    """Where session.default_tree_spec looks for a tree tuned to this device kind."""
    heads_dir = Path(heads_path)
    if not heads_dir.is_dir():
        raise ValueError(f"Medusa heads {heads_path!r} are not a local directory: pass --out FILE for the tuned tree")
    return heads_dir / f"tree-{device.split(':')[0].lower()}.json"


def cmd_tune(args) -> int:
    if args.medusa_choices:
        raise ValueError("tune-tree builds the tree: --medusa-choices does not apply")
    sizes = parse_sizes(args.cost_sizes)
    if 1 not in sizes:
        raise ValueError("--cost-sizes must include 1 (costs are relative to plain decoding)")
    prompts = load_prompts(args.prompts or package_prompts_path(), args.limit)
    session = open_session(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context,
                           weights=args.weights, activations=args.activations)
    loaded, plain = session.loaded, session.generator
    heads_path = resolve_heads_path(loaded, MedusaOptions(True, args.medusa_heads))
    out = Path(args.out) if args.out else tuned_tree_path(heads_path, loaded.device)
    heads = load_heads_for(heads_path, loaded.model).use_first(args.medusa_num_heads, args.medusa_num_layers)
    if heads.sequential:
        log.warning("%s holds sequential (hydra) heads: the tree model below treats heads as independent, so it "
                    "overrates nodes under a parent of rank > 0 (their head continues the rank-0 guess); confirm the "
                    "chosen tree with exo-medusa bench", heads_path)
    scorer = HeadScorer(plain, heads, args.top_k)
    acc, counts = scorer.accuracies([session.prompt_ids(p.text) for p in prompts],
                                    GenerationConfig(max_new_tokens=args.max_generate_tokens))
    curve = measure_cost_curve(plain, sizes, args.cost_reps)
    head_cost = measure_head_cost(loaded.model, heads, args.top_k, args.cost_reps) / curve.seconds[1]
    tuned = build_tree(acc, curve.relative, loaded.model.cache_len - loaded.model.max_context, head_cost)
    write_tree_file(out, {
        "choices": [list(c) for c in tuned.choices], "expected_accept": round(tuned.expected_accept, 4),
        "expected_speedup": round(tuned.expected_speedup, 4), "cost_curve": curve.to_json(),
        "head_cost": round(head_cost, 4),
        "accuracy": np.round(acc, 4).tolist(), "calibration_positions": counts.astype(int).tolist(),
        "device": loaded.device, "dtype": loaded.dtype, "model": loaded.resolved.model_id, "heads": str(heads_path),
    })
    print(report(tuned, acc, counts, curve.to_json(), head_cost, out))
    return 0


def write_tree_file(path: Path, data: dict) -> None:
    """One key per line, each value on one line: readable and diffable without a 60-line choices list."""
    path.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items()) + "\n}\n")


def report(tuned: TunedTree, acc: np.ndarray, counts: np.ndarray, curve: dict[str, float], head_cost: float,
           out: Path) -> str:
    ranks = min(acc.shape[1], 5)
    lines = ["Head accuracy (P(rank-r candidate is the greedy token)):", "",
             "| head | positions | " + " | ".join(f"r{r}" for r in range(ranks)) + " |", "|---|---:|" + "---:|" * ranks]
    lines += [f"| {k} | {int(counts[k])} | " + " | ".join(f"{acc[k][r]:.3f}" for r in range(ranks)) + " |"
              for k in range(acc.shape[0])]
    lines += ["", "Verify cost t(T)/t(1): " + ", ".join(f"{T}: {c:.2f}" for T, c in curve.items()),
              f"Proposal cost (heads + top-k) / t(1): {head_cost:.2f}", "",
              f"Tree: {tuned.size} nodes, {max(map(len, tuned.choices), default=0)} deep, "
              f"expected {tuned.expected_accept:.3f} tokens/step, expected speedup {tuned.expected_speedup:.2f}x (KV compaction and host overheads aside)"]
    if not tuned.choices:
        lines.append("No tree beats plain decoding on this device with these heads: the file holds the root-only tree.")
    lines.append(f"Wrote {out}")
    return "\n".join(lines)


def register(subparsers, model_args, generation_args) -> None:
    p = subparsers.add_parser("tune-tree", parents=[model_args()],
                              help="build the Medusa tree with the best expected tokens/s on this device")
    p.add_argument("--prompts", default=None, help="calibration prompts as JSON lines (default: the package's "
                                                   "bench_prompts.jsonl; keep evaluation sets such as MT-bench out)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--max-generate-tokens", type=int, default=128, help="greedy tokens recorded per prompt")
    p.add_argument("--top-k", type=int, default=TOP_K, help="candidate ranks scored per head")
    p.add_argument("--cost-sizes", default=",".join(map(str, COST_SIZES)),
                   help="tree sizes T for the verify-cost curve (the largest bounds the tree)")
    p.add_argument("--cost-reps", type=int, default=5)
    p.add_argument("--out", default=None, help="tree file (default: tree-<device kind>.json next to the heads, "
                                               "where run/serve pick it up)")
    p.set_defaults(func=cmd_tune)
