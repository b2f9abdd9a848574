"""Prompt lookup: n-gram drafts from the context, grafting them into a fixed-shape Medusa tree, and generation with
them (greedy output identical to plain greedy, exact sampling still distribution-preserving, nothing recompiled)."""
from __future__ import annotations

import numpy as np
import pytest
from tinygrad.codegen import to_program_cache

from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.decoding.heads import random_heads
from exo_tinygrad_medusa.decoding.lookup import (AcceptStats, DraftPlanner, Grafter, LookupConfig, NgramIndex,
                                                 common_prefix)
from exo_tinygrad_medusa.decoding.tree import PLAIN, MedusaTree, chain, load_tree
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig, exact_accept
from test_sampling import SIGNIFICANCE, ToyModel, goodness_of_fit


# -- n-gram index ----------------------------------------------------------------------------------------------------
def test_longest_suffix_wins_over_a_more_recent_shorter_one():
    index = NgramIndex(LookupConfig(), [1, 2, 3, 7, 8, 9, 3, 5, 6, 1, 2, 3])
    # "1 2 3" occurred at the start, followed by 7 8 9; "3" alone occurred later, followed by 5
    assert index.draft(3) == ([7, 8, 9], 3)


def test_most_recent_occurrence_wins():
    index = NgramIndex(LookupConfig(), [4, 5, 10, 4, 5, 11, 12, 9, 4, 5])
    assert index.draft(2) == ([11, 12], 2)


def test_the_suffix_never_matches_itself():
    assert NgramIndex(LookupConfig(), [1, 2, 3]).draft(4) == ([], 0)
    index = NgramIndex(LookupConfig(min_ngram=2), [1, 2, 9, 2])  # "2" would match at n = 1, but n >= 2 is asked for
    assert index.draft(2) == ([], 0)


def test_a_match_running_into_the_suffix_repeats_its_period():
    index = NgramIndex(LookupConfig(), [8, 1, 2, 1, 2])
    assert index.draft(5) == ([1, 2, 1, 2, 1], 2)   # "1 2" was followed by "1 2": the pattern keeps repeating
    assert NgramIndex(LookupConfig(), [6, 6]).draft(3) == ([6, 6, 6], 1)


def test_extend_is_the_same_as_building_at_once():
    seq = [int(t) for t in np.random.default_rng(0).integers(0, 6, 60)]
    grown = NgramIndex(LookupConfig())
    for i in range(0, 60, 7):
        grown.extend(seq[i:i + 7])
        assert grown.draft(4) == NgramIndex(LookupConfig(), seq[:i + 7]).draft(4)


def test_lookup_config_is_checked():
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        LookupConfig(min_ngram=3, max_ngram=2)
    with pytest.raises(ValueError, match="chain_sizes must be >= 1"):
        LookupConfig(chain_sizes=(0, 4))
    with pytest.raises(ValueError, match=r"score_decay must be in \[0, 1\)"):
        LookupConfig(score_decay=1.0)


# -- grafting ----------------------------------------------------------------------------------------------------------
def test_graft_into_a_chain_overwrites_it():
    tree = chain(3)
    out, placed = Grafter(tree).graft(np.array([5, 10, 11, 12]), [20, 21])
    assert out.tolist() == [5, 20, 21, 12] and placed == 2


def test_graft_keeps_the_heads_best_branch_when_a_weaker_one_hosts_the_draft():
    tree = load_tree("cpu-8")  # (0) (1) (0,0) (1,0) (0,1) (0,0,0) (0,0,0,0)
    tokens = np.arange(100, 100 + tree.size)
    grafter = Grafter(tree)
    node = {c: i + 1 for i, c in enumerate(tree.choices)}
    # two draft tokens fit under the rank-1 branch: the rank-0 chain stays as the heads proposed it
    out, placed = grafter.graft(tokens, [7, 8])
    assert placed == 2 and out[node[(1,)]] == 7 and out[node[(1, 0)]] == 8
    assert np.array_equal(np.delete(out, [node[(1,)], node[(1, 0)]]), np.delete(tokens, [node[(1,)], node[(1, 0)]]))
    # four draft tokens need the deepest chain
    out, placed = grafter.graft(tokens, [7, 8, 9, 6])
    assert placed == 4 and [out[node[c]] for c in [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)]] == [7, 8, 9, 6]
    assert out[node[(1,)]] == tokens[node[(1,)]] and out[0] == tokens[0]


def test_graft_follows_a_child_that_already_holds_the_draft_token():
    tree = load_tree("cpu-8")
    node = {c: i + 1 for i, c in enumerate(tree.choices)}
    tokens = np.arange(100, 100 + tree.size)
    draft = [int(tokens[node[(1,)]]), 55, 56]  # the rank-1 candidate is the draft's first token
    out, placed = Grafter(tree).graft(tokens, draft)
    assert placed == 2 and out[node[(1,)]] == draft[0] and out[node[(1, 0)]] == 55
    assert out[node[(0,)]] == tokens[node[(0,)]]


def test_scoring_what_a_step_emitted():
    tree = load_tree("cpu-8")
    node = {c: i + 1 for i, c in enumerate(tree.choices)}
    tokens = np.zeros(tree.size, dtype=np.int64)
    tokens[node[(0,)]], tokens[node[(1,)]], tokens[node[(1, 0)]], tokens[node[(0, 0)]] = 5, 6, 7, 8
    grafter = Grafter(tree)
    assert grafter.matched(tokens, [6, 7, 1]) == 2 and grafter.matched(tokens, [5, 8]) == 2
    assert grafter.matched(tokens, [9, 5]) == 0 and common_prefix([6, 7, 2], [6, 7, 1]) == 2


@pytest.mark.parametrize("spec", ["cpu-8", "cpu-16", "mc_sim_7b_63"])
def test_grafting_never_puts_one_token_on_two_siblings(spec):
    """Duplicate siblings would waste a branch (and the second copy could never be accepted by exact sampling)."""
    tree, rng = load_tree(spec), np.random.default_rng(1)
    grafter = Grafter(tree)
    for _ in range(200):
        tokens = rng.integers(0, 6, tree.size)
        for parent in range(tree.size):  # heads propose distinct candidates under one parent
            kids = grafter.children[parent]
            tokens[kids] = rng.permutation(12)[:len(kids)]
        out, _ = grafter.graft(tokens, [int(t) for t in rng.integers(0, 12, tree.depth)])
        for parent in range(tree.size):
            kids = out[grafter.children[parent]].tolist()
            assert len(kids) == len(set(kids))


@pytest.mark.parametrize("cfg", [GenerationConfig(temperature=1.0), GenerationConfig(temperature=0.7, top_k=3)],
                         ids=["t1", "t0.7-topk3"])
def test_exact_sampling_with_a_grafted_draft_preserves_the_distribution(cfg):
    toy, rng, n = ToyModel(seed=3), np.random.default_rng(7), 6000
    second = int(np.argsort(-toy.logits[toy.root])[1])
    # a draft that shares its first token with a head candidate, then diverges into unlikely tokens
    toy.tree_tokens, placed = Grafter(toy.tree).graft(toy.tree_tokens, [second, 4, 3])
    assert placed >= 2
    samples = [toy.draw(exact_accept, cfg, rng) for _ in range(n)]
    assert goodness_of_fit(samples, toy.joint(cfg)) > SIGNIFICANCE


# -- generation ----------------------------------------------------------------------------------------------------
NEW = 48


@pytest.fixture(scope="module")
def models(tiny_model):
    # llama seed 1: a varied continuation; qwen2 tied: falls into a loop, where the context predicts everything
    return {"varied": tiny_model("llama", max_context=160, seed=1), "loop": tiny_model("qwen2", max_context=160)}


def _prompt(seed: int) -> list[int]:
    part = [int(t) for t in np.random.default_rng(seed).integers(3, 320, 12)]
    return part + [7, 9] + part + [7, 9] + part[:4]   # the prompt repeats itself: lookup has something to find


TABLE_COSTS = LookupConfig(measure_costs=False)


@pytest.fixture(scope="module")
def plain(models):
    out = {}
    for kind, loaded in models.items():
        # the planner uses the cost table: which drafts it verifies must not depend on the machine's load
        gen = Generator(loaded.model, [], lookup=TABLE_COSTS)
        out[kind] = gen, {s: gen.generate(_prompt(s), GenerationConfig(NEW, prompt_lookup=False)).generated_ids
                          for s in (0, 1)}
    return out


@pytest.mark.parametrize("kind", ["varied", "loop"])
def test_plain_decoding_with_lookup_equals_plain_greedy(plain, kind):
    gen, expected = plain[kind]
    for seed in (0, 1):
        result = gen.generate(_prompt(seed), GenerationConfig(NEW, prompt_lookup=True))
        assert result.generated_ids == expected[seed]
        assert result.lookup_steps > 0 and 1 + sum(result.accept_lengths) >= NEW
    if kind == "loop":  # once the model loops, every drafted step accepts most of the chain
        assert result.mean_accepted > 2.0


@pytest.mark.parametrize("kind,tree", [("varied", "cpu-8"), ("varied", "mc_sim_7b_63"), ("loop", "cpu-4")])
def test_medusa_with_lookup_equals_plain_greedy(models, plain, kind, tree):
    loaded = models[kind]
    heads = random_heads(loaded.model.config, loaded.model.lm_head, 4, 1, "v2", seed=11, scale=0.3)
    gen = Generator(loaded.model, [], load_tree(tree), heads, lookup=TABLE_COSTS)
    _, expected = plain[kind]
    lengths = {}
    for lookup in (False, True):
        result = gen.generate(_prompt(0), GenerationConfig(NEW, prompt_lookup=lookup))
        assert result.generated_ids == expected[0]
        assert (result.lookup_steps > 0) == lookup
        lengths[lookup] = result.mean_accepted
    if kind == "loop":  # random heads rarely guess; the context does
        assert lengths[True] > lengths[False] + 0.5


@pytest.mark.parametrize("mode", ["exact", "typical"])
@pytest.mark.parametrize("tree", ["plain", "cpu-8"])
def test_near_zero_temperature_with_lookup_reproduces_greedy(models, plain, mode, tree):
    """The host-side acceptance path with drafts (lookup-only chain or grafted tree) must also reduce to greedy."""
    loaded = models["loop"]
    heads = None if tree == "plain" else random_heads(loaded.model.config, loaded.model.lm_head, 4, 1, "v2", seed=11,
                                                      scale=0.3)
    gen = Generator(loaded.model, [], PLAIN if tree == "plain" else load_tree(tree), heads)
    result = gen.generate(_prompt(1), GenerationConfig(NEW, temperature=1e-4, seed=0, medusa_sampling=mode,
                                                       prompt_lookup=True))
    assert result.generated_ids == plain["loop"][1][1]
    assert result.lookup_steps > 0 and result.mean_accepted > 1.5


def test_lookup_default_is_on_for_medusa_and_off_for_plain(models):
    loaded = models["varied"]
    heads = random_heads(loaded.model.config, loaded.model.lm_head, 4, 1, "v2", seed=11, scale=0.3)
    assert Generator(loaded.model, [], load_tree("cpu-4"), heads).uses_lookup(GenerationConfig())
    assert not Generator(loaded.model, []).uses_lookup(GenerationConfig())
    assert Generator(loaded.model, []).uses_lookup(GenerationConfig(prompt_lookup=True))
    assert Generator(loaded.model, [], load_tree("cpu-4"), heads).generate(
        _prompt(0), GenerationConfig(8, prompt_lookup=False)).lookup_steps == 0


def test_a_chain_longer_than_the_cache_slack_is_a_clear_error(models):
    gen = Generator(models["varied"].model, [], lookup=LookupConfig(chain_sizes=(1, 4097)))
    with pytest.raises(ValueError, match="prompt lookup drafts 4096 tokens a step: .*exceeds the cache slack"):
        gen.generate(_prompt(0), GenerationConfig(4, prompt_lookup=True))


def test_lookup_steps_are_captured_once(plain):
    gen, _ = plain["varied"]
    cfg = GenerationConfig(24, prompt_lookup=True)
    gen.generate(_prompt(0), cfg)
    gen.generate(_prompt(1)[2:], cfg)
    used = [T for T in gen.lookup.chain_sizes if gen.chain_steps(T).verify_greedy.captured is not None]
    assert len(used) >= 2  # steps of more than one size ran
    kernels, captured = len(to_program_cache), {T: gen.chain_steps(T).verify_greedy.captured for T in used}
    for prompt in (_prompt(0)[5:], _prompt(1) + [3, 4]):
        gen.generate(prompt, cfg)
    assert len(to_program_cache) == kernels
    assert all(gen.chain_steps(T).verify_greedy.captured is captured[T] for T in used)


# -- drafts as chains sized to them ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [GenerationConfig(temperature=1.0), GenerationConfig(temperature=0.7, top_k=3)],
                         ids=["t1", "t0.7-topk3"])
def test_exact_sampling_of_a_drafted_chain_preserves_the_distribution(cfg):
    """A draft chain (context or datastore) is a deterministic proposal: exact acceptance keeps the model's law."""
    toy, rng, n = ToyModel(seed=3), np.random.default_rng(11), 6000
    order = np.argsort(-toy.logits[toy.root])
    toy.tree = chain(3)
    toy.tree_tokens = np.array([toy.root, order[1], int(np.argsort(-toy.logits[order[1]])[0]), order[-1]])
    samples = [toy.draw(exact_accept, cfg, rng) for _ in range(n)]
    assert goodness_of_fit(samples, toy.joint(cfg)) > SIGNIFICANCE


def test_expected_accepted_tokens_follow_the_per_depth_rates():
    stats = AcceptStats([0.5, 0.5], depth=3, decay=0.5, weight=1.0)
    assert stats.expected().tolist() == pytest.approx([0, 0.5, 0.75, 0.875])
    stats.update([1, 2, 3], [1, 9])          # right at depth 0, wrong at depth 1; depth 2 unknown
    assert (stats.hits / stats.tries).tolist() == pytest.approx([1.25 / 1.5, 0.25 / 1.5, 0.5])
    stats.update([1, 2, 3], [1])             # only depth 0 is known
    assert stats.tries.tolist() == pytest.approx([1.75, 1.5, 1.0])


def test_planner_prefers_the_longer_proven_draft_and_plain_without_one():
    cfg = LookupConfig(chain_sizes=(1, 2, 4, 8))
    assert DraftPlanner(cfg, [5, 6, 7]).plan().source == "plain"           # nothing in the context repeats
    # a costly deep step is chosen only when it is expected to return enough
    cheap = LookupConfig(chain_sizes=(1, 2, 4, 8), step_costs=((1, 1.0), (8, 1.0)))
    planner = DraftPlanner(cheap, [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3])
    plan = planner.plan()
    assert plan.source == "context" and plan.size == 8 and plan.draft == [4, 5, 6, 7, 8, 9, 1]
    costly = LookupConfig(chain_sizes=(1, 2, 4, 8), step_costs=((1, 1.0), (2, 1.0), (4, 3.0), (8, 9.0)))
    assert DraftPlanner(costly, [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3]).plan().size == 2
    # measured costs override the table
    measured = DraftPlanner(costly, [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3], measured={2: 5.0, 4: 1.0, 8: 9.0})
    assert measured.plan().size == 4


def test_capture_steps_measures_every_step_size(models):
    gen = Generator(models["varied"].model, [], lookup=LookupConfig(chain_sizes=(1, 2, 4)))
    gen.capture_steps()
    assert set(gen.step_seconds) == {1, 2, 4} and gen.measured_costs()[1] == 1.0
    result = gen.generate(_prompt(0), GenerationConfig(16, prompt_lookup=True))
    assert set(result.step_sizes) <= {1, 2, 4} and sum(result.step_sizes.values()) == result.steps


def test_step_costs_measured_replace_priors_and_drift_back():
    from exo_tinygrad_medusa.decoding.step_costs import STALE_DECAY, StepCosts
    costs = StepCosts([1, 2, 4, "heads"], {1: 1.0, 2: 1.2, 4: 1.5, "heads": 1.4}.__getitem__)
    assert costs.relative() == {1: 1.0, 2: 1.2, 4: 1.5, "heads": 1.4}
    costs.record(4, 0.03)                  # no plain step timed: the unit is what chain-4's prior implies
    assert costs.relative()[4] == pytest.approx(1.5) and costs.relative()[2] == 1.2
    costs.record(1, 0.01)
    costs.record(1, 0.02)                  # a running mean: 0.8 * 0.01 + 0.2 * 0.02
    unit = 0.012
    assert costs.seconds[1] == pytest.approx(unit)
    # chain-4 was timed two steps ago: its measurement keeps STALE_DECAY ** 2 of the weight, the prior the rest
    assert costs.relative()[4] == pytest.approx(STALE_DECAY ** 2 * 0.03 / unit + (1 - STALE_DECAY ** 2) * 1.5)
    assert costs.relative()[1] == 1.0 and costs.relative()["heads"] == 1.4


def test_step_costs_keep_the_plain_step_exactly_one_while_other_kinds_run():
    # the unit is the plain step's own running mean: however stale, its relative cost is 1.0 exactly, not 0.99..
    # (the planner compares costs, and callers compare against 1.0)
    from exo_tinygrad_medusa.decoding.step_costs import StepCosts
    rng = np.random.default_rng(0)
    for _ in range(200):
        costs = StepCosts([1, 2, 4], {1: 1.0, 2: 1.04, 4: 1.3}.__getitem__)
        for kind in (1, 2, 4):
            for _ in range(3):
                costs.record(kind, float(rng.uniform(1e-4, 1e-2)))
        assert costs.relative()[1] == 1.0
