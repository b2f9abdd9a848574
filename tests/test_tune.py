"""`exo-medusa tune-tree`: the sparse-tree construction, head-accuracy counting, and a run on a tiny model."""
import json

import numpy as np
import pytest

from exo_tinygrad_medusa.cli import main
from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.decoding.heads import load_heads, random_heads
from exo_tinygrad_medusa.decoding.tree import PLAIN, MedusaTree, load_tree
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.decoding.session import default_tree_spec
from exo_tinygrad_medusa.bench.tune import build_tree, count_hits, grow_order

# path probabilities: (0,) .6, (0,0) .3, (1,) .25, (1,0) .125, (2,) .1, (0,1) .072, (2,0) .05, (1,1) .03, ...
ACC = np.array([[0.6, 0.25, 0.1], [0.5, 0.12, 0.04]])


def test_grow_order_adds_the_most_probable_path_first():
    order = grow_order(ACC, 8)
    assert [path for path, _ in order] == [(0,), (0, 0), (1,), (1, 0), (2,), (0, 1), (2, 0), (1, 1)]
    assert [p for _, p in order] == pytest.approx([0.6, 0.3, 0.25, 0.125, 0.1, 0.072, 0.05, 0.03])


def test_every_prefix_of_the_order_is_a_valid_tree():
    acc = np.random.default_rng(0).uniform(0, 1, (4, 10))
    order = grow_order(acc, 63)
    probs = [p for _, p in order]
    assert probs == sorted(probs, reverse=True)
    for n in range(1, len(order) + 1):
        MedusaTree(tuple(path for path, _ in order[:n]))  # raises if a node lacks its parent


def test_build_tree_keeps_the_size_with_the_best_tokens_per_cost():
    # expected accept 1, 1.6, 1.9, 2.15, 2.275 ... at costs 1, 1.05, 1.075, 1.1, 1.325 ...: 4 nodes win (1.95x)
    tuned = build_tree(ACC, {1: 1.0, 2: 1.05, 4: 1.1, 8: 2.0})
    assert tuned.choices == [(0,), (0, 0), (1,)]
    assert tuned.size == 4
    assert tuned.expected_accept == pytest.approx(2.15)
    assert tuned.expected_speedup == pytest.approx(2.15 / 1.1)


def test_build_tree_looks_past_a_dip_in_the_ratio():
    # from 2 to 3 nodes the ratio drops (1.6 -> 1.58), then the flat cost lets 8 nodes win
    tuned = build_tree(ACC, {1: 1.0, 2: 1.0, 3: 1.2, 8: 1.2})
    assert tuned.choices == [(0,), (0, 0), (1,), (1, 0), (2,), (0, 1), (2, 0)]
    assert tuned.expected_speedup == pytest.approx(2.497 / 1.2)


def test_build_tree_charges_the_proposal_cost_to_every_tree_but_the_root():
    # speeds with a head cost of 0.5: 1.6/1.55, 1.9/1.575, 2.15/1.6, 2.275/1.825: 4 nodes still win
    tuned = build_tree(ACC, {1: 1.0, 2: 1.05, 4: 1.1, 8: 2.0}, head_cost=0.5)
    assert tuned.choices == [(0,), (0, 0), (1,)] and tuned.expected_speedup == pytest.approx(2.15 / 1.6)
    # with proposals costing more than a step no tree beats plain decoding: the root alone
    plain = build_tree(ACC, {1: 1.0, 2: 1.05, 4: 1.1, 8: 2.0}, head_cost=1.2)
    assert plain.choices == [] and plain.expected_accept == 1.0 and plain.expected_speedup == 1.0


def test_build_tree_limits_and_degenerate_inputs():
    assert build_tree(ACC, {1: 1.0, 64: 1.0}, max_size=3).choices == [(0,), (0, 0)]
    assert build_tree(np.zeros((2, 3)), {1: 1.0, 8: 1.0}).choices == []       # nothing is ever accepted
    assert build_tree(ACC, {1: 1.0, 2: 3.0}).choices == []                     # verifying is too expensive
    # measured dips below t(1) are noise: a 2-node tree costs at least a plain step
    assert build_tree(ACC, {1: 1.0, 2: 0.5}).expected_speedup == pytest.approx(1.6)
    with pytest.raises(ValueError, match="must include T = 1"):
        build_tree(ACC, {2: 1.0})
    with pytest.raises(ValueError, match="array of probabilities"):
        build_tree(np.array([[1.5]]), {1: 1.0})


def test_count_hits_scores_head_k_against_the_token_k_plus_2_ahead():
    seq = np.array([5, 6, 7, 8, 9, 10])  # the prompt is 5, 6; generated 7..10
    topk = np.zeros((2, 6, 2), dtype=np.int32)
    topk[0, :, 0] = [0, 8, 9, 0, 0, 0]    # head 0 at row t guesses seq[t + 2] right at rows 1 and 2, rank 0
    topk[0, 3, 1] = 10                    # ... and at row 3 with its rank-1 candidate
    topk[1, :, 1] = [0, 9, 0, 0, 0, 0]    # head 1 at row 1 guesses seq[4] with rank 1
    hits, counts = count_hits(topk, seq, first_row=1)
    assert counts.tolist() == [3, 2]      # rows 1..3 for head 0, rows 1..2 for head 1
    assert hits.tolist() == [[2, 1], [0, 1]]


def test_tune_tree_writes_a_tree_that_runs_losslessly(tiny_model, tmp_path, capsys):
    loaded = tiny_model()
    model, eos = loaded.model, loaded.tokenizer.eos_token_ids
    heads_dir = tmp_path / "heads"
    random_heads(loaded.config, model.lm_head, num_heads=3, num_layers=1, seed=1).save(heads_dir)
    prompts = tmp_path / "calibration.jsonl"
    prompts.write_text('{"category": "a", "turns": ["hello there"]}\n{"category": "b", "prompt": "one two three"}\n')
    code = main(["tune-tree", str(loaded.resolved.path), "--medusa-heads", str(heads_dir), "--prompts", str(prompts),
                 "--max-generate-tokens", "20", "--cost-sizes", "1,2,4,8", "--cost-reps", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    tree_file = heads_dir / "tree-cpu.json"
    assert f"Wrote {tree_file}" in captured.out
    data = json.loads(tree_file.read_text())
    assert list(data["cost_curve"]) == ["1", "2", "4", "8"] and data["cost_curve"]["1"] == 1.0
    assert data["head_cost"] > 0
    acc = np.array(data["accuracy"])
    assert acc.shape == (3, 10) and ((0 <= acc) & (acc <= 1)).all()
    positions = data["calibration_positions"]
    assert positions[0] >= positions[1] >= positions[2] > 0  # head k scores rows with a token k + 2 ahead
    assert default_tree_spec("CPU", str(heads_dir)) == str(tree_file)

    tuned = load_tree(str(tree_file))
    assert tuned.size <= 8 and tuned.depth <= 3 and tuned.top_k <= 10
    assert data["expected_accept"] >= 1.0

    # bench with these heads picks the tuned tree up on its own and must reproduce plain greedy
    report_file = tmp_path / "bench.json"
    assert main(["bench", str(loaded.resolved.path), "--medusa-heads", str(heads_dir), "--prompts", str(prompts),
                 "--max-generate-tokens", "12", "--cost-sizes", "", "--json", str(report_file)]) == 0
    summary = json.loads(report_file.read_text())["summary"]
    assert summary["tree"] == "tree-cpu" and summary["tree_size"] == tuned.size and summary["identical"] is True

    # the measured accuracies under a free verify give a full 8-node tree: it must be lossless too
    wide = MedusaTree(tuple(build_tree(acc, {1: 1.0, 8: 1.0}).choices), "wide")
    assert wide.size == 8
    heads = load_heads(str(heads_dir), loaded.config, model.lm_head)
    prompt = loaded.tokenizer.encode_chat([{"role": "user", "content": "hello there"}])
    cfg = GenerationConfig(max_new_tokens=16)
    expected = Generator(model, eos, PLAIN).generate(prompt, cfg).generated_ids
    assert Generator(model, eos, wide, heads).generate(prompt, cfg).generated_ids == expected


def test_tune_tree_argument_errors(tiny_checkpoint, tmp_path, capsys):
    assert main(["tune-tree", str(tiny_checkpoint()), "--medusa-heads", "x", "--medusa-choices", "cpu-8"]) == 2
    assert "tune-tree builds the tree: --medusa-choices does not apply" in capsys.readouterr().err
    assert main(["tune-tree", str(tiny_checkpoint()), "--medusa-heads", "x", "--cost-sizes", "2,4"]) == 2
    assert "--cost-sizes must include 1" in capsys.readouterr().err
