"""`exo-medusa run`: the JSON report, Medusa equal to plain, and one clear error line with exit code 2 per bad input."""
import json

import pytest

from exo_tinygrad_medusa.cli import main
from exo_tinygrad_medusa.decoding.heads import random_heads
from exo_tinygrad_medusa.model.loader import load_model

REPORT_KEYS = {"model", "prompt_ids", "generated_ids", "text", "prefill_tokens_per_s", "decode_tokens_per_s", "steps",
               "mean_accepted", "accept_histogram", "tree_size", "finish_reason"}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return str(tiny_checkpoint("llama", seed=1))


@pytest.fixture(scope="module")
def heads_dir(checkpoint, tmp_path_factory):
    loaded = load_model(checkpoint)
    return str(random_heads(loaded.config, loaded.model.lm_head, num_heads=2, scale=0.3).save(tmp_path_factory.mktemp("heads")))


def run_json(capsys, *args) -> dict:
    assert main(["run", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_error(capsys, *args) -> str:
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("exo-medusa: error: ") and "\n" not in err, err
    return err


def test_run_json_report_and_medusa_equals_plain(checkpoint, heads_dir, capsys):
    plain = run_json(capsys, checkpoint, "--prompt", "hello there", "--max-generate-tokens", "12")
    assert REPORT_KEYS <= plain.keys()
    assert len(plain["generated_ids"]) == 12 and plain["finish_reason"] == "length"
    assert plain["mean_accepted"] == 1.0 and plain["steps"] == 11 and plain["tree_size"] == 1
    medusa = run_json(capsys, checkpoint, "--prompt", "hello there", "--max-generate-tokens", "12", "--medusa",
                      "--medusa-heads", heads_dir, "--medusa-choices", "chain-2")
    assert medusa["generated_ids"] == plain["generated_ids"] and medusa["prompt_ids"] == plain["prompt_ids"]
    assert medusa["tree_size"] == 3 and medusa["steps"] == sum(medusa["accept_histogram"].values())


def test_run_streams_text_and_summary(checkpoint, capsys):
    assert main(["run", checkpoint, "--prompt", "hi", "--max-generate-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert "5 tokens" in err and "tok/s" in err and "mean accepted 1.0" in err


@pytest.mark.parametrize("args, needle", [
    (["no-such-model"], "unknown model 'no-such-model'"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--max-generate-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--max-context", "16", "--prompt", "a long prompt " * 20], "the context holds 16"),
    (["--medusa-choices", "chain-2"], "without --medusa-enabled"),
])
def test_bad_input_is_one_line_exit_2(checkpoint, capsys, args, needle):
    model = [] if args[0] == "no-such-model" else [checkpoint]
    assert needle in run_error(capsys, *model, *args)


def test_tree_deeper_than_heads(checkpoint, heads_dir, capsys):
    err = run_error(capsys, checkpoint, "--medusa", "--medusa-heads", heads_dir, "--medusa-choices", "chain-3")
    assert "3 levels deep but only 2 Medusa heads" in err


def test_missing_heads_and_too_many_heads(checkpoint, heads_dir, tmp_path, capsys):
    assert "not found" in run_error(capsys, checkpoint, "--medusa", "--medusa-heads", str(tmp_path / "nope"))
    assert "--medusa-num-heads 5: the checkpoint has 2 heads" in run_error(
        capsys, checkpoint, "--medusa", "--medusa-heads", heads_dir, "--medusa-num-heads", "5")

