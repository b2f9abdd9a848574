"""Medusa trees: ancestor structure, depths, retrieval paths, presets, JSON files and the errors users see."""
import json
import random

import numpy as np
import pytest

from exo_tinygrad_medusa.model.config import ModelConfig
from exo_tinygrad_medusa.decoding.heads import MedusaConfig, MedusaHeads
from exo_tinygrad_medusa.decoding.tree import PLAIN, MedusaTree, chain, load_tree, presets
from exo_tinygrad_medusa.model.transformer import Transformer
from exo_tinygrad_medusa.model.shard import Shard
from exo_tinygrad_medusa.decoding.steps import ShardSteps
from helpers_models import TINY


def expected_structure(tree: MedusaTree):
    """Independent of the class: node i sees node j iff j's rank path is a prefix of i's (the root has path ())."""
    paths = [()] + list(tree.choices)
    sees = np.array([[p[:len(q)] == q for q in paths] for p in paths])
    leaves = [p for p in paths if not any(len(q) > len(p) and q[:len(p)] == p for q in paths)]
    root_to_leaf = {tuple(paths.index(leaf[:k]) for k in range(len(leaf) + 1)) for leaf in leaves}
    return sees, root_to_leaf


def check_consistent(tree: MedusaTree) -> None:
    sees, root_to_leaf = expected_structure(tree)
    np.testing.assert_array_equal(tree.ancestor_mask, sees)
    np.testing.assert_array_equal(tree.tree_mask, np.where(sees, 0.0, -np.inf).astype(np.float32))
    assert tree.tree_mask.dtype == np.float32
    assert tree.retrieve_paths.shape == (len(root_to_leaf), tree.depth + 1)
    got = set()
    for path, length in zip(tree.retrieve_paths.tolist(), tree.path_lengths.tolist()):
        got.add(tuple(path[:length]))
        assert path[length:] == [path[length - 1]] * (tree.depth + 1 - length)  # padding repeats the leaf
    assert got == root_to_leaf
    for i, choice in enumerate(tree.choices, start=1):
        assert tree.depths[i] == len(choice)
        assert tree.node_head[i] == len(choice) - 1
        assert tree.node_rank[i] == choice[-1]
        assert tree.parents[i] == (0 if len(choice) == 1 else tree.choices.index(choice[:-1]) + 1)
    assert (tree.depths[0], tree.parents[0], tree.node_head[0]) == (0, -1, -1)
    assert list(tree.depths) == sorted(tree.depths)  # parents always come before their children


def test_cpu8_exact_buffers():
    tree = load_tree("cpu-8")
    assert (tree.name, tree.size, tree.depth, tree.top_k, tree.is_chain) == ("cpu-8", 8, 4, 2, False)
    # nodes sorted by depth then rank: [0] [1] [0,0] [0,1] [1,0] [0,0,0] [0,0,0,0]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3, 6]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3, 4]
    assert tree.node_rank.tolist() == [0, 0, 1, 0, 1, 0, 0, 0]
    assert tree.node_head.tolist() == [-1, 0, 0, 1, 1, 1, 2, 3]
    assert tree.retrieve_paths.tolist() == [[0, 1, 4, 4, 4], [0, 2, 5, 5, 5], [0, 1, 3, 6, 7]]
    assert tree.path_lengths.tolist() == [3, 3, 5]
    visible_from_7 = np.flatnonzero(tree.tree_mask[7] == 0).tolist()
    assert visible_from_7 == [0, 1, 3, 6, 7]
    assert np.isneginf(tree.tree_mask[4, [2, 3, 5, 6, 7]]).all()
    check_consistent(tree)


def test_mc_sim_7b_63():
    tree = load_tree("mc_sim_7b_63")
    assert (tree.size, tree.depth, tree.top_k, tree.is_chain) == (64, 4, 10, False)
    assert len(tree.retrieve_paths) == 42
    assert sorted(tree.path_lengths.tolist()) == [3] * 18 + [4] * 22 + [5] * 2
    check_consistent(tree)


@pytest.mark.parametrize("name", ["cpu-4", "cpu-12", "cpu-16"])
def test_cpu_presets_consistent(name):
    tree = load_tree(name)
    assert tree.size == int(name.split("-")[1])
    assert tree.depth <= 4
    check_consistent(tree)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_chain(n):
    tree = load_tree(f"chain-{n}")
    assert tree == chain(n)
    assert (tree.name, tree.size, tree.depth, tree.top_k, tree.is_chain) == (f"chain-{n}", n + 1, n, 1, True)
    assert tree.parents.tolist() == [-1] + list(range(n))
    assert tree.retrieve_paths.tolist() == [list(range(n + 1))]
    assert tree.path_lengths.tolist() == [n + 1]
    np.testing.assert_array_equal(tree.ancestor_mask, np.tril(np.ones((n + 1, n + 1), dtype=bool)))
    check_consistent(tree)


def test_plain_is_root_only():
    assert (PLAIN.size, PLAIN.depth, PLAIN.top_k, PLAIN.is_chain) == (1, 0, 0, True)
    assert PLAIN.tree_mask.tolist() == [[0.0]]
    assert PLAIN.retrieve_paths.tolist() == [[0]]
    assert PLAIN.path_lengths.tolist() == [1]


def test_order_and_duplicates_do_not_matter():
    choices = list(presets()["mc_sim_7b_63"])
    random.Random(0).shuffle(choices)
    shuffled = MedusaTree(tuple(map(tuple, choices + choices[:5])))
    reference = load_tree("mc_sim_7b_63")
    assert shuffled.choices == reference.choices
    np.testing.assert_array_equal(shuffled.retrieve_paths, reference.retrieve_paths)
    np.testing.assert_array_equal(shuffled.tree_mask, reference.tree_mask)


@pytest.mark.parametrize("choices,message", [
    (((0,), (0, 1, 0)), "no parent [0, 1]"),
    (((1, 0),), "no parent [1]"),
    (((0,), ()), "non-empty"),
    (((0,), (0, -1)), ">= 0"),
])
def test_invalid_trees(choices, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        MedusaTree(choices)


def test_json_tree_file(tmp_path):
    as_list = tmp_path / "my_tree.json"
    as_list.write_text(json.dumps([[0], [1], [0, 0]]))
    tree = load_tree(str(as_list))
    assert (tree.name, tree.size, tree.depth, tree.top_k) == ("my_tree", 4, 2, 2)
    assert tree.retrieve_paths.tolist() == [[0, 2, 2], [0, 1, 3]]
    as_dict = tmp_path / "wrapped.json"
    as_dict.write_text(json.dumps({"choices": [[0], [0, 0], [0, 0, 0]]}))
    assert load_tree(str(as_dict)).is_chain
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([[0], [2, 0]]))
    with pytest.raises(ValueError, match="no parent"):
        load_tree(str(broken))


def test_unknown_tree_lists_presets(tmp_path):
    with pytest.raises(ValueError) as err:
        load_tree("cpu-9")
    for name in ("chain-N", "cpu-4", "cpu-8", "cpu-12", "cpu-16", "mc_sim_7b_63", "JSON"):
        assert name in str(err.value)
    with pytest.raises(ValueError, match="missing.json does not exist"):
        load_tree(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("content,message", [
    ('{"paths": [[0]]}', "must hold a JSON list of paths"), ("[1, 2]", "must hold a JSON list of paths"),
    ('"cpu-8"', "must hold a JSON list of paths"), ('[[0], ["1"]]', "must hold a JSON list of paths"),
    ("[[0], [0.5]]", "must hold a JSON list of paths"), ("[[0], [0, 0]", "is not valid JSON"),
])
def test_malformed_tree_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"tree file {path} {message}"):
        load_tree(str(path))


def test_tree_deeper_than_heads():
    with pytest.raises(ValueError, match=r"'chain-4' is 4 levels deep but only 3 Medusa heads"):
        chain(4).check_heads(3)
    chain(4).check_heads(4)
    PLAIN.check_heads(0)


@pytest.fixture(scope="module")
def unloaded_model():
    """A tiny transformer with zero weights: enough to build (not run) the captured steps."""
    config = ModelConfig.from_hf({**TINY, "model_type": "llama"})
    return Transformer(config, Shard.whole("tiny", config.n_layers), max_context=128)


def test_shard_steps_check_tree_against_heads(unloaded_model):
    config = unloaded_model.config
    heads = MedusaHeads(MedusaConfig(2, 1, config.dim, config.vocab_size, "v2"), unloaded_model.lm_head)
    with pytest.raises(ValueError, match=r"'cpu-8' is 4 levels deep but only 2 Medusa heads"):
        ShardSteps(unloaded_model, load_tree("cpu-8"), heads)
    with pytest.raises(ValueError, match="needs Medusa heads"):
        ShardSteps(unloaded_model, chain(2), None)
    ShardSteps(unloaded_model, chain(2), heads)  # deep enough: no error


def test_shard_steps_reject_tree_larger_than_cache_slack():
    config = ModelConfig.from_hf({**TINY, "model_type": "llama"})
    model = Transformer(config, Shard.whole("tiny", config.n_layers), max_context=128, cache_slack=16)
    heads = MedusaHeads(MedusaConfig(4, 1, config.dim, config.vocab_size, "v2"), model.lm_head)
    with pytest.raises(ValueError, match="tree of 64 nodes exceeds the cache slack of 16"):
        ShardSteps(model, load_tree("mc_sim_7b_63"), heads, prefill_chunks=(16,))
    with pytest.raises(ValueError, match="prefill chunk of 128 exceeds the cache slack of 16"):
        ShardSteps(model, load_tree("cpu-8"), heads)
    ShardSteps(model, load_tree("cpu-16"), heads, prefill_chunks=(16, 8))  # all fit


def test_prefill_plan_fills_large_chunks_then_pads_one_small_one():
    config = ModelConfig.from_hf({**TINY, "model_type": "llama"})
    model = Transformer(config, Shard.whole("tiny", config.n_layers), max_context=1024)
    steps = ShardSteps(model)
    assert steps.prefill_plan(1) == [(0, 32)]
    assert steps.prefill_plan(56) == [(0, 32), (32, 32)]
    assert steps.prefill_plan(512) == [(0, 128), (128, 128), (256, 128), (384, 128)]
    assert steps.prefill_plan(300) == [(0, 128), (128, 128), (256, 32), (288, 32)]
