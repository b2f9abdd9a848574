"""Start-up from disk: a session's captured steps, weights and tokenizer, stored after a run and loaded by the next.

Scheduling and capturing the step kinds a generation uses (prefill chunks, the heads' tree, the draft chains) takes
about a minute on a 2-core CPU, and loading a GGUF several seconds; a stored session loads in about a second and its
steps replay at once (tinygrad_hooks section 9). The file is keyed by everything the captures depend on: the model
file, the heads and model cards (sizes and modification times), the options, the device, the environment variables
that change kernels, tinygrad's version and this package's own source (a code change must never replay old kernels).
A file that fails to load is removed and the session is built the usual way. Steps captured during a run that the
file lacks (a long prompt's 128-token chunk, sampling's steps) are added when the run ends. The files are pickles
(tinygrad's own format for captures), as trusted as tinygrad's kernel cache beside them: never point
EXO_MEDUSA_CACHE_DIR at a directory others can write.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .generate import Generator
from .sampling import GenerationConfig
from .session import MedusaOptions, Session, default_datastore, open_session
from .steps import ShardSteps
from ..model.device import choose_device
from ..model.loader import LoadedModel
from ..model.registry import MODELS_DIR, resolve
from ..model.transformer import KVCache
from ..model.weights import DTYPES
from ..kernels import tinygrad_hooks
from ..kernels.tinygrad_hooks import (NUM_THREADS, captured_of, dump_captured, install_captured, load_captured,
                                      read_host, written_buffers)

log = logging.getLogger(__name__)
FORMAT = 1
KEEP_FILES = 4   # stored sessions kept (newest first): each holds a model's weights, ~0.3 GB for SmolLM2-135M
# environment variables that change which kernels tinygrad builds or how they run (DEV: in the device, key_device)
KERNEL_ENV = ("BEAM", "NOOPT", "CPU_LLVM", "CC", "JIT", "THREADS", "EXO_MEDUSA_KERNELS", "EXO_MEDUSA_THREADS")
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# a GPU backend opens only where one of these exists (NV and CUDA, AMD, other GPUs, Jetson, PCI passthrough)
GPU_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dri", "/dev/nvhost-ctrl-gpu", "/dev/vfio")


def cache_dir() -> Path:
    """EXO_MEDUSA_CACHE_DIR, else ~/.cache/exo-tinygrad-medusa (XDG_CACHE_HOME respected)."""
    if override := os.environ.get("EXO_MEDUSA_CACHE_DIR"):
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "exo-tinygrad-medusa"


def _stat(path: Path) -> list:
    """(relative name, size, mtime_ns) of a file, or of every file under a directory."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return [(str(p.relative_to(path)) if path.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _cpu_digest() -> str:
    """The CPU's model and instruction-set flags: stored programs are compiled for the CPU they ran on (clang's
    -march=native), so a cache directory shared with another machine must not replay them there."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return hashlib.sha256("\n".join(sorted(set(lines))).encode()).hexdigest()[:16]


def _source_digest() -> str:
    """The package's own code and data: any change makes stored captures stale."""
    h = hashlib.sha256()
    for p in sorted(PACKAGE_DIR.rglob("*")):
        if p.is_file() and p.suffix in (".py", ".json", ".c", ".h") and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(PACKAGE_DIR)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def key_device(device: str | None) -> str:
    """The device a session runs on, as choose_device picks it, without its probe of every GPU backend (~2 s on a
    machine without a GPU, most of a stored session's start-up) where no GPU device node exists: then it is the CPU."""
    from tinygrad.helpers import DEV
    if not (device or DEV.device) and sys.platform != "darwin" and not any(os.path.exists(p) for p in GPU_NODES):
        return "CPU"
    return choose_device(device)[0]


def session_key(model: str | None, device: str, dtype: str | None, max_context: int | None, medusa: MedusaOptions,
                weights: str | None) -> str:
    """The key of a stored session: changes whenever what it would hold could differ."""
    from importlib.metadata import version
    resolved = resolve(model)
    heads = medusa.heads or (resolved.card.heads_path() if resolved.card else None) if medusa.enabled else None
    parts = {
        "format": FORMAT, "model": str(resolved.path), "kind": resolved.kind, "files": _stat(resolved.path),
        "device": device, "dtype": dtype, "max_context": max_context, "weights": weights,
        "medusa": [medusa.enabled, heads, medusa.num_heads, medusa.num_layers, medusa.choices],
        "heads_files": _stat(Path(heads)) if heads else [], "choices_file": _stat(Path(medusa.choices)) if medusa.choices else [],
        "models_dir": _stat(MODELS_DIR), "env": {k: os.environ.get(k) for k in KERNEL_ENV}, "threads": NUM_THREADS(),
        "tinygrad": version("tinygrad"), "python": sys.version, "machine": platform.machine(), "cpu": _cpu_digest(), "source": _source_digest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _jits(steps: ShardSteps) -> dict:
    jits = {f"prefill{C}": jit for C, jit in steps.prefill_steps.items()}
    jits.update({name: getattr(steps, name) for name in ("verify_greedy", "verify_logits", "compact",
                                                           "propose_after_prefill", "propose_after_verify")})
    return jits


def captures(generator: Generator) -> dict:
    """{kind: {step name: capture}} of every step captured so far."""
    out = {}
    for kind, steps in generator.step_kinds().items():
        if found := {name: c for name, jit in _jits(steps).items() if (c := captured_of(jit)) is not None}:
            out[kind] = found
    return out


def _count(caps: dict) -> int:
    return sum(len(v) for v in caps.values())


@dataclass
class StoredSession:
    """Where a session is stored, and whether it came from there (`hit`)."""
    path: Path | None
    hit: bool = False
    stored: int = 0                  # captures the file held when loaded
    load_s: float = 0.0

    def prepare(self, session: Session, prompt_ids: list[int], cfg: GenerationConfig) -> None:
        """A loaded capture links its calls into one replay on its first call (~0.1 s a step kind on 2 idle cores,
        more than a whole decode step): make those first calls before the generation's clock starts. A one-token
        generation of the prompt (its prefill chunks, the first tree), then a placeholder verify of every draft
        kind at position 0, which the next prefill rewrites."""
        generator = session.generator
        generator.generate(prompt_ids, replace(cfg, max_new_tokens=1))
        for steps in generator.step_kinds().values():
            if captured_of(steps.verify_greedy) is not None:
                x = steps.host("tokens", np.zeros((1, steps.tree.size), dtype=np.int32))
                read_host(steps.greedy_summary(x, generator.cache.layers, steps.bind(0)))

    def save_if_grown(self, session: Session) -> bool:
        """Store the session when it holds captures the file lacks (all of them on a first run). Returns whether it
        wrote."""
        if self.path is None:
            return False
        caps = captures(session.generator)
        if _count(caps) <= self.stored:
            return False
        generator, loaded = session.generator, session.loaded
        state = {"format": FORMAT, "device": loaded.device, "model": loaded.model, "tokenizer": loaded.tokenizer, "heads": session.heads,
                 "tree": session.tree, "cache": generator.cache.layers, "captures": caps,
                 "step_seconds": dict(generator.step_seconds)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".steps-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                # contents never needed: the KV cache, and what the captures write before they read it
                fresh = [*generator.cache.layers, *(b for caps_of in caps.values() for c in caps_of.values()
                                                    for b in written_buffers(c))]
                dump_captured(state, f, fresh=fresh)
            os.replace(tmp, self.path)  # whole or not at all, also with two runs storing at once
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.stored = _count(caps)
        log.info("stored %d captured steps in %s (%.1f s)", self.stored, self.path, time.perf_counter() - t0)
        _prune(self.path.parent)
        return True


def _prune(directory: Path) -> None:
    files = sorted(directory.glob("steps-*.pkl"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[KEEP_FILES:]:
        old.unlink(missing_ok=True)


def open_session_stored(model: str | None = None, *, device: str | None = None, dtype: str | None = None,
                        max_context: int | None = 2048, medusa: MedusaOptions = MedusaOptions(),
                        weights: str | None = None, use_store: bool = True) -> tuple[Session, StoredSession]:
    """open_session, from the stored session when there is one for exactly these options and files."""
    if not use_store:
        return open_session(model, device=device, dtype=dtype, max_context=max_context, medusa=medusa,
                            weights=weights), StoredSession(None)
    path = cache_dir() / f"steps-{session_key(model, key_device(device), dtype, max_context, medusa, weights)}.pkl"
    if path.is_file():
        t0 = time.perf_counter()
        try:
            session, stored = _load(path, model, device)
            store = StoredSession(path, hit=True, stored=stored, load_s=time.perf_counter() - t0)
            log.info("loaded the stored session %s (%d captured steps, %.2f s)", path, stored, store.load_s)
            os.utime(path)  # recently used: kept by _prune
            return session, store
        except Exception as e:  # a truncated or foreign file fails in many ways inside pickle: rebuild it
            log.warning("stored session %s is unusable (%s: %s): rebuilding it", path, type(e).__name__, e)
            path.unlink(missing_ok=True)
    session = open_session(model, device=device, dtype=dtype, max_context=max_context, medusa=medusa, weights=weights)
    return session, StoredSession(path)


def _load(path: Path, model: str | None, device: str | None) -> tuple[Session, int]:
    tinygrad_hooks.install()
    with open(path, "rb") as f:
        state = load_captured(f)
    if state.get("format") != FORMAT:
        raise ValueError(f"format {state.get('format')} is not {FORMAT}")
    device, _ = choose_device(device or state["device"])   # the one key_device named: made tinygrad's default
    os.environ["DEV"] = device   # as choose_device does with its own pick: compile workers see the same default
    transformer = state["model"]
    dtype = next(name for name, dt in DTYPES.items() if dt == transformer.float_weight.dtype)
    weights = "compact" if transformer.packed_logits is not None else "float32"
    loaded = LoadedModel(transformer, state["tokenizer"], resolve(model), device, dtype, weights)
    generator = Generator(transformer, loaded.tokenizer.eos_token_ids, state["tree"], state["heads"],
                          datastore=default_datastore(loaded), cache=KVCache(state["cache"], transformer.max_context),
                          step_seconds=state["step_seconds"], tokenizer=loaded.tokenizer)
    for kind, caps in state["captures"].items():
        jits = _jits(generator.steps if kind == "tree" else generator.chain_steps(kind))
        for name, captured in caps.items():
            install_captured(jits[name], captured)
    return Session(loaded, generator, state["heads"], state["tree"]), _count(state["captures"])

