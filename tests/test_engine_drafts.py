"""Draft chains on the engine's ring (serving/ring_drafts.py): the last shard plans each pass (plain, a context or
datastore chain, or the heads' tree) and every shard runs the kind the state names; greedy tokens never change."""
from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest

from exo_tinygrad_medusa.decoding.datastore import Datastore
from exo_tinygrad_medusa.decoding.lookup import LookupConfig
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.decoding.tree import load_tree
from exo_tinygrad_medusa.model.shard import Shard
from exo_tinygrad_medusa.serving import ring_drafts
from exo_tinygrad_medusa.serving.engine import MedusaInferenceEngine, RingStateError, StepState
from exo_tinygrad_medusa.serving.ring_drafts import CHAIN, TREE, PassCosts, RingDraftConfig
from ring_driver import local_hop, one_pass, run_ring
from test_engine import LAYERS, chat_prompt, echo, medusa_options, tiny  # noqa: F401 (fixtures)

# table costs only: the plan then depends on the tokens alone, so runs repeat exactly
TABLE = RingDraftConfig(measure_passes=False)


def engines(model, heads, cfg, drafts=TABLE, datastore=None, bounds=((0, 1), (2, 3))):
    if cfg.greedy and cfg.prompt_lookup is None:  # drafts are off on a ring unless asked for
        cfg = dataclasses.replace(cfg, prompt_lookup=True)
    return [(MedusaInferenceEngine(medusa_options(heads), cfg, drafts=drafts, datastore=datastore),
             Shard(model, a, b, LAYERS)) for a, b in bounds]


def ring(pairs, prompt):
    return asyncio.run(run_ring([local_hop(e, s) for e, s in pairs], prompt))


@pytest.fixture
def sources(monkeypatch):
    """The source of every plan the last shard made (plain, heads, context, datastore)."""
    seen = []
    tokens_for = ring_drafts.RequestDrafts._tokens

    def spy(self, plan, root):
        seen.append(plan.source)
        return tokens_for(self, plan, root)
    monkeypatch.setattr(ring_drafts.RequestDrafts, "_tokens", spy)
    return seen


def repeating_prompt(model: str) -> list[int]:
    return chat_prompt(model, "one two three four five, one two three four five, one two three four five, one two")


def test_context_chains_keep_greedy_tokens(echo, sources):
    model, heads = echo
    cfg = GenerationConfig(max_new_tokens=40)
    prompt = repeating_prompt(model)
    plain, _ = ring(engines(model, None, dataclasses.replace(cfg, prompt_lookup=False)), prompt)
    tokens, states = ring(engines(model, heads, cfg), prompt)
    assert len(plain) == 40 and tokens == plain
    kinds = [s.kind for s in states[:-1]]  # the pass each state asks for (the last one asks for none)
    assert CHAIN in kinds
    assert "context" in sources
    # a chain pass accepted drafted tokens: it emitted more than one token
    chain_accepts = [len(after.keep) for before, after in zip(states, states[1:]) if before.kind == CHAIN]
    assert max(chain_accepts) >= 2
    assert len(states) - 1 < 40  # fewer decode passes than tokens
    for s in states:
        assert json.loads(json.dumps(s.to_state())) == s.to_state()
        assert s.prompt == []  # the prompt travels on the prompt pass only, to the last shard


def test_datastore_chains_keep_greedy_tokens(tiny, sources):
    """A datastore of the model's own answer: its drafts are right, so chains accept deep and passes drop."""
    model, heads = tiny
    cfg = GenerationConfig(max_new_tokens=32)
    prompt = chat_prompt(model, "Tell me about the sea.")
    plain, plain_states = ring(engines(model, None, dataclasses.replace(cfg, prompt_lookup=False)), prompt)
    store = Datastore.build([plain])
    tokens, states = ring(engines(model, heads, cfg, datastore=store), prompt)
    assert tokens == plain and len(plain) == 32
    assert "datastore" in sources
    assert max(len(s.keep) for s in states[1:]) >= 4      # a chain of the answer's own tokens accepted deep
    assert len(states) < len(plain_states) // 2            # plain pays a pass a token


def test_plain_engine_with_prompt_lookup_runs_chains(echo, sources):
    """Drafts without heads (prompt_lookup on a plain engine): plain passes and chains, no tree."""
    model, _ = echo
    cfg = GenerationConfig(max_new_tokens=30)
    prompt = repeating_prompt(model)
    plain, _ = ring(engines(model, None, dataclasses.replace(cfg, prompt_lookup=False)), prompt)
    tokens, states = ring(engines(model, None, dataclasses.replace(cfg, prompt_lookup=True)), prompt)
    assert tokens == plain
    assert "heads" not in sources and "context" in sources
    assert {s.kind for s in states[:-1]} == {CHAIN}


def test_measured_pass_costs_keep_tokens(echo):
    model, heads = echo
    cfg = GenerationConfig(max_new_tokens=30)
    prompt = repeating_prompt(model)
    plain, _ = ring(engines(model, None, dataclasses.replace(cfg, prompt_lookup=False)), prompt)
    pairs = engines(model, heads, cfg, drafts=RingDraftConfig())
    for _, (engine, shard) in zip(range(2), pairs):
        asyncio.run(engine.warm_up(shard))  # captures every chain size: passes are timed from the first one
    tokens, states = ring(pairs, prompt)
    assert tokens == plain
    costs = pairs[-1][0].pass_costs
    timed = {1 if s.kind == CHAIN and len(s.tree) == 1 else ("heads" if s.kind == TREE else len(s.tree))
             for s in states[:-1]}
    assert set(costs.seconds) == timed and all(v > 0 for v in costs.seconds.values())


def test_sampling_keeps_the_heads_tree(tiny):
    model, heads = tiny
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, seed=1)
    pairs = engines(model, heads, cfg)
    _, states = ring(pairs, chat_prompt(model))
    assert {s.kind for s in states} == {TREE}
    assert pairs[0][0].draft_sizes == () and pairs[-1][0].pass_costs is None
    with pytest.raises(ValueError, match="drafts on a ring \\(prompt_lookup\\) need greedy decoding"):
        MedusaInferenceEngine(medusa_options(heads), dataclasses.replace(cfg, prompt_lookup=True))


def test_chain_states_are_checked_on_every_shard(tiny):
    model, heads = tiny
    cfg = GenerationConfig(max_new_tokens=30)
    (a, sa), (b, sb) = engines(model, heads, cfg)
    off = MedusaInferenceEngine(medusa_options(heads), dataclasses.replace(cfg, prompt_lookup=False))
    prompt = np.array([chat_prompt(model)])

    async def scenario():
        tokens, state = await one_pass([local_hop(a, sa), local_hop(b, sb)], "r", prompt, None)
        st = StepState.from_state(state)
        root = st.tree[0]
        for kind, tree, error in (("chain", [root] * 3, "a draft chain of 3 tokens is not one of this shard's chain "
                                                        r"sizes \[1, 2, 4, 8\]"),
                                  ("fork", [root], "unknown pass kind 'fork'"),
                                  ("tree", [root] * 2, "the state carries 2 tree tokens, the tree has")):
            bad = dataclasses.replace(st, kind=kind, tree=tree).to_state()
            with pytest.raises(RingStateError, match=error):
                await a.infer_tensor("r", sa, tokens, bad)
        # a chain pass reaches a shard whose drafts are off
        hidden, _ = await off.infer_tensor("q", sa, prompt, None)
        chain = dataclasses.replace(st, kind="chain", tree=[root, 5]).to_state()
        with pytest.raises(RingStateError, match="this shard has drafts off: start every node with the same options"):
            await off.infer_tensor("q", sa, tokens, {**chain, "medusa": {**chain["medusa"], "step": 1}})
        # a last shard with drafts gets a prompt pass from a first shard without them
        hidden, state_off = await off.infer_tensor("s", sa, prompt, None)
        with pytest.raises(RingStateError, match="carries 0 prompt ids"):
            await b.infer_tensor("s", sb, hidden, state_off)
        # refusals changed nothing: the request goes on with a chain pass
        chain = dataclasses.replace(st, kind="chain", tree=[root, 7, 7, 7]).to_state()
        out, after = await one_pass([local_hop(a, sa), local_hop(b, sb)], "r", tokens, chain)
        after = StepState.from_state(after)
        assert after.step == 2 and after.start_pos == st.start_pos + len(after.keep)
        assert after.keep == list(range(len(after.keep))) and out.shape == (1, len(after.keep))
        # the chain pass also ran the heads from its last accepted node: a tree pass may follow with real proposals
        proposed = b.requests["r"].drafts.proposed
        assert len(proposed) == b.tree.size and proposed[0] == out[0, -1] and np.any(proposed[1:] != 0)

    asyncio.run(scenario())


def test_pass_costs_priors_and_measurements():
    tree = load_tree("cpu-8")
    cfg = RingDraftConfig(LookupConfig(step_costs=((1, 1.0), (8, 2.5))), pass_fixed_cost=1.0)
    costs = PassCosts(cfg, tree)
    rel = costs.relative()
    assert rel[1] == 1.0 and rel[8] == pytest.approx((2.5 + 1) / 2)
    assert rel["heads"] == pytest.approx((cfg.lookup.cost(tree.size) + cfg.lookup.head_cost + 1) / 2)
    costs.record(8, 0.030)             # no plain pass timed yet: the unit follows from chain-8's prior
    assert costs.relative()[8] == pytest.approx(rel[8])
    costs.record(1, 0.020)             # now a plain pass is the unit
    assert costs.relative()[8] == pytest.approx(0.98 * 1.5 + 0.02 * rel[8])
    assert costs.relative()[1] == 1.0 and costs.relative()[4] == pytest.approx(costs.prior(4))
    with pytest.raises(ValueError, match="pass_fixed_cost must be >= 0"):
        RingDraftConfig(pass_fixed_cost=-1)
