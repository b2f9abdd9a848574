"""Prompt files: JSON lines with `turns` (the first turn is used) or `prompt`, plus optional `category` and id."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str
    source: str = ""   # where the prompt came from, when the file says (build-prompts writes it)


def load_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = []
    # split on newlines only: str.splitlines also breaks at U+2028 and friends, which JSON strings may hold raw
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        text = None
        if isinstance(row, dict):
            turns = row.get("turns")
            text = turns[0] if isinstance(turns, list) and turns else row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{n}: expected a JSON object with 'turns' or 'prompt' holding non-empty text")
        prompts.append(Prompt(str(row.get("question_id", row.get("id", n))), str(row.get("category", "general")), text,
                              str(row.get("source", ""))))
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts[:limit] if limit else prompts
