"""Generation on a whole model: plain decoding and Medusa share one loop (plain is the root-only tree)."""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tinygrad import Tensor

from .constraints import Constraint
from .heads import MedusaHeads
from .lookup import DraftPlanner, Grafter, LookupConfig, NoProposals, Plan
from .tree import PLAIN, MedusaTree, chain
from ..model.transformer import KVCache, Transformer
from .sampling import GenerationConfig, TokenLogprob, token_logprobs
from .step_costs import StepCosts
from .steps import ShardSteps
from ..kernels.tinygrad_hooks import read_host

log = logging.getLogger(__name__)
OnTokens = Callable[[list[int]], None]
OnLogprobs = Callable[[list[TokenLogprob]], None]


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    generated_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    accept_lengths: list[int] = field(default_factory=list)  # tokens each verify step produced (before stop cuts)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    lookup_steps: int = 0         # verify steps that carried a draft from the context or the datastore
    # per source of a step ("plain", "heads", "context", "datastore"): steps, and tokens they emitted (bonus included)
    source_steps: dict[str, int] = field(default_factory=dict)
    source_tokens: dict[str, int] = field(default_factory=dict)
    step_sizes: dict[int, int] = field(default_factory=dict)   # tokens verified a step -> steps
    host_s: float = 0.0           # time spent drafting and planning on the host
    draft_s: float = 0.0          # time the draft head spent drafting (its captured call, on the device)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, when GenerationConfig.logprobs

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
    """Cuts accepted tokens exactly at the first EOS and at the token budget, and streams what it keeps (the tokens'
    log-probabilities first, when there are any)."""

    def __init__(self, result: GenerationResult, eos_ids: set[int], budget: int, on_tokens: OnTokens | None,
                 on_logprobs: OnLogprobs | None = None):
        self.result, self.eos_ids, self.budget, self.on_tokens = result, eos_ids, budget, on_tokens
        self.on_logprobs, self.done = on_logprobs, False

    def push(self, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
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
        if logprobs is not None:
            self.result.logprobs.extend(logprobs[:len(kept)])
            if kept and self.on_logprobs:
                self.on_logprobs(logprobs[:len(kept)])
        if kept and self.on_tokens:
            self.on_tokens(kept)


class Generator:
    """Owns a whole model (one shard holding every layer), its captured steps and one KV cache.

    Drafts (`GenerationConfig.prompt_lookup`, `LookupConfig`, lookup.DraftPlanner): each step the planner picks, by
    expected emitted tokens per unit of step cost, a chain of the context's or the datastore's draft verified by a
    captured step sized to it (`LookupConfig.chain_sizes`, each captured on first use, all sharing the cache), the
    heads' tree (with heads), or a plain one-token step."""

    def __init__(self, model: Transformer, eos_token_ids, tree: MedusaTree = PLAIN, heads: MedusaHeads | None = None,
                 lookup: LookupConfig = LookupConfig(), datastore=None, cache: KVCache | None = None,
                 step_seconds: dict | None = None, tokenizer=None, draft_head=None):
        """cache: the KV cache to own (a stored session's, which its captures were made on), else a new one.
        step_seconds: step times measured before (a stored session's), which the planner starts from.
        tokenizer: the model's (model/tokenizer.Tokenizer), which a GenerationConfig.response_format's grammar is
        matched against; without it, constrained generation is refused.
        draft_head: a draft_steps.DraftHeadSteps on this model, in place of Medusa heads (the tree stays PLAIN): each
        greedy step it drafts from the verified rows' hidden states, one more draft source for the planner."""
        if draft_head is not None and tree.size > 1:
            raise ValueError("a draft head replaces the Medusa heads: use it with the plain tree")
        if not (model.shard.is_first_layer() and model.shard.is_last_layer()):
            raise ValueError("Generator needs the whole model; use the engine for sharded models")
        self.model, self.tree, self.eos_ids, self.lookup = model, tree, set(eos_token_ids), lookup
        self.datastore, self.tokenizer, self.draft_head = datastore, tokenizer, draft_head
        self.cache: KVCache = cache or model.new_cache()
        self.steps = ShardSteps(model, tree, heads, cache=self.cache, keep_hidden=draft_head is not None)
        self.grafter = Grafter(tree) if tree.size > 1 else None
        self._chains: dict[int, ShardSteps] = {}
        # seconds of a step by kind (tokens verified, or "heads"), kept across generations; the cost table before
        kinds = [*lookup.chain_sizes, *(["heads"] if tree.size > 1 else [])]
        self.costs = StepCosts(kinds, lambda kind: lookup.kind_cost(kind, tree.size), step_seconds)

    @property
    def step_seconds(self) -> dict:
        return self.costs.seconds

    def uses_lookup(self, cfg: GenerationConfig) -> bool:
        """cfg.prompt_lookup, or by default: on for greedy Medusa decoding (planned with the step costs measured on
        this device), off for plain decoding (the exact baseline that benchmarks compare against; --prompt-lookup
        turns drafts on there) and for sampling with heads, which keeps the tree the user chose every step: it
        would be planned with the CPU cost table (measured times would make a seed's tokens depend on the load)."""
        if cfg.prompt_lookup is not None:
            return cfg.prompt_lookup
        return (self.tree.size > 1 or self.draft_head is not None) and cfg.greedy

    def chain_steps(self, size: int) -> ShardSteps:
        """Captured steps verifying `size` tokens (the root and size - 1 drafted ones), made on first use; size 1 is
        a plain step (the generator's own without heads)."""
        if size == 1 and self.tree.size == 1:
            return self.steps
        if size not in self._chains:
            tree = PLAIN if size == 1 else chain(size - 1)
            try:
                self._chains[size] = ShardSteps(self.model, tree, NoProposals(size - 1) if size > 1 else None,
                                                cache=self.cache, keep_hidden=self.draft_head is not None)
            except ValueError as e:
                raise ValueError(f"prompt lookup drafts {size - 1} tokens a step: {e}") from None
        return self._chains[size]

    def step_kinds(self) -> dict:
        """Every ShardSteps made so far by kind: "tree" (the generator's own) and each draft chain size."""
        return {"tree": self.steps, **{size: steps for size, steps in self._chains.items() if steps is not self.steps}}

    def capture_steps(self) -> None:
        """Capture every draft step now (TinyJit captures on a step's second call), so that no timed generation pays
        for it: greedy verifies of placeholder tokens at position 0, which the next prefill rewrites."""
        if self.draft_head is not None:
            self.draft_head.capture(self.lookup.chain_sizes)
        kinds = [(size, self.chain_steps(size)) for size in self.lookup.chain_sizes]
        if self.tree.size > 1:
            kinds.append(("heads", self.steps))
        for kind, steps in kinds:
            x = steps.host("tokens", np.zeros((1, steps.tree.size), dtype=np.int32))
            for rep in range(5):  # two calls capture, three are timed: a first measure of each step's cost
                t0 = time.perf_counter()
                read_host(steps.greedy_summary(x, self.cache.layers, steps.bind(0)))
                if rep >= 2:
                    self.costs.record(kind, time.perf_counter() - t0)

    def measured_costs(self) -> dict:
        """Step costs relative to a plain step (StepCosts.relative): measured where timed, the table elsewhere."""
        return self.costs.relative()

    def _planner(self, prompt_ids: list[int], cfg: GenerationConfig) -> DraftPlanner | None:
        if not self.uses_lookup(cfg):
            return None
        heads_tree = (self.tree.size, self.tree.depth) if self.tree.size > 1 else None
        measured = {}
        if cfg.greedy and self.lookup.measure_costs:
            if not self.step_seconds:  # the first greedy generation measures this device's steps (and captures them)
                self.capture_steps()
            measured = self.measured_costs()
        planner = DraftPlanner(self.lookup, prompt_ids, self.datastore, heads_tree, measured)
        for size in self.lookup.chain_sizes:  # make the steps (and any error) before the clock
            self.chain_steps(size)
        return planner

    def _tokens_for(self, plan: Plan, tree_tokens: np.ndarray) -> tuple[ShardSteps, np.ndarray]:
        """The steps to run and the tokens to verify for a plan; tree_tokens holds the root, and the heads' proposals
        when the last step ran the heads."""
        if plan.source == "heads":
            if len(tree_tokens) == self.tree.size:
                return self.steps, tree_tokens
            # the last step ran no heads: their places hold the best draft's first tokens, else placeholders
            filled = np.zeros(self.tree.size, dtype=tree_tokens.dtype)
            filled[0] = tree_tokens[0]
            return self.steps, filled
        steps = self.chain_steps(plan.size)
        return steps, np.array([tree_tokens[0], *plan.draft], dtype=tree_tokens.dtype)

    def uses_draft_head(self, cfg: GenerationConfig, planner, constraint) -> bool:
        """The draft head drafts for greedy steps that stay on the device (no log-probabilities, no grammar), the
        steps whose verified hidden states it continues from."""
        return self.draft_head is not None and planner is not None and cfg.greedy and cfg.logprobs is None and \
            constraint is None

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.model.max_context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the context holds {self.model.max_context} "
                             f"(at least one must be left to generate)")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def constraint(self, cfg: GenerationConfig) -> Constraint | None:
        """The grammar state of a generation under cfg.response_format, None for free text."""
        if cfg.response_format is None:
            return None
        if self.tokenizer is None:
            raise ValueError("response_format needs the generator's tokenizer (Generator(..., tokenizer=...))")
        return Constraint(cfg.response_format, self.tokenizer, self.model.config.vocab_size)

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
                 on_tokens: OnTokens | None = None, on_logprobs: OnLogprobs | None = None,
                 on_step: Callable[[str], None] | None = None) -> GenerationResult:
        """With cfg.logprobs every step brings its logits to the host (greedy acceptance then runs there, by the
        device's rule): result.logprobs, and on_logprobs before each on_tokens, hold the base model's
        log-probabilities of the emitted tokens, the same with Medusa as in plain decoding. on_step(source), before
        each step's tokens, says where its drafts came from: "prefill" (the first token), then "plain", "heads",
        "context" or "datastore". With cfg.response_format every token is chosen among those its grammar allows
        (constraints.py): the steps' logits then come to the host, and drafts are checked and filled by the grammar
        before each verify step."""
        self.check_prompt(prompt_ids)
        constraint = self.constraint(cfg)
        result = GenerationResult(list(prompt_ids))
        rng = np.random.default_rng(cfg.seed)
        emit = _Emitter(result, self.eos_ids, min(cfg.max_new_tokens, self.model.max_context - len(prompt_ids)),
                        on_tokens, on_logprobs)
        rows = [] if cfg.logprobs is not None else None  # host logits of the emitted tokens, when asked for
        planner = self._planner(prompt_ids, cfg)
        t0 = time.perf_counter()
        hidden, row = self.prefill(prompt_ids)
        tree_tokens = self.steps.first_tree(hidden, row, cfg, rng, rows,
                                            None if constraint is None else constraint.allowed())
        drafting = self.uses_draft_head(cfg, planner, constraint)
        if drafting:
            planner.external["draft head"] = self.draft_head.start(hidden[0, row:row + 1], int(tree_tokens[0]))
        result.prefill_s = (t1 := time.perf_counter()) - t0
        if on_step:
            on_step("prefill")
        emit.push([int(tree_tokens[0])], _logprobs(rows, [int(tree_tokens[0])], cfg))
        if constraint is not None and not emit.done:
            constraint.advance([int(tree_tokens[0])])
        start_pos = len(prompt_ids)
        plain = Plan("heads" if self.tree.size > 1 else "plain", self.tree.size, [], 0.0)
        while not emit.done:
            if planner is not None:
                h0 = time.perf_counter()
                planner.extend(result.generated_ids[len(planner.index.tokens) - len(prompt_ids):])
                plan = planner.plan(constraint.forced() if constraint is not None else None)
                result.host_s += time.perf_counter() - h0
            else:
                plan = plain
            proposed = tree_tokens if len(tree_tokens) == self.tree.size and self.tree.size > 1 else None
            steps, tree_tokens = self._tokens_for(plan, tree_tokens)
            allowed = None
            if constraint is not None:
                h0 = time.perf_counter()
                tree_tokens, allowed = constraint.tree_masks(steps.tree, tree_tokens)
                result.host_s += time.perf_counter() - h0
            # greedy steps are timed once captured (a capturing call compiles); sampling plans from the cost table;
            # steps whose logits come to the host (log-probabilities, a grammar) are not the device's own cost
            timed = planner is not None and cfg.greedy and rows is None and allowed is None and \
                self.lookup.measure_costs and steps.verify_greedy.captured is not None
            s0 = time.perf_counter()
            x = steps.host("tokens", tree_tokens.reshape(1, -1))
            nodes, next_tree = steps.verify(x, self.cache.layers, start_pos, tree_tokens, cfg, rng, rows, allowed)
            if timed:
                self.costs.record("heads" if plan.source == "heads" else plan.size, time.perf_counter() - s0)
                planner.measured = self.measured_costs()
            result.accept_lengths.append(len(nodes))
            emitted = [int(tree_tokens[n]) for n in nodes[1:]] + [int(next_tree[0])]  # what followed the root
            self._count(result, plan, steps.tree.size, len(emitted))
            if planner is not None:
                planner.observe(emitted, None if proposed is None else self.grafter.matched(proposed, emitted))
            if on_step:
                on_step(plan.source)
            emit.push(emitted, _logprobs(rows, emitted, cfg))
            if constraint is not None and not emit.done:
                constraint.advance(emitted)
            if drafting and not emit.done:
                h0 = time.perf_counter()
                planner.external["draft head"] = self.draft_head.advance(steps.last_hidden, emitted)
                result.draft_s += time.perf_counter() - h0
            if nodes != list(range(len(nodes))):  # accepted nodes must sit in consecutive cache slots
                keep = np.arange(steps.tree.size, dtype=np.int32)
                keep[:len(nodes)] = nodes
                steps.compact(self.cache.layers, steps.bind(start_pos), steps.host("keep", keep))
            start_pos += len(nodes)
            # draft chains propose placeholders past their root: the next step starts from the root alone
            tree_tokens = next_tree if steps is self.steps else next_tree[:1]
        result.decode_s = time.perf_counter() - t1
        return result

    @staticmethod
    def _count(result: GenerationResult, plan: Plan, size: int, emitted: int) -> None:
        result.lookup_steps += plan.source in ("context", "datastore")
        result.source_steps[plan.source] = result.source_steps.get(plan.source, 0) + 1
        result.source_tokens[plan.source] = result.source_tokens.get(plan.source, 0) + emitted
        result.step_sizes[size] = result.step_sizes.get(size, 0) + 1


def _logprobs(rows: list | None, tokens: list[int], cfg: GenerationConfig) -> list[TokenLogprob] | None:
    """The log-probabilities of tokens from the host logits rows that predicted them (emptied for the next step)."""
    if rows is None:
        return None
    out = token_logprobs(np.stack(rows), tokens, cfg.logprobs)
    rows.clear()
    return out
