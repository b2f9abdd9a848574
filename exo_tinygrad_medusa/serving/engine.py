"""Exo's InferenceEngine for our tinygrad shards, with Medusa spread over a ring of shards in one pass per step.

A request goes around the ring once per step. Every shard runs the step's tokens (the prompt, or the current
Medusa tree) against its own KV cache; the last shard verifies the tree, accepts a path, proposes the next tree
with its heads and returns the accepted tokens. What the other shards need for the next pass travels in
`inference_state` as plain JSON (see `StepState`): the nodes to keep, the next tree's tokens and a step counter.
Each shard first compacts its cache to the accepted path, then runs the new tree. Greedy rings with prompt_lookup
plan each pass on the last shard (ring_drafts.py): the heads' tree, a plain pass or a chain of drafted tokens (the
state's `kind`).
Every shard checks the step counter and cache position against its own record, so a shard that missed a pass
fails instead of decoding garbage.

Wire contract (what Exo's node loop, or any driver, does between passes):
- first pass: `infer_prompt` / `infer_tensor` on the first shard with token ids (1, T) and no state;
- each shard's output goes to the next shard with the returned state; non-last shards return hidden (1, T, dim);
- the last shard returns the tokens it emitted, int64 (1, k), and the state for the next pass; feed exactly those
  tokens and that state to the first shard again (it runs the tree from the state and checks the tokens match);
- stop when the state's `finish_reason` is set ("stop" at EOS, "length" at the token budget or context end) or at
  the driver's own limit;
- when a request ends, finished or failed (a shard lost, a pass refused), call `release(request_id)` on every
  shard: the last shard frees its cache when it emits the finish by itself, but only the driver knows when the
  other shards' caches are dead. Without it they wait for least-recently-used eviction (`max_requests`).
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from tinygrad import Tensor
from tinygrad.nn.state import safe_load, safe_save

from ..model.loader import LoadedModel, load_model
from ..decoding.heads import load_heads_for
from ..decoding.tree import PLAIN, MedusaTree, load_tree
from ..model.transformer import KVCache
from ..decoding.sampling import GenerationConfig, probabilities, sample
from ..decoding.session import MedusaOptions, default_tree_spec, resolve_heads_path
from ..model.shard import Shard
from ..decoding.steps import ShardSteps
from ..kernels.tinygrad_hooks import read_host, share_kernel_cache
from . import ring_drafts
from .ring_drafts import TREE, PassCosts, RequestDrafts, RingDraftConfig

try:  # inside classic Exo the engine is a real InferenceEngine; without Exo it stands alone
    from exo.inference.inference_engine import InferenceEngine as _EngineBase
except ImportError:
    _EngineBase = object

log = logging.getLogger(__name__)
STATE_KEY = "medusa"
# tinygrad is not thread-safe: every engine in the process runs its tinygrad work on this one thread
TINYGRAD_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinygrad")


share_kernel_cache()


class RingStateError(RuntimeError):
    """The ring state does not match this shard's own record of the request: refuse rather than decode garbage."""


@dataclass
class StepState:
    """What travels with a request from shard to shard (JSON-able: Exo serialises it between nodes)."""
    step: int                  # ring passes finished for this request; 0 while the prompt goes around
    start_pos: int             # cache slot of the first token this pass writes
    tree_id: str               # every shard must run the same tree
    next_layer: int = 0        # the first layer of the shard this state goes to: catches a skipped shard
    keep: list[int] = field(default_factory=list)    # tree nodes the previous pass accepted: compact to them first
    tree: list[int] = field(default_factory=list)    # this pass's tree tokens (node 0 = the last token emitted)
    tokens: list[int] = field(default_factory=list)  # tokens the previous pass emitted
    finish_reason: str | None = None                 # "stop" (EOS) or "length" (token budget or context end)
    kind: str = TREE   # "tree": the Medusa tree; "chain": `tree` holds a root and drafted tokens (ring_drafts.py)
    prompt: list[int] = field(default_factory=list)  # the prompt pass only, with drafts: the last shard plans from it

    def to_state(self) -> dict:
        return {STATE_KEY: asdict(self)}

    @classmethod
    def from_state(cls, state: dict | None) -> "StepState | None":
        if not state or STATE_KEY not in state:
            return None
        try:
            return cls(**state[STATE_KEY])
        except TypeError as e:
            raise RingStateError(f"malformed Medusa ring state {state[STATE_KEY]!r}: {e}") from None


class _Slot:
    """A KV cache with its own captured steps, the cache's buffers baked into every capture. Passing a request's cache
    to shared captures instead costs TinyJit's per-input bookkeeping on every call (two tensors a layer: ~1 ms a
    pass per shard of SmolLM2's 15 layers on two cores, an eighth of a decode step). A slot is reused request after
    request (nothing reads a cache past its request's own positions), so each slot captures its steps once."""

    def __init__(self, steps_for, cache: KVCache):
        self.cache, self.steps = cache, steps_for(cache=cache)
        self.chains: dict[int, ShardSteps] = {}  # draft chains by size, made on first use (ring_drafts.chain_steps)


@dataclass
class _Request:
    """One shard's record of one request."""
    slot: _Slot
    prompt_len: int
    step: int = 0              # passes this shard has run
    pos: int = 0               # committed cache length
    pending: bool = False      # the last tree sits at pos.. and waits for the next pass to say which nodes to keep
    generated: int = 0         # last shard: tokens emitted so far
    rng: np.random.Generator | None = None
    ran: ShardSteps | None = None      # the steps of the pending pass: the next pass's keep refers to their nodes
    drafts: RequestDrafts | None = None  # last shard, with drafts: plans each pass

    @property
    def cache(self) -> KVCache:
        return self.slot.cache

    @property
    def steps(self) -> ShardSteps:
        return self.slot.steps


def tree_fingerprint(tree: MedusaTree) -> str:
    return hashlib.sha1(repr(tree.choices).encode()).hexdigest()[:12]


class MedusaInferenceEngine(_EngineBase):
    """Exo's InferenceEngine interface (all async) over our tinygrad shards, with Medusa on the last shard.

    Models are resolved by our registry from the shard's model_id (card id, HF directory, .gguf, HF repo id);
    Exo's shard_downloader is kept for Exo's API but not used. Per-request KV caches live here, keyed by
    request_id, at most `max_requests` of them (least recently used evicted); each sits in a slot (_Slot) that the
    next request reuses once its request ends, so the steps a slot captured are replayed, not captured again."""

    def __init__(self, medusa: MedusaOptions = MedusaOptions(), generation: GenerationConfig = GenerationConfig(),
                 *, device: str | None = None, dtype: str | None = None, max_context: int = 2048,
                 max_requests: int = 4, shard_downloader=None, drafts: RingDraftConfig = RingDraftConfig(),
                 datastore="shipped"):
        """drafts, datastore: the draft chains of greedy rings (ring_drafts.py); datastore "shipped" is the model's
        own (models/<card>/datastore, loaded on the last shard), else a Datastore or None."""
        if not medusa.enabled and any(v is not None for v in (medusa.heads, medusa.num_heads, medusa.num_layers,
                                                                medusa.choices)):
            raise ValueError("Medusa options were given without --medusa-enabled")
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        if generation.response_format is not None:
            # Exo's API hands the engine tokens, never a request's response_format: a format set here would hold
            # for every request, which no client asked for
            raise ValueError("response_format (JSON mode, JSON schemas) is not supported by the Exo engine: use "
                             "`exo-medusa serve` for constrained decoding")
        ring_drafts.drafts_on(generation)  # refuses drafts with sampling now rather than at the first load
        self.medusa, self.generation = medusa, generation
        self.device, self.dtype, self.max_context, self.max_requests = device, dtype, max_context, max_requests
        self.shard_downloader = shard_downloader
        self.drafts, self.datastore = drafts, datastore
        self.draft_sizes: tuple[int, ...] = ()  # chain sizes this shard runs; () with drafts off
        self.pass_costs: PassCosts | None = None  # last shard, with drafts: timed passes by kind
        self.shard: Shard | None = None
        self.loaded: LoadedModel | None = None
        self.tokenizer = None
        self.slots: list[_Slot] = []           # every slot made so far, at most max_requests
        self.free_slots: list[_Slot] = []      # slots of no live request; the last one freed is reused first
        self._steps_for = None                 # cache -> ShardSteps baked on that cache, for the loaded shard
        self.tree: MedusaTree = PLAIN
        self.tree_id = tree_fingerprint(PLAIN)
        self.requests: OrderedDict[str, _Request] = OrderedDict()
        # ids of requests this shard saw finish or released, so a late pass gets a precise error, not "unknown"
        self.ended: OrderedDict[str, str] = OrderedDict()

    # -- Exo's interface ---------------------------------------------------------------------------------------
    async def ensure_shard(self, shard) -> None:
        await self._on_engine_thread(self._load, Shard.of(shard))

    async def encode(self, shard, prompt: str) -> np.ndarray:
        await self.ensure_shard(shard)
        return np.array(await self._on_engine_thread(self.tokenizer.encode, prompt), dtype=np.int64)

    async def decode(self, shard, tokens) -> str:
        await self.ensure_shard(shard)
        return await self._on_engine_thread(self.tokenizer.decode, np.asarray(tokens).reshape(-1).tolist())

    async def sample(self, x: np.ndarray, temp: float = 0.0, top_p: float = 1.0) -> np.ndarray:
        """The last shard already chose its tokens (an int array): they pass through. Float logits (..., V)
        are sampled at their last row, for drivers that hand us plain logits."""
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.integer):
            return x.reshape(-1).astype(np.int64)
        logits = x.reshape(-1, x.shape[-1])[-1]
        if temp <= 0:
            return np.array([int(logits.argmax())], dtype=np.int64)
        p = probabilities(logits, GenerationConfig(temperature=temp, top_p=top_p))
        return np.array([sample(p, np.random.default_rng())], dtype=np.int64)

    async def infer_prompt(self, request_id: str, shard, prompt: str,
                           inference_state: dict | None = None) -> tuple[np.ndarray, dict | None]:
        tokens = await self.encode(shard, prompt)
        return await self.infer_tensor(request_id, shard, tokens.reshape(1, -1), inference_state)

    async def infer_tensor(self, request_id: str, shard, input_data: np.ndarray,
                           inference_state: dict | None = None) -> tuple[np.ndarray, dict | None]:
        return await self._on_engine_thread(self.infer_tensor_now, request_id, shard, input_data, inference_state)

    async def load_checkpoint(self, shard, path: str) -> None:
        await self.ensure_shard(shard)
        await self._on_engine_thread(self._load_weights, path)

    async def save_checkpoint(self, shard, path: str) -> None:
        await self.ensure_shard(shard)
        await self._on_engine_thread(lambda: safe_save(self.loaded.model.parameters(), str(path)))

    # -- ours --------------------------------------------------------------------------------------------------
    async def release(self, request_id: str) -> bool:
        """Free this shard's KV cache of a request (finished, failed or abandoned); True if it held one. A later
        pass of that request is refused. Safe to call for unknown ids and more than once."""
        return await self._on_engine_thread(self.release_now, request_id)

    async def warm_up(self, shard) -> None:
        """Compile and capture the KV compaction, which otherwise compiles inside the first request whose accepted
        path leaves the tree's first branch (seconds on a CPU, in the middle of a timed run), and with drafts every
        pass kind (ring_drafts.capture_pass_kinds)."""
        await self._on_engine_thread(self.warm_up_now, shard)

    # -- the same calls, blocking, for a caller that is the process's one tinygrad thread (a shard server,
    # serving/ring_shard.py: it skips the hand-off to the engine thread and back, two thread wake-ups a hop) ------
    def load_now(self, shard) -> None:
        self._load(Shard.of(shard))

    def infer_tensor_now(self, request_id: str, shard, input_data: np.ndarray,
                         inference_state: dict | None = None) -> tuple[np.ndarray, dict | None]:
        return self._infer(request_id, Shard.of(shard), np.asarray(input_data), inference_state)

    def release_now(self, request_id: str) -> bool:
        return self._release(request_id, "released")

    def warm_up_now(self, shard) -> None:
        self._load(Shard.of(shard))
        self._warm_up()

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.tokenizer.eos_token_ids if self.tokenizer else ()

    async def _on_engine_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(TINYGRAD_EXECUTOR, fn, *args)

    def _load(self, shard: Shard) -> None:
        if self.shard == shard:
            return
        loaded = load_model(shard.model_id, shard, dtype=self.dtype, device=self.device, max_context=self.max_context)
        tree, heads = self._build_steps(loaded, shard)
        self.loaded, self.tokenizer, self.tree, self.tree_id = loaded, loaded.tokenizer, tree, tree_fingerprint(tree)
        self.requests.clear()  # caches of another shard are meaningless here
        self.ended.clear()
        self.shard = shard
        log.info("engine: %s layers %d..%d of %d, tree %s (%d nodes)%s", shard.model_id, shard.start_layer,
                 shard.end_layer, shard.n_layers, tree.name, tree.size, ", Medusa heads" if heads else "")

    def _build_steps(self, loaded: LoadedModel, shard: Shard) -> tuple[MedusaTree, object]:
        """The tree, the heads (last shard, with Medusa) and the captured steps over the model's current tensors.
        Slots made for earlier weights or another shard are dropped (their captures hold the old buffers)."""
        tree, heads = PLAIN, None
        if self.medusa.enabled:
            heads_path = resolve_heads_path(loaded, self.medusa)
            tree = load_tree(self.medusa.choices or default_tree_spec(loaded.device, heads_path))
            if shard.is_last_layer():
                heads = load_heads_for(heads_path, loaded.model).use_first(
                    self.medusa.num_heads, self.medusa.num_layers)
        self._steps_for = functools.partial(ShardSteps, loaded.model, tree, heads)
        self.slots, self.free_slots = [], []
        self.draft_sizes, self.pass_costs, self.datastore = ring_drafts.shard_setup(
            self.generation, self.drafts, tree, loaded, self.datastore)
        return tree, heads

    def _release(self, request_id: str, why: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is not None and any(req.slot is slot for slot in self.slots):  # not a slot of replaced steps
            self.free_slots.append(req.slot)
        held = req is not None
        self.ended[request_id] = why
        self.ended.move_to_end(request_id)
        while len(self.ended) > 64 * self.max_requests:  # only for error messages: keep the recent ones
            self.ended.popitem(last=False)
        return held

    def _warm_up(self) -> None:
        """Makes the slot the next request gets, and compiles and captures its compaction (nothing while every slot
        holds a live request: warming up must not evict one)."""
        if not self.free_slots and len(self.slots) >= self.max_requests:
            return
        slot = self._acquire_slot()
        self.free_slots.append(slot)
        ring_drafts.capture_pass_kinds(slot, self.draft_sizes, self.shard, self._tensor, self.loaded.config.dim)
        if self.tree.is_chain:
            return  # a chain's accepted nodes are always consecutive: it never compacts
        keep = slot.steps.host("keep", np.arange(self.tree.size))
        for _ in range(2):  # TinyJit captures on the second call; an identity move at position 0 of a free slot
            slot.steps.compact(slot.cache.layers, slot.steps.bind(0), keep)

    def _acquire_slot(self) -> _Slot:
        """A free slot, else a new one while there are fewer than max_requests, else the least recently used
        request's (that request is evicted)."""
        if self.free_slots:
            return self.free_slots.pop()
        if len(self.slots) < self.max_requests:
            self.slots.append(_Slot(self._steps_for, self.loaded.model.new_cache()))
            return self.slots[-1]
        evicted, req = self.requests.popitem(last=False)
        log.info("evicted request %s (more than %d live requests)", evicted, self.max_requests)
        self.ended[evicted] = f"evicted: more than {self.max_requests} live requests"
        return req.slot

    def _load_weights(self, path: str) -> None:
        weights = safe_load(str(path))
        params = self.loaded.model.parameters()
        missing = sorted(set(params) - set(weights))
        if missing:
            raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors of this shard, e.g. {missing[:3]}")
        new = {name: weights[name].to(t.device).cast(t.dtype).contiguous() for name, t in params.items()}
        Tensor.realize(*new.values())
        # parameters() gives linear weights as views of the panels the products read, so assigning to them would not
        # reach those panels: install the tensors, then rebuild what captured the old buffers (the steps, and heads
        # that share lm_head); caches computed with the old weights are dropped
        self.loaded.model.set_parameters(new)
        self._build_steps(self.loaded, self.shard)
        for request_id in list(self.requests):
            self._release(request_id, "released: new weights were loaded")

    # -- one pass of one request through this shard (engine thread) ------------------------------------------
    def _infer(self, request_id: str, shard: Shard, x: np.ndarray, state: dict | None) -> tuple[np.ndarray, dict]:
        self._load(shard)
        incoming = StepState.from_state(state)
        if incoming is None:
            if not shard.is_first_layer():
                raise RingStateError(f"request {request_id}: layers {self._layers()} got input without Medusa ring "
                                     "state; only the first shard starts a request")
            incoming = StepState(step=0, start_pos=0, tree_id=self.tree_id)
        if incoming.next_layer != shard.start_layer:
            raise RingStateError(f"request {request_id}: the ring state is for layer {incoming.next_layer} but this "
                                 f"shard starts at layer {shard.start_layer} (a shard was skipped or a state replayed)")
        incoming.next_layer = shard.end_layer + 1
        if incoming.tree_id != self.tree_id:
            raise RingStateError(f"request {request_id}: the ring runs tree {incoming.tree_id} but layers "
                                 f"{self._layers()} run tree {self.tree_id} ({self.tree.name}): start every node with "
                                 "the same Medusa options")
        if incoming.step == 0:
            return self._prompt_pass(request_id, x, incoming)
        return self._tree_pass(request_id, self._lookup(request_id), x, incoming)

    def _layers(self) -> str:
        return f"{self.shard.start_layer}..{self.shard.end_layer}"

    def _lookup(self, request_id: str) -> _Request:
        req = self.requests.get(request_id)
        if req is None and request_id in self.ended:
            raise RingStateError(f"request {request_id} already ended on layers {self._layers()} "
                                 f"({self.ended[request_id]}): a pass came after its end")
        if req is None:
            raise RingStateError(f"request {request_id} is unknown to layers {self._layers()}: its prompt never ran "
                                 f"here or it was evicted (at most {self.max_requests} live requests)")
        self.requests.move_to_end(request_id)
        return req

    def _prompt_pass(self, request_id: str, x: np.ndarray, st: StepState) -> tuple[np.ndarray, dict]:
        model = self.loaded.model
        prompt_len = self._check_input(x, None)
        if prompt_len >= model.max_context:
            raise ValueError(f"the prompt has {prompt_len} tokens but the context holds {model.max_context} "
                             "(at least one must be left to generate)")
        if request_id in self.requests:  # a request id may start again: its old cache is garbage now
            self._release(request_id, "restarted")
        req = _Request(self._acquire_slot(), prompt_len, rng=np.random.default_rng(self.generation.seed))
        self.ended.pop(request_id, None)
        self.requests[request_id] = req
        steps = req.steps
        outputs, hidden, row = [], None, 0
        for start, C in steps.prefill_plan(prompt_len):
            chunk = x[:, start:start + C]
            row = chunk.shape[1] - 1
            padded = np.concatenate([chunk, np.zeros((1, C - chunk.shape[1], *chunk.shape[2:]), chunk.dtype)], 1)
            hidden = steps.prefill(self._tensor(padded, steps), req.cache.layers, steps.bind(start))
            if not self.shard.is_last_layer():
                outputs.append(read_host(hidden)[:, :row + 1])
        req.pos, req.step = prompt_len, 1
        if self.draft_sizes and self.shard.is_first_layer():
            st.prompt = x.reshape(-1).tolist()  # the last shard drafts from the prompt too
        if not self.shard.is_last_layer():
            return np.concatenate(outputs, 1), st.to_state()
        tree_tokens = steps.first_tree(hidden, row, self.generation, req.rng).astype(np.int64)
        emitted, finish = self._emit(req, [int(tree_tokens[0])])
        kind, tokens = TREE, tree_tokens.tolist()
        if finish:
            self._release(request_id, f"finished: {finish}")
        elif self.pass_costs is not None:
            if len(st.prompt) != prompt_len:
                raise RingStateError(f"request {request_id}: the prompt pass carries {len(st.prompt)} prompt ids for "
                                     f"{prompt_len} positions: start every node with the same options")
            req.drafts = RequestDrafts(self.drafts, self.tree, st.prompt, self.datastore, self.pass_costs)
            kind, tokens = req.drafts.first(emitted, tree_tokens)
        nxt = StepState(1, prompt_len, self.tree_id, 0, [], tokens, emitted, finish, kind)
        return np.array([emitted], dtype=np.int64), nxt.to_state()

    def _tree_pass(self, request_id: str, req: _Request, x: np.ndarray, st: StepState) -> tuple[np.ndarray, dict]:
        where = f"request {request_id}, layers {self._layers()}"
        problem = ring_drafts.pass_problem(st.kind, len(st.tree), self.tree.size, self.draft_sizes)
        if problem:
            raise RingStateError(f"{where}: {problem}")
        steps = req.steps if st.kind == TREE else ring_drafts.chain_steps(req.slot, len(st.tree))
        T = steps.tree.size
        if st.step != req.step:
            raise RingStateError(f"{where}: the ring state is for pass {st.step} but this shard has run {req.step} "
                                 "passes (a pass was missed or replayed)")
        if st.finish_reason:
            raise RingStateError(f"{where}: the request already finished ({st.finish_reason})")
        if req.pending:  # keep: nodes of the previous pass, which ran req.ran's tree
            keep, ran = [int(n) for n in st.keep], req.ran
            if not (1 <= len(keep) <= ran.tree.size and keep[0] == 0 and all(0 <= n < ran.tree.size for n in keep)):
                raise RingStateError(f"{where}: invalid accepted nodes {keep} for a tree of {ran.tree.size} nodes")
            if keep != list(range(len(keep))):  # accepted nodes must sit in consecutive cache slots
                padded = np.arange(ran.tree.size, dtype=np.int32)
                padded[:len(keep)] = keep
                ran.compact(req.cache.layers, ran.bind(req.pos), ran.host("keep", padded))
            req.pos, req.pending = req.pos + len(keep), False
        if st.start_pos != req.pos:
            raise RingStateError(f"{where}: the ring state writes at position {st.start_pos} but this shard's cache "
                                 f"holds {req.pos} tokens")
        if self.shard.is_first_layer():
            fed = x.reshape(-1).tolist()
            if fed != st.tokens:
                raise RingStateError(f"{where}: fed tokens {fed} but the last shard emitted {st.tokens}")
            x = np.array([st.tree], dtype=np.int32)
        else:
            self._check_input(x, T)
        xt = self._tensor(x, steps)
        req.step, req.pending, req.ran = req.step + 1, True, steps
        if not self.shard.is_last_layer():
            return read_host(steps.verify_logits(xt, req.cache.layers, steps.bind(req.pos))), st.to_state()
        timed = steps.verify_greedy.captured is not None  # a pass that compiles says nothing about its cost
        nodes, next_tree = steps.verify(xt, req.cache.layers, req.pos, np.array(st.tree), self.generation, req.rng)
        followed = [st.tree[n] for n in nodes[1:]] + [int(next_tree[0])]
        emitted, finish = self._emit(req, followed)
        kind, tokens = TREE, [int(t) for t in next_tree]
        if finish:  # nothing can follow a finished request: its cache is garbage from now on
            self._release(request_id, f"finished: {finish}")
        elif req.drafts is not None:
            kind, tokens = req.drafts.after(st.kind, T, followed, next_tree, timed)
        nxt = StepState(st.step + 1, req.pos + len(nodes), self.tree_id, 0, nodes, tokens, emitted, finish, kind)
        return np.array([emitted], dtype=np.int64), nxt.to_state()

    def _emit(self, req: _Request, tokens: list[int]) -> tuple[list[int], str | None]:
        """Cut the emitted tokens at the first EOS and at the budget (max_new_tokens or the context end)."""
        budget = min(self.generation.max_new_tokens, self.loaded.model.max_context - req.prompt_len)
        kept, finish = [], None
        for t in tokens:
            kept.append(int(t))
            if t in self.tokenizer.eos_token_ids:
                finish = "stop"
                break
            if req.generated + len(kept) >= budget:
                finish = "length"
                break
        req.generated += len(kept)
        return kept, finish

    def _check_input(self, x: np.ndarray, tokens: int | None) -> int:
        """Token ids (1, T) on the first shard, hidden states (1, T, dim) elsewhere; returns T."""
        cfg = self.loaded.config
        if self.shard.is_first_layer():
            if x.ndim != 2 or x.shape[0] != 1 or x.shape[1] == 0 or not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"the first shard takes token ids of shape (1, T), got {x.dtype} {x.shape}")
            if x.min() < 0 or x.max() >= cfg.vocab_size:
                raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        elif x.ndim != 3 or x.shape[0] != 1 or x.shape[2] != cfg.dim or x.shape[1] == 0:
            raise ValueError(f"layers {self._layers()} take hidden states of shape (1, T, {cfg.dim}), got {x.shape}")
        if tokens is not None and x.shape[1] != tokens:
            raise RingStateError(f"layers {self._layers()} expected {tokens} positions, got {x.shape[1]}")
        return x.shape[1]

    def _tensor(self, x: np.ndarray, steps: ShardSteps) -> Tensor:
        """A pass's input on the device: token ids, or hidden states in the weights' dtype."""
        if np.issubdtype(x.dtype, np.integer):
            return steps.host("tokens", x)
        return steps.host("hidden", x, self.loaded.model.float_weight.dtype)
