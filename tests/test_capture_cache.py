"""Stored sessions (decoding/capture_cache.py, tinygrad_hooks section 9): a capture pickled and loaded replays the
same values on its own buffers, a stored session generates exactly what the built one does, and a changed file or a
broken store is rebuilt."""
import io
import logging
import os
import shutil

import numpy as np
import pytest
from tinygrad import Tensor, TinyJit

from exo_tinygrad_medusa.decoding.capture_cache import open_session_stored, session_key
from exo_tinygrad_medusa.decoding.heads import random_heads
from exo_tinygrad_medusa.decoding.sampling import GenerationConfig
from exo_tinygrad_medusa.decoding.session import MedusaOptions
from exo_tinygrad_medusa.kernels.tinygrad_hooks import (captured_of, dump_captured, install_captured, load_captured,
                                                         read_host, written_buffers)
from exo_tinygrad_medusa.model.loader import load_model


def test_a_loaded_capture_replays_on_its_own_buffers():
    weight = Tensor(np.arange(6, dtype=np.float32)).contiguous().realize()
    scratch = Tensor.full((6,), 5.0).contiguous().realize()   # stored as "fresh": comes back zeroed
    step = TinyJit(lambda x: (x * weight + scratch).realize())
    x = Tensor(np.ones(6, dtype=np.float32)).contiguous().realize()
    for _ in range(3):
        step(x)
    assert step.captured._written_uops  # worked out on the first replay: stored with the capture
    written = written_buffers(step.captured)
    assert written and weight.uop.base.buffer not in written and scratch.uop.base.buffer not in written
    f = io.BytesIO()
    dump_captured({"step": step.captured, "weight": weight, "scratch": scratch}, f, fresh=[scratch, *written])
    f.seek(0)
    state = load_captured(f)
    weight.assign(Tensor.zeros(6)).realize()   # the original's buffers change; the loaded ones must not
    assert "_written_uops" in state["step"].__dict__
    assert np.array_equal(read_host(state["scratch"]), np.zeros(6)) and np.array_equal(state["weight"].numpy(), np.arange(6))
    loaded = TinyJit(lambda x: x)   # its function is never called: it replays the installed capture
    install_captured(loaded, state["step"])
    assert captured_of(loaded) is state["step"]
    out = loaded(Tensor(np.full(6, 2.0, dtype=np.float32)).contiguous().realize())
    assert np.array_equal(out.numpy(), 2 * np.arange(6))   # 2 * weight + the zeroed scratch
    assert np.array_equal(step(x).numpy(), np.full(6, 5.0))  # the original: its zeroed weight, its own scratch


@pytest.fixture()
def store_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_MEDUSA_CACHE_DIR", str(tmp_path / "store"))
    return tmp_path / "store"


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    # a copy: a test touches its files
    return shutil.copytree(tiny_checkpoint("llama", seed=3), tmp_path_factory.mktemp("ckpt") / "model")


@pytest.fixture(scope="module")
def heads_dir(checkpoint, tmp_path_factory):
    loaded = load_model(str(checkpoint))
    return str(random_heads(loaded.config, loaded.model.lm_head, num_heads=2, scale=0.3).save(tmp_path_factory.mktemp("heads")))


def test_session_key_follows_files_and_options(checkpoint, heads_dir, store_dir):
    medusa = MedusaOptions(True, heads_dir, choices="chain-2")
    key = session_key(str(checkpoint), "CPU", None, 64, medusa, None)
    assert key == session_key(str(checkpoint), "CPU", None, 64, medusa, None)
    assert key != session_key(str(checkpoint), "CPU", None, 128, medusa, None)
    assert key != session_key(str(checkpoint), "CPU", None, 64, MedusaOptions(True, heads_dir, choices="chain-3"), None)
    assert key != session_key(str(checkpoint), "CPU", None, 64, MedusaOptions(), None)
    weights = next(checkpoint.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))   # the checkpoint was rewritten
    assert key != session_key(str(checkpoint), "CPU", None, 64, medusa, None)


@pytest.mark.slow
def test_stored_session_generates_the_same_tokens(checkpoint, heads_dir, store_dir, caplog):
    options = dict(max_context=64, medusa=MedusaOptions(True, heads_dir, choices="chain-2"))
    cfg = GenerationConfig(max_new_tokens=10)
    prompt = [1, 5, 9, 2, 7]
    built, store = open_session_stored(str(checkpoint), **options)
    assert not store.hit and store.path.parent == store_dir and not store.path.exists()
    built.warm_up(prompt, cfg)
    expected = built.generator.generate(prompt, cfg).generated_ids
    assert store.save_if_grown(built) and store.path.is_file()
    assert not store.save_if_grown(built)   # nothing new captured: not written again

    loaded, hit = open_session_stored(str(checkpoint), **options)
    assert hit.hit and hit.stored == store.stored
    names = built.loaded.model.parameters()
    for name, tensor in loaded.loaded.model.parameters().items():
        assert np.array_equal(tensor.numpy(), names[name].numpy()), name
    assert loaded.tree.size == built.tree.size and loaded.tokenizer.vocab_size == built.tokenizer.vocab_size
    steps = loaded.generator.steps
    assert steps.verify_greedy.captured is not None and steps.prefill_steps[32].captured is not None
    assert loaded.generator.generate(prompt, cfg).generated_ids == expected
    # a different start position and a longer run replay the same captures
    assert loaded.generator.generate([3, *prompt], cfg).generated_ids == built.generator.generate([3, *prompt], cfg).generated_ids

    store.path.write_bytes(store.path.read_bytes()[:1000])   # a truncated file: rebuilt, with a warning
    with caplog.at_level(logging.WARNING):
        rebuilt, again = open_session_stored(str(checkpoint), **options)
    assert not again.hit and not store.path.exists() and "unusable" in caplog.text
    assert rebuilt.generator.generate(prompt, cfg).generated_ids == expected


def test_without_the_store_nothing_is_written(checkpoint, store_dir):
    session, store = open_session_stored(str(checkpoint), max_context=64, use_store=False)
    session.generator.generate([1, 2, 3], GenerationConfig(max_new_tokens=3))
    assert store.path is None and not store.save_if_grown(session) and not store_dir.exists()
