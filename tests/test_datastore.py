"""The datastore of the model's own answers (decoding/datastore.py): suffix order, queries against a brute-force
reference, files, and greedy generation with its drafts (token-identical to plain greedy)."""
from __future__ import annotations

import numpy as np
import pytest

from exo_tinygrad_medusa.decoding.datastore import (MAX_MATCH, MIN_MATCH, Datastore, build_sequence, suffix_order)
from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.decoding.lookup import DraftPlanner, LookupConfig
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig


def _answers(rng, count: int, vocab: int, lo: int = 1, hi: int = 40) -> list[list[int]]:
    return [[int(t) for t in rng.integers(0, vocab, rng.integers(lo, hi))] for _ in range(count)]


def _reference(answers, tails, context, length):
    """Brute force: every occurrence of the longest matching context suffix (MIN_MATCH..MAX_MATCH tokens) inside one
    prompt-tail + answer run, then the most frequent next token (ties: the smallest id) among the occurrences that
    still follow the draft, until an answer ends."""
    runs = [t + a for t, a in zip(tails, answers)]
    for n in range(min(MAX_MATCH, len(context)), MIN_MATCH - 1, -1):
        pattern = context[len(context) - n:]
        alive = [(r, i + n) for r in runs for i in range(len(r) - n + 1) if r[i:i + n] == pattern]
        if not alive:
            continue
        support, draft = len(alive), []
        for _ in range(length):
            counts: dict[int, int] = {}
            for r, j in alive:
                if j < len(r):
                    counts[r[j]] = counts.get(r[j], 0) + 1
            ended = sum(1 for r, j in alive if j >= len(r))
            if not counts or ended > max(counts.values()):
                break  # the most frequent "next token" is the end of the answer
            tok = min(counts, key=lambda t: (-counts[t], t))
            draft.append(tok)
            alive = [(r, j + 1) for r, j in alive if j < len(r) and r[j] == tok]
        return draft, n, support
    return [], 0, 0


def test_suffix_order_sorts_by_the_first_tokens():
    rng = np.random.default_rng(0)
    for vocab, depth in ((3, 32), (5, 4), (50, 8)):
        seq = rng.integers(0, vocab, 300)
        order = suffix_order(seq, depth)
        key = lambda i: (tuple(int(t) for t in seq[i:i + depth]) + (vocab + 1,) * max(0, i + depth - len(seq)), i)
        assert order.tolist() == sorted(range(len(seq)), key=key)


@pytest.mark.parametrize("vocab", [3, 7, 40])
def test_draft_matches_brute_force(vocab):
    rng = np.random.default_rng(vocab)
    answers, tails = _answers(rng, 60, vocab), _answers(rng, 60, vocab, 1, 6)
    store = Datastore.build(answers, tails, tail=4)
    tails = [t[-4:] for t in tails]
    checked = 0
    for _ in range(300):
        if rng.random() < 0.5:  # a context that ends inside a stored answer: long matches
            run = tails[k := int(rng.integers(len(answers)))] + answers[k]
            context = run[:int(rng.integers(1, len(run) + 1))]
        else:
            context = [int(t) for t in rng.integers(0, vocab + 1, rng.integers(1, 12))]  # may hold unseen id vocab
        length = int(rng.integers(1, 9))
        draft = store.draft(context, length)
        expected = _reference(answers, tails, context, length)
        assert (draft.tokens, draft.match, draft.support) == expected, context
        checked += bool(expected[0])
    assert checked > 50  # most queries found something to draft


def test_shares_are_the_fractions_of_matches_that_continued():
    store = Datastore.build([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4], [9, 1, 2, 7]], tail=0)
    draft = store.draft([0, 1, 2], 3)
    assert draft.tokens == [3, 4] and draft.match == 2 and draft.support == 4
    assert draft.shares == pytest.approx([0.75, 2 / 3])
    assert store.draft([5, 5], 3).tokens == [] and store.draft([2], 3).tokens == []  # a 1-token suffix is too short


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    answers = _answers(rng, 30, 9)
    store = Datastore.build(answers, meta={"model": "toy"})
    store.save(tmp_path / "ds")
    loaded = Datastore.load(tmp_path / "ds")
    assert isinstance(loaded.suffixes, np.memmap) and loaded.meta["model"] == "toy"
    assert loaded.seq.dtype == np.uint16 and loaded.suffixes.dtype == np.int32
    for _ in range(50):
        context = [int(t) for t in rng.integers(0, 9, 6)]
        assert loaded.draft(context, 5) == store.draft(context, 5)
    with pytest.raises(FileNotFoundError, match="build-datastore"):
        Datastore.load(tmp_path / "missing")


def test_large_vocabularies_keep_int32_ids():
    answers = [[70000, 131000, 5, 70000, 131000, 6]]
    seq, sep = build_sequence(answers)
    assert sep == (1 << 17) - 1 and seq.max() == sep  # 131000 needs 17 bits
    store = Datastore.build(answers, tail=0)
    assert store.seq.dtype == np.int32 and store.per_key == 3
    assert store.draft([1, 70000, 131000], 2).tokens == [5, 70000]


# -- planning ---------------------------------------------------------------------------------------------------------
def test_the_step_is_sized_to_the_draft():
    cfg = LookupConfig(chain_sizes=(1, 2, 4, 8))
    # no match anywhere: a plain step
    assert DraftPlanner(cfg, [1, 2, 3, 4]).plan().size == 1
    # a long answer in the store, matched by 8 tokens, that kept matching: the deepest chain
    answer = list(range(10, 80))
    planner = DraftPlanner(cfg, [5, 6], Datastore.build([answer], tail=0))
    planner.extend(answer[:8])
    sizes = []
    for i in range(8, 60):  # every draft token was right
        plan = planner.plan()
        sizes.append(plan.size)
        planner.observe(answer[i:i + 8])
        planner.extend(answer[i:i + 1])
    plan = planner.plan()
    assert plan.source == "datastore" and plan.size == 8 and plan.draft == answer[60:67]
    assert sizes[0] < 8 and sorted(sizes) == sizes  # deeper as the evidence grows
    # the answer ends two tokens on: the step is the smallest that holds both
    planner.extend(answer[60:68])
    plan = planner.plan()
    assert plan.source == "datastore" and plan.draft[:2] == answer[68:70] and plan.size == 4


def test_a_draft_that_keeps_failing_falls_back_to_plain_steps():
    planner = DraftPlanner(LookupConfig(), [7, 8, 9, 7, 8, 9, 7, 8])
    assert planner.plan().source == "context"
    for _ in range(30):
        plan = planner.plan()
        planner.observe([1])  # the model never continues the repetition
    assert planner.plan().source == "plain"


# -- generation -------------------------------------------------------------------------------------------------------
NEW = 40


@pytest.fixture(scope="module")
def toy(tiny_model):
    loaded = tiny_model("llama", max_context=160, seed=1)
    gen = Generator(loaded.model, [])
    prompts = [[int(t) for t in np.random.default_rng(s).integers(3, 320, 10)] for s in range(4)]
    outputs = [gen.generate(p, GenerationConfig(NEW, prompt_lookup=False)).generated_ids for p in prompts]
    return loaded, prompts, outputs


def test_greedy_with_datastore_drafts_equals_plain_greedy(toy):
    loaded, prompts, outputs = toy
    # the store holds the model's answers to prompts 0 and 1: asked again, the datastore predicts them
    store = Datastore.build(outputs[:2], prompts[:2])
    # planned with the cost table, not this machine's measured step times: how deep the chains go must not depend on
    # the load
    gen = Generator(loaded.model, [], datastore=store, lookup=LookupConfig(measure_costs=False))
    for prompt, expected in zip(prompts, outputs):
        result = gen.generate(prompt, GenerationConfig(NEW, prompt_lookup=True))
        assert result.generated_ids == expected
        assert set(result.step_sizes) <= set(gen.lookup.chain_sizes)
    seen = gen.generate(prompts[0], GenerationConfig(NEW, prompt_lookup=True))
    assert seen.source_steps.get("datastore", 0) > 0
    assert seen.source_tokens["datastore"] / seen.source_steps["datastore"] > 2.5
    assert seen.mean_accepted > 2.5 and max(seen.step_sizes) >= 4


def test_near_zero_temperature_with_datastore_drafts_reproduces_greedy(toy):
    loaded, prompts, outputs = toy
    gen = Generator(loaded.model, [], datastore=Datastore.build(outputs[:1], prompts[:1]))
    result = gen.generate(prompts[0], GenerationConfig(NEW, temperature=1e-4, seed=0, medusa_sampling="exact",
                                                       prompt_lookup=True))
    assert result.generated_ids == outputs[0] and result.source_steps.get("datastore", 0) > 0


@pytest.mark.slow
def test_the_shipped_datastore_rebuilds_from_the_published_corpus():
    """The committed corpus withholds its prompts; the assistant header stands in for them, and the rebuild equals the
    shipped datastore token for token."""
    from exo_tinygrad_medusa.decoding.datastore import corpus_datastore
    from exo_tinygrad_medusa.model.registry import MODELS_DIR
    from exo_tinygrad_medusa.training.cli import _assistant_header
    corpus, shipped = MODELS_DIR / "smollm2-135m" / "distill-corpus", Datastore.load(MODELS_DIR / "smollm2-135m" / "datastore")
    with pytest.raises(ValueError, match="withholds prompts"):
        corpus_datastore(corpus)
    rebuilt = corpus_datastore(corpus, header_ids=_assistant_header("smollm2-135m"))
    assert np.array_equal(np.asarray(rebuilt.seq), np.asarray(shipped.seq))
    assert np.array_equal(np.asarray(rebuilt.suffixes), np.asarray(shipped.suffixes))
