"""The transformer itself: layer shards chained by hand, tree attention against sequential decoding, one TinyJit
capture replayed at new start positions, and KV-cache compaction."""
import numpy as np
import pytest
from tinygrad import GlobalCounters, Tensor, TinyJit
from tinygrad.codegen import to_program_cache

from exo_tinygrad_medusa.model.loader import load_model
from exo_tinygrad_medusa.decoding.tree import load_tree
from exo_tinygrad_medusa.model.shard import Shard
from helpers_models import reference_logits

PROMPT = [5, 17, 200, 33, 9, 100, 250, 3]
N_LAYERS = 4


def _load_shards(tiny_model, arch: str, bounds: list[tuple[int, int]]):
    whole = tiny_model(arch)
    model_id = str(whole.resolved.path)
    shards = [tiny_model(arch, shard=Shard(model_id, start, end, N_LAYERS)).model for start, end in bounds]
    return whole.model, shards


def _run_chain(forward, shards, caches, x, start_pos: int):
    """Pass token ids through the first shard and hidden states through the rest; the last returns logits."""
    for model, cache in zip(shards, caches):
        x = forward(model, x, cache, start_pos)
    return x[1].numpy()[0]


@pytest.mark.parametrize("arch,bounds", [("llama", [(0, 1), (2, 3)]), ("qwen2", [(0, 0), (1, 2), (3, 3)])])
def test_shards_hold_only_their_layers(tiny_model, arch, bounds):
    _, shards = _load_shards(tiny_model, arch, bounds)
    for model, (start, end) in zip(shards, bounds):
        assert sorted(model.layers) == list(range(start, end + 1))
        assert hasattr(model, "embed_tokens") == (start == 0)
        assert hasattr(model, "lm_head") == hasattr(model, "norm") == (end == N_LAYERS - 1)
        names = set(model.parameters())
        layer_ids = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        assert layer_ids == set(range(start, end + 1))
        assert ("model.embed_tokens.weight" in names) == (start == 0)
        assert ("lm_head.weight" in names) == (end == N_LAYERS - 1)
        assert len(model.new_cache().layers) == end - start + 1


@pytest.mark.parametrize("arch,bounds", [("llama", [(0, 1), (2, 3)]), ("qwen2", [(0, 0), (1, 2), (3, 3)])])
def test_shards_in_sequence_equal_whole_model(tiny_model, engine, arch, bounds):
    whole, shards = _load_shards(tiny_model, arch, bounds)
    whole_cache, shard_caches = whole.new_cache(), [s.new_cache() for s in shards]
    whole_logits = engine.forward(whole, PROMPT, whole_cache, 0)[1].numpy()[0]
    shard_logits = _run_chain(engine.forward, shards, shard_caches, PROMPT, 0)
    np.testing.assert_allclose(shard_logits, whole_logits, atol=1e-5, rtol=0)

    # greedy decoding, one token per step, each shard keeping its own layers' cache
    whole_ids, shard_ids = [int(whole_logits[-1].argmax())], [int(shard_logits[-1].argmax())]
    for step in range(20):
        pos = len(PROMPT) + step
        whole_logits = engine.forward(whole, [whole_ids[-1]], whole_cache, pos)[1].numpy()[0]
        shard_logits = _run_chain(engine.forward, shards, shard_caches, [shard_ids[-1]], pos)
        np.testing.assert_allclose(shard_logits, whole_logits, atol=1e-5, rtol=0)
        whole_ids.append(int(whole_logits[-1].argmax()))
        shard_ids.append(int(shard_logits[-1].argmax()))
    assert shard_ids == whole_ids
    # and the whole model itself decodes what the independent numpy forward predicts
    ids = PROMPT + whole_ids
    assert reference_logits(tiny_model(arch).resolved.path, ids[:-1])[len(PROMPT) - 1:].argmax(-1).tolist() == whole_ids


def test_shard_layer_count_must_match_config(tiny_checkpoint):
    directory = str(tiny_checkpoint("llama"))
    with pytest.raises(ValueError, match="shard says the model has 6 layers, its config says 4"):
        load_model(directory, Shard(directory, 0, 2, 6))


# -- tree attention -------------------------------------------------------------------------------------------------

def _tree_tokens(size: int) -> list[int]:
    return np.random.default_rng(7).integers(3, 320, size).tolist()


def test_tree_step_equals_sequential_paths(tiny_model, engine):
    """Every node of a tree step sees exactly the prefix and its own ancestors, at position start + depth."""
    loaded = tiny_model("llama")
    model, tree = loaded.model, load_tree("cpu-8")
    assert not tree.is_chain and len(set(tree.depths.tolist())) < tree.size  # siblings share positions
    tokens = _tree_tokens(tree.size)
    cache = model.new_cache()
    engine.forward(model, PROMPT, cache, 0)
    start = len(PROMPT)
    _, logits = model.forward(Tensor([tokens], dtype="int32"), cache, engine.start_pos(model).bind(start),
                              Tensor(tree.depths), Tensor(tree.tree_mask))
    tree_logits = logits.numpy()[0]
    assert tree_logits.shape == (tree.size, model.config.vocab_size)

    for node in range(tree.size):
        path = np.flatnonzero(tree.ancestor_mask[node]).tolist()  # root .. node
        assert len(path) == tree.depths[node] + 1
        # sequential decoding overwrites the slots after the prefix, so one prefilled cache serves every path
        for depth, n in enumerate(path):
            _, step_logits = engine.forward(model, [tokens[n]], cache, start + depth)
        np.testing.assert_allclose(tree_logits[node], step_logits.numpy()[0, -1], atol=1e-4, rtol=0)
        expected = reference_logits(loaded.resolved.path, PROMPT + [tokens[n] for n in path])[-1]
        np.testing.assert_allclose(tree_logits[node], expected, atol=1e-4, rtol=0)


def _compiled_kernels() -> int:
    # tinygrad lowers and compiles each distinct kernel once per process and keeps it here
    return len(to_program_cache)


def test_compile_counter_sees_new_kernels():
    before = _compiled_kernels()
    (Tensor(np.arange(37, dtype=np.float32)) * 7 + 1234567).realize()  # a kernel no other test builds
    assert _compiled_kernels() > before


def test_tree_step_jit_replays_at_new_start_pos_without_compiling(tiny_model, engine):
    model, tree = tiny_model("llama").model, load_tree("cpu-8")
    depths, mask = Tensor(tree.depths).realize(), Tensor(tree.tree_mask).realize()
    pos_var = engine.start_pos(model)

    @TinyJit
    def tree_step(x: Tensor, layers: list[Tensor], start_pos) -> Tensor:
        return model.forward(x, layers, start_pos, depths, mask)[1].realize()

    cache = model.new_cache()
    engine.forward(model, PROMPT, cache, 0)
    x = Tensor([_tree_tokens(tree.size)], dtype="int32").realize()
    start = len(PROMPT)
    tree_step(x, cache.layers, pos_var.bind(start))      # runs eagerly
    tree_step(x, cache.layers, pos_var.bind(start + 3))  # captures
    captured, kernels = tree_step.captured, _compiled_kernels()
    assert captured is not None and tree_step.cnt == 2

    for pos in (start + 7, start + 40, model.max_context - tree.size):
        launched = GlobalCounters.kernel_count
        replayed = tree_step(x, cache.layers, pos_var.bind(pos)).numpy()
        assert GlobalCounters.kernel_count > launched
        # the same kernels again (same tokens, same cache prefix), now eagerly, must give the same logits
        eager = model.forward(x, cache.layers, pos_var.bind(pos), depths, mask)[1].numpy()
        np.testing.assert_allclose(replayed, eager, atol=1e-5, rtol=0)
    assert tree_step.captured is captured and tree_step.cnt == 5
    assert _compiled_kernels() == kernels, "replaying the capture at new start positions compiled new kernels"


# -- KV compaction --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("symbolic", [False, True])
def test_compact_moves_kept_entries(tiny_model, engine, symbolic):
    model = tiny_model("llama").model
    cache = model.new_cache()
    rng = np.random.default_rng(3)
    for layer in cache.layers:
        layer.assign(Tensor(rng.standard_normal(layer.shape).astype(np.float32))).realize()
    before = [layer.numpy() for layer in cache.layers]
    start = 11
    keep = np.array([0, 3, 6, 7, 2, 5, 1, 4], dtype=np.int32)  # accepted nodes first, then anything
    cache.compact(engine.start_pos(model).bind(start) if symbolic else start, Tensor(keep))
    for old, layer in zip(before, cache.layers):
        expected = old.copy()
        expected[:, :, :, start:start + len(keep)] = old[:, :, :, start + keep]
        np.testing.assert_array_equal(layer.numpy(), expected)
