"""The report of `exo-medusa bench-ring`: a markdown table and a plot."""
from __future__ import annotations

from pathlib import Path


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_report(report: dict) -> str:
    s = report["summary"]
    lines = [f"## exo-medusa bench-ring: {s['model']} ({s['n_layers']} layers), tree {s['tree']} ({s['tree_size']} "
             f"nodes)", "", f"{len(s['prompts'])} prompts, up to {s['max_generate_tokens']} new tokens each, greedy; "
             f"shards are {s.get('shards_as', 'processes')} on loopback (idle kernel-pool threads spin "
             f"{s.get('pool_spin_ms', 0.3):g} ms before they sleep), the delay is one-way per ring link. Compute "
             "per pass is the decode time less the injected delay: the shards' engines (as each shard times its own) "
             "plus the transport (framing, loopback sockets, the driver's relay, wake-ups).", "",
             "| shards | link delay | plain tok/s | Medusa tok/s | Medusa/plain | passes/token plain | passes/token "
             "Medusa | accepted/step | compute ms/pass plain | of which engines | compute ms/pass Medusa | "
             "standalone ms/step | plain pass / standalone step | identical |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for c in report["cells"]:
        lines.append(f"| {c['shards']} | {c['delay_ms']:g} ms | {_fmt(c['plain_tokens_per_s'])} | "
                     f"{_fmt(c['medusa_tokens_per_s'])} | {_fmt(c['ratio'])}x | {_fmt(c['plain_passes_per_token'])} | "
                     f"{_fmt(c['medusa_passes_per_token'])} | {_fmt(c['mean_accepted'])} | "
                     f"{_fmt(c['plain_compute_ms_per_pass'], 1)} | {_fmt(c['plain_engine_ms_per_pass'], 1)} | "
                     f"{_fmt(c['medusa_compute_ms_per_pass'], 1)} | "
                     f"{_fmt(c['standalone_ms_per_step'], 1)} | {_fmt(c['plain_pass_per_standalone_step'])}x | "
                     f"{'yes' if c['identical'] else '**NO**'} |")
    lines += ["", "Pass-cost model (a pass costs compute + shards x delay; ratio = a (c_plain + N d) / (c_Medusa + N d)):",
              "", "| shards | c_plain ms | c_Medusa ms | standalone step ms | c_plain / standalone | tokens/pass "
                  "ratio a (limit for long links) | Medusa wins above (one-way) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for m in report["model_fit"]:
        wins = m["break_even_one_way_delay_ms"]
        lines.append(f"| {m['shards']} | {m['plain_compute_ms_per_pass']:.1f} | {m['medusa_compute_ms_per_pass']:.1f} | "
                     f"{m['standalone_ms_per_step']:.1f} | {_fmt(m['plain_pass_per_standalone_step'])}x | "
                     f"{m['tokens_per_pass_ratio']:.3f} | {'never' if wins is None else f'{wins:g} ms'} |")
    exo = report.get("exo")
    if exo and "skipped" in exo:
        lines += ["", f"Classic Exo: skipped ({exo['skipped']})."]
    elif exo:
        lines += ["", f"Classic Exo, two-node ring, {exo['delay_ms']:g} ms one-way on its gRPC links, prompt "
                      f"{exo['prompt']!r}: plain {exo['plain']['decode_s']:.2f} s, Medusa {exo['medusa']['decode_s']:.2f} s "
                      f"of decoding, Medusa/plain {_fmt(exo['ratio'])}x, identical text: "
                      f"{'yes' if exo['identical'] else '**NO**'}."]
    return "\n".join(lines)


def plot_report(report: dict, out: str | Path) -> Path:
    from .bench import require_matplotlib
    plt = require_matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for i, shards in enumerate(dict.fromkeys(c["shards"] for c in report["cells"])):
        cells = [c for c in report["cells"] if c["shards"] == shards]
        delays = [c["delay_ms"] for c in cells]
        color = colors[i % len(colors)]
        left.plot(delays, [c["plain_tokens_per_s"] for c in cells], marker="o", linestyle="--", color=color,
                  label=f"plain, {shards} shards")
        left.plot(delays, [c["medusa_tokens_per_s"] for c in cells], marker="s", color=color,
                  label=f"Medusa, {shards} shards")
        right.plot(delays, [c["ratio"] or 0.0 for c in cells], marker="s", color=color, label=f"{shards} shards")
        fit = next((m for m in report.get("model_fit", []) if m["shards"] == shards), None)
        if fit:  # what the pass-cost model predicts from the median compute per pass: the noise-free trend
            right.plot(delays, [fit["predicted_ratio"][str(d)] for d in delays], linestyle=":", color=color,
                       label=f"{shards} shards, pass-cost model")
    left.set_xlabel("one-way link delay (ms)")
    left.set_ylabel("decode tokens/s")
    left.set_title("Ring throughput vs link delay")
    left.legend()
    right.axhline(1.0, color="grey", linewidth=1, linestyle="--")
    right.set_xlabel("one-way link delay (ms)")
    right.set_ylabel("Medusa / plain tokens/s")
    right.set_title(f"Speedup (tree {report['summary']['tree']})")
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
