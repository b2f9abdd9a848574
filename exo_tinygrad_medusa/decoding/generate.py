"""Generation on a whole model: plain decoding and Medusa share one loop (plain is the root-only tree)."""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tinygrad import Tensor

from .heads import MedusaHeads
from .lookup import Grafter, LookupConfig, NgramIndex, NoProposals, SourceScores, common_prefix
from .tree import PLAIN, MedusaTree, chain
from ..model.transformer import KVCache, Transformer
from .sampling import GenerationConfig
from .steps import ShardSteps

log = logging.getLogger(__name__)
OnTokens = Callable[[list[int]], None]


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    generated_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    accept_lengths: list[int] = field(default_factory=list)  # tokens each verify step produced (before stop cuts)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    lookup_steps: int = 0         # verify steps that carried a draft from the context (prompt lookup)

    @property
    def steps(self) -> int:
        return len(self.accept_lengths)

    @property
    def mean_accepted(self) -> float:
        return float(np.mean(self.accept_lengths)) if self.accept_lengths else 1.0

    @property
    def accept_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.accept_lengths).items()))

    @property
    def prefill_tokens_per_s(self) -> float:
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes from the prefill; decode speed counts what the verify steps produced
        return (len(self.generated_ids) - 1) / self.decode_s if self.decode_s and len(self.generated_ids) > 1 else 0.0


class _Emitter:
    """Cuts accepted tokens exactly at the first EOS and at the token budget, and streams what it keeps."""

    def __init__(self, result: GenerationResult, eos_ids: set[int], budget: int, on_tokens: OnTokens | None):
        self.result, self.eos_ids, self.budget, self.on_tokens = result, eos_ids, budget, on_tokens
        self.done = False

    def push(self, tokens: list[int]) -> None:
        kept = []
        for t in tokens:
            kept.append(t)
            if t in self.eos_ids:
                self.done, self.result.finish_reason = True, "stop"
                break
            if len(self.result.generated_ids) + len(kept) >= self.budget:
                self.done, self.result.finish_reason = True, "length"
                break
        self.result.generated_ids.extend(kept)
        if kept and self.on_tokens:
            self.on_tokens(kept)


class Generator:
    """Owns a whole model (one shard holding every layer), its captured steps and one KV cache.

    Prompt lookup (`GenerationConfig.prompt_lookup`, `LookupConfig`): with heads, context drafts are grafted into
    the Medusa tree; without heads, a step whose context offers a draft verifies `chain_tokens` drafted tokens in a
    chain tree (its own captured steps, sharing the cache) and any other step is a plain one-token step."""

    def __init__(self, model: Transformer, eos_token_ids, tree: MedusaTree = PLAIN, heads: MedusaHeads | None = None,
                 lookup: LookupConfig = LookupConfig()):
        if not (model.shard.is_first_layer() and model.shard.is_last_layer()):
            raise ValueError("Generator needs the whole model; use the engine for sharded models")
        self.model, self.tree, self.eos_ids, self.lookup = model, tree, set(eos_token_ids), lookup
        self.cache: KVCache = model.new_cache()
        self.steps = ShardSteps(model, tree, heads, cache=self.cache)
        self.grafter = Grafter(tree) if tree.size > 1 else None
        self._lookup_chain: ShardSteps | None = None

    def uses_lookup(self, cfg: GenerationConfig) -> bool:
        """cfg.prompt_lookup, or by default: on with a Medusa tree (grafting replaces the nodes least likely to be
        accepted at no extra verify cost), off for plain decoding (a drafted chain costs more than a one-token step
        and pays only where the text repeats its context, e.g. summaries and edits)."""
        return self.tree.size > 1 if cfg.prompt_lookup is None else cfg.prompt_lookup

    @property
    def lookup_chain(self) -> ShardSteps:
        """Captured steps of the lookup-only chain tree (plain decoding with prompt lookup), made on first use."""
        if self._lookup_chain is None:
            n = self.lookup.chain_tokens
            try:
                self._lookup_chain = ShardSteps(self.model, chain(n), NoProposals(n), cache=self.cache)
            except ValueError as e:
                raise ValueError(f"prompt lookup drafts {n} tokens a step: {e}") from None
        return self._lookup_chain

    def _with_draft(self, tree_tokens: np.ndarray, index: NgramIndex | None,
                    scores: SourceScores | None) -> tuple[ShardSteps, np.ndarray, list[int]]:
        """The steps to run, the tokens to verify (with the context's draft put in where it is used) and the draft
        (empty if the context offered none)."""
        if index is None:
            return self.steps, tree_tokens, []
        if self.grafter is not None:
            draft, _ = index.draft(self.tree.depth)
            if draft and scores.prefer_lookup:
                return self.steps, self.grafter.graft(tree_tokens, draft)[0], draft
            return self.steps, tree_tokens, draft
        draft, _ = index.draft(self.lookup.chain_tokens)
        if not draft:
            return self.steps, tree_tokens[:1], []
        return self.lookup_chain, np.array([tree_tokens[0], *draft], dtype=tree_tokens.dtype), draft

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.model.max_context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the context holds {self.model.max_context} "
                             f"(at least one must be left to generate)")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def prefill(self, prompt_ids: list[int]) -> tuple[Tensor, int]:
        """Run the prompt in chunks (steps.prefill_plan; the last one padded); returns the last chunk's hidden states
        and the row of the last prompt token. Padding writes K/V past the prompt: those slots are rewritten first."""
        hidden, row = None, 0
        for start, C in self.steps.prefill_plan(len(prompt_ids)):
            chunk = prompt_ids[start:start + C]
            row = len(chunk) - 1
            tokens = self.steps.host("tokens", [chunk + [0] * (C - len(chunk))])
            hidden = self.steps.prefill(tokens, self.cache.layers, self.steps.bind(start))
        return hidden, row

    def generate(self, prompt_ids: list[int], cfg: GenerationConfig = GenerationConfig(),
                 on_tokens: OnTokens | None = None) -> GenerationResult:
        self.check_prompt(prompt_ids)
        result = GenerationResult(list(prompt_ids))
        rng = np.random.default_rng(cfg.seed)
        emit = _Emitter(result, self.eos_ids, min(cfg.max_new_tokens, self.model.max_context - len(prompt_ids)), on_tokens)
        # the lookup-only chain needs cache slack for its drafts: make its steps (and any error) before the clock
        index = NgramIndex(self.lookup, prompt_ids) if self.uses_lookup(cfg) else None
        scores = SourceScores(self.lookup.score_decay) if index is not None and self.grafter is not None else None
        if index is not None and self.grafter is None:
            _ = self.lookup_chain
        t0 = time.perf_counter()
        hidden, row = self.prefill(prompt_ids)
        tree_tokens = self.steps.first_tree(hidden, row, cfg, rng)
        result.prefill_s = (t1 := time.perf_counter()) - t0
        emit.push([int(tree_tokens[0])])
        start_pos = len(prompt_ids)
        while not emit.done:
            if index is not None:
                index.extend(result.generated_ids[len(index.tokens) - len(prompt_ids):])
            proposed = tree_tokens
            steps, tree_tokens, draft = self._with_draft(proposed, index, scores)
            result.lookup_steps += bool(draft) and tree_tokens is not proposed
            x = steps.host("tokens", tree_tokens.reshape(1, -1))
            nodes, next_tree = steps.verify(x, self.cache.layers, start_pos, tree_tokens, cfg, rng)
            result.accept_lengths.append(len(nodes))
            emitted = [int(tree_tokens[n]) for n in nodes[1:]] + [int(next_tree[0])]  # what followed the root
            if scores is not None and draft:
                scores.update(self.grafter.matched(proposed, emitted), common_prefix(draft, emitted))
            emit.push(emitted)
            if nodes != list(range(len(nodes))):  # accepted nodes must sit in consecutive cache slots
                keep = np.arange(steps.tree.size, dtype=np.int32)
                keep[:len(nodes)] = nodes
                steps.compact(self.cache.layers, steps.bind(start_pos), steps.host("keep", keep))
            start_pos += len(nodes)
            # the lookup-only chain proposes placeholders past its root: the next step starts from the root alone
            tree_tokens = next_tree if steps is self.steps else next_tree[:1]
        result.decode_s = time.perf_counter() - t1
        return result
