"""`make run PROMPT=...` hands the prompt to the CLI exactly as typed (newlines, quotes, `$`, backslashes)."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_passes_the_prompt_verbatim(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    # a stand-in for the installed CLI that prints each argument it received between brackets
    (fake / "exo-medusa").write_text('#!/bin/sh\nfor a in "$@"; do printf "[%s]\\n" "$a"; done\n')
    (fake / "exo-medusa").chmod(0o755)
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".run").touch()
    prompt = 'line one\n"two" $HOME `echo x` \\n $$ \'single\' end'
    out = subprocess.run(["make", "-s", "-o", f"{venv}/.run", "run", f"VENV={venv}", f"BIN={fake}", f"PROMPT={prompt}"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.endswith(f"[--prompt]\n[{prompt}]\n")
