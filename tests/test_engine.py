"""The Exo-interface engine: a ring of shards (one pass per Medusa step) must reproduce whole-model generation."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from exo_tinygrad_medusa.serving.engine import MedusaInferenceEngine, RingStateError, StepState
from exo_tinygrad_medusa.decoding.heads import random_heads
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.decoding.session import MedusaOptions, open_session
from exo_tinygrad_medusa.model.shard import Shard
from ring_driver import local_hop, one_pass, run_ring

LAYERS = 4
ORACLE = json.loads((Path(__file__).parent / "data" / "smollm2_oracle.json").read_text())


@dataclass(frozen=True)
class ForeignShard:
    """Stands in for Exo's Shard: same fields, different class."""
    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int

    def is_first_layer(self) -> bool:
        return self.start_layer == 0

    def is_last_layer(self) -> bool:
        return self.end_layer == self.n_layers - 1


def save_random_heads(loaded, out: Path, scale: float = 0.02) -> str:
    random_heads(loaded.config, loaded.model.lm_head, num_heads=4, num_layers=1, seed=0, scale=scale).save(out)
    return str(out)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tiny_model, tmp_path_factory):
    """A random tiny Llama (varied tokens, Medusa rarely accepts) and random heads for it."""
    directory = tiny_checkpoint("llama")
    return str(directory), save_random_heads(tiny_model("llama"), tmp_path_factory.mktemp("heads"))


@pytest.fixture(scope="module")
def echo(tiny_checkpoint, tiny_model, tmp_path_factory):
    """Tied embeddings make the tiny model repeat itself, so near-identity heads get candidates accepted along
    varied tree paths: every kind of KV compaction happens."""
    directory = tiny_checkpoint("llama", tie=True)
    return str(directory), save_random_heads(tiny_model("llama", tie=True), tmp_path_factory.mktemp("echo_heads"),
                                             scale=0.15)


def medusa_options(heads: str | None) -> MedusaOptions:
    return MedusaOptions(True, heads, choices="cpu-8") if heads else MedusaOptions()


def reference(model: str, heads: str | None, prompt: list[int], cfg: GenerationConfig):
    # the engine proposes from the heads only: the Generator's context drafts would change the accepted lengths
    cfg = dataclasses.replace(cfg, prompt_lookup=False)
    return open_session(model, medusa=medusa_options(heads)).generator.generate(prompt, cfg)


def split_engines(model: str, heads: str | None, cfg: GenerationConfig, bounds=((0, 1), (2, 3)), **kwargs):
    # heads only, as `reference` runs: draft chains change the accepted lengths (test_engine_drafts.py tests them)
    cfg = dataclasses.replace(cfg, prompt_lookup=False)
    return [(MedusaInferenceEngine(medusa_options(heads), cfg, **kwargs), Shard(model, a, b, LAYERS))
            for a, b in bounds]


def ring(engines, prompt: list[int], request_id: str = "req"):
    return asyncio.run(run_ring([local_hop(e, s) for e, s in engines], prompt, request_id))


def chat_prompt(model: str, text: str = "Tell me about the sea.") -> list[int]:
    return open_session(model).prompt_ids(text)


@pytest.mark.parametrize("medusa", [False, True], ids=["plain", "medusa"])
def test_two_shards_match_one_shard(tiny, medusa):
    model, heads = tiny
    heads = heads if medusa else None
    cfg = GenerationConfig(max_new_tokens=24)
    prompt = chat_prompt(model)
    expected = reference(model, heads, prompt, cfg)
    whole, _ = ring(split_engines(model, heads, cfg, bounds=((0, 3),)), prompt)
    split, states = ring(split_engines(model, heads, cfg), prompt)
    assert len(expected.generated_ids) == 24 and expected.finish_reason == "length"
    assert whole == expected.generated_ids
    assert split == expected.generated_ids
    assert [len(s.keep) for s in states[1:]] == expected.accept_lengths
    assert states[-1].finish_reason == "length"
    for s in states:  # what crosses the wire is plain JSON
        assert json.loads(json.dumps(s.to_state())) == s.to_state()


def test_medusa_compaction_across_shards(echo):
    model, heads = echo
    cfg = GenerationConfig(max_new_tokens=40)
    prompt = chat_prompt(model, "hello there, how are you?")
    expected = reference(model, heads, prompt, cfg)
    tokens, states = ring(split_engines(model, heads, cfg), prompt)
    assert tokens == expected.generated_ids
    keeps = [s.keep for s in states[1:]]
    assert [len(k) for k in keeps] == expected.accept_lengths
    assert any(k != list(range(len(k))) for k in keeps), "no step needed a KV compaction"
    assert len(set(expected.accept_lengths)) >= 2 and max(expected.accept_lengths) >= 3


def test_sampling_across_shards_matches_generator(tiny):
    model, heads = tiny
    cfg = GenerationConfig(max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3)
    prompt = chat_prompt(model)
    expected = reference(model, heads, prompt, cfg)
    tokens, _ = ring(split_engines(model, heads, cfg), prompt)
    assert tokens == expected.generated_ids
    greedy = reference(model, heads, prompt, GenerationConfig(max_new_tokens=16))
    assert tokens != greedy.generated_ids


def test_a_shard_that_misses_a_pass_fails_loudly(tiny):
    model, _ = tiny
    (a, shard_a), (b, shard_b) = split_engines(model, None, GenerationConfig(max_new_tokens=50))
    prompt = np.array([chat_prompt(model)])

    async def scenario():
        hidden, state = await a.infer_tensor("r", shard_a, prompt, None)          # the prompt pass
        tokens, state = await b.infer_tensor("r", shard_b, hidden, state)
        hidden1, state_a1 = await a.infer_tensor("r", shard_a, tokens, state)     # pass 1
        tokens1, state1 = await b.infer_tensor("r", shard_b, hidden1, state_a1)
        hidden2, state_a2 = await a.infer_tensor("r", shard_a, tokens1, state1)   # pass 2 reaches the first shard
        with pytest.raises(RingStateError, match="state is for layer 2 but this shard starts at layer 0"):
            await a.infer_tensor("r", shard_a, tokens1, state_a2)                 # ... and comes back, skipping one
        with pytest.raises(RingStateError, match="the ring state is for pass 1 but this shard has run 2 passes"):
            await b.infer_tensor("r", shard_b, hidden1, state_a1)                 # pass 1 replayed on the second
        with pytest.raises(RingStateError, match="the ring state is for pass 2 but this shard has run 3 passes"):
            await a.infer_tensor("r", shard_a, tokens1, state1)                   # pass 2 replayed on the first
        with pytest.raises(RingStateError, match="only the first shard starts a request"):
            await b.infer_tensor("new", shard_b, hidden, None)
        _, state2 = await b.infer_tensor("r", shard_b, hidden2, state_a2)         # refusals changed nothing
        assert StepState.from_state(state2).step == 3

    asyncio.run(scenario())


def test_wrong_fed_tokens_and_tree_mismatch_fail(tiny):
    model, heads = tiny
    cfg = GenerationConfig(max_new_tokens=50)
    (a, shard_a), (b, shard_b) = split_engines(model, None, cfg)
    prompt = np.array([chat_prompt(model)])

    async def scenario():
        tokens, state = await one_pass([local_hop(a, shard_a), local_hop(b, shard_b)], "r", prompt, None)
        wrong = (tokens + 1) % 300
        with pytest.raises(RingStateError, match=rf"fed tokens \[{int(wrong[0, 0])}\] but the last shard emitted "
                                                 rf"\[{int(tokens[0, 0])}\]"):
            await a.infer_tensor("r", shard_a, wrong, state)
        hidden, state_a = await a.infer_tensor("q", shard_a, prompt, None)
        medusa_b = MedusaInferenceEngine(medusa_options(heads), cfg)
        with pytest.raises(RingStateError, match="start every node with the same Medusa options"):
            await medusa_b.infer_tensor("q", shard_b, hidden, state_a)

    asyncio.run(scenario())


def test_least_recently_used_request_is_evicted(tiny):
    model, _ = tiny
    engines = split_engines(model, None, GenerationConfig(max_new_tokens=50), max_requests=1)
    hops = [local_hop(e, s) for e, s in engines]
    prompt = np.array([chat_prompt(model)])

    async def scenario():
        tokens, state = await one_pass(hops, "first", prompt, None)
        await one_pass(hops, "second", prompt, None)
        assert list(engines[0][0].requests) == ["second"]
        with pytest.raises(RingStateError, match=r"request first already ended on layers 0..1 \(evicted: more than 1 "
                                                 r"live requests\): a pass came after its end"):
            await one_pass(hops, "first", tokens, state)

    asyncio.run(scenario())


def test_exo_interface(tiny):
    model, _ = tiny
    engine = MedusaInferenceEngine()
    shard = ForeignShard(model, 0, LAYERS - 1, LAYERS)

    async def scenario():
        ids = await engine.encode(shard, "hello world")
        assert ids.dtype == np.int64 and ids.ndim == 1
        assert await engine.decode(shard, ids) == "hello world"
        assert engine.shard == Shard(model, 0, LAYERS - 1, LAYERS)
        assert engine.tokenizer.eos_token_id == 2
        np.testing.assert_array_equal(await engine.sample(np.array([[5, 9]]), temp=0.7), [5, 9])
        logits = np.zeros((1, 3, 10), np.float32)
        logits[0, -1, 4] = 1.0
        np.testing.assert_array_equal(await engine.sample(logits, temp=0.0), [4])
        out, state = await engine.infer_prompt("p", shard, "hello world")
        assert out.shape == (1, 1) and out.dtype == np.int64
        assert StepState.from_state(state).start_pos == len(ids)
        n = engine.loaded.model.max_context
        with pytest.raises(ValueError, match=f"the prompt has {n} tokens but the context holds {n}"):
            await engine.infer_tensor("long", shard, np.full((1, n), 5), None)
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 320\)"):
            await engine.infer_tensor("bad", shard, np.array([[5, 320]]), None)

    asyncio.run(scenario())


def test_checkpoint_round_trip(tiny, tiny_checkpoint, tmp_path):
    model, _ = tiny
    other = str(tiny_checkpoint("llama", seed=1))
    cfg = GenerationConfig(max_new_tokens=8)
    prompt = chat_prompt(model)
    source, target = MedusaInferenceEngine(generation=cfg), MedusaInferenceEngine(generation=cfg)
    shard, other_shard = Shard(model, 0, LAYERS - 1, LAYERS), Shard(other, 0, LAYERS - 1, LAYERS)
    path = tmp_path / "shard.safetensors"
    asyncio.run(source.save_checkpoint(shard, str(path)))
    before, _ = ring([(target, other_shard)], prompt)
    asyncio.run(target.load_checkpoint(other_shard, str(path)))
    after, _ = ring([(target, other_shard)], prompt)
    expected = reference(model, None, prompt, cfg).generated_ids
    assert after == expected and before != expected


def test_two_processes_over_loopback(tiny):
    """The second shard runs in another process: tensors and inference_state cross a socket as bytes and JSON."""
    from engine_peer import RemoteShard

    model, heads = tiny
    cfg = GenerationConfig(max_new_tokens=20)
    prompt = chat_prompt(model)
    expected = reference(model, heads, prompt, cfg)
    peer = subprocess.Popen([sys.executable, str(Path(__file__).parent / "engine_peer.py"), model, "2", "3",
                             str(LAYERS), "--medusa-heads", heads, "--medusa-choices", "cpu-8", "--max-new-tokens",
                             "20"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = peer.stdout.readline()
        assert line.startswith("PORT "), f"peer did not start: {line!r}"

        async def scenario():
            remote = await RemoteShard.connect(int(line.split()[1]))
            first = MedusaInferenceEngine(medusa_options(heads), cfg)
            try:
                return await run_ring([local_hop(first, Shard(model, 0, 1, LAYERS)), remote], prompt)
            finally:
                await remote.close()

        tokens, _ = asyncio.run(scenario())
    finally:
        peer.stdin.close()
        peer.wait(timeout=60)
    assert tokens == expected.generated_ids


@pytest.mark.slow
@pytest.mark.parametrize("medusa", [False, True], ids=["plain", "medusa"])
def test_default_model_two_shards_reproduce_the_oracle(default_model, medusa):
    # Medusa as --medusa-enabled runs it (shipped heads, default tree) up to the oracle's EOS; plain decoding is
    # one token per ring pass, so a prefix of the oracle keeps it affordable
    expected = ORACLE["greedy_new_ids"] if medusa else ORACLE["greedy_new_ids"][:40]
    cfg = GenerationConfig(max_new_tokens=200 if medusa else len(expected))
    n = default_model.config.n_layers
    engines = [(MedusaInferenceEngine(MedusaOptions(medusa), cfg, dtype="float32"), Shard("smollm2-135m", a, b, n))
               for a, b in ((0, n // 2 - 1), (n // 2, n - 1))]
    tokens, states = ring(engines, ORACLE["prompt_ids"])
    assert tokens == expected
    assert states[-1].finish_reason == ("stop" if medusa else "length")
