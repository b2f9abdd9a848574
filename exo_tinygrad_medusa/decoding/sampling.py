"""Host-side sampling and Medusa acceptance for temperature > 0 (greedy acceptance runs on the device, except when
log-probabilities are asked for: then the logits come to the host and `greedy_accept` applies the device's rule),
and the log-probabilities of emitted tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .tree import MedusaTree

if TYPE_CHECKING:
    from .constraints import ResponseFormat

MAX_TOP_LOGPROBS = 20  # as OpenAI


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0            # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    medusa_sampling: str = "typical"   # "typical" (Medusa paper) or "exact" (distribution-preserving)
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    prompt_lookup: bool | None = None  # drafts from the context (medusa/lookup.py); None: where it pays (Generator)
    # the base model's log-probability of each emitted token, with this many most likely alternatives (0 to 20);
    # None: none (the logits then stay on the device when decoding greedily)
    logprobs: int | None = None
    # JSON mode or a JSON schema, enforced by a token mask at every position (constraints.py); None: free text
    response_format: "ResponseFormat | None" = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.medusa_sampling not in ("typical", "exact"):
            raise ValueError(f"medusa_sampling must be 'typical' or 'exact', got {self.medusa_sampling!r}")
        if not 0 < self.posterior_threshold <= 1 or not self.posterior_alpha > 0:
            raise ValueError("posterior_threshold must be in (0, 1] and posterior_alpha > 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be None or 0 to {MAX_TOP_LOGPROBS} alternatives, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: np.ndarray, cfg: GenerationConfig) -> np.ndarray:
    """The sampling distribution over the last axis after temperature, top-k and top-p."""
    x = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = np.partition(x, -cfg.top_k, axis=-1)[..., -cfg.top_k, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if cfg.top_p < 1:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, -1)
        drop_sorted = np.cumsum(sorted_p, -1) - sorted_p >= cfg.top_p  # keep the smallest prefix reaching top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(-1, keepdims=True)
    return p


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    return int(rng.choice(p.shape[-1], p=p))


def typical_accept(tree: MedusaTree, tree_tokens: np.ndarray, logits: np.ndarray, cfg: GenerationConfig,
                   rng: np.random.Generator) -> tuple[list[int], int]:
    """Medusa's typical acceptance: a candidate passes if p(token) > min(threshold, alpha * exp(-entropy(p)))
    under its parent's distribution; the longest passing path wins, the bonus is sampled at its end."""
    p = probabilities(logits, cfg)                                  # (T, V)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)
    cutoff = np.minimum(cfg.posterior_threshold, cfg.posterior_alpha * np.exp(-entropy))
    node_ok = np.ones(tree.size, dtype=bool)
    for i in range(1, tree.size):
        parent = tree.parents[i]
        node_ok[i] = p[parent, tree_tokens[i]] > cutoff[parent]
    best_nodes: list[int] = [0]
    for path, length in zip(tree.retrieve_paths, tree.path_lengths):
        nodes = [0]
        for node in path[1:length]:
            if not node_ok[node]:
                break
            nodes.append(int(node))
        if len(nodes) > len(best_nodes):
            best_nodes = nodes
    return best_nodes, sample(p[best_nodes[-1]], rng)


def exact_accept(tree: MedusaTree, tree_tokens: np.ndarray, logits: np.ndarray, cfg: GenerationConfig,
                 rng: np.random.Generator) -> tuple[list[int], int]:
    """Tree speculative sampling that leaves the model's distribution unchanged.

    The drafts are the heads' top-k, i.e. deterministic proposals. At each node the children are tried in turn:
    child c is accepted with probability r(c) under the residual r (initially p); a rejected child's mass is
    removed and r renormalised. P(emit c) = p(c) for every token c, as in sampling directly from p. If no child is
    accepted the bonus token is drawn from the final residual."""
    children: dict[int, list[int]] = {}
    for i in range(1, tree.size):
        children.setdefault(int(tree.parents[i]), []).append(i)
    nodes, node = [0], 0
    while True:
        residual = probabilities(logits[node], cfg)
        accepted = None
        for child in sorted(children.get(node, []), key=lambda c: tree.node_rank[c]):
            token = int(tree_tokens[child])
            if rng.random() < residual[token]:
                accepted = child
                break
            residual[token] = 0.0
            residual /= residual.sum()
        if accepted is None:  # also at a leaf: then the residual is the leaf's own distribution
            return nodes, sample(residual, rng)
        nodes.append(accepted)
        node = accepted


def greedy_accept(tree: MedusaTree, tree_tokens: np.ndarray, logits: np.ndarray) -> tuple[list[int], int]:
    """The device's greedy rule (ShardSteps._verify_greedy) on host logits: the longest path whose every node is its
    parent's argmax (the first such path on a tie), and the argmax after its last node as the bonus token."""
    pred = logits.argmax(-1)
    best_nodes: list[int] = [0]
    for path, length in zip(tree.retrieve_paths, tree.path_lengths):
        nodes = [0]
        for node in path[1:length]:
            if int(tree_tokens[node]) != int(pred[nodes[-1]]):
                break
            nodes.append(int(node))
        if len(nodes) > len(best_nodes):
            best_nodes = nodes
    return best_nodes, int(pred[best_nodes[-1]])


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # the most likely tokens at this position and theirs, best first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def token_logprobs(rows: np.ndarray, tokens, top_n: int) -> list[TokenLogprob]:
    """For each emitted token, its log-probability under the base model's distribution at its position (rows[i]:
    the raw logits that predicted tokens[i]; temperature 1, before any top-k/top-p cut) and the top_n best."""
    out = []
    for row, token in zip(log_softmax(np.asarray(rows)), tokens):
        top = ()
        if (n := min(top_n, row.shape[-1])) > 0:
            pick = np.argpartition(-row, n - 1)[:n]
            pick = pick[np.lexsort((pick, -row[pick]))]  # best first; equal ones by id, for a stable answer
            top = tuple((int(i), float(row[i])) for i in pick)
        out.append(TokenLogprob(int(token), float(row[int(token)]), top))
    return out
