"""Run classic Exo's own node and CLI with our engine in place of Exo's tinygrad engine.

`exo-medusa --inference-engine tinygrad --medusa-enabled [--medusa-heads DIR] [Exo flags...]` and
`exo-medusa run MODEL --prompt ... --inference-engine tinygrad --medusa-enabled` take our options off the command
line, hand the rest to Exo, and start Exo (github.com/exo-explore/exo, the classic Python tree with
exo/inference/tinygrad) after the patches below. Exo's own command, `exo --inference-engine tinygrad --medusa-enabled
[...]`, does the same through the import hook in exo_hook.py (installed as a .pth file). Every adaptation Exo needs lives in this module and is applied in
process, from our package: nothing in Exo's files changes. `exo.main` parses sys.argv and builds its node at import
time, so the patches go in before it is imported and the few settings that depend on its parsed flags right after.

Patches (each function below says why):
 1. get_inference_engine       "tinygrad" and "medusa" build our engine (both bindings: inference_engine, node).
 2. select_best_inference_engine  a no-op: Exo would replace our engine (and its KV caches) when peers change.
 3. model_cards / pretty_name  our model cards (and a local model given to `run`) under our engine's class name.
 4. resolve_tokenizer          our tokenizer behind the transformers-style calls Exo makes; no Hugging Face access.
 5. new_shard_downloader       a no-op downloader: our engine resolves models itself (registry, offline).
 6. process_inference_result   several tokens per step: Exo appends exactly one sampled token per step.
 7. serialize_inference_state  JSON: Exo's version raises TypeError on Linux for any non-empty state.
 8. run_model_cli              waits for the ring to settle and collects every token (Exo's drops some).
 9. ChatGPTAPI.run host        binds the API to --node-host (Exo binds 0.0.0.0), so a loopback node stays local.
10. Node.__init__              a finished request is released on every node (its KV cache slot, with the steps
                               captured on it, goes to the next request): Exo never tells an engine a request ended.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import importlib
import json
import logging
import sys
import uuid

import numpy as np

from .engine import TINYGRAD_EXECUTOR, MedusaInferenceEngine, StepState
from ..model.registry import DEFAULT_MODEL, cards, resolve
from ..decoding.session import MedusaOptions
from ..model.tokenizer import Tokenizer

log = logging.getLogger(__name__)
ENGINE_NAMES = ("tinygrad", "medusa")
RING_SETTLE_S = 3.0       # a peer refreshes its topology every 2 s: after this both sides partition alike
CLI_TIMEOUT_S = 900.0


def exo_available() -> bool:
    try:
        importlib.import_module("exo.orchestration.node")  # classic Exo, not some other package named exo
        return True
    except ImportError:
        return False


def exo_options() -> argparse.ArgumentParser:
    """Our options in Exo mode; everything else on the command line belongs to Exo."""
    p = argparse.ArgumentParser(prog="exo-medusa", add_help=False, allow_abbrev=False)
    p.add_argument("--medusa-enabled", "--medusa", dest="medusa_enabled", action="store_true")
    p.add_argument("--medusa-heads", default=None)
    p.add_argument("--medusa-num-heads", type=int, default=None)
    p.add_argument("--medusa-num-layers", type=int, default=None)
    p.add_argument("--medusa-choices", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--max-requests", type=int, default=4, help="live requests (KV caches) per node")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def prepare_exo(argv: list[str]) -> list[str]:
    """Our options off `argv`, checked, and patches 1-7 applied for them; returns the arguments that are Exo's.
    Raises ValueError for inconsistent options, before Exo starts."""
    ours, exo_argv = exo_options().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if ours.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    medusa = MedusaOptions(ours.medusa_enabled, ours.medusa_heads, ours.medusa_num_heads, ours.medusa_num_layers,
                           ours.medusa_choices)
    MedusaInferenceEngine(medusa)
    apply_patches(functools.partial(MedusaInferenceEngine, medusa, device=ours.device, dtype=ours.dtype,
                                    max_context=ours.max_context, max_requests=ours.max_requests))
    return exo_argv


def run_exo(argv: list[str]) -> int:
    if not exo_available():
        print("exo-medusa: --inference-engine needs classic Exo (github.com/exo-explore/exo), which is not installed; "
              "without it use `exo-medusa run MODEL --prompt ...` or `exo-medusa serve MODEL`", file=sys.stderr)
        return 2
    try:
        exo_argv = prepare_exo(argv)
    except ValueError as e:
        print(f"exo-medusa: error: {e}", file=sys.stderr)
        return 2
    # our flags are off the command line, so the exo_hook finder (Exo's own `exo` command) leaves exo.main alone
    sys.argv = ["exo-medusa"] + exo_argv
    import exo.main as exo_main  # parses sys.argv, builds node, engine and API
    try:
        configure_from_exo_args(exo_main)
    except (ValueError, FileNotFoundError) as e:  # e.g. a model we cannot resolve (ModelNotFound)
        print(f"exo-medusa: error: {e}", file=sys.stderr)
        return 2
    exo_main.run()
    return 0 if _cli_state["ok"] is not False else 1


def configure_from_exo_args(exo_main) -> None:
    """Patches 8-9 and the settings that depend on Exo's parsed flags: after `import exo.main`, before it runs."""
    args, node = exo_main.args, exo_main.node
    if isinstance(node.inference_engine, MedusaInferenceEngine):
        # the last shard accepts Medusa candidates, so it needs Exo's sampling settings up front
        node.inference_engine.generation = dataclasses.replace(
            node.inference_engine.generation, temperature=args.default_temp, max_new_tokens=args.max_generate_tokens)
    for model in filter(None, (args.model_name, args.run_model, args.default_model)):
        register_model(model)
    # Exo's API answers requests for unknown models with its default model, llama-3.2-1b unless told otherwise
    exo_main.api.default_model = args.default_model or DEFAULT_MODEL
    exo_main.run_model_cli = run_model_cli  # 8: main() looks the name up when it runs
    # 9: Exo's API binds every interface; serve it where the node itself listens
    exo_main.api.run = functools.partial(type(exo_main.api).run, exo_main.api, args.node_host)


def apply_patches(make_engine=MedusaInferenceEngine) -> None:
    """Patches 1-7 and 10 (idempotent). `make_engine(shard_downloader=...)` builds the engine Exo asks for."""
    import exo.download.new_shard_download as downloads
    import exo.inference.inference_engine as inference_engine
    import exo.inference.tokenizers as tokenizers
    import exo.orchestration.node as node_module
    from exo.download.shard_download import NoopShardDownloader
    from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle

    original = getattr(inference_engine.get_inference_engine, "exo_original", inference_engine.get_inference_engine)

    # 1: exo.main and Node.select_best_inference_engine each bound the name at import: replace both bindings
    def get_inference_engine(inference_engine_name: str, shard_downloader):
        if inference_engine_name in ENGINE_NAMES:
            return make_engine(shard_downloader=shard_downloader)
        return original(inference_engine_name, shard_downloader)

    get_inference_engine.exo_original = original
    inference_engine.get_inference_engine = node_module.get_inference_engine = get_inference_engine
    inference_engine.inference_engine_classes["medusa"] = MedusaInferenceEngine.__name__

    # 2: on every peer change Exo rebuilds the engine from the first engine name peers support ("tinygrad"),
    # which would drop the loaded shard and every request's KV cache mid-generation
    async def select_best_inference_engine(self) -> None:
        return None

    node_module.Node.select_best_inference_engine = select_best_inference_engine
    node_module.Node.process_inference_result = process_inference_result  # 6
    original_init = getattr(node_module.Node.__init__, "exo_original", node_module.Node.__init__)

    # 10: every node hears of a finished request (the last shard's own callbacks, the others through Exo's result
    # broadcast); without a release each request takes a new cache slot and captures its steps again (seconds),
    # until max_requests slots are held
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.on_token.register("exo-medusa-release").on_next(functools.partial(_release_finished, self))

    __init__.exo_original = original_init
    node_module.Node.__init__ = __init__
    GRPCPeerHandle.serialize_inference_state = serialize_inference_state   # 7

    # 3: Exo finds models (and the engine's repo id) by engine class name in model_cards
    for card in cards().values():
        register_model(card.id, card.n_layers)

    # 4: Exo's resolver downloads through transformers; ours reads the model we will load anyway
    tokenizers.resolve_tokenizer = resolve_tokenizer
    for name in ("exo.main", "exo.api.chatgpt_api"):  # modules that already from-imported the old one
        if name in sys.modules:
            sys.modules[name].resolve_tokenizer = resolve_tokenizer

    # 5: the engine resolves models through our registry, so Exo's downloader must not hit the network
    downloads.new_shard_downloader = lambda *args, **kwargs: NoopShardDownloader()


_cli_state: dict = {"ok": None}  # set by run_model_cli: run_exo's exit code


def _exo_models():
    import exo.models
    return exo.models


def register_model(model_id: str, n_layers: int | None = None) -> None:
    """Make `model_id` (a card id, HF directory or .gguf) runnable by our engine under Exo."""
    models = _exo_models()
    if models.get_repo(model_id, MedusaInferenceEngine.__name__) is not None:
        return
    if n_layers is None:
        n_layers = _count_layers(model_id)
    card = models.model_cards.setdefault(model_id, {"layers": n_layers, "repo": {}})
    card["repo"][MedusaInferenceEngine.__name__] = model_id
    models.pretty_name.setdefault(model_id, f"{model_id} (exo-tinygrad-medusa)")


def _count_layers(model_id: str) -> int:
    resolved = resolve(model_id)
    if resolved.card:
        return resolved.card.n_layers
    if resolved.kind == "hf":
        return int(json.loads((resolved.path / "config.json").read_text())["num_hidden_layers"])
    from tinygrad.llm.gguf import gguf_load
    kv, _ = gguf_load(str(resolved.path))
    return int(kv[f"{kv['general.architecture']}.block_count"])


# -- 4: tokenizer ---------------------------------------------------------------------------------------------
class ExoTokenizer:
    """Our Tokenizer behind the transformers-style calls Exo's CLI and API make."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id

    def apply_chat_template(self, conversation, tokenize: bool = False, add_generation_prompt: bool = True, **_):
        text = self.tokenizer.apply_chat_template(list(conversation), add_generation_prompt)
        return self.tokenizer.encode(text) if tokenize else text

    def encode(self, text: str, **_) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids, **_) -> str:
        # as `exo-medusa run` prints it: without end-of-sequence and other special tokens
        eos = self.tokenizer.eos_token_ids
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in eos], skip_special_tokens=True)


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_id: str) -> Tokenizer:
    resolved = resolve(model_id)
    if resolved.kind == "hf":
        return Tokenizer.from_dir(resolved.path)
    from tinygrad.llm.gguf import gguf_load
    return Tokenizer.from_gguf_metadata(gguf_load(str(resolved.path))[0])


async def resolve_tokenizer(repo_id: str) -> ExoTokenizer:
    # GGUF metadata is read through tinygrad tensors: on the engine's tinygrad thread
    tokenizer = await asyncio.get_running_loop().run_in_executor(TINYGRAD_EXECUTOR, load_tokenizer, repo_id)
    return ExoTokenizer(tokenizer)


# -- 6: several tokens per step ----------------------------------------------------------------------------------
def complete_text(tokenizer, tokens: list[int], eos: set[int]) -> bool:
    """Whether `tokens` decode to whole characters. Exo's API decodes each streamed chunk on its own, so a chunk that
    ends inside a character's UTF-8 bytes would show (and keep) a replacement character the full text does not have.
    A genuinely invalid byte also ends in one: it is held only until more tokens or the end of the request."""
    return not tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True).endswith("\ufffd")


async def _broadcast_after(node, previous: asyncio.Task | None, request_id: str, tokens: list[int],
                           finished: bool) -> None:
    if previous is not None:  # broadcast_result reports its own failures; only the order matters here
        await asyncio.gather(previous, return_exceptions=True)
    await node.broadcast_result(request_id, tokens, finished)


async def process_inference_result(self, shard, result: np.ndarray, request_id: str | None = None,
                                   inference_state: dict | None = None):
    """Exo's node loop, for engines whose last shard returns every token of a step (Exo's samples one and calls
    .item()). Tokens are kept up to the first EOS and --max-generate-tokens; the engine's own end of generation
    (`finish_reason` in the ring state) also ends the request; the emitted tokens go back to the first shard with
    the state. Callbacks and peers get the tokens in chunks that end on whole characters (see complete_text), and
    in order: each broadcast to the peers waits for the request's previous one."""
    buffered = self.buffered_token_output.setdefault(request_id, ([], False))[0]
    finished = False
    forward = result
    if shard.is_last_layer():
        engine = self.inference_engine
        tokens = (await engine.sample(result, temp=self.default_sample_temperature)).reshape(-1).tolist()
        eos = set(getattr(engine, "eos_token_ids", ()) or (engine.tokenizer.eos_token_id,))
        new_tokens = []
        for token in tokens[:max(self.max_generate_tokens - len(buffered), 0)]:
            new_tokens.append(int(token))
            if token in eos:
                break
        buffered.extend(new_tokens)
        step = StepState.from_state(inference_state)
        finished = (not new_tokens or new_tokens[-1] in eos or len(buffered) >= self.max_generate_tokens
                    or bool(step and step.finish_reason))
        held = _held_tokens(self).setdefault(request_id, [])
        held.extend(new_tokens)
        if finished or (held and complete_text(engine.tokenizer, held, eos)):
            chunk = held[:]
            held.clear()
            self.trigger_on_token_callbacks(request_id, chunk, finished)
            broadcasts = _broadcasts(self)
            broadcasts[request_id] = asyncio.create_task(
                _broadcast_after(self, broadcasts.get(request_id), request_id, chunk, finished))
        if finished:
            _held_tokens(self).pop(request_id, None)
            _broadcasts(self).pop(request_id, None)
        forward = np.array([new_tokens], dtype=np.int64)
    if finished:
        self.buffered_token_output[request_id] = (buffered, True)
        self.outstanding_requests.pop(request_id, None)
    else:
        self.outstanding_requests[request_id] = "waiting"
        asyncio.create_task(self.forward_tensor(shard, forward, request_id, self.get_partition_index(offset=1),
                                                inference_state))
    return np.array(buffered)


def _release_finished(node, request_id: str, tokens, finished: bool) -> None:
    release = getattr(node.inference_engine, "release", None)
    if finished and release is not None:
        _release_tasks(node).add(task := asyncio.ensure_future(release(request_id)))  # held: not collected mid-run
        task.add_done_callback(_release_tasks(node).discard)


def _release_tasks(node) -> set:
    return node.__dict__.setdefault("_medusa_release_tasks", set())


def _held_tokens(node) -> dict[str, list[int]]:
    """Per request: tokens emitted by the engine but not yet given to callbacks (an unfinished character)."""
    return node.__dict__.setdefault("_medusa_held_tokens", {})


def _broadcasts(node) -> dict[str, asyncio.Task]:
    """Per live request: its latest broadcast to the peers, which the next one waits for."""
    return node.__dict__.setdefault("_medusa_broadcasts", {})


# -- 7: inference_state over gRPC --------------------------------------------------------------------------------
def serialize_inference_state(self, inference_state: dict):
    """Exo tests `isinstance(v, mx.array)`, and on Linux `mx` is numpy, whose `array` is a function: TypeError for
    any non-empty state. Our state is plain JSON (StepState), which the receiving GRPCServer already merges back
    from `other_data_json`."""
    from exo.networking.grpc import node_service_pb2
    proto = node_service_pb2.InferenceState()
    if inference_state:
        proto.other_data_json = json.dumps(inference_state)
    return proto


# -- 8: `exo run` ------------------------------------------------------------------------------------------------
async def wait_for_ring(node, settle_s: float = RING_SETTLE_S) -> None:
    """Exo's `run` starts right after the node starts: a peer that has not yet seen this node computes another
    partition and the request never finishes. Wait until our topology holds every peer, then one refresh more."""
    while len(node.topology.nodes) < len(node.peers) + 1:
        await asyncio.sleep(0.2)
    if node.peers:
        await asyncio.sleep(settle_s)


async def run_model_cli(node, model_name: str, prompt: str) -> None:
    """Exo's version waits with AsyncCallback.wait, which re-checks only on notifications and drops tokens; an
    on_next observer sees every event."""
    models = _exo_models()
    engine_class = type(node.inference_engine).__name__
    shard = models.build_base_shard(model_name, engine_class)
    if shard is None:
        print(f"Error: model {model_name!r} is not available for {engine_class}")
        _cli_state["ok"] = False
        return
    await wait_for_ring(node)
    tokenizer = await resolve_tokenizer(models.get_repo(model_name, engine_class))
    request_id = str(uuid.uuid4())
    tokens: list[int] = []
    done = asyncio.Event()

    def on_token(rid: str, new_tokens: list[int], finished: bool) -> None:
        if rid == request_id:
            tokens.extend(new_tokens)
            if finished:
                done.set()

    callback_id = f"exo-medusa-cli-{request_id}"
    node.on_token.register(callback_id).on_next(on_token)
    try:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        await node.process_prompt(shard, chat, request_id=request_id)
        await asyncio.wait_for(done.wait(), timeout=CLI_TIMEOUT_S)
        print("\nGenerated response:")
        print(tokenizer.decode(tokens), flush=True)
        _cli_state["ok"] = True
    except asyncio.TimeoutError:
        print(f"Error: no complete answer after {CLI_TIMEOUT_S:.0f} s ({len(tokens)} tokens)", flush=True)
        _cli_state["ok"] = False
    finally:
        node.on_token.deregister(callback_id)
