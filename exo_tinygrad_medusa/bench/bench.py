"""`exo-medusa bench`: plain greedy against Medusa greedy on one loaded model, and this device's verify-cost curve.

Both generators share the loaded weights; they alternate prompt by prompt in one process so that drifting clocks
and background load hit both alike. Speed is decode throughput (tokens after the first over the verify loop's
time): the prefill is the same work for both and Medusa only changes the decode loop."""
from __future__ import annotations

import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from tinygrad import Tensor, TinyJit

from ..options import session_from_args
from ..decoding.generate import GenerationResult, Generator
from ..decoding.heads import MedusaHeads, random_heads
from ..decoding.tree import PLAIN, MedusaTree, load_tree
from ..prompts import Prompt, load_prompts
from ..model.transformer import Transformer
from ..model.registry import resolve
from ..decoding.sampling import GenerationConfig
from ..decoding.session import Session, default_tree_spec, open_session
from ..kernels.tinygrad_hooks import kernel_mode, read_host
from ..model.weights import weight_bytes_per_token

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
COST_SIZES = (1, 2, 4, 8, 16, 32, 64)
COST_START_POS = 128      # a typical position mid-answer; attention over the prefix is part of the verify cost
RANDOM_HEADS_NOTE = "random (speed-only run: acceptance and speedup do not reflect trained heads)"


# -- prompts -------------------------------------------------------------------------------------------------
def default_prompts_path(repo_root: Path = REPO_ROOT) -> Path:
    """MT-bench from the shared data folder next to the repository when present, else the package's own set."""
    shared = repo_root.parent / "shared" / "data" / "mt_bench.jsonl"
    return shared if shared.is_file() else package_prompts_path()


def package_prompts_path() -> Path:
    """The package's own prompts: a few categories of everyday requests, also the calibration set of tune-tree."""
    return Path(str(resources.files("exo_tinygrad_medusa").joinpath("data/bench_prompts.jsonl")))


# -- verify cost -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostCurve:
    """Median seconds of one forward over T new tokens (logits and argmax included, as in a verify step)."""
    seconds: dict[int, float]
    start_pos: int

    @property
    def relative(self) -> dict[int, float]:
        base = self.seconds[min(self.seconds)]
        return {T: s / base for T, s in sorted(self.seconds.items())}

    def to_json(self) -> dict[str, float]:
        return {str(T): round(r, 4) for T, r in self.relative.items()}


def measure_cost_curve(generator: Generator, sizes=COST_SIZES, reps: int = 5,
                       start_pos: int | None = None) -> CostCurve:
    """Time the generator's own greedy verify steps over T tokens (chain_steps(T): the steps decoding runs, captured
    on its cache) at a fixed start position, for each T. The positions written are garbage afterwards, as after
    any step: the next prefill rewrites them. A chain mask costs what a tree mask of the same size does: the
    kernels only see a (T, T) mask."""
    model = generator.model
    sizes = sorted(set(int(T) for T in sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError("cost-curve sizes must be positive integers")
    slack = model.cache_len - model.max_context
    if sizes[-1] > slack:
        raise ValueError(f"cost-curve size {sizes[-1]} exceeds the model's cache slack of {slack} tokens")
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    start = min(COST_START_POS, model.max_context - sizes[-1]) if start_pos is None else start_pos
    seconds = {}
    for T in sizes:
        steps = generator.chain_steps(T)
        x = steps.host("tokens", np.zeros((1, T), dtype=np.int32))
        times = []
        for rep in range(reps + 2):  # the first two calls compile and capture (unless decoding already did)
            t0 = time.perf_counter()
            read_host(steps.greedy_summary(x, generator.cache.layers, steps.bind(start)))
            if rep >= 2:
                times.append(time.perf_counter() - t0)
        seconds[T] = statistics.median(times)
        log.info("verify cost T=%d: %.2f ms", T, seconds[T] * 1e3)
    return CostCurve(seconds, start)


def measure_head_cost(model: Transformer, heads: MedusaHeads, top_k: int, reps: int = 5,
                      num_heads: int | None = None) -> float:
    """Median seconds to propose a tree's candidates from one hidden row: every head's logits and their top-k.
    Every Medusa step pays it on top of the verify forward; with v2 heads each head is an lm_head matmul over
    its proposal vocabulary (the whole vocabulary unless the heads carry a smaller one)."""
    device = model.lm_head.device
    row = Tensor(np.random.default_rng(0).standard_normal(model.config.dim).astype(np.float32), device=device)
    row = row.cast(model.lm_head.dtype).contiguous().realize()
    root = Tensor(0, dtype="int32", device=device).contiguous().realize()  # sequential heads continue a root token
    step = TinyJit(lambda hidden: heads.propose(hidden, top_k, num_heads, root=root).realize())
    times = []
    for rep in range(reps + 2):  # the first two calls compile and capture
        t0 = time.perf_counter()
        read_host(step(row))
        if rep >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_prefill(generator: Generator, prompt_tokens: int, reps: int = 3) -> float:
    """Median seconds to prefill a prompt of `prompt_tokens` ids (cycled from a fixed pattern) into the generator's
    cache, chunks and padding included, after two untimed runs that compile and capture."""
    ids = [int(i) for i in (np.arange(prompt_tokens) * 7919 + 11) % min(generator.model.config.vocab_size, 32000)]
    generator.check_prompt(ids)
    times = []
    for rep in range(reps + 2):
        t0 = time.perf_counter()
        hidden, _ = generator.prefill(ids)
        hidden.numpy()
        if rep >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- plain against Medusa ------------------------------------------------------------------------------------
@dataclass
class PromptRun:
    id: str
    category: str
    prompt_tokens: int
    generated_tokens: int
    plain_tokens_per_s: float
    medusa_tokens_per_s: float
    speedup: float | None          # None when a run decoded nothing past the first token
    mean_accepted: float
    steps: int
    identical: bool
    plain_decode_s: float
    medusa_decode_s: float
    accepted_total: int
    # Medusa run, per source of a step (plain, heads, context, datastore): steps and the tokens they emitted
    source_steps: dict = field(default_factory=dict)
    source_tokens: dict = field(default_factory=dict)
    step_sizes: dict = field(default_factory=dict)     # tokens verified a step -> steps
    host_s: float = 0.0                                 # drafting and planning on the host
    draft_head_s: float = 0.0                           # the draft head's captured drafting, when there is one

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("plain_tokens_per_s", "medusa_tokens_per_s", "plain_decode_s", "medusa_decode_s"):
            out[key] = round(out[key], 4)
        out["speedup"] = None if self.speedup is None else round(self.speedup, 4)
        out["mean_accepted"] = round(self.mean_accepted, 4)
        return out


def compare(plain: Generator, medusa: Generator, prompt: Prompt, prompt_ids: list[int], cfg: GenerationConfig,
            plain_first: bool = True) -> PromptRun:
    runs: dict[str, GenerationResult] = {}
    for name in (("plain", "medusa") if plain_first else ("medusa", "plain")):
        runs[name] = (plain if name == "plain" else medusa).generate(prompt_ids, cfg)
    p, m = runs["plain"], runs["medusa"]
    plain_speed, medusa_speed = p.decode_tokens_per_s, m.decode_tokens_per_s
    speedup = medusa_speed / plain_speed if plain_speed > 0 and medusa_speed > 0 else None
    return PromptRun(prompt.id, prompt.category, len(prompt_ids), len(p.generated_ids), plain_speed, medusa_speed,
                     speedup, m.mean_accepted, m.steps, p.generated_ids == m.generated_ids, p.decode_s, m.decode_s,
                     sum(m.accept_lengths), dict(m.source_steps), dict(m.source_tokens),
                     {str(k): v for k, v in sorted(m.step_sizes.items())}, m.host_s, m.draft_s)


def warm_up(plain: Generator, medusa: Generator, prompt_ids: list[int], tokens: int = 8) -> None:
    """Compile and capture every step before timing: TinyJit captures on a step's second call and the
    post-prefill proposal runs once per generation, hence two short generations each."""
    cfg = GenerationConfig(max_new_tokens=tokens)
    for gen in (plain, medusa):
        for _ in range(2):
            gen.generate(prompt_ids, cfg)
    medusa.capture_steps()  # draft steps of every size, which short warm-ups need not reach
    if not medusa.tree.is_chain:
        # KV compaction runs only when a side branch wins; an identity compaction at position 0 (rewritten by the
        # next prefill) captures it now instead of inside a timed run
        keep = Tensor(np.arange(medusa.tree.size, dtype=np.int32))
        for _ in range(2):
            medusa.steps.compact(medusa.cache.layers, medusa.steps.bind(0), keep)


def geomean(values) -> float | None:
    values = [v for v in values if v is not None and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def _aggregate(runs: list[PromptRun]) -> dict:
    plain_s, medusa_s = sum(r.plain_decode_s for r in runs), sum(r.medusa_decode_s for r in runs)
    decoded = sum(max(r.generated_tokens - 1, 0) for r in runs)
    steps = sum(r.steps for r in runs)
    speedup = geomean(r.speedup for r in runs)
    return {
        "prompts": len(runs),
        "plain_tokens_per_s": round(decoded / plain_s, 4) if plain_s else 0.0,
        "medusa_tokens_per_s": round(decoded / medusa_s, 4) if medusa_s else 0.0,
        "speedup_geomean": None if speedup is None else round(speedup, 4),
        "mean_accepted": round(sum(r.accepted_total for r in runs) / steps, 4) if steps else 1.0,
        "identical": all(r.identical for r in runs),
        "sources": _by_source(runs),
        "step_sizes": _sum_dicts(r.step_sizes for r in runs),
        "host_ms_per_step": round(1e3 * sum(r.host_s for r in runs) / steps, 4) if steps else 0.0,
        "draft_head_ms_per_step": round(1e3 * sum(r.draft_head_s for r in runs) / steps, 4) if steps else 0.0,
    }


def _sum_dicts(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _by_source(runs: list[PromptRun]) -> dict[str, dict]:
    """Per source of a Medusa step: its share of the steps and the tokens its steps emitted each (bonus included)."""
    steps, tokens = _sum_dicts(r.source_steps for r in runs), _sum_dicts(r.source_tokens for r in runs)
    total = sum(steps.values())
    return {src: {"steps": n, "share": round(n / total, 4), "tokens_per_step": round(tokens.get(src, 0) / n, 4)}
            for src, n in sorted(steps.items(), key=lambda kv: -kv[1])}


def summarize(runs: list[PromptRun]) -> tuple[dict, dict[str, dict]]:
    categories = {}
    for category in dict.fromkeys(r.category for r in runs):
        categories[category] = _aggregate([r for r in runs if r.category == category])
    return _aggregate(runs), categories


# -- report ----------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_report(report: dict) -> str:
    s = report["summary"]
    k = s.get("kernels") or {}
    lines = [f"## exo-medusa bench: {s['model']} on {s['device']} ({s['dtype']}), tree {s['tree']} ({s['tree_size']} "
             f"nodes), heads: {s['heads']}", "",
             f"{s['prompts']} prompts from {s['prompts_file']}, up to {s['max_generate_tokens']} new tokens each, greedy.",
             f"Kernels: {k.get('choices', '?')} choices, {k.get('cores', '?')} core(s), "
             f"{'one C call per captured step' if k.get('graph') else 'one launch per kernel'}, "
             f"{k.get('weights', '?')} weights, {k.get('activations', 'float32')} activations"
             + (", hand-written C for packed products and attention." if k.get("packed_products") == "hand" else ".")
             + (f" Prefill of a {s['prefill_tokens']}-token prompt: {s['prefill_tokens_per_s']:.1f} tok/s."
                if s.get("prefill_tokens_per_s") else "")
             + (f" Weights read per token: {s['weight_bytes_per_token'] / 1e6:.1f} MB; plain decoding streams them at "
                f"{s['plain_weight_gb_per_s']:.1f} GB/s." if s.get("weight_bytes_per_token") else ""),
             "", "| prompt | category | prompt tok | new tok | plain tok/s | Medusa tok/s | speedup | accepted/step "
                 "| identical |",
             "|---|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in report["prompts"]:
        lines.append(f"| {r['id']} | {r['category']} | {r['prompt_tokens']} | {r['generated_tokens']} | "
                     f"{_fmt(r['plain_tokens_per_s'])} | {_fmt(r['medusa_tokens_per_s'])} | {_fmt(r['speedup'])}x | "
                     f"{_fmt(r['mean_accepted'])} | {'yes' if r['identical'] else '**NO**'} |")
    lines += ["", "| category | prompts | plain tok/s | Medusa tok/s | speedup (geomean) | accepted/step | identical |",
              "|---|---:|---:|---:|---:|---:|:---:|"]
    for name, c in [*report["categories"].items(), ("**all**", s)]:
        lines.append(f"| {name} | {c['prompts']} | {_fmt(c['plain_tokens_per_s'])} | {_fmt(c['medusa_tokens_per_s'])} "
                     f"| {_fmt(c['speedup_geomean'])}x | {_fmt(c['mean_accepted'])} "
                     f"| {'yes' if c['identical'] else '**NO**'} |")
    if s.get("sources"):
        lines += ["", "Medusa steps by source of their drafts (tokens a step: accepted drafts plus the bonus token); "
                  f"host drafting {s.get('host_ms_per_step', 0):.2f} ms a step"
                  + (f", the draft head {s['draft_head_ms_per_step']:.2f} ms a step" if s.get("draft_head_ms_per_step") else "")
                  + "; tokens verified a step: "
                  + ", ".join(f"{T}: {n}" for T, n in s.get("step_sizes", {}).items()), "",
                  "| source | steps | share | tokens/step |", "|---|---:|---:|---:|"]
        for src, v in s["sources"].items():
            lines.append(f"| {src} | {v['steps']} | {v['share']:.2f} | {v['tokens_per_step']:.2f} |")
    curve, seconds = report["cost_curve"], report["cost_seconds"]
    if curve:
        lines += ["", f"Verify cost over T tree tokens at start position {report['cost_start_pos']}:", "",
                  "| T | " + " | ".join(curve) + " |", "|---|" + "---:|" * len(curve),
                  "| t(T)/t(1) | " + " | ".join(f"{v:.2f}" for v in curve.values()) + " |",
                  "| ms | " + " | ".join(f"{seconds[T] * 1e3:.1f}" for T in curve) + " |"]
    relative = report["head_cost_relative"]
    if report["head_cost_seconds"] is not None:
        heads = f"{s['tree_depth']} head(s)" if s.get("tree_depth") else "heads"  # reports before the depth was kept
        lines += ["", f"Proposing the next tree ({heads} + top-{s['tree_top_k']} on one row): "
                  f"{report['head_cost_seconds'] * 1e3:.1f} ms"
                  + (f" = {relative:.2f} x t(1), paid by every Medusa step on top of the verify." if relative else ".")]
    return "\n".join(lines)


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'exo-tinygrad-medusa[plot]' "
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_speedup(ax, report: dict) -> None:
    names = list(report["categories"]) + ["all"]
    values = [c["speedup_geomean"] or 0.0 for c in [*report["categories"].values(), report["summary"]]]
    ax.bar(names, values, color=["tab:blue"] * (len(names) - 1) + ["tab:orange"])
    ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
    ax.set_ylabel("Medusa / plain decode tokens/s (geomean)")
    ax.set_title(f"Speedup per category (tree {report['summary']['tree']})")
    ax.tick_params(axis="x", labelrotation=30)


def plot_cost_curve(ax, curve: dict[str, float], label: str = "") -> None:
    sizes = [int(T) for T in curve]
    ax.plot(sizes, list(curve.values()), marker="o", label=label or None)
    ax.plot(sizes, sizes, color="grey", linewidth=1, linestyle=":", label="linear in T")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)  # log-log: cost linear in T is the diagonal
    ax.set_xticks(sizes, [str(T) for T in sizes])
    top = max(max(curve.values()), sizes[-1])
    ticks = [2 ** i for i in range(0, int(np.ceil(np.log2(top))) + 1)]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("tokens verified per step (T)")
    ax.set_ylabel("t(T) / t(1)")
    ax.set_title("Verify cost")
    ax.legend()


def plot_report(report: dict, out: str | Path) -> Path:
    plt = require_matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_speedup(left, report)
    if report["cost_curve"]:
        plot_cost_curve(right, report["cost_curve"], report["summary"]["device"])
    else:
        right.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


# -- command -----------------------------------------------------------------------------------------------------
def parse_sizes(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()] if text.strip() else []
    except ValueError:
        raise ValueError(f"--cost-sizes expects comma-separated integers, got {text!r}") from None


def open_bench(args) -> tuple[Session, Generator, Generator, str]:
    """The loaded session plus plain and Medusa generators sharing its model, and a description of the heads."""
    if args.random_heads:
        if args.medusa_heads:
            raise ValueError("--random-heads and --medusa-heads exclude each other")
        if args.draft_head:
            raise ValueError("--random-heads and --draft-head exclude each other")
        session = open_session(args.model, device=args.device, dtype=args.dtype, max_context=args.max_context,
                               weights=args.weights, activations=args.activations)
        model = session.loaded.model
        heads: MedusaHeads = random_heads(session.loaded.config, model.lm_head, num_heads=args.medusa_num_heads or 4,
                                          num_layers=args.medusa_num_layers or 1, seed=args.seed or 0)
        tree: MedusaTree = load_tree(args.medusa_choices or default_tree_spec(session.loaded.device, None))
        tree.check_heads(heads.num_heads)
        medusa = Generator(model, session.tokenizer.eos_token_ids, tree, heads)
        return session, session.generator, medusa, RANDOM_HEADS_NOTE
    heads_source = args.medusa_heads or (f"draft head {args.draft_head}" if args.draft_head else None)
    if heads_source is None:
        card = resolve(args.model).card
        heads_source = card.heads_path() if card else None
        if heads_source is None:
            raise ValueError(f"model {args.model!r} has no default Medusa heads: pass --medusa-heads PATH|REPO, or "
                             f"--random-heads for a speed-only benchmark")
    args.medusa_enabled = True
    session = session_from_args(args)
    plain = Generator(session.loaded.model, session.tokenizer.eos_token_ids, PLAIN)
    return session, plain, session.generator, heads_source


def run_bench(args) -> dict:
    prompts = load_prompts(args.prompts or default_prompts_path(), args.limit)
    sizes = parse_sizes(args.cost_sizes)
    if args.plot:
        require_matplotlib()  # fail before minutes of benchmarking, not after
    session, plain, medusa, heads_note = open_bench(args)
    print(f"Medusa heads: {heads_note}; tree {medusa.tree.name} ({medusa.tree.size} nodes)", file=sys.stderr)
    cfg = GenerationConfig(max_new_tokens=args.max_generate_tokens)
    prompt_ids = [session.prompt_ids(p.text) for p in prompts]
    t0 = time.perf_counter()
    warm_up(plain, medusa, prompt_ids[0], args.warmup_tokens)
    log.info("warm-up took %.1f s", time.perf_counter() - t0)
    runs = []
    for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
        run = compare(plain, medusa, prompt, ids, cfg, plain_first=i % 2 == 0)
        runs.append(run)
        sources = ", ".join(f"{k} {v}" for k, v in sorted(run.source_steps.items()))
        print(f"[{i + 1}/{len(prompts)}] {prompt.id} ({prompt.category}): plain {run.plain_tokens_per_s:.2f} tok/s, "
              f"Medusa {run.medusa_tokens_per_s:.2f} tok/s, accepted {run.mean_accepted:.2f}/step (steps: {sources})"
              f"{'' if run.identical else ', TOKENS DIFFER'}", file=sys.stderr)
    curve = measure_cost_curve(plain, sizes, args.cost_reps) if sizes else None
    # a step runs only as many heads as its tree is deep; a root-only tree proposes nothing
    head_s = (measure_head_cost(session.loaded.model, medusa.steps.heads, medusa.tree.top_k, args.cost_reps,
                                medusa.tree.depth) if medusa.tree.size > 1 else None)
    # the prefill measurement fits the context (a 256-token context measures a 255-token prompt)
    prefill_tokens = min(args.prefill_tokens, session.loaded.model.max_context - 1)
    prefill_s = measure_prefill(plain, prefill_tokens, args.cost_reps) if prefill_tokens > 0 else None
    summary, categories = summarize(runs)
    loaded = session.loaded
    summary.update(model=loaded.resolved.model_id, device=loaded.device, dtype=loaded.dtype, tree=medusa.tree.name,
                   tree_size=medusa.tree.size, tree_depth=medusa.tree.depth, tree_top_k=medusa.tree.top_k, heads=heads_note,
                   max_generate_tokens=args.max_generate_tokens, random_heads=bool(args.random_heads),
                   prompts_file=str(args.prompts or default_prompts_path()),
                   kernels={**kernel_mode(), "weights": loaded.weights},
                   prefill_tokens=prefill_tokens if prefill_s else None,
                   prefill_tokens_per_s=round(prefill_tokens / prefill_s, 2) if prefill_s else None)
    # plain decoding reads every weight once a token: its tokens/s times these bytes is the bandwidth it achieves
    weight_bytes = weight_bytes_per_token(loaded.model)
    summary.update(weight_bytes_per_token=weight_bytes,
                   plain_weight_gb_per_s=round(weight_bytes * summary["plain_tokens_per_s"] / 1e9, 2))
    return {"summary": summary, "categories": categories, "prompts": [r.to_json() for r in runs],
            "cost_curve": curve.to_json() if curve else {},
            "cost_seconds": {str(T): round(s, 6) for T, s in curve.seconds.items()} if curve else {},
            "cost_start_pos": curve.start_pos if curve else None,
            "head_cost_seconds": None if head_s is None else round(head_s, 6),
            "head_cost_relative": round(head_s / curve.seconds[1], 4) if head_s and curve and 1 in curve.seconds else None}


def cmd_bench(args) -> int:
    report = run_bench(args)
    print(markdown_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot:
        plot_report(report, args.plot)
    if not report["summary"]["identical"]:
        differ = [r["id"] for r in report["prompts"] if not r["identical"]]
        print(f"exo-medusa bench: Medusa greedy output differs from plain greedy for prompts {differ}", file=sys.stderr)
        return 1
    return 0


def register(subparsers, model_args, generation_args) -> None:
    p = subparsers.add_parser("bench", parents=[model_args()],
                              help="plain vs Medusa greedy speed, and the verify-cost curve")
    p.add_argument("--prompts", default=None,
                   help="JSON lines with 'turns' or 'prompt' and 'category' (default: ../shared/data/mt_bench.jsonl "
                        "next to the repository when present, else the package's bench_prompts.jsonl)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--max-generate-tokens", type=int, default=128)
    p.add_argument("--random-heads", action="store_true",
                   help="random Medusa heads (speed-only runs when the model has no trained heads)")
    p.add_argument("--seed", type=int, default=None, help="seed of --random-heads")
    p.add_argument("--warmup-tokens", type=int, default=8, help="tokens of each untimed warm-up generation")
    p.add_argument("--cost-sizes", default=",".join(map(str, COST_SIZES)),
                   help="tree sizes T for the verify-cost curve, comma-separated ('' to skip it)")
    p.add_argument("--cost-reps", type=int, default=5, help="timed repetitions per size (the median is kept)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill measurement (0: skip)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the full report as JSON")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="plot speedup per category and the cost curve")
    p.set_defaults(func=cmd_bench)
