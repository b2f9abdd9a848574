"""Medusa heads: the forward against numpy, checkpoints (safetensors and torch .pt) and the errors bad heads raise."""
import json
import shutil
import struct
import zipfile

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tinygrad import Tensor

from exo_tinygrad_medusa.model.config import ModelConfig
from exo_tinygrad_medusa.decoding.heads import WEIGHTS_FILE, MedusaConfig, MedusaHeads, load_heads, random_heads
from exo_tinygrad_medusa.decoding.tree import load_tree
from exo_tinygrad_medusa.model.transformer import Linear, Transformer
from exo_tinygrad_medusa.kernels.packed import Q8_0, PackedWeight, pack_ggml
from exo_tinygrad_medusa.model.shard import Shard
from exo_tinygrad_medusa.decoding.steps import ShardSteps
from helpers_models import TINY

DIM, VOCAB = TINY["hidden_size"], TINY["vocab_size"]


@pytest.fixture(scope="module")
def model_config() -> ModelConfig:
    return ModelConfig.from_hf({**TINY, "model_type": "llama"})


@pytest.fixture(scope="module")
def base_lm_head() -> Tensor:
    rng = np.random.default_rng(7)
    return Tensor((rng.standard_normal((VOCAB, DIM)) * DIM ** -0.5).astype(np.float32)).realize()


@pytest.fixture(scope="module")
def hidden() -> np.ndarray:
    return np.random.default_rng(8).standard_normal((5, DIM)).astype(np.float32)


def numpy_state(heads: MedusaHeads) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in heads.state_dict().items()}


def numpy_logits(state: dict[str, np.ndarray], num_heads: int, num_layers: int, base: np.ndarray, h: np.ndarray):
    """Independent forward from the published layout: ResBlocks x + SiLU(W x + b), then the head's own lm_head
    (`{head}.{num_layers}.weight`, v1) or the base model's (v2)."""
    out = []
    for k in range(num_heads):
        x = h.astype(np.float64)
        for layer in range(num_layers):
            z = x @ state[f"{k}.{layer}.linear.weight"].T + state[f"{k}.{layer}.linear.bias"]
            x = x + z / (1 + np.exp(-z))
        out.append(x @ state.get(f"{k}.{num_layers}.weight", base).T)
    return np.stack(out)


@pytest.mark.parametrize("fmt,num_layers", [("v1", 1), ("v2", 1), ("v2", 2), ("v1", 0)])
def test_forward_matches_numpy(model_config, base_lm_head, hidden, fmt, num_layers):
    heads = random_heads(model_config, base_lm_head, num_heads=3, num_layers=num_layers, fmt=fmt, seed=1, scale=0.3)
    logits = heads(Tensor(hidden)).numpy()
    assert logits.shape == (3, 5, VOCAB)
    expected = numpy_logits(numpy_state(heads), 3, num_layers, base_lm_head.numpy(), hidden)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
    # the scale makes each head disagree with the base model's own next-token guess somewhere
    base_top = (hidden @ base_lm_head.numpy().T).argmax(-1)
    assert (logits.argmax(-1) != base_top).any()
    feats = heads.features(Tensor(hidden))
    assert len(feats) == 3 and all(f.shape == (5, DIM) for f in feats)


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_fresh_heads_start_as_copies_of_the_base_lm_head(model_config, base_lm_head, hidden, fmt):
    heads = MedusaHeads(MedusaConfig(2, 1, DIM, VOCAB, fmt), base_lm_head)
    base = hidden @ base_lm_head.numpy().T
    np.testing.assert_allclose(heads(Tensor(hidden)).numpy(), np.stack([base, base]), atol=1e-5)
    assert len(heads.trainable()) == 2 * 2 + (2 if fmt == "v1" else 0)


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_save_load_round_trip(tmp_path, model_config, base_lm_head, hidden, fmt):
    heads = random_heads(model_config, base_lm_head, num_heads=3, num_layers=1, fmt=fmt, seed=2, scale=0.3)
    out = heads.save(tmp_path / "heads")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", WEIGHTS_FILE]
    config = json.loads((out / "config.json").read_text())
    assert config == {"medusa_num_heads": 3, "medusa_num_layers": 1, "hidden_size": DIM, "vocab_size": VOCAB,
                      "medusa_format": fmt, "base_model_name_or_path": ""}
    expected_keys = {f"{k}.0.linear.{p}" for k in range(3) for p in ("weight", "bias")}
    expected_keys |= {f"{k}.1.weight" for k in range(3)} if fmt == "v1" else set()
    assert set(heads.state_dict()) == expected_keys
    expected = heads(Tensor(hidden)).numpy()
    for path in (out, out / WEIGHTS_FILE):  # the directory, or its weights file next to config.json
        loaded = load_heads(str(path), model_config, base_lm_head)
        assert loaded.config == heads.config
        np.testing.assert_array_equal(loaded(Tensor(hidden)).numpy(), expected)


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_published_config_without_format_or_sizes(tmp_path, model_config, base_lm_head, hidden, fmt):
    """Medusa's own config.json names only the head and layer counts: the format comes from the weights."""
    heads = random_heads(model_config, base_lm_head, num_heads=2, num_layers=1, fmt=fmt, seed=3, scale=0.3)
    out = heads.save(tmp_path / "heads")
    (out / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1,
                                                 "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}))
    loaded = load_heads(str(out), model_config, base_lm_head)
    assert (loaded.config.medusa_format, loaded.config.base_model_name_or_path) == (fmt, "lmsys/vicuna-7b-v1.3")
    np.testing.assert_array_equal(loaded(Tensor(hidden)).numpy(), heads(Tensor(hidden)).numpy())


# -- torch checkpoints, written without torch ---------------------------------------------------------------------
def _pickle_str(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()  # BINUNICODE


def _pickle_int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)  # BININT


def _pickle_ints(values) -> bytes:
    return b"(" + b"".join(_pickle_int(v) for v in values) + b"t"  # MARK ... TUPLE


def write_torch_checkpoint(path, tensors: dict[str, np.ndarray]) -> None:
    """What torch.save(state_dict) writes: a zip with archive/data.pkl (protocol 2) whose tensors are
    torch._utils._rebuild_tensor_v2(persistent storage id, offset, size, stride, requires_grad, hooks) and whose
    storages are raw little-endian float32 files archive/data/<key>."""
    pkl = bytearray(b"\x80\x02" + b"}(")  # PROTO 2, EMPTY_DICT, MARK
    storages = {}
    for key, (name, array) in enumerate(tensors.items()):
        array = np.ascontiguousarray(array, dtype=np.float32)
        storages[str(key)] = array.tobytes()
        strides = [s // 4 for s in array.strides]
        pkl += _pickle_str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n" + b"("
        pkl += b"(" + _pickle_str("storage") + b"ctorch\nFloatStorage\n" + _pickle_str(str(key)) + _pickle_str("cpu")
        pkl += _pickle_int(array.size) + b"tQ"  # TUPLE, BINPERSID
        pkl += _pickle_int(0) + _pickle_ints(array.shape) + _pickle_ints(strides) + b"\x89"  # NEWFALSE
        pkl += b"ccollections\nOrderedDict\n)R"  # OrderedDict() for backward hooks
        pkl += b"tR"  # TUPLE, REDUCE
    pkl += b"u."  # SETITEMS, STOP
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", bytes(pkl))
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("fmt,prefix", [("v1", ""), ("v2", "medusa_head.")])
def test_load_torch_pt_checkpoint(tmp_path, model_config, base_lm_head, hidden, fmt, prefix):
    heads = random_heads(model_config, base_lm_head, num_heads=2, num_layers=1, fmt=fmt, seed=4, scale=0.3)
    out = tmp_path / "pt_heads"
    out.mkdir()
    write_torch_checkpoint(out / "medusa_lm_head.pt", {prefix + k: v for k, v in numpy_state(heads).items()})
    (out / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    loaded = load_heads(str(out), model_config, base_lm_head)
    assert loaded.config.medusa_format == fmt
    np.testing.assert_array_equal(loaded(Tensor(hidden)).numpy(), heads(Tensor(hidden)).numpy())


# -- bad heads ------------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_v1(tmp_path, model_config, base_lm_head):
    heads = random_heads(model_config, base_lm_head, num_heads=2, num_layers=1, fmt="v1", seed=5, scale=0.3)
    return heads.save(tmp_path / "heads")


def test_wrong_hidden_size(tmp_path, model_config, base_lm_head):
    narrow = ModelConfig.from_hf({**TINY, "model_type": "llama", "hidden_size": 32})
    heads = random_heads(narrow, Tensor.zeros(VOCAB, 32).contiguous(), num_heads=2, num_layers=1, fmt="v2")
    out = heads.save(tmp_path / "narrow")
    with pytest.raises(ValueError, match="hidden size 32 but the model's hidden size is 64"):
        load_heads(str(out), model_config, base_lm_head)
    # a published config.json without hidden_size: the size is read off the weights
    (out / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    with pytest.raises(ValueError, match="hidden size 32 but the model's hidden size is 64"):
        load_heads(str(out), model_config, base_lm_head)


def test_wrong_vocab_size(tmp_path, model_config, base_lm_head, saved_v1):
    small = ModelConfig.from_hf({**TINY, "model_type": "llama", "vocab_size": 300})
    with pytest.raises(ValueError, match="vocab size 320 but the model's vocab size is 300"):
        load_heads(str(saved_v1), small, base_lm_head[:300])
    (saved_v1 / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    with pytest.raises(ValueError, match="vocab size 320 but the model's vocab size is 300"):
        load_heads(str(saved_v1), small, base_lm_head[:300])


def test_too_few_heads_for_the_tree(model_config, base_lm_head, saved_v1):
    heads = load_heads(str(saved_v1), model_config, base_lm_head)
    tree = load_tree("cpu-8")
    with pytest.raises(ValueError, match=r"'cpu-8' is 4 levels deep but only 2 Medusa heads are loaded"):
        tree.check_heads(heads.num_heads)
    model = Transformer(model_config, Shard.whole("tiny", model_config.n_layers), max_context=64)
    with pytest.raises(ValueError, match="4 levels deep but only 2 Medusa heads"):
        ShardSteps(model, tree, heads)


@pytest.mark.parametrize("keep", [0.5, 20])
def test_truncated_safetensors(model_config, base_lm_head, saved_v1, keep):
    path = saved_v1 / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(ValueError, match=f"Medusa heads file {path} is corrupt or unreadable"):
        load_heads(str(saved_v1), model_config, base_lm_head)


def test_corrupt_torch_file(tmp_path, model_config, base_lm_head):
    out = tmp_path / "pt"
    out.mkdir()
    (out / "medusa_lm_head.pt").write_bytes(b"not a torch file" * 10)
    (out / "config.json").write_text(json.dumps({"medusa_num_heads": 1, "medusa_num_layers": 1}))
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        load_heads(str(out), model_config, base_lm_head)


def test_missing_files(tmp_path, model_config, base_lm_head, saved_v1):
    no_config = tmp_path / "no_config"
    shutil.copytree(saved_v1, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_heads(str(no_config), model_config, base_lm_head)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(saved_v1, no_weights)
    (no_weights / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {WEIGHTS_FILE}"):
        load_heads(str(no_weights), model_config, base_lm_head)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_heads(str(tmp_path / "nowhere"), model_config, base_lm_head)


def test_bad_config_and_tensors(model_config, base_lm_head, saved_v1):
    config_path = saved_v1 / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match="config .* is invalid"):
        load_heads(str(saved_v1), model_config, base_lm_head)
    config_path.write_text(json.dumps({**config, "medusa_num_heads": 3}))
    with pytest.raises(ValueError, match=r"missing tensor '2.0.linear.weight' for 3 heads x 1 layers"):
        load_heads(str(saved_v1), model_config, base_lm_head)
    config_path.write_text(json.dumps(config))
    weights = load_file(str(saved_v1 / WEIGHTS_FILE))
    save_file({**weights, "1.0.linear.bias": weights["1.0.linear.bias"][:32]}, str(saved_v1 / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"tensor 1.0.linear.bias: shape \(32,\), expected \(64,\)"):
        load_heads(str(saved_v1), model_config, base_lm_head)


def test_use_first(model_config, base_lm_head, hidden):
    for fmt in ("v1", "v2"):
        heads = random_heads(model_config, base_lm_head, num_heads=4, num_layers=1, fmt=fmt, seed=6, scale=0.3)
        full = heads(Tensor(hidden)).numpy()
        assert heads.use_first(4).num_heads == 4
        first_two = heads.use_first(2)
        assert first_two.num_heads == first_two.config.medusa_num_heads == 2
        np.testing.assert_array_equal(first_two(Tensor(hidden)).numpy(), full[:2])
        assert len(first_two.state_dict()) == 2 * (3 if fmt == "v1" else 2)
    heads = random_heads(model_config, base_lm_head, num_heads=4, num_layers=1, fmt="v2")
    with pytest.raises(ValueError, match="--medusa-num-heads 5: the checkpoint has 4 heads"):
        heads.use_first(5)
    with pytest.raises(ValueError, match="--medusa-num-heads 0: the checkpoint has 4 heads"):
        heads.use_first(0)
    with pytest.raises(ValueError, match="--medusa-num-layers 2: the checkpoint has 1 layers"):
        heads.use_first(num_layers=2)


# -- proposal vocabulary ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_restricted_heads_propose_only_their_vocabulary(tmp_path, model_config, base_lm_head, hidden, fmt):
    heads = random_heads(model_config, base_lm_head, num_heads=3, num_layers=1, fmt=fmt, seed=4, scale=0.3)
    full = heads(Tensor(hidden)).numpy()                                              # (3, 5, VOCAB)
    vocab_ids = np.random.default_rng(5).choice(VOCAB, size=VOCAB // 3, replace=False)
    heads.restrict_vocab(vocab_ids)
    allowed = np.sort(vocab_ids)
    # reference: the full logits with every other token masked out, ranked best first
    masked = np.full_like(full, -np.inf)
    masked[..., allowed] = full[..., allowed]
    expected = np.argsort(-masked, axis=-1, kind="stable")[..., :4]
    proposed = heads.propose(Tensor(hidden), 4).numpy()
    assert proposed.shape == (3, 5, 4)
    np.testing.assert_array_equal(proposed, expected)
    np.testing.assert_allclose(heads(Tensor(hidden)).numpy(), full[..., allowed], rtol=1e-5, atol=1e-5)
    heads.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["medusa_proposal_vocab_size"] == len(allowed)
    loaded = load_heads(str(tmp_path), model_config, base_lm_head)
    np.testing.assert_array_equal(loaded.vocab_ids.numpy(), allowed)
    np.testing.assert_array_equal(loaded.propose(Tensor(hidden), 4).numpy(), expected)


@pytest.mark.parametrize("fmt", ["v2", "hydra"])
def test_proposals_read_a_packed_lm_head_as_its_float_values(tmp_path, model_config, hidden, fmt):
    """Heads on a GGUF model read their proposal rows from the packed logits weight: the same tokens and logits as
    from the float lm_head those codes stand for."""
    rng = np.random.default_rng(11)
    blocks = np.zeros((VOCAB, DIM // 32, 34), np.uint8)  # Q8_0
    blocks[..., 0:2] = rng.uniform(0.001, 0.02, (VOCAB, DIM // 32, 1)).astype(np.float16).view(np.uint8)
    blocks[..., 2:] = rng.integers(0, 256, (VOCAB, DIM // 32, 32), dtype=np.uint8)
    packed = pack_ggml(blocks.reshape(-1), Q8_0, (VOCAB, DIM))
    logits_product = Linear(DIM, VOCAB)
    Tensor.realize(*logits_product.set(packed))
    dense = logits_product.matrix().contiguous().realize()
    random_heads(model_config, dense, num_heads=2, num_layers=1, fmt=fmt, seed=3, scale=0.3) \
        .restrict_vocab(np.random.default_rng(12).choice(VOCAB, size=VOCAB // 4, replace=False)).save(tmp_path)
    on_floats = load_heads(str(tmp_path), model_config, dense)
    on_codes = load_heads(str(tmp_path), model_config, dense, packed_lm_head=logits_product.weight)
    assert on_floats._vocab_product.weight.__class__ is Tensor and on_codes._vocab_product.weight.__class__ is PackedWeight
    root = Tensor(np.arange(5, dtype=np.int32) * 7)
    np.testing.assert_array_equal(on_codes.propose(Tensor(hidden), 4, root=root).numpy(),
                                  on_floats.propose(Tensor(hidden), 4, root=root).numpy())
    if fmt == "v2":
        np.testing.assert_allclose(on_codes(Tensor(hidden)).numpy(), on_floats(Tensor(hidden)).numpy(), rtol=1e-5, atol=1e-5)


def test_unrestricted_proposals_are_the_top_k_of_the_full_vocabulary(model_config, base_lm_head, hidden):
    heads = random_heads(model_config, base_lm_head, num_heads=2, num_layers=1, fmt="v2", seed=9, scale=0.3)
    full = heads(Tensor(hidden)).numpy()
    np.testing.assert_array_equal(heads.propose(Tensor(hidden), 3).numpy(), np.argsort(-full, axis=-1)[..., :3])


@pytest.mark.parametrize("ids,message", [
    (np.array([0, 1, VOCAB]), "distinct token ids below"),
    (np.array([3, 3, 4]), "distinct token ids below"),
    (np.zeros((0,), dtype=np.int32), "1.."),
])
def test_bad_proposal_vocabulary(tmp_path, model_config, base_lm_head, ids, message):
    heads = random_heads(model_config, base_lm_head, num_heads=1, num_layers=1, fmt="v2")
    with pytest.raises(ValueError, match=message):
        heads.restrict_vocab(ids)
    heads.save(tmp_path)
    weights = load_file(str(tmp_path / WEIGHTS_FILE))
    save_file({**weights, "vocab_ids": ids.astype(np.int32)}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=message):
        load_heads(str(tmp_path), model_config, base_lm_head)


@pytest.mark.parametrize("kwargs,message", [
    (dict(medusa_num_heads=0), "medusa_num_heads must be >= 1"),
    (dict(medusa_num_layers=-1), "medusa_num_layers must be >= 0"),
    (dict(medusa_format="v3"), "medusa_format must be one of v1, v2, hydra, got 'v3'"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MedusaConfig(**{**dict(medusa_num_heads=2, medusa_num_layers=1, hidden_size=DIM, vocab_size=VOCAB), **kwargs})


def test_v1_needs_base_lm_head():
    with pytest.raises(ValueError, match="pass base_lm_head"):
        MedusaHeads(MedusaConfig(1, 1, DIM, VOCAB, "v1"))


# -- sequential (hydra) heads -------------------------------------------------------------------------------------
def numpy_hydra_propose(state: dict[str, np.ndarray], num_heads: int, base: np.ndarray, h: np.ndarray,
                        root: np.ndarray, k: int, allowed: np.ndarray) -> np.ndarray:
    """Independent sequential proposal: head j's input is head j-1's output state (h for head 0) plus its token map
    of the lm_head row of the token it continues (the root, then head j-1's best candidate)."""
    out, x, token = [], h.astype(np.float64), root
    for j in range(num_heads):
        x = x + base[token] @ state[f"{j}.token.weight"].T
        z = x @ state[f"{j}.0.linear.weight"].T + state[f"{j}.0.linear.bias"]
        x = x + z / (1 + np.exp(-z))
        logits = x @ base[allowed].T
        ranked = allowed[np.argsort(-logits, axis=-1, kind="stable")[..., :k]]
        out.append(ranked)
        token = ranked[..., 0]
    return np.stack(out)


def test_hydra_heads_continue_the_root_then_their_own_best_guess(tmp_path, model_config, base_lm_head, hidden):
    heads = random_heads(model_config, base_lm_head, num_heads=3, num_layers=1, fmt="hydra", seed=11, scale=0.3)
    allowed = np.sort(np.random.default_rng(12).choice(VOCAB, size=VOCAB // 2, replace=False))
    heads.restrict_vocab(allowed)
    root = np.array([3, 17, 3, 40, 0], dtype=np.int32)
    expected = numpy_hydra_propose(numpy_state(heads), 3, base_lm_head.numpy(), hidden, root, 4, allowed)
    np.testing.assert_array_equal(heads.propose(Tensor(hidden), 4, root=Tensor(root)).numpy(), expected)
    # the token matters: another root changes the proposals of the same hidden states
    other = heads.propose(Tensor(hidden), 4, root=Tensor(root + 1)).numpy()
    assert (other[0] != expected[0]).any()
    heads.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_format"] == "hydra"
    assert {f"{j}.token.weight" for j in range(3)} <= set(load_file(str(tmp_path / WEIGHTS_FILE)))
    loaded = load_heads(str(tmp_path), model_config, base_lm_head)
    np.testing.assert_array_equal(loaded.propose(Tensor(hidden), 4, root=Tensor(root)).numpy(), expected)
    # teacher-forced features (training) with the proposal's own tokens reproduce the proposal's logits
    tokens = np.stack([root, expected[0, :, 0], expected[1, :, 0]], axis=-1).astype(np.int32)
    logits = loaded(Tensor(hidden), tokens=Tensor(tokens)).numpy()
    np.testing.assert_array_equal(allowed[logits.argmax(-1)], expected[..., 0])


def test_hydra_heads_need_their_tokens(model_config, base_lm_head, hidden):
    heads = MedusaHeads(MedusaConfig(2, 1, DIM, VOCAB, "hydra"), base_lm_head)
    with pytest.raises(ValueError, match="sequential \\(hydra\\) heads propose from the root token"):
        heads.propose(Tensor(hidden), 2)
    with pytest.raises(ValueError, match="sequential \\(hydra\\) heads need the tokens they continue"):
        heads(Tensor(hidden))
    # fresh: zero token maps and ResBlocks, every head starts as a copy of the base lm_head, whatever the tokens
    base = hidden @ base_lm_head.numpy().T
    tokens = Tensor(np.ones((5, 2), dtype=np.int32))
    np.testing.assert_allclose(heads(Tensor(hidden), tokens=tokens).numpy(), np.stack([base, base]), atol=1e-5)
    assert len(heads.trainable()) == 2 * 2 + 2


def test_hydra_heads_missing_token_weights(tmp_path, model_config, base_lm_head):
    heads = random_heads(model_config, base_lm_head, num_heads=2, num_layers=1, fmt="hydra", seed=3)
    heads.save(tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_FILE))
    del state["1.token.weight"]
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="missing tensor '1.token.weight'"):
        load_heads(str(tmp_path), model_config, base_lm_head)
