"""`exo-medusa bench-ring`: plain against Medusa greedy decoding on a ring of shard processes, with a link delay.

On a ring every decoding step is one pass around it: N link crossings for N shards. Plain decoding pays a pass per
token, Medusa one per verify step, so each token a step accepts beyond the first saves a whole pass. For each ring
size (2 and 3 shards split by layers, one process each on loopback, or with --shard-threads one thread each of this
process: ring_local's note says why both) and each one-way link delay, the same prompts
run through a plain ring and a Medusa ring alternately (which goes first alternates too), so background load and
the kernels' speed hit both alike. Requests go through the engine's wire contract (`infer_tensor` and the JSON step
state, see engine.py) over sockets (ring.py); the delay is injected in that transport, never on the machine's
network devices.

Reported per (ring size, delay): decode tokens/s of both, their ratio, ring passes per token, Medusa's mean
accepted length (tokens per verify step), compute per pass (decode time less the injected delay), and whether the
token streams are identical. Beside them, a standalone plain decode step (the whole model in this process, no ring)
on the same prompts, run after each pair: what a plain pass would cost if the ring added nothing. A pass costs c + N*d (compute c, delay d), so Medusa/plain = a*(c_plain + N*d) /
(c_medusa + N*d) for accepted length a: the ratio grows with d towards a, and Medusa overtakes plain once N*d
exceeds (c_medusa - a*c_plain) / (a - 1), the break-even delay the summary reports.

With `--exo` and classic Exo importable, the same prompt also runs on a two-node Exo ring (Exo's own gRPC and API,
our engine inside) with and without `--medusa-enabled`; without Exo that part is skipped with a note."""
from __future__ import annotations

import asyncio
import json
import os
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..kernels.tinygrad_hooks import pool_spin_seconds, set_pool_spin
from ..options import refuse_load_options
from ..prompts import Prompt, load_prompts
from ..model.registry import resolve
from ..serving.ring import LinkConfig, Ring, RingResult
from ..serving.ring_local import LocalRing, ShardSpec, split_layers
from .bench_ring_exo import run_exo_comparison
from .bench_ring_report import markdown_report, plot_report

log = logging.getLogger(__name__)
DEFAULT_DELAYS_MS = (0.0, 2.0, 5.0, 20.0)
DEFAULT_SHARDS = (2, 3)


@dataclass(frozen=True)
class RingBenchConfig:
    model: str
    prompts: tuple[Prompt, ...]
    shard_counts: tuple[int, ...] = DEFAULT_SHARDS
    delays_ms: tuple[float, ...] = DEFAULT_DELAYS_MS
    max_new_tokens: int = 48
    warmup_tokens: int = 6
    medusa_heads: str | None = None       # None: the model card's heads
    medusa_choices: str | None = None     # None: the engine's default tree for the device
    dtype: str | None = None
    device: str | None = None
    max_context: int = 2048
    hop_timeout_s: float = 300.0
    start_timeout_s: float = 900.0
    shard_threads: bool = False           # shards as threads of this process (ring_local's note), not processes
    pool_spin_ms: float | None = None     # idle kernel-pool threads spin this long before sleeping (None: default)

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("bench-ring needs at least one prompt")
        if not self.shard_counts or any(n < 1 for n in self.shard_counts):
            raise ValueError(f"--shards must be positive ring sizes, got {self.shard_counts}")
        if not self.delays_ms or any(d < 0 for d in self.delays_ms):
            raise ValueError(f"--link-delays-ms must be delays >= 0, got {self.delays_ms}")
        if self.max_new_tokens < 2:
            raise ValueError("--max-generate-tokens must be >= 2 (decode speed is measured after the first token)")
        if self.warmup_tokens < 2:
            raise ValueError("--warmup-tokens must be >= 2 (TinyJit captures on a step's second call)")
        if self.pool_spin_ms is not None and not 0 <= self.pool_spin_ms <= 1000:
            raise ValueError(f"--pool-spin-ms must be between 0 and 1000, got {self.pool_spin_ms:g}")


@dataclass
class PromptPair:
    """One prompt, one ring size, one delay: the plain and the Medusa run."""
    shards: int
    delay_ms: float
    prompt: str
    plain: RingResult
    medusa: RingResult
    standalone_decode_s: float = 0.0      # the same prompt, plain, whole model in the bench's own process
    standalone_decode_tokens: int = 0

    @property
    def identical(self) -> bool:
        return self.plain.tokens == self.medusa.tokens

    def to_json(self) -> dict:
        out = {"shards": self.shards, "delay_ms": self.delay_ms, "prompt": self.prompt, "identical": self.identical,
               "standalone": {"decode_s": round(self.standalone_decode_s, 4),
                              "decode_tokens": self.standalone_decode_tokens}}
        for name, r in (("plain", self.plain), ("medusa", self.medusa)):
            out[name] = {"tokens": len(r.tokens), "decode_tokens": r.decode_tokens, "passes": r.decode_passes,
                         "decode_s": round(r.decode_s, 4), "link_s": round(r.link_s, 4),
                         "engine_s": round(r.engine_s, 4),
                         "prompt_s": round(r.prompt_s, 4), "tokens_per_s": round(r.decode_tokens_per_s, 4),
                         "finish_reason": r.finish_reason, "accepted": r.accepted}
        return out


@dataclass
class Cell:
    """Aggregate of every prompt at one ring size and one delay."""
    shards: int
    delay_ms: float
    prompts: int
    plain_tokens_per_s: float
    medusa_tokens_per_s: float
    ratio: float | None
    plain_passes_per_token: float
    medusa_passes_per_token: float
    mean_accepted: float
    plain_compute_ms_per_pass: float   # decode time less the injected delay, per pass: engines + transport
    plain_engine_ms_per_pass: float    # of which the shards' engines, as each shard times its own (the rest: transport)
    medusa_compute_ms_per_pass: float
    link_ms_per_pass: float            # delay actually slept per pass (N links), Medusa ring
    identical: bool
    standalone_ms_per_step: float      # a plain decode step of the whole model, no ring
    plain_pass_per_standalone_step: float | None   # plain compute per pass / standalone step: what the ring adds

    @classmethod
    def of(cls, pairs: list[PromptPair]) -> "Cell":
        def total(mode: str, attr: str) -> float:
            return sum(getattr(getattr(p, mode), attr) for p in pairs)

        tokens = {m: total(m, "decode_tokens") for m in ("plain", "medusa")}
        seconds = {m: total(m, "decode_s") for m in ("plain", "medusa")}
        passes = {m: total(m, "decode_passes") for m in ("plain", "medusa")}
        link = {m: total(m, "link_s") for m in ("plain", "medusa")}
        engine_ms = 1e3 * total("plain", "engine_s") / max(passes["plain"], 1)
        speed = {m: tokens[m] / seconds[m] if seconds[m] > 0 else 0.0 for m in ("plain", "medusa")}
        accepted = [a for p in pairs for a in p.medusa.accepted]
        alone_tokens = sum(p.standalone_decode_tokens for p in pairs)
        alone_ms = 1e3 * sum(p.standalone_decode_s for p in pairs) / alone_tokens if alone_tokens else 0.0
        plain_ms = 1e3 * (seconds["plain"] - link["plain"]) / max(passes["plain"], 1)
        return cls(pairs[0].shards, pairs[0].delay_ms, len(pairs), speed["plain"], speed["medusa"],
                   speed["medusa"] / speed["plain"] if speed["plain"] > 0 and speed["medusa"] > 0 else None,
                   passes["plain"] / max(tokens["plain"], 1), passes["medusa"] / max(tokens["medusa"], 1),
                   statistics.fmean(accepted) if accepted else 1.0,
                   plain_ms, engine_ms, 1e3 * (seconds["medusa"] - link["medusa"]) / max(passes["medusa"], 1),
                   1e3 * link["medusa"] / max(passes["medusa"], 1), all(p.identical for p in pairs),
                   alone_ms, plain_ms / alone_ms if alone_ms > 0 else None)

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def ring_model(cells: list[Cell], shards: int) -> dict:
    """The pass-cost model fitted on one ring size: compute per pass (median over delays), accepted length, the
    limit of the ratio for long links and the one-way delay above which Medusa beats plain."""
    mine = [c for c in cells if c.shards == shards]
    c_plain = statistics.median(c.plain_compute_ms_per_pass for c in mine)
    c_medusa = statistics.median(c.medusa_compute_ms_per_pass for c in mine)
    engines = statistics.median(c.plain_engine_ms_per_pass for c in mine)
    alone = statistics.median(c.standalone_ms_per_step for c in mine)
    # tokens per pass, as measured (the budget cut of the last pass included): the ratio's limit for long links
    a = statistics.fmean(c.plain_passes_per_token / c.medusa_passes_per_token for c in mine)
    if a <= 1.0:
        break_even = None
    else:
        break_even = max((c_medusa - a * c_plain) / (a - 1.0), 0.0) / shards
    return {"shards": shards, "plain_compute_ms_per_pass": round(c_plain, 2),
            "plain_engine_ms_per_pass": round(engines, 2),
            "medusa_compute_ms_per_pass": round(c_medusa, 2), "tokens_per_pass_ratio": round(a, 4),
            "standalone_ms_per_step": round(alone, 2),
            "plain_pass_per_standalone_step": round(c_plain / alone, 3) if alone > 0 else None,
            "break_even_one_way_delay_ms": None if break_even is None else round(break_even, 1),
            "predicted_ratio": {str(c.delay_ms): round(a * (c_plain + shards * c.delay_ms)
                                                       / (c_medusa + shards * c.delay_ms), 4) for c in mine}}


# -- running -------------------------------------------------------------------------------------------------------
def model_layers(model: str) -> int:
    """The model's layer count without loading its weights into a model (card, config.json or GGUF metadata)."""
    resolved = resolve(model)
    if resolved.card:
        return resolved.card.n_layers
    if resolved.kind == "gguf":
        from tinygrad.llm.gguf import gguf_load
        kv, _ = gguf_load(str(resolved.path))
        return int(kv[f"{kv['general.architecture']}.block_count"])
    return int(json.loads((resolved.path / "config.json").read_text())["num_hidden_layers"])


def default_heads(model: str) -> str:
    card = resolve(model).card
    heads = card.heads_path() if card else None
    if heads is None:
        raise ValueError(f"model {model!r} has no default Medusa heads: pass --medusa-heads PATH|REPO")
    return heads


def ring_specs(cfg: RingBenchConfig, n_layers: int, shards: int, medusa: bool) -> list[ShardSpec]:
    heads = (cfg.medusa_heads or default_heads(cfg.model)) if medusa else None
    return [ShardSpec(cfg.model, a, b, n_layers, medusa_heads=heads, medusa_choices=cfg.medusa_choices if medusa else None,
                      max_new_tokens=cfg.max_new_tokens, dtype=cfg.dtype, device=cfg.device,
                      max_context=cfg.max_context) for a, b in split_layers(n_layers, shards)]


async def warm_up(ring: Ring, prompt_ids: list[int], passes: int) -> None:
    """Compile and capture every step before timing: two short requests (TinyJit captures on a step's second
    call), and the KV compaction a Medusa tree needs when a side branch wins."""
    await ring.warm_up()
    for i in range(2):
        await ring.generate(f"warm-up-{i}", prompt_ids, max_passes=passes)


class Standalone:
    """Plain greedy decoding of the whole model in this process: the decode step a ring pass is compared with."""

    def __init__(self, cfg: RingBenchConfig):
        from ..decoding.session import open_session
        self.generator = open_session(cfg.model, device=cfg.device, dtype=cfg.dtype,
                                      max_context=cfg.max_context).generator
        self.max_new_tokens = cfg.max_new_tokens

    def warm_up(self, prompt_ids: list[int], tokens: int) -> None:
        for _ in range(2):  # TinyJit captures on a step's second call
            self.decode(prompt_ids, tokens)

    def decode(self, prompt_ids: list[int], tokens: int | None = None) -> tuple[float, int]:
        from ..decoding.sampling import GenerationConfig
        result = self.generator.generate(prompt_ids, GenerationConfig(max_new_tokens=tokens or self.max_new_tokens))
        return result.decode_s, max(len(result.generated_ids) - 1, 0)


async def bench_one_ring_size(cfg: RingBenchConfig, plain: LocalRing, medusa: LocalRing, shards: int,
                              progress, standalone: Standalone) -> tuple[list[PromptPair], dict]:
    rings = {"plain": plain.ring, "medusa": medusa.ring}
    try:
        prompt_ids = [await medusa.ring.encode_chat(p.text) for p in cfg.prompts]
        t0 = time.perf_counter()
        for ring in rings.values():
            await warm_up(ring, prompt_ids[0], cfg.warmup_tokens)
        standalone.warm_up(prompt_ids[0], cfg.warmup_tokens)
        progress(f"{shards} shards: warmed up in {time.perf_counter() - t0:.0f} s")
        tree = (await medusa.ring.hops[-1].status())["tree"]
        pairs = []
        for delay in cfg.delays_ms:
            link = LinkConfig(delay_s=delay / 1e3, hop_timeout_s=cfg.hop_timeout_s)
            plain.set_link(link)
            medusa.set_link(link)
            for i, (prompt, ids) in enumerate(zip(cfg.prompts, prompt_ids)):
                order = ("plain", "medusa") if (i + len(pairs)) % 2 == 0 else ("medusa", "plain")
                runs = {}
                for mode in order:
                    runs[mode] = await rings[mode].generate(f"{mode}-{shards}-{delay}-{prompt.id}", ids)
                pair = PromptPair(shards, delay, prompt.id, runs["plain"], runs["medusa"], *standalone.decode(ids))
                pairs.append(pair)
                progress(f"{shards} shards, {delay:g} ms: {prompt.id}: plain {pair.plain.decode_tokens_per_s:.2f} "
                         f"tok/s, Medusa {pair.medusa.decode_tokens_per_s:.2f} tok/s, accepted "
                         f"{statistics.fmean(pair.medusa.accepted or [1]):.2f}/pass"
                         f"{'' if pair.identical else ', TOKENS DIFFER'}")
        return pairs, tree or {}
    finally:
        await asyncio.gather(plain.ring.close(), medusa.ring.close())


def run_ring_bench(cfg: RingBenchConfig, progress=lambda line: print(line, file=sys.stderr, flush=True)) -> dict:
    n_layers = model_layers(cfg.model)
    if cfg.pool_spin_ms is not None:  # shard processes inherit the environment; threads share this process's pool
        os.environ["EXO_MEDUSA_POOL_SPIN_MS"] = f"{cfg.pool_spin_ms:g}"
        set_pool_spin(cfg.pool_spin_ms / 1e3)
    standalone = Standalone(cfg)
    pairs: list[PromptPair] = []
    trees = {}
    for shards in cfg.shard_counts:
        if shards > n_layers:
            raise ValueError(f"cannot split {n_layers} layers into {shards} shards")
        progress(f"{shards} shards: starting {2 * shards} shard {'threads' if cfg.shard_threads else 'processes'} "
                 "(a plain ring and a Medusa ring) ...")
        link = LinkConfig(hop_timeout_s=cfg.hop_timeout_s)
        plain = LocalRing(ring_specs(cfg, n_layers, shards, False), link, cfg.start_timeout_s,
                          threads=cfg.shard_threads)
        medusa = LocalRing(ring_specs(cfg, n_layers, shards, True), link, cfg.start_timeout_s,
                           threads=cfg.shard_threads)
        try:
            t0 = time.perf_counter()
            plain.start()
            medusa.start()
            progress(f"{shards} shards: loaded in {time.perf_counter() - t0:.0f} s")
            more, trees[shards] = asyncio.run(bench_one_ring_size(cfg, plain, medusa, shards, progress, standalone))
            pairs += more
        finally:
            for p in plain.processes + medusa.processes:
                p.request_stop()
            plain.stop()
            medusa.stop()
    cells = [Cell.of([p for p in pairs if p.shards == n and p.delay_ms == d])
             for n in cfg.shard_counts for d in cfg.delays_ms]
    tree = next(iter(trees.values()), {})
    summary = {"model": cfg.model, "n_layers": n_layers, "prompts": [p.id for p in cfg.prompts],
               "max_generate_tokens": cfg.max_new_tokens, "tree": tree.get("name"), "tree_size": tree.get("size"),
               "heads": cfg.medusa_heads or default_heads(cfg.model), "dtype": cfg.dtype, "device": cfg.device,
               "shards_as": "threads" if cfg.shard_threads else "processes",
               "pool_spin_ms": pool_spin_seconds() * 1e3,
               "identical": all(p.identical for p in pairs)}
    return {"summary": summary, "cells": [c.to_json() for c in cells],
            "model_fit": [ring_model(cells, n) for n in cfg.shard_counts],
            "runs": [p.to_json() for p in pairs]}


# -- command -------------------------------------------------------------------------------------------------------
def parse_list(text: str, kind, flag: str) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} expects comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values


def config_from_args(args) -> RingBenchConfig:
    from .bench import default_prompts_path
    prompts = load_prompts(args.prompts or default_prompts_path(), args.limit)
    refuse_load_options(args, "bench-ring", "its shards load compact weights with float32 activations")
    if args.medusa_num_heads is not None or args.medusa_num_layers is not None:
        raise ValueError("bench-ring uses the heads as they are: --medusa-num-heads/--medusa-num-layers are not "
                         "supported here")
    return RingBenchConfig(args.model, tuple(prompts), parse_list(args.shards, int, "--shards"),
                           parse_list(args.link_delays_ms, float, "--link-delays-ms"), args.max_generate_tokens,
                           args.warmup_tokens, args.medusa_heads, args.medusa_choices, args.dtype, args.device,
                           args.max_context, args.hop_timeout_s, shard_threads=args.shard_threads,
                           pool_spin_ms=args.pool_spin_ms)


def cmd_bench_ring(args) -> int:
    cfg = config_from_args(args)
    if args.plot:
        from .bench import require_matplotlib
        require_matplotlib()  # fail before minutes of benchmarking, not after
    report = run_ring_bench(cfg)
    if args.exo:
        report["exo"] = run_exo_comparison(cfg, args.exo_link_delay_ms)
    print(markdown_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot_report(report, args.plot)
    if not report["summary"]["identical"]:
        print("exo-medusa bench-ring: Medusa greedy output differs from plain greedy", file=sys.stderr)
        return 1
    return 0


def register(subparsers, model_args, generation_args) -> None:
    p = subparsers.add_parser("bench-ring", parents=[model_args()],
                              help="plain vs Medusa on a ring of shard processes with an injected link delay")
    p.add_argument("--shards", default=",".join(map(str, DEFAULT_SHARDS)), help="ring sizes, comma-separated")
    p.add_argument("--link-delays-ms", default=",".join(f"{d:g}" for d in DEFAULT_DELAYS_MS),
                   help="one-way delay per ring link in ms, comma-separated")
    p.add_argument("--prompts", default=None, help="JSON lines prompt file (default: as `bench`)")
    p.add_argument("--limit", type=int, default=2, help="only the first N prompts (default 2)")
    p.add_argument("--max-generate-tokens", type=int, default=48)
    p.add_argument("--warmup-tokens", type=int, default=6, help="passes of each untimed warm-up request")
    p.add_argument("--hop-timeout-s", type=float, default=300.0,
                   help="a shard that does not answer a pass in this time fails the request")
    p.add_argument("--shard-threads", action="store_true",
                   help="run the shards as threads of this process (sharing its compiled kernels and kernel pool, "
                        "as nodes with cores of their own would not contend) instead of one process each; they "
                        "still talk over loopback sockets")
    p.add_argument("--pool-spin-ms", type=float, default=None,
                   help="idle kernel-pool threads spin this long for the next kernel before they sleep (default "
                        "0.3; EXO_MEDUSA_POOL_SPIN_MS): a node that owns its cores waits a hop between steps, and a "
                        "longer spin saves it a wake-up per kernel; on a shared machine it burns cores others need")
    p.add_argument("--exo", action="store_true",
                   help="also compare on a two-node classic Exo ring (skipped with a note when Exo is not installed)")
    p.add_argument("--exo-link-delay-ms", type=float, default=5.0, help="one-way gRPC delay of the --exo ring")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the full report as JSON")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="plot tokens/s and speedup vs link delay")
    p.set_defaults(func=cmd_bench_ring)

