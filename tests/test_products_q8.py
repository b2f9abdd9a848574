"""Packed products with int8 activations (--activations q8, kernels/products_q8.py): the kernel against a numpy
reference of the same quantization, a token's outputs independent of the other tokens of the step, Medusa greedy
equal to plain greedy, and the option's errors."""
from __future__ import annotations

import numpy as np
import pytest
from tinygrad import Tensor

from exo_tinygrad_medusa.cli import main
from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.decoding.heads import random_heads
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.decoding.tree import PLAIN, load_tree
from exo_tinygrad_medusa.kernels import products_q8
from exo_tinygrad_medusa.model.loader import load_model
from exo_tinygrad_medusa.kernels.packed import GGML_BLOCKS, Q4_0, Q4_1, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0, _decode_blocks, pack_ggml
from exo_tinygrad_medusa.model.transformer import Linear
from test_tinygrad_hooks import BLOCKS, _cols, _hand_programs
from test_weights import quantize_blocks

vnni = pytest.mark.skipif(not products_q8.cpu_has_vnni(), reason="q8 activations need AVX512-VNNI and VBMI")
Q8_TYPES = [Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K]
NAMES = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}
OFFSET = {Q4_0: 8, Q8_0: 128}


@pytest.fixture
def q8():
    """Packed products compiled inside the test use int8 activations; the exact kernel again afterwards."""
    products_q8.set_activations("q8")
    yield
    products_q8.set_activations("float32")


def _quantized(x: np.ndarray):
    """The kernel's quantization of x [T, rows] per 32-row block, in float32 as the C computes it: (codes, scales,
    code sums)."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = (np.abs(blocks).max(-1) / np.float32(127)).astype(np.float32)
    ok = d >= np.float32(1.17549435e-38)
    inverse = np.where(ok, np.float32(1) / np.where(ok, d, 1), 0).astype(np.float32)
    codes = np.rint(blocks * inverse[..., None]).astype(np.int64)   # round half to even, as the CPU's conversion
    return codes, np.where(ok, d, 0).astype(np.float32), codes.sum(-1)


def _reference(x: np.ndarray, raw: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> np.ndarray:
    """numpy: sum over blocks of (D * sx) * (sum q * xq - offset * sum xq) [+ M * (sx * sum xq)], in float64 from the
    kernel's float32 factors."""
    out_f, in_f = shape
    per, nbytes = GGML_BLOCKS[ggml_type]
    q, fields = _decode_blocks(raw.reshape(out_f, in_f // per, nbytes), ggml_type)
    q = q.reshape(out_f, in_f // 32, 32).astype(np.int64)
    half = lambda a: a.view(np.float16).astype(np.float32)
    codes, sx, sums = _quantized(x)
    if ggml_type == Q6_K:   # 16-row sub-blocks: per half, int8 scale * (sum q * xq - 32 * sum xq), added in integers
        halves = np.einsum("obhr,tbhr->tobh", q.reshape(out_f, -1, 2, 16), codes.reshape(*codes.shape[:2], 2, 16))
        halves -= 32 * codes.reshape(*codes.shape[:2], 2, 16).sum(-1)[:, None]
        isum = (halves * fields["scale"].reshape(out_f, -1, 2).astype(np.int64)[None]).sum(-1)
        d = np.repeat(half(fields["super_scale"]).reshape(out_f, -1), 8, axis=1)   # 8 blocks of 32 a super-block
        out = (d[None] * sx[:, None, :]).astype(np.float32).astype(np.float64) * isum
        return out.sum(-1)
    if "super_minimum" in fields:   # Q4_K, Q5_K: the super-block's float16 times each 32-row sub-block's integer
        d = (half(fields["super_scale"]) * fields["scale"].astype(np.float32)).reshape(out_f, -1)
        m = (-(half(fields["super_minimum"]) * fields["minimum"].astype(np.float32))).reshape(out_f, -1)
    else:
        d, m = half(fields["scale"])[..., 0], half(fields["minimum"])[..., 0] if "minimum" in fields else None
    isum = np.einsum("obr,tbr->tob", q, codes) - OFFSET.get(ggml_type, 0) * sums[:, None, :]
    out = (d[None] * sx[:, None, :]).astype(np.float32).astype(np.float64) * isum
    if m is not None:
        out += m[None].astype(np.float64) * (sx * sums.astype(np.float32)).astype(np.float32)[:, None, :]
    return out.sum(-1)


def _packed_linear(ggml_type: int, rng, rows: int, cols: int):
    raw = BLOCKS[ggml_type](rng, rows, cols)
    linear = Linear(cols, rows)
    Tensor.realize(*linear.set(pack_ggml(raw, ggml_type, (rows, cols))))
    return linear, raw


@vnni
@pytest.mark.parametrize("ggml_type", Q8_TYPES, ids=NAMES.get)
def test_q8_products_match_a_numpy_reference_of_the_same_quantization(ggml_type, q8):
    """One core and several, 1 to 12 tokens (whole and partial groups of 8), batches: the kernel's int8 sums are
    exact, so it agrees with the reference to float32 rounding; it is not the exact product (the activations are
    rounded), and the kernel that ran is the q8 one."""
    rng = np.random.default_rng(11)
    for rows, cols in ((1024, _cols(ggml_type, 576)), (48, _cols(ggml_type, 64))):
        linear, raw = _packed_linear(ggml_type, rng, rows, cols)
        dense = linear.matrix().numpy()
        for shape in ((1, 1, cols), (1, 3, cols), (1, 12, cols), (2, 4, cols)):
            x = rng.standard_normal(shape).astype(np.float32)
            x[..., :32] *= 50   # blocks of very different scales
            x[..., 32:64] = 0   # a block of zeros (no scale)
            got = linear(Tensor(x)).numpy().reshape(-1, rows)
            flat = x.reshape(-1, cols)
            expected = _reference(flat, raw, ggml_type, (rows, cols))
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
            exact = flat @ dense.T.astype(np.float64)
            assert np.abs(got - exact).max() > 1e-4 * np.abs(exact).max()   # rounded activations: not exact
            np.testing.assert_allclose(got, exact, atol=0.05 * np.abs(exact).max())
            name = f"packed_{_tag(ggml_type)}_a8_{flat.shape[0]}_{cols}_{rows}"
            assert name in _hand_programs(), f"{shape}: the q8 kernel did not run"


def _tag(ggml_type: int) -> str:
    return {Q4_0: "q4o8", Q4_1: "q4m", Q8_0: "q8o128", Q4_K: "q4km", Q5_K: "q8km", Q6_K: "q6ko32"}[ggml_type]


@vnni
@pytest.mark.parametrize("ggml_type", Q8_TYPES, ids=NAMES.get)
def test_q8_outputs_of_a_token_do_not_depend_on_the_other_tokens(ggml_type, q8):
    """Bit for bit: a token's outputs alone (a decode step) and among 2, 5, 8 or 11 tokens (verify steps): each token
    quantizes its own row, so Medusa's logits stay plain decoding's."""
    rng = np.random.default_rng(12)
    linear, _ = _packed_linear(ggml_type, rng, 512, _cols(ggml_type, 576))
    x = rng.standard_normal((1, 11, linear.in_features)).astype(np.float32)
    alone = np.concatenate([linear(Tensor(x[:, i:i + 1])).numpy() for i in range(11)], axis=1)
    for n in (2, 5, 8, 11):
        np.testing.assert_array_equal(linear(Tensor(x[:, :n])).numpy(), alone[:, :n])


@vnni
def test_formats_without_a_q8_kernel_keep_the_exact_one(q8):
    """Q5_0 (a high plane of 1 bit) keeps the exact kernel under q8: its outputs equal the dequantized product."""
    rng = np.random.default_rng(13)
    linear, _ = _packed_linear(Q5_0, rng, 48, 256)
    x = rng.standard_normal((1, 2, 256)).astype(np.float32)
    np.testing.assert_array_equal(linear(Tensor(np.eye(256, dtype=np.float32)[None])).numpy()[0], linear.matrix().numpy().T)
    assert not any("_a8_" in name and name.startswith("packed_q5o") for name in _hand_programs())
    exact = x @ linear.matrix().numpy().T
    np.testing.assert_allclose(linear(Tensor(x)).numpy(), exact, rtol=2e-5, atol=2e-5 * np.abs(exact).max())


@vnni
def test_the_mode_applies_to_products_compiled_after_it(q8):
    """float32, q8, float32 again on the same weights and shapes in one process: each product runs the kernel of the
    mode it was compiled in (the exact one gives the dequantized matrix bit for bit on one-hot rows, q8 does not)."""
    rng = np.random.default_rng(14)
    linear, _ = _packed_linear(Q4_1, rng, 64, 96)
    eye, dense = np.eye(96, dtype=np.float32)[None], linear.matrix().numpy().T
    results = {}
    for mode in ("float32", "q8", "float32"):
        products_q8.set_activations(mode)
        results.setdefault(mode, []).append(linear(Tensor(eye)).numpy()[0])
    for exact in results["float32"]:
        np.testing.assert_array_equal(exact, dense)
    assert not np.array_equal(results["q8"][0], dense)
    np.testing.assert_allclose(results["q8"][0], dense, atol=0.02 * np.abs(dense).max())


def test_unknown_activations_are_refused():
    with pytest.raises(ValueError, match="unknown activations 'int4': choose one of float32, q8"):
        products_q8.set_activations("int4")


@vnni
@pytest.mark.parametrize("tree", ["chain-3", "cpu-8"])
def test_medusa_greedy_equals_plain_greedy_with_q8_activations(tiny_checkpoint, tree, q8):
    """A tiny model packed as Q4_1 (lm_head too): Medusa's verify steps (4-8 tokens a product) give plain greedy's
    tokens under q8, and q8 kernels ran for one token and for many."""
    loaded = load_model(str(tiny_checkpoint("llama", seed=1)), max_context=160)
    for linear in loaded.model.linears().values():
        w = linear.matrix().numpy()
        Tensor.realize(*linear.set(pack_ggml(quantize_blocks(w, Q4_1), Q4_1, w.shape)))
    products_q8.set_activations("q8")   # after the load, which sets the mode it was asked for (float32)
    model, prompt = loaded.model, [int(t) for t in np.random.default_rng(42).integers(3, 320, 40)]
    heads = random_heads(model.config, model.lm_head, 4, 1, "v2", seed=11, scale=0.3)
    plain = Generator(model, [], PLAIN).generate(prompt, GenerationConfig(64)).generated_ids
    result = Generator(model, [], load_tree(tree), heads).generate(prompt, GenerationConfig(64))
    assert result.generated_ids == plain and result.steps < 64
    tokens = {int(name.split("_")[3]) for name in _hand_programs() if name.startswith("packed_q4m_a8_")}
    assert 1 in tokens and max(tokens) >= 4, tokens


def test_q8_is_refused_where_it_cannot_run(tiny_checkpoint, monkeypatch, capsys):
    """One clear error, before any work: float32 or 16-bit weights, tinygrad's own kernels (as on GPUs and OpenCL),
    a CPU without VNNI; on the command line, exo-medusa: error: ... and exit status 2."""
    directory = str(tiny_checkpoint("llama"))
    with pytest.raises(ValueError, match=r"--activations q8 needs a GGUF model's packed codes \(--weights compact\)"):
        load_model(directory, activations="q8")
    assert main(["run", directory, "--activations", "q8", "--prompt", "hi"]) == 2
    assert "exo-medusa: error: --activations q8 needs a GGUF model's packed codes" in capsys.readouterr().err
    monkeypatch.setattr(products_q8, "cpu_has_vnni", lambda: False)
    with pytest.raises(ValueError, match="--activations q8 needs a CPU with AVX512-VNNI and AVX512-VBMI"):
        load_model(directory, activations="q8")
    monkeypatch.setenv("EXO_MEDUSA_KERNELS", "tuned")
    with pytest.raises(ValueError, match="--activations q8 needs the CPU device's hand-written products; CPU runs "
                                         "tinygrad's own kernels"):
        load_model(directory, activations="q8")
    assert products_q8.activations() == "float32"


@vnni
@pytest.mark.slow
def test_smollm2_with_q8_activations_still_gives_the_float32_oracle(q8):
    """The embedded SmolLM2-135M (Q4_1 matrices, Q8_0 lm_head) with int8 activations: on the oracle prompt its greedy
    tokens are the float32 oracle's, all 126 (measured; q8 numbers differ, this prompt's argmaxes do not), and Medusa
    greedy equals them."""
    import json
    from pathlib import Path
    from exo_tinygrad_medusa.decoding.session import MedusaOptions, open_session
    oracle = json.loads((Path(__file__).parent / "data" / "smollm2_oracle.json").read_text())
    session = open_session("smollm2-135m", medusa=MedusaOptions(enabled=True), activations="q8")
    assert products_q8.activations() == "q8"
    ids = session.tokenizer.encode_chat([{"role": "user", "content": oracle["prompt"]}])
    plain = Generator(session.loaded.model, session.tokenizer.eos_token_ids, PLAIN).generate(ids, GenerationConfig(256))
    assert plain.generated_ids == oracle["greedy_new_ids"]
    assert session.generator.generate(ids, GenerationConfig(256)).generated_ids == plain.generated_ids
    assert any(name.startswith("packed_q4m_a8_") for name in _hand_programs())
    assert any(name.startswith("packed_q8o128_a8_") for name in _hand_programs())
