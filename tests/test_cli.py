"""`exo-medusa run`: the JSON report, Medusa equal to plain, and one clear error line with exit code 2 per bad input."""
import io
import json
import re

import pytest

from exo_tinygrad_medusa.cli import main
from exo_tinygrad_medusa.decoding.heads import random_heads
from exo_tinygrad_medusa.model.loader import load_model

REPORT_KEYS = {"model", "prompt_ids", "generated_ids", "text", "prefill_tokens_per_s", "decode_tokens_per_s", "steps",
               "mean_accepted", "accept_histogram", "tree_size", "finish_reason", "stored_session"}


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
    # stderr holds the one summary line (the status line only draws on a terminal)
    assert err.count("\n") == 1 and err.startswith("5 tokens (length): decode ") and "1.0 tokens a step" in err
    report = run_json(capsys, checkpoint, "--prompt", "hi", "--max-generate-tokens", "5")
    assert 0 < report["first_token_s"] < 60 and report["startup_s"] > 0 and report["decode_tokens_per_s"] > 0


def test_second_run_starts_from_the_stored_session(checkpoint, heads_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EXO_MEDUSA_CACHE_DIR", str(tmp_path))
    args = [checkpoint, "--prompt", "stored", "--max-generate-tokens", "9", "--medusa", "--medusa-heads", heads_dir,
            "--medusa-choices", "chain-2", "--max-context", "96"]
    first = run_json(capsys, *args)
    assert not first["stored_session"] and len(list(tmp_path.glob("steps-*.pkl"))) == 1
    second = run_json(capsys, *args)
    assert second["stored_session"] and second["generated_ids"] == first["generated_ids"]
    assert main(["run", *args]) == 0
    assert "(a stored session loaded)" in capsys.readouterr().err
    fresh = run_json(capsys, *args, "--no-step-cache")
    assert not fresh["stored_session"] and fresh["generated_ids"] == first["generated_ids"]


def test_prompt_from_file_and_stdin_equal_prompt_flag(checkpoint, capsys, tmp_path, monkeypatch):
    text = 'two lines,\n"quoted" $HOME `and` \\ backslash'
    direct = run_json(capsys, checkpoint, "--prompt", text, "--max-generate-tokens", "3")
    (tmp_path / "p.txt").write_text(text, encoding="utf-8")
    from_file = run_json(capsys, checkpoint, "--prompt-file", str(tmp_path / "p.txt"), "--max-generate-tokens", "3")
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    from_stdin = run_json(capsys, checkpoint, "--prompt", "-", "--max-generate-tokens", "3")
    assert direct["prompt_ids"] == from_file["prompt_ids"] == from_stdin["prompt_ids"]
    assert direct["generated_ids"] == from_file["generated_ids"] == from_stdin["generated_ids"]
    assert "--prompt-file" in run_error(capsys, checkpoint, "--prompt-file", str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("args, needle", [
    (["--max-generate-tokens", "-5"], "--max-generate-tokens must be >= 1"),
    (["--medusa-enabled", "--medusa-choices", "no-such-tree"], "--medusa-choices: unknown tree 'no-such-tree'"),
    (["--medusa-num-heads", "2"], "without --medusa-enabled: --medusa-num-heads"),
])
def test_option_errors_come_before_the_model_loads(capsys, args, needle):
    # the model does not exist either: the option's error proves it was checked first
    assert needle in run_error(capsys, "no-such-model", *args)


def test_json_schema_errors_name_the_flag_before_the_model_loads(capsys, tmp_path):
    (tmp_path / "broken.json").write_text('{"type": ')
    (tmp_path / "bad.json").write_text('{"type": "objekt"}')
    (tmp_path / "list.json").write_text('[1, 2]')
    for name, needle in (("missing.json", "cannot read it"), ("broken.json", "not valid JSON"),
                         ("bad.json", "the JSON schema cannot be compiled for constrained decoding: Invalid type"),
                         ("list.json", "the JSON schema must be an object")):
        err = run_error(capsys, "no-such-model", "--json-schema", str(tmp_path / name))
        assert f"--json-schema {tmp_path / name}: " in err and needle in err, err


def test_run_with_a_json_schema_medusa_equals_plain(checkpoint, heads_dir, capsys, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    # OpenAI's wrapper, as a client would write it
    (tmp_path / "weather.json").write_text(json.dumps({"name": "weather", "strict": True, "schema": schema}))
    args = (checkpoint, "--prompt", "weather?", "--max-generate-tokens", "60", "--json-schema",
            str(tmp_path / "weather.json"))
    plain = run_json(capsys, *args)
    assert plain["finish_reason"] == "stop" and plain["response_format"] == "json_schema"
    jsonschema.validate(json.loads(plain["text"]), schema)
    medusa = run_json(capsys, *args, "--medusa", "--medusa-heads", heads_dir, "--medusa-choices", "chain-2")
    assert medusa["generated_ids"] == plain["generated_ids"]
    assert isinstance(json.loads(run_json(capsys, checkpoint, "--json-object", "--max-generate-tokens", "40")["text"]),
                      dict)
    # a budget too small for the JSON: said so, not hidden
    assert main(["run", *args[:3], "--max-generate-tokens", "3", *args[5:]]) == 0
    assert "the token budget ran out before the JSON closed" in capsys.readouterr().err


def test_help_names_every_command_and_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for command in ("run", "serve", "bench", "bench-ring", "tune-tree", "train-heads", "distill", "eval-heads"):
        assert f"    {command}" in top, command
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    helptext = capsys.readouterr().out
    options = [o for o in re.findall(r"^  (--[a-z-]+)", helptext, re.M) if o != "--help"]
    assert "--prompt-file" in options and len(options) > 15
    for block in re.split(r"\n  (?=-)", helptext)[1:]:
        assert len(block.split(None, 1)) == 2 and len(block.split()) > 2, f"option without help: {block!r}"


@pytest.mark.parametrize("args, needle", [
    (["no-such-model"], "unknown model 'no-such-model'"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--max-generate-tokens", "-5"], "--max-generate-tokens must be >= 1, got -5"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--prompt", "  "], "the prompt is empty"),
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

