"""Every hook into tinygrad's internals, in one marked module. HOOKS INTO tinygrad 0.14 INTERNALS: see
tests/test_tinygrad_hooks.py, which fails loudly when an upgrade moves what this relies on.

1. Kernel choices for products (`choose_opts`). tinygrad's hand-coded heuristic leaves a matrix-vector product a
   serial chain of scalar multiply-adds. The model holds weights as 16-column panels (model.Linear); their products
   run as vector multiply-adds when the panel's columns are upcast as one vector and the token axis by up to 4 (every
   weight load serves 4 tokens), with the panels split over the cores. The choices travel inside the kernel's AST
   (`KernelInfo.opts_to_apply`), the one way that reaches tinygrad's compile processes; they are read off the AST in
   the parent: no search, nothing to cache, the same choices on every machine.
2. Every core (`ParallelSlices`). tinygrad 0.14's CPU device splits a kernel into THREAD slices (a `core_id`
   argument) but runs them one after another. A small C pool runs them on every core: the caller and the pool take
   slices from a shared counter, so a descheduled pool thread never stalls the caller; idle pool threads sleep.
3. One C call per captured step (`CPUGraph`): a TinyJit capture replays as a table of kernel calls run by one C loop,
   instead of one Python launch per kernel.
4. The kernel cache db opened shareable between threads (`share_kernel_cache`): the engine compiles on its own
   thread while Exo touches tinygrad on others.
5. (none: a GGUF's raw codes are read with numpy, model/gguf_file.py, without tinygrad's internals)
6. Host copies (`device_buffer`, `write_host`, `read_host`): a step's token ids in and its small result out, copied
   straight to and from realized buffers instead of through the scheduler.
7. Hand-written C kernels (`_hand_program`): packed products (products.py) matched by their whole AST, and
   kernels requested by name through Tensor.custom_kernel (attention.py), compiled from our C source.
8. Devices without native float16 (`emulates_float16`). Sections 1-3 and 7 apply to the CPU device only (each checks
   the device; GPU-style devices such as CL, CUDA, METAL keep tinygrad's own kernels and launches, packed weights
   included). tinygrad 0.14 BUG: where the renderer lacks float16 (pocl's OpenCL on a CPU has no cl_khr_fp16), float16
   is emulated as float32, and the emulation breaks every reduction computed in float16 (a max, or the one-hot sum of
   an embedding gather): its accumulator comes out as AFTER(CAST(...)), which fails UOp verification ("UOp
   verification failed ... Ops.AFTER") when the kernel compiles. Workaround: such devices default to float32, and
   --dtype float16 there is refused with that reason (model/loader.py). The same emulation zeroes whole blocks when
   tinygrad's GGUF reader dequantizes there (it computes in float16): the CPU dequantizes GGUFs for such devices
   (loader._gguf_reader_device). tests/test_device_cl.py fails when a tinygrad upgrade fixes either.
9. Captured steps on disk (`dump_captured`, `load_captured`, `captured_of`, `install_captured`): a TinyJit capture
   pickles with its compiled programs and every buffer it reads (tinygrad's own pickling); loaded in a new process,
   each buffer gets a fresh slot number (the old process's numbers would alias buffers made here: tinygrad
   deduplicates UOps by value), buffers named `fresh` (a KV cache) come back zeroed instead of stored, and a loaded
   capture replays at once, with no scheduling. decoding/capture_cache.py uses it for start-up.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import sqlite3
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable
from pathlib import Path

import numpy as np
import tinygrad.helpers
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.codegen.opt.postrange import Scheduler
from tinygrad.engine import realize
from tinygrad.engine.jit import GraphException, GraphRunner
from tinygrad.uop.ops import AxisType, KernelInfo, Ops, PatternMatcher, UOp, UPat, graph_rewrite

if TYPE_CHECKING:
    from tinygrad import Tensor

log = logging.getLogger(__name__)

# -- 1. kernel choices -------------------------------------------------------------------------------------------
VECTOR = 16          # floats the output axis is upcast by (one AVX-512 register, two AVX2 ones)
TOKENS_IN_FLIGHT = 4  # token rows sharing each weight load
MIN_THREAD_WORK = 1 << 18  # multiply-adds below which a kernel stays on one core (a hand-off costs ~1 µs)


def _pre_opt_ast(ast: UOp) -> UOp:
    """The AST as tinygrad's apply_opts sees it: the rewrites full_rewrite_to_sink runs before optimizing."""
    from tinygrad import codegen as cg
    sink = graph_rewrite(ast, cg.multi_pm, name="multi_pm")
    sink = graph_rewrite(sink, cg.pm_mops, name="early movement ops", bottom_up=True)
    sink = graph_rewrite(sink, cg.pm_load_collapse, name="load collapse")
    sink = graph_rewrite(sink, cg.pm_split_ranges + cg.pm_flatten_range, ctx={}, name="split ranges")
    sink = graph_rewrite(sink, cg.sym + cg.pm_flatten_range, name="initial symbolic")
    return graph_rewrite(sink, cg.pm_flatten_range + cg.pm_simplify_ranges, ctx={}, name="simplify ranges")


def _stride(idx: UOp, rng: UOp) -> int | None:
    """The constant stride of `rng` in a flat buffer index, 0 when the index does not depend on it, None if unclear."""
    if rng not in idx.backward_slice_with_self:
        return 0
    for term in idx.split_uop(Ops.ADD):
        if term is rng:
            return 1
        if term.op is Ops.MUL and rng in term.src:
            other = term.src[1] if term.src[0] is rng else term.src[0]
            if other.op is Ops.CONST:
                return int(other.arg)
    return None


@dataclass
class ProductAxes:
    """The roles of a product kernel's output axes, out[t, b, i, j] = sum_r a[t, r] * w[b, r, i, j]."""
    vector: int               # unit stride in the output and in the weight: the accumulators' vector
    lane: int | None = None   # the next output axis (stride = the vector's size) that the activations ignore: codes
                              # unpacked from 32-bit words, one lane per byte
    token: int | None = None  # the activations depend on it, the weight does not: each weight load serves these
    panel: int | None = None  # the largest other output axis: split over the cores


def _product_axes(k: Scheduler) -> ProductAxes | None:
    store = next((u for u in k.ast.toposort() if u.op is Ops.STORE), None)
    if store is None or store.src[0].op is not Ops.INDEX:
        return None
    output, reduce_rngs = store.src[0], [k.rngs[a] for a in k.axes_of(AxisType.REDUCE)]
    inputs = [b for b in k.bufs if b is not output]
    axes = k.axes_of(AxisType.LOOP, AxisType.GLOBAL, AxisType.WEAK)
    stride = {(id(b), a): _stride(b.src[1].get_idx(), k.rngs[a]) for b in [output, *inputs] for a in axes}
    if None in stride.values():
        return None
    vector = next((a for a in axes if stride[(id(output), a)] == 1 and any(stride[(id(b), a)] == 1 for b in inputs)), None)
    if vector is None:
        return None
    # activations: inputs that read along the reduction but not along the vector
    acts = [b for b in inputs if stride[(id(b), vector)] == 0 and any(r in b.src[1].get_idx().backward_slice_with_self for r in reduce_rngs)]
    roles = ProductAxes(vector)
    rest = []
    for a in axes:
        if a == vector or k.full_shape[a] == 1:
            continue
        act_reads = any(stride[(id(b), a)] != 0 for b in acts)
        if roles.lane is None and not act_reads and stride[(id(output), a)] == k.full_shape[vector]:
            roles.lane = a
        elif roles.token is None and act_reads:
            roles.token = a
        else:
            rest.append(a)
    roles.panel = max(rest, key=lambda a: k.full_shape[a], default=None)
    return roles


def choose_opts(ast: UOp, ren) -> tuple[Opt, ...] | None:
    """Choices for a product whose weight is read with unit stride along an output axis of at most 16 (the panels of
    model.Linear), else None (the kernel keeps tinygrad's heuristic)."""
    k = Scheduler(_pre_opt_ast(ast), ren)
    if len(k.reduceops) != 1:
        return None
    if not all(isinstance(s, int) for s in k.full_shape):
        return _context_opts(k)
    roles = _product_axes(k)
    if roles is None or (k.full_shape[roles.vector] > VECTOR and k.full_shape[roles.vector] % VECTOR):
        return None
    if roles.lane is not None and k.full_shape[roles.vector] * k.full_shape[roles.lane] > VECTOR:
        roles.lane = None  # a lane axis only when vector x lanes fit one panel
    # opts name axes by position, and positions move as opts apply: follow the ranges themselves
    vector, lane, token = (None if a is None else k.rngs[a] for a in (roles.vector, roles.lane, roles.token))
    work, threads = 1, NUM_THREADS()
    for s in k.full_shape:
        work *= s
    try:
        if threads > 1 and work >= MIN_THREAD_WORK and roles.panel is not None and k.full_shape[roles.panel] % threads == 0:
            k.apply_opt(Opt(OptOps.THREAD, roles.panel, threads))
        # tokens first: the accumulators then lie [token][output], contiguous along the output, one vector each
        if token is not None:
            amt = next((a for a in (TOKENS_IN_FLIGHT, 3, 2) if int(token.vmax + 1) % a == 0), None)
            if amt is not None:
                k.apply_opt(Opt(OptOps.UPCAST, k.rngs.index(token), amt))
        if lane is not None:
            k.apply_opt(Opt(OptOps.UPCAST, k.rngs.index(lane), 0))
        k.apply_opt(Opt(OptOps.UPCAST, k.rngs.index(vector), min(VECTOR, int(vector.vmax + 1))))
    except Exception as e:  # KernelOptError and friends: keep the heuristic rather than fail the compile
        log.debug("kernel choices %s rejected for %s: %s", k.applied_opts, ast.arg.name, e, exc_info=True)
        return None
    return tuple(k.applied_opts)


REUSE_MAX = 16  # accumulators a context kernel keeps per loaded key/value


def _context_opts(k: Scheduler) -> tuple[Opt, ...] | None:
    """Choices for a reduction over the cached context, whose length is symbolic (attention scores, the weighted sum
    of values, softmax statistics). Left to the heuristic they run as scalar chains on one core, which at a 512-token
    context cost more than all the weight products of a batched step. Three choices, each only where it applies:
    THREAD over the outermost fixed output axis that splits evenly (the sequences of a batch); UPCAST the fixed
    output axes that a context-reading input ignores (the query heads of a group and the query tokens: each loaded
    key or value then serves all of them); UPCAST by 16 an output axis of unit stride in the output and in such an
    input (the head dimension of the weighted values: one vector of accumulators)."""
    store = next((u for u in k.ast.toposort() if u.op is Ops.STORE), None)
    if store is None or store.src[0].op is not Ops.INDEX:
        return None
    output = store.src[0]
    axes = k.axes_of(AxisType.LOOP, AxisType.GLOBAL, AxisType.WEAK)
    fixed = [a for a in axes if isinstance(k.full_shape[a], int) and k.full_shape[a] > 1]
    symbolic = [k.rngs[a] for a in range(len(k.full_shape)) if not isinstance(k.full_shape[a], int)]
    reads = lambda b, a: k.rngs[a] in b.src[1].get_idx().backward_slice_with_self
    # inputs that walk the context: the cached keys or values, read along the symbolic axis and the reduction (masks
    # read the symbolic axis too, but not the reduction, and ignore the axes a key serves)
    reduce_rngs = [k.rngs[a] for a in k.axes_of(AxisType.REDUCE)]
    walks = lambda b, rngs: any(r in b.src[1].get_idx().backward_slice_with_self for r in rngs)
    context = [b for b in k.bufs if b is not output and walks(b, symbolic) and walks(b, reduce_rngs)]
    if not context:
        return None
    vector = next((a for a in fixed if _stride(output.src[1].get_idx(), k.rngs[a]) == 1 and k.full_shape[a] % VECTOR == 0
                   and any(_stride(b.src[1].get_idx(), k.rngs[a]) == 1 for b in context)), None)
    reuse = [a for a in fixed if a != vector and any(not reads(b, a) for b in context)
             and any(reads(b, a) for b in k.bufs if b is not output)]
    threads, work = NUM_THREADS(), 1
    for a in range(len(k.full_shape)):
        work *= k.full_shape[a] if isinstance(k.full_shape[a], int) else 256  # a typical context length
    split = next((a for a in fixed if a not in reuse and a != vector and k.full_shape[a] % threads == 0), None)
    rngs = {a: k.rngs[a] for a in fixed}
    try:
        if threads > 1 and work >= MIN_THREAD_WORK and split is not None:
            k.apply_opt(Opt(OptOps.THREAD, split, threads))
        budget = REUSE_MAX if vector is None else REUSE_MAX // 4  # a vector holds 16 accumulators already
        for a in reuse:  # whole when it fits the budget, else by the largest of 4, 2 that divides it
            size = int(rngs[a].vmax + 1)
            amt = size if size <= budget else next((n for n in (4, 2) if n <= budget and size % n == 0), None)
            if amt is not None:
                k.apply_opt(Opt(OptOps.UPCAST, k.rngs.index(rngs[a]), amt if amt < size else 0))
                budget //= amt
        if vector is not None:
            k.apply_opt(Opt(OptOps.UPCAST, k.rngs.index(rngs[vector]), VECTOR))
    except Exception as e:  # as in choose_opts: keep the heuristic rather than fail the compile
        log.debug("context kernel choices %s rejected: %s", k.applied_opts, e, exc_info=True)
        return None
    return tuple(k.applied_opts) or None


def NUM_THREADS() -> int:
    """Cores the large products split over: EXO_MEDUSA_THREADS, else every core tinygrad sees."""
    return max(1, int(os.environ.get("EXO_MEDUSA_THREADS", 0)) or tinygrad.helpers.NUM_CPU_THREADS.value)


def pool_spin_seconds() -> float:
    """How long idle pool threads spin before they sleep: EXO_MEDUSA_POOL_SPIN_MS, else DEFAULT_POOL_SPIN_S."""
    text = os.environ.get("EXO_MEDUSA_POOL_SPIN_MS", "")
    try:
        ms = float(text) if text else DEFAULT_POOL_SPIN_S * 1e3
    except ValueError:
        raise ValueError(f"EXO_MEDUSA_POOL_SPIN_MS must be a number of milliseconds, got {text!r}") from None
    if not 0 <= ms <= 1000:
        raise ValueError(f"EXO_MEDUSA_POOL_SPIN_MS must be between 0 and 1000 ms, got {text!r}")
    return ms / 1e3


def set_pool_spin(seconds: float) -> bool:
    """Set how long idle pool threads spin before they sleep (this process); False where no pool runs (not the CPU
    device's hooks, or one core)."""
    if not 0 <= seconds <= 1:
        raise ValueError(f"the pool's spin must be between 0 and 1 s, got {seconds}")
    if _pool is None:
        return False
    _pool.set_spin(seconds)
    return True


_choices: dict[bytes, tuple[Opt, ...] | None] = {}


def _with_choices(ctx, call: UOp, sink: UOp) -> UOp | None:
    info = sink.arg
    device = call.src[1].device if len(call.src) > 1 else None
    dev = device if isinstance(device, str) else (device[0] if device else None)
    if dev is None or not dev.startswith("CPU"):
        return None
    from tinygrad import Device
    if (program := _hand_program(sink, Device[dev].renderer)) is not None:
        return call.replace(src=(program, *call.src[1:]))
    if not isinstance(info, KernelInfo) or info.opts_to_apply is not None or info.beam or info.applied_opts:
        return None
    # the same kernel recurs (every layer, every load-time copy): decide once per AST; kernels without a reduction
    # (copies, elementwise) keep the heuristic without the cost of the pre-opt rewrites
    if (opts := _choices.get(sink.key, False)) is False:
        has_reduce = any(u.op is Ops.REDUCE for u in sink.toposort())
        opts = _choices[sink.key] = choose_opts(sink, Device[dev].renderer) if has_reduce else None
    if opts is None:
        return None
    return call.replace(src=(sink.replace(arg=replace(info, opts_to_apply=opts)), *call.src[1:]))


pm_choices = PatternMatcher([
    (UPat(Ops.CALL, src=(UPat(Ops.SINK, name="sink"),), name="call", allow_any_len=True), _with_choices),
])


# -- 2. every core -----------------------------------------------------------------------------------------------
MAX_ARGS = 60        # kernel arguments the trampoline forwards (tinygrad's CPU programs take at most 63)
GRAPH_CMD_WORDS = 3 + MAX_ARGS
# how long an idle pool thread spins for the next job before it sleeps. Short by default: a spinning thread burns a
# core that other processes may need (on a loaded machine long spins made steps several times slower). A ring node
# that owns its cores waits a link hop between jobs and pays a wake-up for every sleep: EXO_MEDUSA_POOL_SPIN_MS (or
# set_pool_spin) lengthens the spin for such a node.
DEFAULT_POOL_SPIN_S = 0.0003

_POOL_SRC = r"""
#include <pthread.h>
#include <stdint.h>
#include <time.h>
#include <stdatomic.h>
#if defined(__x86_64__)
#define RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define RELAX() __asm__ volatile("yield")
#else
#define RELAX() do {} while (0)
#endif
typedef uint64_t u64;
typedef void (*kernel_t)(PARAMS);
static kernel_t job_fn; static u64 job_args[NARGS]; static int job_core, pool_size;
static atomic_int job_n;
/* the job's generation (high 32 bits) and its next free slice (low 32 bits), in one word: a pool thread takes a slice
   only of the job it saw published, so one that wakes late can never run a slice of a newer job with stale
   arguments, nor count one as done */
static atomic_ulong ticket;
static atomic_int job_done, sleepers;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER; static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t job_mu = PTHREAD_MUTEX_INITIALIZER;
#define CALL(fn, a) fn(ARRAY_ARGS)
#define GEN(v) ((v) >> 32)
/* slices are taken from a shared counter, not assigned: when a pool thread is descheduled (a busy machine), the
   caller runs its slices itself instead of waiting for it */
static void run_slices(u64 gen) {
  for (;;) {
    u64 v = atomic_load(&ticket);
    if (GEN(v) != gen || (v & 0xffffffffu) >= (u64)atomic_load(&job_n)) return;
    if (!atomic_compare_exchange_weak(&ticket, &v, v + 1)) continue;
    /* slice v of job `gen` is ours; the caller waits for it, so the job's fields stay as they are until we are done */
    u64 a[NARGS];
    for (int i = 0; i < NARGS; i++) a[i] = job_args[i];
    a[job_core] = v & 0xffffffffu;
    CALL(job_fn, a);
    atomic_fetch_add(&job_done, 1);
  }
}
static atomic_long spin_ns = 300000;
void pool_set_spin(long ns) { atomic_store(&spin_ns, ns < 0 ? 0 : ns); }
static long elapsed_ns(const struct timespec *t0) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (long)((t.tv_sec - t0->tv_sec) * 1000000000LL + (t.tv_nsec - t0->tv_nsec));
}
static void *worker(void *arg) {
  u64 seen = 0;
  (void)arg;
  for (;;) {
    long spin = atomic_load(&spin_ns);
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 1; GEN(atomic_load(&ticket)) == seen; i++) {
      RELAX();
      if ((i & 255) == 0 && elapsed_ns(&t0) >= spin) break;  /* the clock is read every 256 pauses */
    }
    if (GEN(atomic_load(&ticket)) == seen) {  /* idle: sleep until the next job rather than burn a core */
      pthread_mutex_lock(&mu);
      atomic_fetch_add(&sleepers, 1);
      while (GEN(atomic_load(&ticket)) == seen) pthread_cond_wait(&cv, &mu);
      atomic_fetch_sub(&sleepers, 1);
      pthread_mutex_unlock(&mu);
    }
    seen = GEN(atomic_load(&ticket));
    run_slices(seen);
  }
  return 0;
}
int pool_start(int n) {
  for (int t = 1; t < n; t++) {
    pthread_t th;
    if (pthread_create(&th, 0, worker, 0)) return pool_size = t;
    pthread_detach(th);
  }
  return pool_size = n;
}
/* slices 0..n-1 of a THREAD-split kernel (its core_id argument at index core), on the caller and the pool */
static void dispatch(kernel_t fn, int n, int core, const u64 *args) {
  if (n <= 1 || pool_size <= 1) {
    u64 a[NARGS];
    for (int i = 0; i < NARGS; i++) a[i] = args[i];
    for (int t = 0; t < (n < 1 ? 1 : n); t++) { a[core] = (u64)t; CALL(fn, a); }
    return;
  }
  /* one job at a time: two Python threads (two engines in one process) may launch split kernels at once, and ctypes
     releases the GIL around this call */
  pthread_mutex_lock(&job_mu);
  job_fn = fn; job_core = core;
  atomic_store(&job_n, n);
  for (int i = 0; i < NARGS; i++) job_args[i] = args[i];
  atomic_store(&job_done, 0);
  u64 gen = GEN(atomic_load(&ticket)) + 1;
  atomic_store(&ticket, gen << 32);  /* publishes the fields above (sequentially consistent) */
  if (atomic_load(&sleepers)) { pthread_mutex_lock(&mu); pthread_cond_broadcast(&cv); pthread_mutex_unlock(&mu); }
  run_slices(gen);
  while (atomic_load(&job_done) < n) RELAX();
  pthread_mutex_unlock(&job_mu);
}
void pool_run(u64 fn, u64 n, u64 core, PARAMS) {
  u64 in[NARGS] = {ARGS};
  dispatch((kernel_t)fn, (int)n, (int)core, in);
}
/* a captured graph: count commands of CMD words each: kernel, slices (0: not split), core_id index, arguments;
   with `ns` set, each command's wall time in nanoseconds is added to ns[i] (profiling) */
void run_graph(const u64 *cmds, u64 count, u64 *ns) {
  struct timespec t0, t1;
  for (u64 i = 0; i < count; i++) {
    const u64 *c = cmds + i * CMDW;
    if (ns) clock_gettime(CLOCK_MONOTONIC, &t0);
    if (c[1] > 1) dispatch((kernel_t)c[0], (int)c[1], (int)c[2], c + 3);
    else { const u64 *a = c + 3; CALL(((kernel_t)c[0]), a); }
    if (ns) { clock_gettime(CLOCK_MONOTONIC, &t1); ns[i] += (u64)((t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec)); }
  }
}
"""


def _pool_source() -> str:
    params = ", ".join(f"u64 a{i}" for i in range(MAX_ARGS))
    args = ", ".join(f"a{i}" for i in range(MAX_ARGS))
    src = _POOL_SRC.replace("NARGS", str(MAX_ARGS)).replace("PARAMS", params)
    src = src.replace("CMDW", str(GRAPH_CMD_WORDS))
    src = src.replace("ARRAY_ARGS", ", ".join(f"a[{i}]" for i in range(MAX_ARGS)))
    return src.replace("ARGS", args)


class ParallelSlices:
    """The C pool: `run(fn_addr, n, core_slot, args)` runs slices 0..n-1 of a THREAD-split kernel on n cores."""

    def __init__(self, threads: int):
        """threads: cores split kernels run on (1: slices run in turn on the caller, as tinygrad does)."""
        spin = pool_spin_seconds()  # a bad setting fails before any thread starts
        lib_path = _build_pool()
        self.lib = ctypes.CDLL(str(lib_path))
        self.threads = self.lib.pool_start(ctypes.c_int(threads))
        self.run = self.lib.pool_run
        self.run.argtypes = [ctypes.c_uint64] * (3 + MAX_ARGS)
        self.run.restype = None
        self.run_graph = self.lib.run_graph
        self.run_graph.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p]
        self.run_graph.restype = None
        self.lib.pool_set_spin.argtypes = [ctypes.c_long]
        self.lib.pool_set_spin.restype = None
        self.set_spin(spin)

    def set_spin(self, seconds: float) -> None:
        self.lib.pool_set_spin(ctypes.c_long(int(seconds * 1e9)))


def _build_pool() -> Path:
    src = _pool_source()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "exo-tinygrad-medusa"
    lib = cache / f"pool-{hashlib.sha256(src.encode()).hexdigest()[:16]}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, suffix=".so", delete=False) as tmp:
            subprocess.run([os.environ.get("CC", "clang"), "-O2", "-shared", "-fPIC", "-pthread", "-x", "c", "-", "-o", tmp.name],
                           input=src.encode(), check=True, capture_output=True)
        os.replace(tmp.name, lib)  # atomic: concurrent processes never load a half-written library
    return lib


_pool: ParallelSlices | None = None


def _program_call(original):
    """Direct (non-HCQ2) launches: THREAD-split kernels go through the pool too."""
    @functools.wraps(original)
    def call(self, *bufs, global_size=(1, 1, 1), local_size=(1, 1, 1), vals=(), wait=False, timeout=None):
        slot = self.runtimevars.get("core_id")
        if slot is None or _pool is None or global_size[0] <= 1 or self.lvp:
            return original(self, *bufs, global_size=global_size, local_size=local_size, vals=vals, wait=wait, timeout=timeout)
        import time
        st = time.perf_counter()
        args = [b.va_addr for b in bufs] + [v or 0 for v in vals]  # the core_id slot is None here
        _pool.run(self.addr, global_size[0], slot, *args, *([0] * (MAX_ARGS - len(args))))
        return time.perf_counter() - st if wait else None
    return call


# -- 3. one C call per captured step ----------------------------------------------------------------------------------
class CPUGraph(GraphRunner):
    """A TinyJit capture on the CPU replayed by one C call that runs every kernel in order, instead of one Python
    launch per kernel (~490 a decode step, ~40 µs each: more than the kernels themselves once they are fast).
    The command table is built once; a replay only rewrites the arguments that change (input buffers, start_pos)."""

    def __init__(self, linear, input_uops=()):
        super().__init__(linear, input_uops)
        self.table = (ctypes.c_uint64 * (GRAPH_CMD_WORDS * len(self.calls)))()
        self.profile = None                      # per command accumulated ns, when profiling
        self.arg_slot: list[dict[int, int]] = []   # per command: call argument position -> kernel argument index
        self.var_slot: list[int] = []             # per command: kernel argument index of its first variable
        for j, ((_, prg, bufs, device_vars), runtime) in enumerate(zip(self.calls, self.runtimes)):
            if runtime is None or getattr(runtime, "lvp", False):
                raise GraphException("the CPU graph runs clang/LLVM programs only")
            info = prg.arg
            gsz, _ = info.launch_dims({v: 0 for v in self.vars})
            core = runtime.runtimevars.get("core_id")
            args = [bufs[i]._buf.va_addr for i in info.globals] + [device_vars.get(v.expr, 0) for v in info.vars]
            if len(args) > MAX_ARGS:
                raise GraphException(f"a kernel with {len(args)} arguments")
            base = j * GRAPH_CMD_WORDS
            self.table[base:base + 3] = [runtime.addr, gsz[0] if core is not None else 0, core or 0]
            self.table[base + 3:base + 3 + len(args)] = [a or 0 for a in args]
            self.arg_slot.append({pos: k for k, pos in enumerate(info.globals)})
            self.var_slot.append(len(info.globals))
        if self.launch_dims_replace:
            raise GraphException("symbolic launch dims")  # CPU kernels loop inside; only THREAD sets dims

    def __call__(self, input_uops, var_vals, wait=False):
        from tinygrad.device import MultiBuffer
        t = self.table
        for j, swaps in enumerate(self.uop_replace):
            for pos, slot in swaps:
                if (k := self.arg_slot[j].get(pos)) is not None:
                    buf = input_uops[slot].buffer
                    t[j * GRAPH_CMD_WORDS + 3 + k] = (buf.bufs[0] if isinstance(buf, MultiBuffer) else buf)._buf.va_addr
        for j, i, v in self.updated_vars(var_vals):
            t[j * GRAPH_CMD_WORDS + 3 + self.var_slot[j] + i] = v
        st = time.perf_counter()
        _pool.run_graph(ctypes.addressof(t), len(self.calls), None if self.profile is None else ctypes.addressof(self.profile))
        return time.perf_counter() - st if wait else None

    def start_profile(self) -> None:
        """Add each kernel's wall time (ns) to `profile` on every replay from now on (see kernel_times)."""
        self.profile = (ctypes.c_uint64 * len(self.calls))()

    def kernel_times(self) -> list[tuple[str, float]]:
        """(kernel name, accumulated µs) per command since start_profile."""
        return [(prg.arg.name, self.profile[j] / 1e3) for j, (_, prg, _, _) in enumerate(self.calls)]


# -- 4. the kernel cache db, shareable between threads -------------------------------------------------------------
def share_kernel_cache() -> None:
    """tinygrad opens its on-disk kernel cache (sqlite) on first use, usable from that thread only; the engine
    compiles on its own thread while hosts touch tinygrad on theirs (Exo's device_capabilities opens the device on
    the main thread). Reopen the cache shareable between threads; sqlite serialises the accesses."""
    if getattr(tinygrad.helpers, "_exo_medusa_shared_db", False):
        return
    connect = sqlite3.connect
    sqlite3.connect = functools.partial(connect, check_same_thread=False)
    try:
        tinygrad.helpers._db_connection = None
        tinygrad.helpers.db_connection()
    finally:
        sqlite3.connect = connect
    tinygrad.helpers._exo_medusa_shared_db = True


# -- 6. host values in and out without the scheduler ---------------------------------------------------------------
# A step's few host values (token ids, a position, a small result) would go through Tensor(ndarray) and .numpy():
# both schedule a copy, and tinygrad's scheduler walks every live tensor (each weight of the model) on the way, ~5 ms
# a decode step on the CPU. These copy straight between host memory and a realized buffer.
def device_buffer(shape: tuple[int, ...], dtype, device: str) -> Tensor:
    """A realized, zeroed tensor on `device` whose values write_host replaces in place. Its buffer is made directly:
    realizing a zeros tensor would schedule it, and every schedule walks every live tensor (~50 ms each once a
    stored session's tensors are loaded)."""
    from tinygrad import Device, Tensor
    from tinygrad.device import Buffer
    size = math.prod(shape)
    buf = Buffer(Device.canonicalize(device), size, dtype, initial_value=bytes(size * dtype.itemsize))
    return Tensor(UOp.from_buffer(buf)).reshape(shape)


def host_tensor(values: np.ndarray, device: str) -> Tensor:
    """A realized tensor on `device` holding `values` (a step's constant), made without the scheduler."""
    from tinygrad.dtype import _from_np_dtype
    values = np.ascontiguousarray(values)
    return write_host(device_buffer(values.shape, _from_np_dtype(values.dtype), device), values)


def _plain_buffer(t: Tensor):
    """t's buffer when t is exactly a realized buffer (no view, one device), else None."""
    uop = t.uop
    if uop.op is Ops.RESHAPE:  # a reshape of a buffer keeps its memory order
        uop = uop.src[0]
    if uop.op is not Ops.BUFFER or not isinstance(t.device, str):
        return None
    buf = uop.buffer
    return buf if buf.is_initialized() and buf._base is None and buf.size == t.numel() else None


def write_host(t: Tensor, values: np.ndarray) -> Tensor:
    """Copy `values` (same element count, cast to t's dtype) into t's buffer; returns t."""
    buf = _plain_buffer(t)
    if buf is None:
        raise ValueError("write_host needs a realized buffer from device_buffer")
    data = np.ascontiguousarray(values, dtype=_np_dtype(t.dtype))
    if not data.flags.writeable:  # e.g. read from a socket: the CPU copy reads through ctypes, which wants writable
        data = data.copy()
    if data.size != buf.size:
        raise ValueError(f"write_host: {data.size} values for a buffer of {buf.size}")
    buf.allocator._copyin(buf._buf, memoryview(data).cast("B"))
    return t


def read_host(t: Tensor) -> np.ndarray:
    """t's values as a new numpy array: copied straight out of its buffer when t is one (a captured step's output),
    through t.numpy() otherwise."""
    buf = _plain_buffer(t)
    if buf is None:
        return t.numpy()
    out = np.empty(t.shape, dtype=_np_dtype(t.dtype))
    buf.allocator._copyout(memoryview(out).cast("B"), buf._buf)  # the allocators synchronize before copying out
    return out


def _np_dtype(dtype) -> np.dtype:
    from tinygrad.dtype import _to_np_dtype
    return np.dtype(_to_np_dtype(dtype))


# -- 7. hand-written kernels: packed products, captured steps' attention ---------------------------------------------
# model.Linear announces each product with packed weights it builds (`expect_packed_product`): the kernel AST that
# tinygrad will schedule for it is derived once per shape from the same expression on empty buffers, and remembered
# with what each of its buffers holds. A kernel whose AST is one of those compiles from products.py's C instead of
# tinygrad's rendering (`_hand_program`). Matching whole ASTs, not patterns, means a kernel that computes anything
# else (a fused norm, another layout) keeps tinygrad's code. attention.py instead requests its kernel by name
# through Tensor.custom_kernel (`expect_hand_kernel`). EXO_MEDUSA_KERNELS=tuned turns both off.
_packed_products: dict[bytes, tuple["PackedProduct", tuple[str, ...]]] = {}
_announced: set[tuple] = set()


def hand_kernels(device: str) -> bool:
    """Whether packed products and captured steps' attention on `device` run hand-written C: the C pool is up and the
    device renders C (clang)."""
    if _pool is None or os.environ.get("EXO_MEDUSA_KERNELS", "hand") != "hand" or not device.startswith("CPU"):
        return False
    from tinygrad import Device
    from tinygrad.renderer.cstyle import ClangRenderer
    import sys
    return sys.byteorder == "little" and isinstance(Device[device].renderer, ClangRenderer)


def expect_packed_product(x: "Tensor", weight, product) -> None:
    """Remember the kernel of `product(x, weight).contiguous()` (x contiguous [..., rows], weight a PackedWeight).
    `product` builds the expression; it is run once per shape on empty buffers, scheduled, never executed."""
    from tinygrad import Tensor
    from .products import PackedProduct, WIDTH
    (outputs, rows), width = weight.shape, weight.width
    panels, tokens = outputs // WIDTH, math.prod(x.shape[:-1])
    layout = tuple((name, tuple(t.shape), t.dtype) for name, t in weight.named().items())
    key = (tuple(x.shape), str(x.device), layout, weight.offset, weight.bits, weight.high_bits, weight.block, weight.half)
    if key in _announced:
        return
    _announced.add(key)
    if width != WIDTH or rows % weight.block or not all(isinstance(s, int) for s in x.shape):
        return
    empty = lambda t: Tensor.empty(*t.shape, dtype=t.dtype, device=t.device)
    ref_x, ref_w = empty(x), weight.map(empty)
    out = product(ref_x, ref_w).contiguous()
    calls = [c for c in out.schedule_linear().src if c.op is Ops.CALL]
    if len(calls) != 1:
        return
    call = calls[0]
    named = {"out": out, "x": ref_x, **ref_w.named()}
    roles = []
    for buf in call.src[1:]:
        role = next((r for r, t in named.items() if t.uop.base is buf), None)
        if role is None:
            return
        roles.append(role)
    if roles[0] != "out":  # the kernel's arguments put the output first (_c_program)
        return
    work = tokens * rows * panels * WIDTH
    threads = NUM_THREADS() if work >= MIN_THREAD_WORK and panels >= NUM_THREADS() else 1
    _packed_products[call.src[0].key] = (PackedProduct.of(weight, tokens, threads), tuple(roles))


_hand_named: dict[str, tuple[Callable[[str], str], int]] = {}


def expect_hand_kernel(name: str, source: Callable[[str], str], threads: int) -> None:
    """A kernel requested through Tensor.custom_kernel with KernelInfo name `name` compiles from source(function
    name) instead of its placeholder body, split into `threads` slices. The C function takes the buffers in slot
    order, then core_id when threads > 1."""
    _hand_named[name] = (source, threads)


def _hand_program(sink: UOp, renderer) -> UOp | None:
    """A PROGRAM compiling hand-written C for a kernel announced by expect_packed_product (by its AST) or
    expect_hand_kernel (by its name), else None."""
    if (found := _packed_products.get(sink.key)) is not None:
        from .products_q8 import chosen, kernel_source
        spec, roles = found
        spec = chosen(spec)   # the process's activations when it compiles (products_q8.set_activations)
        name = f"packed_{spec.tag}_{spec.tokens}_{spec.rows}_{spec.panels * 16}"
        params = [*roles, *(["core_id"] if spec.threads > 1 else [])]
        return _c_program(sink.replace(arg=replace(sink.arg, name=name)), spec.threads, lambda fn: kernel_source(spec, fn, params), renderer)
    if isinstance(sink.arg, KernelInfo) and (named := _hand_named.get(sink.arg.name)) is not None:
        source, threads = named
        return _c_program(sink, threads, source, renderer)
    return None


def _c_program(sink: UOp, threads: int, source: Callable[[str], str], renderer) -> UOp:
    """PROGRAM(sink, LINEAR(its buffers), SOURCE(C)): tinygrad compiles the SOURCE as it would its own rendering. The
    arguments are the sink's buffers in slot order (slot 0 the output), then core_id when split."""
    from tinygrad import dtypes
    from tinygrad.uop.ops import AddrSpace, ProgramInfo
    buffers = tuple(sorted((u for u in sink.toposort() if u.op is Ops.PARAM and u.arg.addrspace != AddrSpace.ALU),
                           key=lambda u: u.arg.slot))
    variables = ()
    if threads > 1:  # the slice argument comes after the buffers: its slot is its position among the arguments
        core = UOp.variable("core_id", 0, threads - 1, dtypes.int, param=True)
        variables = (core.replace(arg=replace(core.arg, slot=len(buffers))),)
    slots = tuple(u.arg.slot for u in buffers)
    info = ProgramInfo(sink.arg.name, (threads, 1, 1), (1, 1, 1), variables, slots, slots[:1], slots[1:], renderer.target)
    # the LINEAR lists the arguments (the loader's signature reads them)
    return UOp(Ops.PROGRAM, src=(sink, UOp(Ops.LINEAR, src=buffers), UOp(Ops.SOURCE, arg=source(info.function_name))), arg=info)


# -- 8. devices without native float16 -------------------------------------------------------------------------------
def emulates_float16(device: str) -> bool:
    """Whether tinygrad would emulate float16 on `device` (its renderer has no native float16): reductions in float16
    then fail to compile there (tinygrad 0.14; see section 8 of the module docstring)."""
    from tinygrad import Device, dtypes
    return dtypes.half not in Device[device].renderer.supported_dtypes()


# -- 9. captured steps on disk ---------------------------------------------------------------------------------------
def captured_of(jit):
    """The capture of a TinyJit (or of an object holding one as `.jit`), None until it has captured."""
    return getattr(jit, "jit", jit).captured


def install_captured(jit, captured) -> None:
    """Make `jit` replay `captured` from its next call on: TinyJit's call count says it has captured."""
    jit = getattr(jit, "jit", jit)
    jit.captured, jit.cnt = captured, 2


def _reduce_tensor(t: Tensor):
    from tinygrad import Tensor
    return Tensor, (t.uop,)  # a realized tensor is its buffer's UOp; Tensor() registers it as a live tensor again


def _reduce_captured(c):
    # CapturedJit works out the buffers its calls write on its first replay, ~0.4 s a step kind for SmolLM2: the
    # stored set saves a loaded capture that work (the rest of a first replay is linking its calls, done here)
    written = c.__dict__.get("_written_uops")
    return _restore_captured, (type(c), c.ret, c._linear, c.expected_names, c.expected_input_info, written)


def _restore_captured(cls, ret, linear, names, input_info, written):
    captured = cls(ret, linear, names, input_info)
    if written is not None:
        captured.__dict__["_written_uops"] = written
    return captured


def written_buffers(captured) -> list:
    """The buffers a capture writes (its scratch memory, its outputs, a KV cache): a replay rewrites them before
    reading them back, so a new process needs their sizes, not their contents."""
    from tinygrad.uop.ops import buffers
    found = (buffers[u] for u in captured._written_uops if u in buffers)
    return [b if b._base is None else b._base for b in found]  # a view's memory is its base's: stored as one


def _reduce_buffer(buf):
    # tinygrad's own reduce restores a buffer's bytes through a scheduled copy (~3 ms a buffer, ~1900 buffers in a
    # stored session): this one copies them straight into the allocation. Views keep tinygrad's reduce.
    import pickle
    if buf._base is not None or not buf.is_allocated() or buf.device.startswith(("NPY", "DISK")):
        return buf.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
    return _restore_buffer, (buf.device, buf.size, buf.dtype, buf.options, pickle.PickleBuffer(buf.as_memoryview()),
                             buf.uop_refcount)


def _restore_buffer(device, size, dtype, options, data, uop_refcount, zero=False):
    from tinygrad.device import Buffer
    buf = Buffer(device, size, dtype, options=options, uop_refcount=uop_refcount).allocate()
    # the allocators copy in from writable memory only (ctypes); pickle hands back read-only bytes
    data = bytearray(buf.nbytes) if zero else data if isinstance(data, bytearray) else bytearray(data)
    buf.allocator._copyin(buf._buf, memoryview(data).cast("B"))
    return buf


def dump_captured(state, file, fresh: list = ()) -> None:
    """Pickle `state` (captures, model objects, tensors) to the open binary `file`; `fresh` buffers (or tensors'
    buffers) are stored by size only, and load_captured zeroes them."""
    import copyreg
    import pickle
    from tinygrad import Tensor
    from tinygrad.device import Buffer
    from tinygrad.engine.jit import CapturedJit
    fresh_ids = {id(f.uop.base.buffer if isinstance(f, Tensor) else f) for f in fresh}

    class Pickler(pickle.Pickler):
        dispatch_table = {**copyreg.dispatch_table, Tensor: _reduce_tensor, CapturedJit: _reduce_captured,
                          Buffer: _reduce_buffer}

        def persistent_id(self, obj):
            from tinygrad.device import Buffer
            if isinstance(obj, Buffer) and id(obj) in fresh_ids:
                return ("fresh", obj.device, obj.size, obj.dtype)
            return None
    Pickler(file, protocol=pickle.HIGHEST_PROTOCOL).dump(state)


def _fresh_slot_uop(op, *args):
    """UOp(...) for unpickling: a global buffer gets a new slot (see section 9)."""
    from tinygrad.uop.ops import ParamArg
    if op is Ops.BUFFER and len(args) >= 3 and isinstance(arg := args[2], ParamArg) and arg.device is not None:
        args = (args[0], args[1], replace(arg, slot=next(UOp.unique_num)), *args[3:])
    return UOp(op, *args)


def load_captured(file):
    """What dump_captured wrote to `file`."""
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("tinygrad.uop.ops", "UOp"):
                return _fresh_slot_uop
            return super().find_class(module, name)

        def persistent_load(self, pid):
            _, device, size, dtype = pid
            return _restore_buffer(device, size, dtype, None, None, 0, zero=True)
    return Unpickler(file).load()


# -- installing ----------------------------------------------------------------------------------------------------
_installed = False


def install() -> None:
    """Install every hook once per process. EXO_MEDUSA_KERNELS=default leaves tinygrad's own kernel choices and
    serial slices (for comparisons)."""
    global _installed, _pool
    if _installed:
        return
    _installed = True
    share_kernel_cache()
    if os.environ.get("EXO_MEDUSA_KERNELS", "hand") == "default":
        log.info("kernels: tinygrad's default choices, one core")
        return
    from tinygrad.runtime import ops_cpu
    original_lower = realize.lower_and_compile
    realize.lower_and_compile = lambda linear: original_lower(graph_rewrite(linear, pm_choices, walk=True, name="exo-medusa choices"))
    try:
        _pool = ParallelSlices(NUM_THREADS())
    except (OSError, subprocess.CalledProcessError) as e:
        log.warning("kernels: no C runtime (%s): one Python launch per kernel, split kernels on one core", e)
        return
    ops_cpu.CPUProgram.__call__ = _program_call(ops_cpu.CPUProgram.__call__)
    # captured steps replay through CPUGraph: on devices opened from now on, and on those already open
    init = ops_cpu.CPUDevice.__init__

    @functools.wraps(init)
    def init_with_graph(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.graph = CPUGraph
    ops_cpu.CPUDevice.__init__ = init_with_graph
    from tinygrad import Device
    for name in list(Device._opened_devices):
        if isinstance(Device[name], ops_cpu.CPUDevice):
            Device[name].graph = CPUGraph
    log.info("kernels on the CPU device: product choices from the AST, %d core(s), captured steps in one C call "
             "(other devices keep tinygrad's own)", _pool.threads)


def kernel_mode() -> dict:
    """What bench reports: which kernel choices ran, on how many cores, whether packed products are hand-written, and
    their activations (float32, or q8: products_q8)."""
    from .products_q8 import activations
    mode = os.environ.get("EXO_MEDUSA_KERNELS", "hand")
    tuned = _installed and mode != "default"
    return {"choices": "products" if tuned else "default", "cores": _pool.threads if (tuned and _pool) else 1,
            "graph": bool(tuned and _pool), "packed_products": "hand" if (tuned and _pool and mode == "hand") else "tinygrad",
            "activations": activations()}
