"""model/gguf_writer.py writes whole GGUF files that the package's loader and tinygrad's reader take back: a tiny
checkpoint written as a GGUF computes the independent numpy forward's logits; quantized tensors come back byte for
byte; requantize's Q4_1 quantizer and llama.cpp's Q4_K_M layer mix."""
import json

import numpy as np
import pytest
from tinygrad.llm.gguf import gguf_load

from exo_tinygrad_medusa.kernels.packed import PackedWeight, Q4_1, Q4_K, Q6_K
from exo_tinygrad_medusa.model.gguf_file import tensor_bytes
from exo_tinygrad_medusa.model.gguf_writer import F32, GGUFTensor, write_gguf
from exo_tinygrad_medusa.model.loader import load_model
from exo_tinygrad_medusa.model.requantize import q4_k_m_layers, quantize
from exo_tinygrad_medusa.model.weights import rope_row_order
from helpers_models import load_numpy_weights, reference_logits

IDS = [5, 17, 200, 33, 9, 100, 250, 3]
# Hugging Face name pieces -> llama.cpp's
_LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
                **{f"self_attn.{x}_proj.{k}": f"attn_{x}.{k}" for x in "qkv" for k in ("weight", "bias")}}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def _tokenizer_metadata(directory) -> dict:
    """The tiny byte-level BPE tokenizer.json as llama.cpp's tokenizer keys."""
    tok = json.loads((directory / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tok["added_tokens"]}
    vocab.update(special)
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens], "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"], "tokenizer.ggml.add_bos_token": False}


def _checkpoint_as_gguf(directory, path, matrices: int = F32) -> None:
    """The checkpoint's tensors in a GGUF, llama's q/k rows interleaved as llama.cpp's converter does; 2-D tensors as
    GGML type `matrices`, the others float32."""
    cfg, weights = load_numpy_weights(directory)
    arch = cfg["model_type"]
    tensors = []
    for hf, w in weights.items():
        if arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg["num_attention_heads"] if "q_proj" in hf else cfg["num_key_value_heads"]
            interleaved = np.empty_like(w)
            interleaved[rope_row_order(w.shape[0], heads)] = w   # the loader reads rows back in this order
            w = interleaved
        kind = matrices if w.ndim == 2 else F32
        data = quantize(w, kind) if kind != F32 else np.ascontiguousarray(w, dtype=np.float32)
        tensors.append(GGUFTensor(_gguf_name(hf), w.shape, kind, data))
    meta = {"general.architecture": arch, f"{arch}.block_count": cfg["num_hidden_layers"],
            f"{arch}.context_length": cfg["max_position_embeddings"], f"{arch}.embedding_length": cfg["hidden_size"],
            f"{arch}.feed_forward_length": cfg["intermediate_size"],
            f"{arch}.attention.head_count": cfg["num_attention_heads"],
            f"{arch}.attention.head_count_kv": cfg["num_key_value_heads"], f"{arch}.rope.freq_base": cfg["rope_theta"],
            f"{arch}.attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"], **_tokenizer_metadata(directory)}
    write_gguf(path, meta, tensors)


@pytest.mark.parametrize("arch,tie", [("llama", False), ("qwen2", True)])
def test_written_checkpoint_loads_and_computes_the_reference_logits(tiny_checkpoint, engine, tmp_path, arch, tie):
    directory = tiny_checkpoint(arch, tie=tie)
    path = tmp_path / f"tiny-{arch}.gguf"
    _checkpoint_as_gguf(directory, path)
    loaded = load_model(str(path), dtype="float32")
    c = loaded.config
    assert (c.architecture, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size) == \
        (arch, 64, 4, 4, 2, 128, 320)
    assert (c.tie_embeddings, c.qkv_bias, c.norm_eps, c.rope_theta) == (tie, arch == "qwen2", np.float32(1e-5), 10000.0)
    assert tuple(loaded.tokenizer.eos_token_ids) == (2,)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("the cat")) == "the cat"
    np.testing.assert_allclose(engine.logits(loaded.model, IDS), reference_logits(directory, IDS), atol=1e-4, rtol=0)


def test_quantized_tensors_and_metadata_read_back(tmp_path):
    rng = np.random.default_rng(0)
    matrices = {name: (0.02 * rng.standard_normal((8, 512))).astype(np.float32)
                for name in ("q41.weight", "q4k.weight", "q6k.weight")}
    types = {"q41.weight": Q4_1, "q4k.weight": Q4_K, "q6k.weight": Q6_K}
    blobs = {name: quantize(w, types[name]) for name, w in matrices.items()}
    norm = np.linspace(0.5, 1.5, 512, dtype=np.float32)
    tensors = [GGUFTensor(name, w.shape, types[name], (lambda b=blobs[name]: b)) for name, w in matrices.items()]
    tensors.append(GGUFTensor("norm.weight", norm.shape, F32, norm))
    meta = {"general.architecture": "llama", "some.count": 16, "some.eps": 1e-6, "some.flag": True,
            "some.words": ["a", "b c", "Ġd"], "some.ids": [3, 1, 4, 1, 5], "some.name": "random"}
    path = tmp_path / "mixed.gguf"
    write_gguf(path, meta, tensors, alignment=64)

    raw = tensor_bytes(path)
    for name, blob in blobs.items():
        ggml_type, data = raw[name]
        assert ggml_type == types[name]
        np.testing.assert_array_equal(np.asarray(data[:blob.size]), blob)
    kv, state = gguf_load(str(path))
    assert {k: kv[k] for k in meta} == {**meta, "some.eps": pytest.approx(1e-6)}
    assert kv["general.alignment"] == 64
    np.testing.assert_array_equal(state["norm.weight"].numpy(), norm)
    for name, w in matrices.items():
        got = state[name].numpy()
        assert got.shape == w.shape
        # round to nearest: within half a step of the block's range (Q4_1: range / 15; K-quants: coarser scales)
        step = (w.max() - w.min()) / {Q4_1: 15, Q4_K: 15, Q6_K: 63}[types[name]]
        assert np.abs(got - w).max() <= step, name
        assert np.abs(got - w).mean() < step / 3, name


def test_written_blocks_stay_packed_in_the_model(tiny_checkpoint, engine, tmp_path):
    """Q4_1 matrices written by the writer are the products' packed codes when the loader reads them, and the model
    computes what it computes with the file's float32 dequantization."""
    directory = tiny_checkpoint("llama", tie=True)
    path = tmp_path / "tiny-q41.gguf"
    _checkpoint_as_gguf(directory, path, matrices=Q4_1)
    packed, dense = load_model(str(path), dtype="float32"), load_model(str(path), dtype="float32", weights="float32")
    assert all(isinstance(l.weight, PackedWeight) for l in packed.model.linears().values() if l is not None)
    assert tensor_bytes(path)["blk.0.ffn_down.weight"][0] == Q4_1
    np.testing.assert_allclose(engine.logits(packed.model, IDS), engine.logits(dense.model, IDS), atol=1e-4, rtol=0)


def test_writer_refuses_data_of_the_wrong_size(tmp_path):
    with pytest.raises(ValueError, match="need 2304"):
        write_gguf(tmp_path / "bad.gguf", {}, [GGUFTensor("w", (16, 256), Q4_K, bytes(100))])
    with pytest.raises(ValueError, match="not whole blocks"):
        write_gguf(tmp_path / "bad.gguf", {}, [GGUFTensor("w", (16, 100), Q4_K, bytes(100))])


@pytest.mark.parametrize("n_layers,more", [(16, 8), (28, 14)])
def test_q4_k_m_mix_gives_half_the_value_and_down_projections_6_bits(n_layers, more):
    for tied in (True, False):
        plan = q4_k_m_layers(n_layers, tied)
        for kind in ("attn_v", "ffn_down"):
            layers = [i for i in range(n_layers) if plan(f"blk.{i}.{kind}.weight") == Q6_K]
            assert len(layers) == more and layers[:2] == [0, 1] and layers[-2:] == [n_layers - 2, n_layers - 1]
        assert plan("blk.3.attn_q.weight") == plan("blk.0.ffn_up.weight") == Q4_K
        assert plan("output.weight") == Q6_K
        assert plan("token_embd.weight") == (Q6_K if tied else Q4_K)
