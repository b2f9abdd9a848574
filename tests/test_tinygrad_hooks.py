"""The hooks into tinygrad's internals (exo_tinygrad_medusa/tinygrad_hooks.py). The first test fails loudly when a
tinygrad upgrade moves something they rely on; the others check that each hook does its job and changes no value."""
import functools
import inspect

import numpy as np
import pytest
from tinygrad import Tensor, TinyJit, UOp, dtypes

from exo_tinygrad_medusa.kernels import tinygrad_hooks as hooks
from exo_tinygrad_medusa.model.transformer import Linear
from exo_tinygrad_medusa.kernels.packed import GGML_BLOCKS, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, pack_ggml, widen_half

hooks.install()


def test_tinygrad_internals_the_hooks_rely_on_are_still_there():
    import tinygrad
    from tinygrad import codegen
    from tinygrad.codegen.opt import postrange
    from tinygrad.engine import jit, realize
    from tinygrad.runtime import ops_cpu
    from tinygrad.uop.ops import KernelInfo

    from importlib.metadata import version
    assert version("tinygrad") == "0.14.0", "tinygrad moved: re-check every hook in tinygrad_hooks.py, then this pin"
    for name in ("multi_pm", "pm_mops", "pm_load_collapse", "pm_split_ranges", "pm_flatten_range", "sym", "pm_simplify_ranges"):
        assert hasattr(codegen, name), f"tinygrad.codegen.{name} (the rewrites before apply_opts) is gone"
    assert "simplify ranges" in inspect.getsource(codegen.full_rewrite_to_sink)
    assert "opts_to_apply" in inspect.getsource(postrange.apply_opts)
    assert "opts_to_apply" in KernelInfo.__dataclass_fields__
    assert "self.applied_opts" in inspect.getsource(postrange.Scheduler.__init__)
    for attr in ("apply_opt", "axes_of", "full_shape", "bufs", "reduceops", "rngs"):
        assert hasattr(postrange.Scheduler, attr), f"Scheduler.{attr} is gone"
    assert list(inspect.signature(realize.lower_and_compile).parameters) == ["linear"]
    assert "lower_and_compile(" in inspect.getsource(realize.compile_linear)
    for attr in ("calls", "runtimes", "uop_replace", "updated_vars", "launch_dims_replace", "vars"):
        assert attr in inspect.getsource(jit.GraphRunner), f"GraphRunner.{attr} is gone"
    assert "self.graph" in inspect.getsource(tinygrad.device.Compiled.__init__)
    assert "dev.graph" in inspect.getsource(jit.graph_split_rewrite) or "graph_class" in inspect.getsource(jit.graph_split_rewrite)
    source = inspect.getsource(ops_cpu.CPUProgram)
    assert "runtimevars" in source and "self.addr" in source and "core_id" in source
    assert hasattr(tinygrad.helpers, "_db_connection") and hasattr(tinygrad.helpers, "db_connection")
    for allocator in (ops_cpu.CPUAllocator, tinygrad.device.Allocator):
        assert hasattr(allocator, "_copyin") and hasattr(allocator, "_copyout"), "allocator copies moved"
    assert "is_realized" in inspect.getsource(jit._prepare_jit_inputs), "the JIT no longer skips realized inputs"
    # hand-written kernels: a PROGRAM carrying SOURCE compiles that source; its signature lists LINEAR's PARAMs
    assert "Ops.SOURCE, name=\"source\")), name=\"prg\"), do_compile" in inspect.getsource(codegen).replace("'", '"')
    assert "self.src[1].src" in inspect.getsource(UOp.to_elf) and "if ast.op is Ops.PROGRAM: prg = ast" in inspect.getsource(codegen)


def _product_step(linear: Linear):
    return TinyJit(lambda x: linear(x).realize())


def test_panel_products_get_vector_choices_and_the_same_values():
    from tinygrad import Device
    from tinygrad.uop.ops import Ops
    rng = np.random.default_rng(0)
    w = rng.standard_normal((176, 72)).astype(np.float32)
    linear = Linear(72, 176)
    Tensor.realize(*linear.set(Tensor(w)))
    x = Tensor(rng.standard_normal((1, 4, 72)).astype(np.float32)).realize()
    # the product's kernel, as the scheduler hands it to compilation
    sinks = [u.src[0] for u in linear(x).schedule_linear().src if u.op is Ops.CALL and u.src[0].op is Ops.SINK]
    product = next(k for k in sinks if any(u.op is Ops.REDUCE for u in k.toposort()))
    opts = hooks.choose_opts(product, Device["CPU"].renderer)
    # 4 tokens per weight load, the 16-column panel as one vector
    assert opts is not None and [(o.op.name, o.arg) for o in opts][-2:] == [("UPCAST", 4), ("UPCAST", 16)]
    np.testing.assert_allclose(linear(x).numpy(), x.numpy() @ w.T, rtol=1e-5, atol=1e-5)


def test_split_kernels_run_on_the_pool_and_match_numpy():
    assert hooks.kernel_mode()["cores"] == hooks.NUM_THREADS()
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1024, 512)).astype(np.float32)  # 512k multiply-adds: split over the cores
    linear = Linear(512, 1024)
    Tensor.realize(*linear.set(Tensor(w)))
    step = _product_step(linear)
    for _ in range(4):  # captured on the second call, replayed after
        x = rng.standard_normal((1, 1, 512)).astype(np.float32)
        np.testing.assert_allclose(step(Tensor(x)).numpy(), x @ w.T, rtol=1e-4, atol=1e-4)


def test_split_kernels_from_two_threads_at_once_stay_correct():
    """Two engines in one process launch split kernels from two threads (ctypes releases the GIL): each job's slices
    run with its own arguments."""
    import threading
    rng = np.random.default_rng(9)
    raw = BLOCKS[Q4_1](rng, 4096, 576)  # large enough that the two threads' C calls overlap
    linears = [Linear(576, 4096) for _ in range(2)]
    for linear in linears:
        Tensor.realize(*linear.set(pack_ggml(raw, Q4_1, (4096, 576))))
    dense = linears[0].matrix().numpy()
    steps = [_product_step(linear) for linear in linears]
    xs = [rng.standard_normal((1, 8, 576)).astype(np.float32) for _ in range(2)]
    inputs = [Tensor(x).realize() for x in xs]
    for step, x in zip(steps, inputs):
        for _ in range(3):
            step(x)
    errors = []

    def hammer(i):
        for _ in range(200):
            got = hooks.read_host(steps[i](inputs[i]))
            if not np.allclose(got, xs[i] @ dense.T, rtol=1e-4, atol=1e-3):
                errors.append(i)
                return
    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, f"wrong products from thread(s) {errors}"


def test_captured_steps_replay_through_one_c_call_with_new_inputs_and_positions():
    buf = Tensor.zeros(64, dtype=dtypes.float32).contiguous().realize()
    pos = UOp.variable("pos", 0, 48)

    @TinyJit
    def step(x: Tensor, p: UOp) -> Tensor:
        buf[p:p + 4].assign(x).realize()
        return (buf * 2).sum().realize()

    expected = np.zeros(64, np.float32)
    for i in range(6):
        x = np.arange(4, dtype=np.float32) + i
        expected[i * 8:i * 8 + 4] = x
        assert step(Tensor(x), pos.bind(i * 8)).item() == pytest.approx(2 * expected.sum())
    graphs = [c for c in step.captured._linear.src if c.src[0].op.name == "CUSTOM_FUNCTION" and c.src[0].arg == "graph"]
    assert graphs, "the capture did not batch its kernels into a graph"
    assert isinstance(next(iter(step.captured.linear.src)), UOp)


def test_captured_graphs_time_each_kernel_when_profiling(monkeypatch):
    graphs = []
    init = hooks.CPUGraph.__init__
    monkeypatch.setattr(hooks.CPUGraph, "__init__", lambda self, *a, **k: (init(self, *a, **k), graphs.append(self))[0])
    rng = np.random.default_rng(7)
    linear = Linear(256, 512)
    Tensor.realize(*linear.set(Tensor(rng.standard_normal((512, 256)).astype(np.float32))))
    step = TinyJit(lambda x: (linear(x).contiguous().relu().contiguous() * 2).sum().realize())  # kernels enough for a graph
    x = Tensor(rng.standard_normal((1, 1, 256)).astype(np.float32)).realize()
    for _ in range(3):
        step(x)
    assert graphs, "the capture did not replay through CPUGraph"
    graphs[-1].start_profile()
    for _ in range(5):
        step(x)
    times = graphs[-1].kernel_times()
    assert len(times) == len(graphs[-1].calls) and all(us > 0 for _, us in times)


def test_host_copies_reach_a_captured_step_without_scheduling(monkeypatch):
    """write_host rewrites a step's input in place and read_host copies a result out: the captured step sees every
    new value, and nothing is scheduled (tinygrad's scheduler walks every live tensor, a model's weights included)."""
    import tinygrad.tensor
    tokens = hooks.device_buffer((1, 3), dtypes.int32, "CPU")
    step = TinyJit(lambda x: (x * 2 + 1).realize())
    walks = []
    for i in range(5):
        if i == 2:  # captured by now: count the scheduler's walks over live tensors from here on
            walk = tinygrad.tensor._apply_map_to_tensors
            monkeypatch.setattr(tinygrad.tensor, "_apply_map_to_tensors", lambda *a, **k: walks.append(a) or walk(*a, **k))
        values = np.array([[i, 10 * i, -i]])
        out = hooks.read_host(step(hooks.write_host(tokens, values)))
        np.testing.assert_array_equal(out, values * 2 + 1)
        assert out.dtype == np.int32 and out.shape == (1, 3)
    frozen = np.array([[7, 8, 9]], dtype=np.int32)
    frozen.flags.writeable = False  # values read from a socket
    np.testing.assert_array_equal(hooks.read_host(step(hooks.write_host(tokens, frozen))), frozen * 2 + 1)
    assert walks == []
    step(Tensor([[1, 2, 3]], dtype=dtypes.int32)).numpy()  # the usual way schedules: the count above can fail
    assert walks
    np.testing.assert_array_equal(hooks.read_host(tokens.reshape(3)), [7, 8, 9])
    np.testing.assert_array_equal(hooks.read_host(tokens[0, 1:]), [8, 9])  # a view: read through numpy()
    with pytest.raises(ValueError, match="realized buffer"):
        hooks.write_host(tokens[0, 1:], np.zeros(2))
    with pytest.raises(ValueError, match="2 values for a buffer of 3"):
        hooks.write_host(tokens, np.zeros(2))


def _scales(rng, shape, low: float, high: float) -> np.ndarray:
    """float16 scales as bytes: mostly in [low, high), some negative, some float16 subnormals and zeros (the widening
    in the products must get every float16 exactly)."""
    d = rng.uniform(low, high, shape).astype(np.float16)
    d[rng.random(shape) < 0.2] *= -1
    d[rng.random(shape) < 0.05] = 0
    tiny = rng.random(shape) < 0.1
    d[tiny] = rng.integers(1, 1024, tiny.sum(), dtype=np.uint16).view(np.float16)   # subnormal float16
    return d.view(np.uint8)


# where each format keeps its float16 scales, by byte offset in a block; every other byte is random (codes, K-quant
# sub-block scales, high bits)
HALF_AT = {Q4_0: (0,), Q4_1: (0, 2), Q5_0: (0,), Q5_1: (0, 2), Q8_0: (0,), Q4_K: (0, 2), Q5_K: (0, 2), Q6_K: (208,)}


def _blocks(ggml_type: int, rng, rows: int, cols: int) -> np.ndarray:
    """Random GGML blocks of an [rows, cols] matrix: random bytes, float16 scales from _scales (minimums of Q4_1 and
    Q5_1 negative), so that every code, scale and bit layout is exercised."""
    per, nbytes = GGML_BLOCKS[ggml_type]
    blocks = rng.integers(0, 256, (rows, cols // per, nbytes), dtype=np.uint8)
    for k, at in enumerate(HALF_AT[ggml_type]):
        low, high = (-1, 0) if k and ggml_type in (Q4_1, Q5_1) else (0.001, 0.1)
        blocks[..., at:at + 2] = _scales(rng, (rows, cols // per, 1), low, high)
    return blocks.reshape(-1)


BLOCKS = {t: functools.partial(_blocks, t) for t in HALF_AT}


def _cols(ggml_type: int, cols: int) -> int:
    """cols rounded up to whole blocks of the format (256 for the K-quants)."""
    per = GGML_BLOCKS[ggml_type][0]
    return -(-cols // per) * per
PACKED_TYPES = list(BLOCKS)
BYTES_PER_WEIGHT = {Q4_0: 0.5625, Q4_1: 0.625, Q5_0: 0.6875, Q5_1: 0.75, Q8_0: 1.0625, Q4_K: 0.578125, Q5_K: 1.078125,
                    Q6_K: 0.8203125}
KERNEL_TAG = {Q4_0: "q4o8", Q4_1: "q4m", Q5_0: "q5o16", Q5_1: "q5m", Q8_0: "q8o128", Q4_K: "q4km", Q5_K: "q8km",
              Q6_K: "q6ko32"}


def test_float16_bits_widen_exactly():
    """Every finite float16, widened by integer ops (the tinygrad fallback of the packed products): bit for bit
    numpy's conversion, subnormals and signed zeros included."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    finite = np.isfinite(bits.view(np.float16))
    got = widen_half(Tensor(bits[finite])).numpy()
    assert np.array_equal(got.view(np.uint32), bits[finite].view(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("ggml_type", PACKED_TYPES)
def test_packed_weights_hold_exactly_the_loaders_float32_values(ggml_type, monkeypatch):
    """The packed form keeps the GGUF's bytes a weight (4-bit codes two to a byte, float16 scales), and both
    products, the hand-written C and tinygrad's own kernel (other devices), read exactly the loader's float32 values."""
    from tinygrad.llm.gguf import ggml_data_to_tensor
    rng = np.random.default_rng(2)
    rows, cols = 48, _cols(ggml_type, 64)
    raw = BLOCKS[ggml_type](rng, rows, cols)
    dense = ggml_data_to_tensor(Tensor(raw), rows * cols, ggml_type).reshape(rows, cols).numpy()
    order = np.random.default_rng(3).permutation(rows)
    linear = Linear(cols, rows)
    Tensor.realize(*linear.set(pack_ggml(raw, ggml_type, (rows, cols), order)))
    assert linear.weight.nbytes == rows * cols * BYTES_PER_WEIGHT[ggml_type]
    assert np.array_equal(linear.matrix().numpy(), dense[order])  # bit for bit, rows permuted as asked
    x = rng.standard_normal((1, 2, cols)).astype(np.float32)
    np.testing.assert_allclose(linear(Tensor(x)).numpy(), x @ dense[order].T, rtol=1e-5, atol=1e-5)
    # one-hot inputs: each token's outputs are one row of the weights, dequantized by the hand-written kernel
    np.testing.assert_array_equal(linear(Tensor(np.eye(cols, dtype=np.float32)[None])).numpy()[0], dense[order].T)
    monkeypatch.setenv("EXO_MEDUSA_KERNELS", "tuned")   # tinygrad's kernel over the same packed tensors
    assert not hooks.hand_kernels("CPU")
    np.testing.assert_allclose(linear(Tensor(x)).numpy(), x @ dense[order].T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(linear(Tensor(np.eye(cols, dtype=np.float32)[None])).numpy()[0], dense[order].T)


@pytest.mark.parametrize("ggml_type", PACKED_TYPES)
def test_packed_rows_are_the_same_rows_still_packed(ggml_type):
    """A proposal vocabulary's rows taken from a packed lm_head: bit for bit the dense rows, in the order asked."""
    rng = np.random.default_rng(4)
    rows, cols = 64, _cols(ggml_type, 64)
    raw = BLOCKS[ggml_type](rng, rows, cols)
    full = Linear(cols, rows)
    Tensor.realize(*full.set(pack_ggml(raw, ggml_type, (rows, cols))))
    ids = np.array([3, 60, 0, 17, 18, 19, 44, 2])
    part = Linear(cols, len(ids))
    Tensor.realize(*part.set(full.weight.rows(ids)))
    assert np.array_equal(part.matrix().numpy(), full.matrix().numpy()[ids])
    with pytest.raises(ValueError, match="multiple of 4 output rows, got 3"):
        full.weight.rows(ids[:3])


def _hand_programs() -> set[str]:
    from tinygrad.engine.realize import to_program_cache
    return {p.arg.name for p in to_program_cache.values() if p.arg.name.startswith("packed_")}


@pytest.mark.parametrize("ggml_type", PACKED_TYPES)
def test_packed_products_run_the_hand_written_kernel_and_match_the_float_product(ggml_type):
    """Products with packed weights compile from products.py's C (one or several cores, any token count, batches)
    and equal the product with the dequantized matrix."""
    assert hooks.hand_kernels("CPU") and hooks.kernel_mode()["packed_products"] == "hand"
    rng = np.random.default_rng(5)
    for rows, cols in ((1024, _cols(ggml_type, 576)), (48, _cols(ggml_type, 64))):   # split over the cores, and on one
        raw = BLOCKS[ggml_type](rng, rows, cols)
        linear = Linear(cols, rows)
        Tensor.realize(*linear.set(pack_ggml(raw, ggml_type, (rows, cols))))
        dense = linear.matrix().numpy()
        for shape in ((1, 1, cols), (1, 2, cols), (1, 7, cols), (3, 4, cols)):
            before = _hand_programs()
            x = rng.standard_normal(shape).astype(np.float32)
            got = linear(Tensor(x)).numpy()
            np.testing.assert_allclose(got, x @ dense.T, rtol=2e-5, atol=2e-5 * np.abs(x @ dense.T).max())
            tokens = shape[0] * shape[1]
            suffix = KERNEL_TAG[ggml_type]
            assert f"packed_{suffix}_{tokens}_{cols}_{rows}" in _hand_programs() - before or \
                f"packed_{suffix}_{tokens}_{cols}_{rows}" in before, f"{shape}: tinygrad's kernel ran, not the hand-written one"


@pytest.mark.parametrize("ggml_type", PACKED_TYPES)
def test_a_tokens_outputs_do_not_depend_on_the_other_tokens_of_the_step(ggml_type):
    """Bit for bit: the outputs for a token are the same alone (a decode step) and among 2, 5, 8 or 11 tokens (a
    verify step; 11 spans a full group of tokens and a partial one), so a product never makes Medusa's logits differ
    from plain decoding's."""
    rng = np.random.default_rng(6)
    rows, cols = 512, _cols(ggml_type, 576)
    raw = BLOCKS[ggml_type](rng, rows, cols)
    linear = Linear(cols, rows)
    Tensor.realize(*linear.set(pack_ggml(raw, ggml_type, (rows, cols))))
    x = rng.standard_normal((1, 11, cols)).astype(np.float32)
    alone = np.concatenate([linear(Tensor(x[:, i:i + 1])).numpy() for i in range(11)], axis=1)
    for n in (2, 5, 8, 11):
        np.testing.assert_array_equal(linear(Tensor(x[:, :n])).numpy(), alone[:, :n])


def _attention_reference(q, cache, start, mask):
    """numpy: grouped-query attention of T new queries over the first start + T cached keys."""
    B, H, T, D = q.shape
    kvh = cache.shape[2]
    keys, values = cache[0, :, :, :start + T], cache[1, :, :, :start + T]
    out = np.zeros((B, T, H, D), np.float64)
    for b in range(B):
        for h in range(H):
            scores = q[b, h].astype(np.float64) @ keys[b, h // (H // kvh)].T / np.sqrt(D)
            scores[:, start:] += mask
            p = np.exp(scores - scores.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ values[b, h // (H // kvh)]
    return out.reshape(B, T, H * D)


@pytest.mark.parametrize("T", [1, 2, 3])
def test_decode_attention_runs_the_hand_written_kernel_and_matches_numpy(T):
    """Captured steps' attention compiles from attention_kernel's C, agrees with a float64 reference, and a query's
    output is bit for bit the same whatever the other new tokens of the step."""
    from exo_tinygrad_medusa.kernels.attention import decode_attention
    from exo_tinygrad_medusa.model.transformer import causal_mask
    rng = np.random.default_rng(8 + T)
    B, kvh, group, D, C = 2, 2, 3, 64, 48
    cache = Tensor(rng.standard_normal((2, B, kvh, C, D)).astype(np.float32)).realize()
    pos = UOp.variable("start_pos", 0, C - 4)
    steps = {n: TinyJit(lambda q, p, m: decode_attention(q, cache, p, m, group).realize()) for n in (1, T)}
    for start in (0, 5, 21, 21, 30):
        q = rng.standard_normal((B, kvh * group, T, D)).astype(np.float32)
        mask = causal_mask(T)
        got = steps[T](Tensor(q), pos.bind(start), Tensor(mask)).numpy()
        np.testing.assert_allclose(got, _attention_reference(q, cache.numpy(), start, mask), rtol=1e-4, atol=1e-5)
        alone = steps[1](Tensor(q[:, :, :1].copy()), pos.bind(start), Tensor(causal_mask(1))).numpy()
        np.testing.assert_array_equal(got[:, :1], alone)   # the first new token sees the same keys either way
    names = {p.arg.name for p in __import__("tinygrad").engine.realize.to_program_cache.values()}
    assert any(n.startswith(f"exo_attention_{B}_{T}_") for n in names), "tinygrad's attention ran, not the hand-written one"


def test_hand_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("EXO_MEDUSA_KERNELS", "tuned")
    assert not hooks.hand_kernels("CPU") and hooks.kernel_mode()["packed_products"] == "tinygrad"


def test_unpackable_types_are_refused_by_name():
    with pytest.raises(ValueError, match="GGML type 23 has no packed form"):   # IQ4_XS
        pack_ggml(np.zeros(1 << 12, np.uint8), 23, (32, 256))
    with pytest.raises(ValueError, match="whole 256-weight blocks"):
        pack_ggml(np.zeros(1 << 12, np.uint8), Q4_K, (32, 64))
    with pytest.raises(ValueError, match="whole 32-weight blocks"):
        pack_ggml(np.zeros(1 << 12, np.uint8), Q4_1, (32, 48))


_CL_PACKED_SCRIPT = r"""
import json, sys
import numpy as np
from tinygrad import Tensor
from tinygrad.llm.gguf import ggml_data_to_tensor
from exo_tinygrad_medusa.kernels.packed import pack_ggml
from exo_tinygrad_medusa.model.transformer import Linear
raw, ggml_type, rows, cols = np.frombuffer(bytes.fromhex(sys.argv[1]), np.uint8), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
dense = ggml_data_to_tensor(Tensor(raw.copy(), device="CPU"), rows * cols, ggml_type).reshape(rows, cols).numpy()
linear = Linear(cols, rows)
Tensor.realize(*linear.set(pack_ggml(raw, ggml_type, (rows, cols)).to("CL")))
x = np.random.default_rng(0).standard_normal((1, 2, cols)).astype(np.float32)
got = linear(Tensor(x, device="CL")).numpy()
print(json.dumps({"exact": bool(np.array_equal(linear.matrix().numpy(), dense)),
                  "error": float(np.abs(got - x @ dense.T).max() / np.abs(x @ dense.T).max())}))
"""


def _cl_env() -> dict | None:
    import glob
    import os
    vendors = os.environ.get("OCL_ICD_VENDORS", "/etc/OpenCL/vendors")
    if not glob.glob(os.path.join(vendors, "*.icd")) and not vendors.endswith(".icd"):
        return None
    return {**os.environ, "DEV": "CL", "OCL_ICD_VENDORS": vendors}


@pytest.mark.skipif(_cl_env() is None, reason="no OpenCL ICD (apt-get install pocl-opencl-icd; OCL_ICD_VENDORS=<its folder>)")
@pytest.mark.parametrize("ggml_type", [Q4_1, Q4_K, Q6_K])
def test_packed_products_on_a_gpu_style_device_are_tinygrads_kernel_over_the_packed_tensors(ggml_type):
    """On CL (pocl: GPU-style lowering) the hooks step aside: tinygrad's own kernel reads the packed tensors (no float32
    copy), its dequantization is bit for bit the loader's and its product the float product."""
    import json
    import subprocess
    import sys
    rows, cols = 32, 256
    raw = BLOCKS[ggml_type](np.random.default_rng(9), rows, cols)
    proc = subprocess.run([sys.executable, "-c", _CL_PACKED_SCRIPT, raw.tobytes().hex(), str(ggml_type), str(rows), str(cols)],
                          env=_cl_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["exact"] and result["error"] < 1e-5, result


@pytest.mark.parametrize("half", ["bf16", "f16"])
def test_half_precision_products_widen_exactly_and_run_the_hand_written_kernel(half):
    """16-bit weights kept as their bits (2 bytes a weight): the product equals the product of the exactly widened
    float32 matrix, runs the hand-written kernel, and a token's outputs do not depend on the other tokens."""
    from exo_tinygrad_medusa.kernels.packed import pack_half
    rng = np.random.default_rng(9)
    rows, cols = 48, 64
    dense = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
    if half == "bf16":
        bits = (dense.view(np.uint32) >> 16).astype(np.uint16)
        widened = (bits.astype(np.uint32) << 16).view(np.float32)
    else:
        bits = dense.astype(np.float16).view(np.uint16)
        widened = bits.view(np.float16).astype(np.float32)
    weight = pack_half(bits, half)
    assert weight.nbytes == rows * cols * 2 and weight.shape == (rows, cols)
    linear = Linear(cols, rows)
    Tensor.realize(*linear.set(weight))
    assert np.array_equal(linear.matrix().numpy(), widened)
    before = _hand_programs()
    x = rng.standard_normal((1, 11, cols)).astype(np.float32)
    got = linear(Tensor(x)).numpy()
    np.testing.assert_allclose(got, x @ widened.T, rtol=1e-5, atol=1e-5)
    assert f"packed_{half}_11_{cols}_{rows}" in _hand_programs() | before
    alone = np.concatenate([linear(Tensor(x[:, i:i + 1])).numpy() for i in range(11)], axis=1)
    np.testing.assert_array_equal(got, alone)


def test_the_pools_spin_is_set_at_run_time_and_bounds_idle_cpu(monkeypatch):
    """An idle pool thread spins for the set time before it sleeps: a long spin burns CPU while the process waits (what
    a ring node that owns its cores wants between hops), no spin burns none; products stay right either way."""
    import time
    if hooks.NUM_THREADS() < 2:
        pytest.skip("one core: no pool threads")
    rng = np.random.default_rng(3)
    raw = BLOCKS[Q4_1](rng, 4096, 576)  # a product split over the cores
    linear = Linear(576, 4096)
    Tensor.realize(*linear.set(pack_ggml(raw, Q4_1, (4096, 576))))
    dense = linear.matrix().numpy()
    step = _product_step(linear)

    def idle_cpu_after_a_step(spin_s: float) -> float:
        assert hooks.set_pool_spin(spin_s)
        x = rng.standard_normal((1, 1, 576)).astype(np.float32)
        # the reference without BLAS: its threads busy-wait after a product too
        np.testing.assert_allclose(hooks.read_host(step(Tensor(x).realize())), (x[..., None, :] * dense).sum(-1),
                                   rtol=1e-4, atol=1e-3)
        c0 = time.process_time()
        time.sleep(0.06)
        return time.process_time() - c0
    try:
        for _ in range(3):
            idle_cpu_after_a_step(0.0)
        no_spin = min(idle_cpu_after_a_step(0.0) for _ in range(2))
        long_spin = max(idle_cpu_after_a_step(0.05) for _ in range(2))
    finally:
        hooks.set_pool_spin(hooks.pool_spin_seconds())
    assert long_spin > 0.015, long_spin
    assert no_spin < 0.01, no_spin
    monkeypatch.setenv("EXO_MEDUSA_POOL_SPIN_MS", "fast")
    with pytest.raises(ValueError, match="EXO_MEDUSA_POOL_SPIN_MS"):
        hooks.pool_spin_seconds()
    monkeypatch.setenv("EXO_MEDUSA_POOL_SPIN_MS", "12.5")
    assert hooks.pool_spin_seconds() == 0.0125
    with pytest.raises(ValueError, match="between 0 and 1 s"):
        hooks.set_pool_spin(-1)
