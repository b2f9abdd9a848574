"""`exo-medusa bench`: prompt files, the report (JSON, markdown, plot) and an end-to-end run on a tiny model."""
import json
import math
import sys

import pytest

from exo_tinygrad_medusa.prompts import Prompt

from exo_tinygrad_medusa.bench import bench
from exo_tinygrad_medusa.decoding.generate import Generator
from exo_tinygrad_medusa.cli import main

PROMPTS = [{"question_id": 7, "category": "greeting", "turns": ["hi there", "and a second turn"]},
           {"id": "cat", "category": "greeting", "prompt": "the cat sat"},
           {"category": "story", "turns": ["go on and on"]}]
SUMMARY_KEYS = {"plain_tokens_per_s", "medusa_tokens_per_s", "speedup_geomean", "mean_accepted", "identical", "device"}


def write_prompts(path, rows=PROMPTS):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_load_prompts_reads_first_turn_category_and_ids(tmp_path):
    prompts = bench.load_prompts(write_prompts(tmp_path / "p.jsonl"))
    assert prompts == [Prompt("7", "greeting", "hi there"), Prompt("cat", "greeting", "the cat sat"),
                       Prompt("3", "story", "go on and on")]
    assert [p.id for p in bench.load_prompts(tmp_path / "p.jsonl", limit=2)] == ["7", "cat"]


def test_load_prompts_names_the_bad_line(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", [PROMPTS[0], {"category": "x"}])
    with pytest.raises(ValueError, match=r"p\.jsonl:2: expected a JSON object with 'turns' or 'prompt'"):
        bench.load_prompts(path)
    with pytest.raises(ValueError, match="holds no prompts"):
        bench.load_prompts(write_prompts(tmp_path / "empty.jsonl", []))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bench.load_prompts(tmp_path / "missing.jsonl")


def test_default_prompts_prefer_shared_mt_bench(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    assert bench.default_prompts_path(repo) == bench.package_prompts_path()
    shared = tmp_path / "shared" / "data" / "mt_bench.jsonl"
    shared.parent.mkdir(parents=True)
    write_prompts(shared)
    assert bench.default_prompts_path(repo) == shared


def test_package_prompts_cover_a_few_categories():
    prompts = bench.load_prompts(bench.package_prompts_path())
    assert len(prompts) == 16 and len({p.id for p in prompts}) == 16
    assert {p.category for p in prompts} == {"coding", "explanation", "writing", "lists"}


def test_geomean_skips_missing_ratios():
    assert bench.geomean([2.0, 0.5, None]) == pytest.approx(1.0)
    assert bench.geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert bench.geomean([None]) is None


def run(pid, category, plain_s, medusa_s, tokens=11, steps=5, accepted=10, identical=True):
    return bench.PromptRun(pid, category, 20, tokens, (tokens - 1) / plain_s, (tokens - 1) / medusa_s,
                           plain_s / medusa_s, accepted / steps, steps, identical, plain_s, medusa_s, accepted)


def test_summarize_aggregates_per_category():
    runs = [run("a", "x", 1.0, 0.5), run("b", "x", 1.0, 2.0, steps=10), run("c", "y", 2.0, 1.0, identical=False)]
    summary, categories = bench.summarize(runs)  # values rounded to 4 decimals for the JSON report
    assert list(categories) == ["x", "y"]
    assert categories["x"]["speedup_geomean"] == pytest.approx(1.0)                  # geomean of 2 and 0.5
    assert categories["x"]["plain_tokens_per_s"] == pytest.approx(20 / 2.0)         # decoded tokens / summed time
    assert categories["x"]["mean_accepted"] == pytest.approx(20 / 15, abs=1e-4)     # accepted tokens / all steps
    assert categories["x"]["identical"] and not categories["y"]["identical"]
    assert summary["speedup_geomean"] == pytest.approx(math.prod([2.0, 0.5, 2.0]) ** (1 / 3), abs=1e-4)
    assert summary["identical"] is False and summary["prompts"] == 3


def fake_report():
    runs = [run("a", "x", 1.0, 0.5), run("b", "y", 1.0, 0.8)]
    summary, categories = bench.summarize(runs)
    summary.update(model="tiny", device="CPU", dtype="float32", tree="cpu-8", tree_size=8, tree_depth=3, tree_top_k=2,
                   heads="random",
                   max_generate_tokens=11, prompts_file="p.jsonl")
    return {"summary": summary, "categories": categories, "prompts": [r.to_json() for r in runs],
            "cost_curve": {"1": 1.0, "2": 1.1, "4": 1.5}, "cost_seconds": {"1": 0.01, "2": 0.011, "4": 0.015},
            "cost_start_pos": 128, "head_cost_seconds": 0.004, "head_cost_relative": 0.4}


def test_markdown_report_has_prompt_category_and_cost_rows():
    text = bench.markdown_report(fake_report())
    assert "| a | x | 20 | 11 | 10.00 | 20.00 | 2.00x | 2.00 | yes |" in text
    assert "| **all** | 2 |" in text
    assert "| t(T)/t(1) | 1.00 | 1.10 | 1.50 |" in text and "| ms | 10.0 | 11.0 | 15.0 |" in text
    assert "(3 head(s) + top-2 on one row): 4.0 ms = 0.40 x t(1)" in text
    report = fake_report()
    del report["summary"]["tree_depth"]  # a report written before the depth was kept still renders
    assert "(heads + top-2 on one row): 4.0 ms" in bench.markdown_report(report)


def test_plot_report_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = bench.plot_report(fake_report(), tmp_path / "bench.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match=r"--plot needs matplotlib: pip install 'exo-tinygrad-medusa\[plot\]'"):
        bench.require_matplotlib()


def test_bench_without_heads_points_at_random_heads(tiny_checkpoint, tmp_path, capsys):
    args = ["bench", str(tiny_checkpoint()), "--prompts", str(write_prompts(tmp_path / "p.jsonl"))]
    assert main(args) == 2
    assert "has no default Medusa heads: pass --medusa-heads PATH|REPO, or --random-heads" in capsys.readouterr().err
    assert main(args + ["--random-heads", "--medusa-heads", str(tmp_path)]) == 2
    assert "--random-heads and --medusa-heads exclude each other" in capsys.readouterr().err


def test_cost_curve_rejects_trees_beyond_the_cache_slack(tiny_model):
    model = tiny_model().model
    with pytest.raises(ValueError, match="cost-curve size 129 exceeds the model's cache slack of 128 tokens"):
        bench.measure_cost_curve(Generator(model, eos_token_ids=()), [1, 129])


def test_bench_random_heads_on_tiny_model(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", str(tiny_checkpoint()), "--random-heads", "--prompts", str(write_prompts(tmp_path / "p.jsonl")),
                 "--max-generate-tokens", "12", "--medusa-choices", "cpu-8", "--cost-sizes", "1,2,4", "--cost-reps", "1",
                 "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["identical"] is True and summary["device"] == "CPU" and summary["random_heads"] is True
    assert summary["tree"] == "cpu-8" and summary["tree_size"] == 8 and summary["prompts"] == 3
    assert summary["plain_tokens_per_s"] > 0 and summary["medusa_tokens_per_s"] > 0 and summary["speedup_geomean"] > 0
    assert 1.0 <= summary["mean_accepted"] <= 5.0  # cpu-8 is 4 levels deep: at most 4 guesses + 1 per step
    assert [p["id"] for p in report["prompts"]] == ["7", "cat", "3"]
    for p in report["prompts"]:
        assert p["identical"] is True and p["generated_tokens"] >= 1 and p["steps"] >= 1
        assert p["accepted_total"] >= p["generated_tokens"] - 1  # the verify steps produced every token past the first
    assert set(report["categories"]) == {"greeting", "story"} and report["categories"]["greeting"]["prompts"] == 2
    assert list(report["cost_curve"]) == ["1", "2", "4"] and report["cost_curve"]["1"] == 1.0
    assert all(report["cost_seconds"][T] > 0 for T in ("1", "2", "4")) and report["cost_start_pos"] == 128
    assert report["head_cost_seconds"] > 0 and report["head_cost_relative"] > 0
    assert "| prompt | category |" in captured.out and "| **all** | 3 |" in captured.out
    assert "random (speed-only run" in captured.err
    # which kernels ran, and a prefill measurement that fits the tiny model's 256-token context
    assert summary["kernels"]["choices"] == "products" and summary["kernels"]["graph"] is True
    assert summary["kernels"]["weights"] == "float32" and summary["kernels"]["cores"] >= 1
    assert summary["prefill_tokens"] == 255 and summary["prefill_tokens_per_s"] > 0
    assert "Prefill of a 255-token prompt" in captured.out
    # bytes of weights a token reads (float32 here: 4 a weight) and the bandwidth plain decoding reached with them
    assert summary["weight_bytes_per_token"] > 0 and summary["plain_weight_gb_per_s"] > 0
    assert "Weights read per token" in captured.out
