"""Medusa decoding end to end on tiny random models: lossless greedy output, real acceptance with heads fitted to the
model's own continuation, KV compaction after branch acceptance, exact stops, and one TinyJit capture per step."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tinygrad import Tensor
from tinygrad.codegen import to_program_cache

from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.model.loader import load_model
from exo_tinygrad_medusa.decoding.heads import MedusaHeads, load_heads, random_heads
from exo_tinygrad_medusa.decoding.tree import PLAIN, load_tree
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.decoding.session import MedusaOptions, default_tree_spec, resolve_heads_path
from exo_tinygrad_medusa.decoding.steps import ShardSteps
from helpers_models import write_tiny_checkpoint

MAX_CONTEXT, PROMPT_LEN, NEW_TOKENS = 160, 40, 80
# seeds whose greedy continuation of the prompt is varied (random tiny models often fall into a loop of one token;
# the tied qwen2 ones always do)
CHECKPOINTS = {"llama": dict(seed=1), "qwen2": dict(seed=2, tie=False)}
NUM_HEADS = 4
FITTED_TOKENS = 56  # fitted heads are exact for this many generated tokens (fewer rows than the hidden size)


class TinyKit:
    """One tiny model per architecture, its plain greedy continuation and the hidden states along it, Medusa heads
    (one object per format, whose weights tests swap in place) and one Generator per (arch, tree, format)."""

    def __init__(self, tmp_path_factory):
        self.tmp, self.models, self.plain, self.greedy, self.hidden = tmp_path_factory, {}, {}, {}, {}
        self.heads: dict[tuple, MedusaHeads] = {}
        self.weights: dict[tuple, dict[str, np.ndarray]] = {}
        self.generators: dict[tuple, Generator] = {}
        self.prompt = [int(t) for t in np.random.default_rng(42).integers(3, 320, PROMPT_LEN)]

    def model(self, arch: str):
        if arch not in self.models:
            directory = write_tiny_checkpoint(self.tmp.mktemp(arch), arch, **CHECKPOINTS[arch])
            model = self.models[arch] = load_model(str(directory), dtype="float32", max_context=MAX_CONTEXT).model
            self.plain[arch] = Generator(model, [], PLAIN)
            self.greedy[arch] = self.plain[arch].generate(self.prompt, GenerationConfig(NEW_TOKENS)).generated_ids
            self.hidden[arch] = self._hidden_states(arch, self.prompt + self.greedy[arch])
        return self.models[arch]

    def _hidden_states(self, arch: str, ids: list[int]) -> np.ndarray:
        """Final normed hidden state at every position of `ids`, from the captured prefill on a scratch cache."""
        steps, cache, rows = ShardSteps(self.models[arch]), self.models[arch].new_cache(), []
        for start, C in steps.prefill_plan(len(ids)):
            chunk = ids[start:start + C]
            x = Tensor([chunk + [0] * (C - len(chunk))], dtype="int32")
            rows.append(steps.prefill(x, cache.layers, steps.bind(start)).numpy()[0, :len(chunk)])
        return np.concatenate(rows).astype(np.float64)

    def generator(self, arch: str, tree: str, fmt: str, weights: str) -> Generator:
        model = self.model(arch)
        if (arch, fmt) not in self.heads:
            self.heads[arch, fmt] = random_heads(model.config, model.lm_head, NUM_HEADS, 1, fmt, seed=11, scale=0.3)
        if (arch, tree, fmt) not in self.generators:
            self.generators[arch, tree, fmt] = Generator(model, [], load_tree(tree), self.heads[arch, fmt])
        self._load_weights(arch, fmt, weights)
        return self.generators[arch, tree, fmt]

    def _load_weights(self, arch: str, fmt: str, kind: str) -> None:
        """Write a weight set into the heads' existing buffers, which the captured steps read."""
        if (arch, fmt, kind) not in self.weights:
            self.weights[arch, fmt, kind] = self._make_weights(arch, fmt, kind)
        for name, tensor in self.heads[arch, fmt].state_dict().items():
            tensor.assign(Tensor(self.weights[arch, fmt, kind][name])).realize()

    def _make_weights(self, arch: str, fmt: str, kind: str) -> dict[str, np.ndarray]:
        model = self.models[arch]
        if kind == "random":
            heads = random_heads(model.config, model.lm_head, NUM_HEADS, 1, fmt, seed=11, scale=0.3)
            return {name: t.numpy() for name, t in heads.state_dict().items()}
        assert fmt == "v1", "fitted heads need their own lm_heads"
        return fitted_heads(self.hidden[arch], self.prompt + self.greedy[arch], model.config.vocab_size,
                            exact_share=1.0 if kind == "oracle" else 0.4, rank1_share=0.0 if kind == "oracle" else 0.4)


def fitted_heads(hidden: np.ndarray, ids: list[int], vocab: int, exact_share: float, rank1_share: float):
    """v1 heads with zero ResBlocks whose lm_head k maps the hidden state at position t to token t + k + 2 of the
    greedy continuation: solved exactly (min-norm, fewer rows than dimensions) so that the target scores 1 and every
    other token 0. A rank1_share of rows scores a random decoy 1.5 (target second best); the rest of the rows, beyond
    exact_share + rank1_share, do not mention the target at all."""
    rng, dim = np.random.default_rng(5), hidden.shape[1]
    weights = {}
    for k in range(NUM_HEADS):
        rows = np.arange(PROMPT_LEN - 1, min(len(ids) - k - 2, PROMPT_LEN - 1 + FITTED_TOKENS))
        targets = np.array([ids[t + k + 2] for t in rows])
        scores = np.zeros((len(rows), vocab))
        kind = rng.random(len(rows))
        exact, rank1 = kind < exact_share, (kind >= exact_share) & (kind < exact_share + rank1_share)
        scores[np.flatnonzero(exact | rank1), targets[exact | rank1]] = 1.0
        decoys = (targets + rng.integers(1, vocab, len(rows))) % vocab
        wrong = ~(exact | rank1)
        scores[np.flatnonzero(rank1), decoys[rank1]] = 1.5
        scores[np.flatnonzero(wrong), decoys[wrong]] = 1.0
        lm_head = (np.linalg.pinv(hidden[rows]) @ scores).T
        np.testing.assert_allclose(hidden[rows] @ lm_head.T, scores, atol=1e-6)  # the fit is exact
        weights[f"{k}.0.linear.weight"] = np.zeros((dim, dim), dtype=np.float32)
        weights[f"{k}.0.linear.bias"] = np.zeros(dim, dtype=np.float32)
        weights[f"{k}.1.weight"] = lm_head.astype(np.float32)
    return weights


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> TinyKit:
    return TinyKit(tmp_path_factory)


def greedy(max_new_tokens: int = NEW_TOKENS) -> GenerationConfig:
    """Greedy with the heads' tree every step: these tests are about the tree's mechanics (drafts from the context and
    the datastore, planned per step, are covered by test_greedy_medusa_equals_plain_greedy and test_lookup.py)."""
    return GenerationConfig(max_new_tokens=max_new_tokens, prompt_lookup=False)


def spy_accepted_nodes(monkeypatch, generator: Generator) -> list[list[int]]:
    """Record the tree nodes each verify step accepts."""
    seen, verify = [], generator.steps.verify

    def recording(*args, **kwargs):
        nodes, next_tree = verify(*args, **kwargs)
        seen.append(list(nodes))
        return nodes, next_tree

    monkeypatch.setattr(generator.steps, "verify", recording)
    return seen


def check_accounting(result, max_new_tokens: int) -> None:
    """The first token comes from the prefill; each verify step adds its accepted nodes' worth (the last one cut)."""
    assert result.steps == len(result.accept_lengths)
    assert 1 + sum(result.accept_lengths) >= len(result.generated_ids)
    assert 1 + sum(result.accept_lengths[:-1]) < len(result.generated_ids) <= max_new_tokens


# -- the base model and the fitted heads behave as the tests assume --------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fixture_hidden_states_follow_the_greedy_path(kit, arch):
    model = kit.model(arch)
    assert len(kit.greedy[arch]) == NEW_TOKENS and len(set(kit.greedy[arch])) > 40
    predicted = (kit.hidden[arch] @ model.lm_head.numpy().T).argmax(-1)
    assert predicted[PROMPT_LEN - 1:-1].tolist() == kit.greedy[arch]


def test_random_heads_disagree_with_the_base_model(kit):
    kit.generator("llama", "cpu-8", "v2", "random")
    heads, hidden = kit.heads["llama", "v2"], kit.hidden["llama"][PROMPT_LEN - 1:]
    proposals = heads(Tensor(hidden.astype(np.float32))).numpy().argmax(-1)  # (heads, positions)
    base = (hidden @ kit.models["llama"].lm_head.numpy().T).argmax(-1)
    assert 0.3 < (proposals != base).mean() < 1.0


# -- lossless greedy decoding ----------------------------------------------------------------------------------------
LOSSLESS = [
    ("llama", "chain-3", "v1", "random"), ("llama", "chain-3", "v1", "partial"),
    ("llama", "cpu-16", "v1", "random"), ("llama", "cpu-16", "v1", "partial"),
    ("llama", "mc_sim_7b_63", "v1", "random"), ("llama", "mc_sim_7b_63", "v1", "partial"),
    ("llama", "cpu-8", "v2", "random"),
    ("qwen2", "cpu-8", "v1", "random"), ("qwen2", "cpu-8", "v1", "partial"),
    ("qwen2", "chain-3", "v2", "random"), ("qwen2", "cpu-16", "v2", "random"),
    ("qwen2", "mc_sim_7b_63", "v2", "random"),
    ("llama", "chain-3", "hydra", "random"), ("llama", "cpu-8", "hydra", "random"),
    ("qwen2", "mc_sim_7b_63", "hydra", "random"),
]


@pytest.mark.parametrize("arch,tree,fmt,weights", LOSSLESS, ids=["-".join(case) for case in LOSSLESS])
def test_greedy_medusa_equals_plain_greedy(kit, arch, tree, fmt, weights):
    result = kit.generator(arch, tree, fmt, weights).generate(kit.prompt, GenerationConfig(max_new_tokens=NEW_TOKENS))
    assert result.generated_ids == kit.greedy[arch]  # planned: heads, context drafts or plain steps
    assert result.finish_reason == "length"
    check_accounting(result, NEW_TOKENS)
    if weights == "partial":  # heads right about half the time: several tokens per step from the heads alone
        heads_only = kit.generator(arch, tree, fmt, weights).generate(
            kit.prompt, GenerationConfig(max_new_tokens=NEW_TOKENS, prompt_lookup=False))
        assert heads_only.generated_ids == kit.greedy[arch] and heads_only.source_steps == {"heads": heads_only.steps}
        assert heads_only.mean_accepted > 1.4
        assert max(heads_only.accept_histogram) >= 3


# -- acceptance with heads that know the continuation ----------------------------------------------------------------
@pytest.mark.parametrize("arch,tree,fmt", [("llama", "chain-3", "v1"), ("qwen2", "cpu-8", "v1")])
def test_fitted_heads_are_accepted(kit, arch, tree, fmt):
    depth = load_tree(tree).depth
    result = kit.generator(arch, tree, fmt, "oracle").generate(kit.prompt, greedy(FITTED_TOKENS))
    assert result.generated_ids == kit.greedy[arch][:FITTED_TOKENS]
    check_accounting(result, FITTED_TOKENS)
    # every step but the last (cut by the token budget) accepts the whole chain: depth + 1 tokens
    assert result.accept_lengths[:-1] == [depth + 1] * (result.steps - 1)
    assert result.steps == -(-(FITTED_TOKENS - 1) // (depth + 1))
    assert result.mean_accepted >= 0.9 * (depth + 1) or result.steps <= 2


def test_branch_acceptance_compacts_the_kv_cache(kit, monkeypatch):
    """After steps that accept non-chain paths (rank-1 candidates), the cache must hold exactly what plain decoding
    writes for the same tokens."""
    generator = kit.generator("llama", "mc_sim_7b_63", "v1", "partial")
    accepted = spy_accepted_nodes(monkeypatch, generator)
    result = generator.generate(kit.prompt, greedy())
    assert result.generated_ids == kit.greedy["llama"]
    branches = [nodes for nodes in accepted if nodes != list(range(len(nodes)))]
    assert len(branches) >= 3
    assert any(len(nodes) >= 3 for nodes in branches)

    plain = kit.plain["llama"]
    assert plain.generate(kit.prompt, greedy()).generated_ids == kit.greedy["llama"]
    written = PROMPT_LEN + NEW_TOKENS - 1  # the last generated token is never fed back
    for medusa_layer, plain_layer in zip(generator.cache.layers, plain.cache.layers):
        np.testing.assert_allclose(medusa_layer.numpy()[..., :written, :], plain_layer.numpy()[..., :written, :],
                                   atol=1e-5, rtol=0)


# -- stopping ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def oracle_chain(kit):
    """chain-3 with fitted heads: every verify step accepts 4 tokens, so step s emits tokens 4s+1 .. 4s+4."""
    generator = kit.generator("llama", "chain-3", "v1", "oracle")
    yield generator, kit.greedy["llama"]
    generator.eos_ids = set()
    kit.plain["llama"].eos_ids = set()


def test_eos_inside_an_accepted_path(kit, oracle_chain):
    generator, expected = oracle_chain
    # an index in the middle of a step's 4 tokens (neither its first nor its bonus) whose token is new
    stop_at = next(i for i in range(2, FITTED_TOKENS) if (i - 1) % 4 in (1, 2) and expected[i] not in expected[:i])
    generator.eos_ids = {expected[stop_at]}
    streamed = []
    result = generator.generate(kit.prompt, greedy(), on_tokens=streamed.append)
    assert result.generated_ids == expected[:stop_at + 1]
    assert result.finish_reason == "stop"
    # the prefill's token, then each step's tokens in one call, the last one cut right after the EOS
    assert streamed == [expected[:1]] + [expected[i:min(i + 4, stop_at + 1)] for i in range(1, stop_at + 1, 4)]
    assert result.accept_lengths[-1] == 4 and 1 + sum(result.accept_lengths) > stop_at + 1  # cut inside the path
    kit.plain["llama"].eos_ids = {expected[stop_at]}
    plain = kit.plain["llama"].generate(kit.prompt, greedy())
    assert (plain.generated_ids, plain.finish_reason) == (result.generated_ids, "stop")


def test_eos_as_first_token(kit, oracle_chain):
    generator, expected = oracle_chain
    generator.eos_ids = {expected[0]}
    result = generator.generate(kit.prompt, greedy())
    assert (result.generated_ids, result.finish_reason, result.steps) == ([expected[0]], "stop", 0)


@pytest.mark.parametrize("max_new_tokens,accept_lengths", [(1, []), (5, [4]), (7, [4, 4]), (10, [4, 4, 4])])
def test_token_budget_inside_an_accepted_path(kit, oracle_chain, max_new_tokens, accept_lengths):
    generator, expected = oracle_chain
    result = generator.generate(kit.prompt, greedy(max_new_tokens))
    assert result.generated_ids == expected[:max_new_tokens]
    assert result.finish_reason == "length"
    assert result.accept_lengths == accept_lengths


@pytest.mark.parametrize("tree,fmt,weights", [("mc_sim_7b_63", "v1", "random"), ("chain-3", "v1", "oracle")])
def test_context_end(kit, tree, fmt, weights):
    generator = kit.generator("llama", tree, fmt, weights)
    plain = kit.plain["llama"]
    rng = np.random.default_rng(9)
    for room in (6, 2, 1):
        prompt = [int(t) for t in rng.integers(3, 320, MAX_CONTEXT - room)]
        expected = plain.generate(prompt, greedy())
        assert len(expected.generated_ids) == room and expected.finish_reason == "length"
        result = generator.generate(prompt, greedy())
        assert result.generated_ids == expected.generated_ids
        assert result.finish_reason == "length"
    with pytest.raises(ValueError, match=f"the prompt has {MAX_CONTEXT} tokens but the context holds {MAX_CONTEXT}"):
        generator.generate([5] * MAX_CONTEXT, greedy())


def test_bad_prompts(kit):
    generator = kit.generator("llama", "chain-3", "v1", "random")
    with pytest.raises(ValueError, match="the prompt is empty"):
        generator.generate([], greedy())
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 320\)"):
        generator.generate([5, 320], greedy())


@pytest.mark.parametrize("mode", ["typical", "exact"])
def test_sampling_near_zero_temperature_is_greedy(kit, mode):
    """As the temperature goes to 0 both acceptance rules accept exactly the argmax matches, so the sampling path
    (host-side acceptance, proposals from the accepted node, compaction) must reproduce greedy decoding."""
    generator = kit.generator("llama", "cpu-16", "v1", "partial")
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, temperature=1e-4, seed=0, medusa_sampling=mode)
    result = generator.generate(kit.prompt, cfg)
    assert result.generated_ids == kit.greedy["llama"]
    assert result.mean_accepted > 1.4


def test_sequential_heads_propose_from_the_sampled_root(kit, monkeypatch):
    """With sampling, the root of the next tree is drawn on the host; hydra heads must continue that token, not the
    argmax: after prefill and after every sampled verify step, the tree's candidates are the heads' proposal from
    the last accepted node's hidden state and the drawn root."""
    generator = kit.generator("llama", "cpu-8", "hydra", "random")
    steps, heads, tree = generator.steps, kit.heads["llama", "hydra"], generator.tree
    hidden_of_step, trees = [], []
    verify_logits, verify = steps.verify_logits, steps.verify

    def recording_logits(*args):
        hidden, logits = verify_logits(*args)
        hidden_of_step.append(hidden.numpy().copy())
        return hidden, logits

    def recording_verify(*args, **kwargs):
        nodes, next_tree = verify(*args, **kwargs)
        trees.append((nodes, next_tree.copy()))
        return nodes, next_tree

    monkeypatch.setattr(steps, "verify_logits", recording_logits)
    monkeypatch.setattr(steps, "verify", recording_verify)
    cfg = GenerationConfig(max_new_tokens=24, temperature=1.0, seed=3, medusa_sampling="exact")
    generator.generate(kit.prompt, cfg)
    assert len(trees) >= 3
    pick = (tree.node_head * tree.top_k + tree.node_rank)[1:]
    roots_differ = 0
    for hidden, (nodes, next_tree) in zip(hidden_of_step, trees):
        row = Tensor(hidden[nodes[-1]].astype(np.float32))
        root = int(next_tree[0])
        proposed = heads.propose(row, tree.top_k, tree.depth, root=Tensor(root, dtype="int32")).numpy()
        np.testing.assert_array_equal(next_tree[1:], proposed.reshape(-1)[pick])
        roots_differ += root != int((hidden[nodes[-1]] @ kit.models["llama"].lm_head.numpy().T).argmax())
    assert roots_differ > 0  # temperature 1 on a random model draws non-argmax roots: the check above has teeth


# -- TinyJit: one capture per step, reused by later generations -------------------------------------------------------
def test_a_generators_steps_refuse_another_cache(kit):
    generator = kit.generator("llama", "cpu-8", "v1", "partial")
    generator.generate(kit.prompt, greedy(4))
    other = kit.model("llama").new_cache()
    x = generator.steps.host("tokens", [[1] * generator.tree.size])
    with pytest.raises(ValueError, match="captured on another KV cache"):
        generator.steps.verify_greedy(x, other.layers, generator.steps.bind(0))
    with pytest.raises(ValueError, match="captured on another KV cache"):
        generator.steps.compact(other.layers, generator.steps.bind(0), generator.steps.host("keep", range(generator.tree.size)))


def test_second_generation_compiles_nothing(kit, monkeypatch):
    """Once every step is captured, later generations compile nothing and schedule nothing: host values go in and
    out through ShardSteps.host/read_host (tinygrad's scheduler walks every live tensor: ~5 ms a step on a real
    model)."""
    import tinygrad.tensor
    generator = kit.generator("llama", "cpu-16", "v1", "partial")
    configs = [greedy(48), GenerationConfig(max_new_tokens=12, temperature=0.8, seed=1, medusa_sampling="exact"),
               GenerationConfig(max_new_tokens=12, temperature=0.8, seed=1, medusa_sampling="typical")]
    prompts = [kit.prompt, kit.prompt[:7] + kit.prompt[:30], kit.prompt[5:]]  # other lengths and start positions
    for cfg in configs:  # warm-up: every step kind runs, gets captured, and replays
        generator.generate(kit.prompt, cfg)
        generator.generate(kit.prompt[3:], cfg)
    names = ("verify_greedy", "verify_logits", "propose_after_prefill", "propose_after_verify", "compact")
    jits = {name: getattr(generator.steps, name) for name in names}
    jits["prefill"] = generator.steps.prefill_steps[min(generator.steps.chunks)]  # these prompts fit small chunks
    captured = {name: jit.captured for name, jit in jits.items()}
    assert all(c is not None for c in captured.values()), "every step should have been captured by now"
    kernels, walks, walk = len(to_program_cache), [], tinygrad.tensor._apply_map_to_tensors
    monkeypatch.setattr(tinygrad.tensor, "_apply_map_to_tensors", lambda *a, **k: walks.append(a[1:]) or walk(*a, **k))
    for cfg in configs:
        for prompt in prompts:
            result = generator.generate(prompt, cfg)
            assert len(result.generated_ids) == cfg.max_new_tokens
    assert len(to_program_cache) == kernels
    assert walks == [], "a decode step went through tinygrad's scheduler"
    assert {name: jit.captured for name, jit in jits.items()} == captured


# -- the default model -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_with_shipped_heads_reproduces_the_oracle(default_model):
    oracle = json.loads((Path(__file__).parent / "data" / "smollm2_oracle.json").read_text())
    model = default_model.model
    heads_path = resolve_heads_path(default_model, MedusaOptions(True))
    heads = load_heads(heads_path, model.config, model.lm_head)
    tree = load_tree(default_tree_spec(default_model.device, heads_path))
    generator = Generator(model, default_model.tokenizer.eos_token_ids, tree, heads)
    result = generator.generate(oracle["prompt_ids"], GenerationConfig(max_new_tokens=200))
    assert result.generated_ids == oracle["greedy_new_ids"]
    assert result.finish_reason == "stop"
    check_accounting(result, 200)
