"""Shared options: one lower module that every command imports (no import circle through cli.py), sampling values
checked before a model loads, and the first-run notice."""
from __future__ import annotations

import argparse
import ast
import io
import re
from pathlib import Path

import pytest

from exo_tinygrad_medusa.cli import main
from exo_tinygrad_medusa.options import generation_args, generation_config
from exo_tinygrad_medusa.status import Status

PACKAGE = Path(__file__).resolve().parent.parent / "exo_tinygrad_medusa"


def parse(*argv: str):
    return argparse.ArgumentParser(parents=[generation_args()]).parse_args(list(argv))


def test_nothing_imports_cli():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("cli", "exo_tinygrad_medusa.cli"):
                importers.append(path.name)
            if isinstance(node, ast.ImportFrom) and node.module is None and any(a.name == "cli" for a in node.names):
                importers.append(path.name)
    assert importers == ["__main__.py"]


def test_temperature_too_small_to_sample_is_greedy():
    assert generation_config(parse("--temperature", "1e-320")).greedy
    assert generation_config(parse("--temperature", "0.7")).temperature == 0.7


@pytest.mark.parametrize("argv, message", [
    (("--seed", "-1"), "seed must be in [0, 2**64), got -1"),
    (("--temperature", "inf"), "temperature must be a finite number"),
    (("--temperature", "nan"), "temperature must be a finite number"),
    (("--temperature", "-0.5"), "temperature must be >= 0"),
])
def test_bad_sampling_values_are_refused(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generation_config(parse(*argv))


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_status_line_is_drawn_and_cleared_on_a_terminal_only():
    tty = FakeTerminal()
    status = Status(stream=tty)
    status.show("loading model")
    status.show("compiling")
    assert "\rexo-medusa: loading model [" in tty.getvalue() and "\rexo-medusa: compiling [" in tty.getvalue()
    status.clear()
    assert tty.getvalue().endswith("\r") and tty.getvalue().rsplit("\r", 2)[-2].strip() == ""
    pipe = io.StringIO()
    Status(stream=pipe).show("loading model")
    assert pipe.getvalue() == ""  # pipes and logs keep exactly the summary or the error line
    assert Status(enabled=False, stream=FakeTerminal()).live is False


@pytest.mark.parametrize("argv, message", [
    (("--queue-size", "-1"), "--queue-size must be >= 0"),
    (("--timeout", "0"), "--timeout and --header-timeout must be > 0"),
    (("--max-connections", "0"), "--max-connections and --max-client-connections >= 1"),
])
def test_serve_limits_are_checked_before_the_model_loads(argv, message, capsys):
    assert main(["serve", "no-such-model", *argv]) == 2  # the model would fail too: the limits are checked first
    err = capsys.readouterr().err.strip()
    assert err.startswith("exo-medusa: error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("argv, message", [
    (["train-heads", "--out", "unused", "--activations", "q8"], "train-heads does not take --activations"),
    (["distill", "--prompts", "p.jsonl", "--corpus", "c", "--weights", "float32"], "distill does not take --weights"),
    (["eval-heads", "--weights", "compact", "--activations", "q8"], "eval-heads does not take --weights or --activations"),
    (["bench-ring", "--activations", "q8"], "bench-ring does not take --activations"),
])
def test_commands_that_load_their_own_way_refuse_load_options(argv, message, capsys):
    # no model loads: the refusal comes first, one line, exit 2
    assert main(argv) == 2
    assert message in capsys.readouterr().err
