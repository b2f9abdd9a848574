"""Drafts from a datastore of the model's own answers: a suffix array over their token ids.

The store is the answers of a self-distillation corpus laid end to end, each preceded by the last few tokens of its
prompt (the chat template's assistant header, so the first answer tokens have something to match) and followed by a
separator. Its suffixes are sorted by their first `SORT_DEPTH` tokens; every suffix sharing a pattern then sits in one
contiguous range of the array, and so does every suffix sharing the pattern plus any continuation of it. A query takes
the longest suffix of the current context (MIN_MATCH..MAX_MATCH tokens) that occurs in the store and walks its range
one token at a time, keeping the most frequent next token: a chain draft and, per token, the share of the matches that
continued that way.

Files (a directory): `tokens.npy` (the sequence, uint16 when the vocabulary allows, else int32), `suffixes.npy`
(int32 start positions, sorted) and `datastore.json` (format, separator, counts, provenance). Both arrays are
memory-mapped; a query runs a few numpy binary searches over packed keys (two or three uint64 per suffix, made at load)
and costs ~0.1 ms on the host."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
FORMAT = 1
TOKENS_FILE, SUFFIXES_FILE, META_FILE = "tokens.npy", "suffixes.npy", "datastore.json"
MIN_MATCH, MAX_MATCH = 2, 8
SORT_DEPTH = 32          # suffixes are ordered by this many tokens: a match plus its continuation must fit
PROMPT_TAIL = 4          # prompt tokens kept before each answer (the assistant header of a chat template)
MAX_DRAFT = SORT_DEPTH - MAX_MATCH
MAX_COUNTED = 2048       # matches counted per query, to keep a query well under a millisecond


@dataclass(frozen=True)
class StoreDraft:
    tokens: list[int]
    match: int                  # length of the context suffix that matched (0: none)
    support: int                # occurrences of that suffix in the store
    shares: list[float]         # per draft token: share of the matches still alive that continued with it


NO_DRAFT = StoreDraft([], 0, 0, [])


def _bits_for(max_token: int) -> int:
    """Bits a token takes in a packed key: room for every id and the separator (all ones, above every id)."""
    return max(int(max_token + 1).bit_length(), 1)


def suffix_order(seq: np.ndarray, depth: int = SORT_DEPTH) -> np.ndarray:
    """Start positions of seq's suffixes sorted by their first `depth` tokens (ties: by position), by prefix doubling:
    each round sorts by (rank of the first k tokens, rank of the k tokens after them), doubling k."""
    n = len(seq)
    rank = np.unique(seq, return_inverse=True)[1].astype(np.int64) + 1   # ranks 1..n
    k = 1
    while k < depth:
        # past the end sorts after every token, as the separator padding of the query keys does
        after = np.full(n, n + 1, dtype=np.int64)
        after[:n - k] = rank[k:] if k < n else after[:0]
        order = np.lexsort((after, rank))
        pair_rank, after_sorted = rank[order], after[order]
        new = np.empty(n, dtype=np.int64)
        changed = np.ones(n, dtype=bool)
        changed[1:] = (pair_rank[1:] != pair_rank[:-1]) | (after_sorted[1:] != after_sorted[:-1])
        new[order] = np.cumsum(changed)
        rank = new
        k *= 2
        if rank.max() == n:  # every suffix already distinct
            break
    return np.lexsort((np.arange(n), rank)).astype(np.int32)


def build_sequence(answers, prompt_tails=None, tail: int = PROMPT_TAIL) -> tuple[np.ndarray, int]:
    """The store's token sequence (each answer after its prompt's last `tail` tokens, then the separator), and the
    separator. answers, prompt_tails: lists of token-id lists."""
    answers = [[int(t) for t in a] for a in answers]
    tails = [[int(t) for t in p][-tail:] if tail else [] for p in (prompt_tails or [[] for _ in answers])]
    max_token = max((max(x) for x in answers + tails if x), default=0)
    if min((min(x) for x in answers + tails if x), default=0) < 0:
        raise ValueError("token ids must be >= 0")
    sep = (1 << _bits_for(max_token)) - 1
    parts = []
    for a, p in zip(answers, tails):
        parts.append(np.asarray(p + a + [sep], dtype=np.int64))
    seq = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return seq, sep


class Datastore:
    """A suffix array over `seq` (sep-separated token runs); see the module docstring."""

    def __init__(self, seq: np.ndarray, suffixes: np.ndarray, sep: int, meta: dict | None = None):
        self.seq, self.suffixes, self.sep = seq, suffixes, int(sep)
        self.meta = meta or {}
        self.bits = _bits_for(self.sep - 1)
        if (1 << self.bits) - 1 != self.sep:
            raise ValueError(f"datastore separator {sep} is not all ones in {self.bits} bits")
        self.per_key = 64 // self.bits
        n = len(seq)
        # the sequence padded with separators, so a key or a continuation may run past the end
        pad = MAX_MATCH + MAX_DRAFT + self.per_key
        self._padded = np.concatenate([np.asarray(seq, dtype=np.int64), np.full(pad, self.sep, dtype=np.int64)])
        self.keys = [self._pack_at(np.asarray(suffixes, dtype=np.int64) + j * self.per_key)
                     for j in range(-(-MAX_MATCH // self.per_key))] if n else []

    @classmethod
    def build(cls, answers, prompt_tails=None, tail: int = PROMPT_TAIL, meta: dict | None = None) -> "Datastore":
        seq, sep = build_sequence(answers, prompt_tails, tail)
        suffixes = suffix_order(seq)
        dtype = np.uint16 if sep <= np.iinfo(np.uint16).max else np.int32
        return cls(seq.astype(dtype), suffixes, sep, {**(meta or {}), "prompt_tail": tail})

    # -- files ----------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / TOKENS_FILE, np.asarray(self.seq))
        np.save(d / SUFFIXES_FILE, np.asarray(self.suffixes, dtype=np.int32))
        meta = {**self.meta, "format": FORMAT, "separator": self.sep, "tokens": int(len(self.seq)),
                "sort_depth": SORT_DEPTH}
        (d / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "Datastore":
        d = Path(directory)
        if not (d / META_FILE).is_file():
            raise FileNotFoundError(f"{d} is not a datastore (no {META_FILE}); build one with `exo-medusa build-datastore`")
        meta = json.loads((d / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d}: datastore format {meta.get('format')} is not {FORMAT}")
        t0 = time.perf_counter()
        seq = np.load(d / TOKENS_FILE, mmap_mode="r")
        suffixes = np.load(d / SUFFIXES_FILE, mmap_mode="r")
        if len(seq) != len(suffixes) or len(seq) != meta.get("tokens"):
            raise ValueError(f"{d}: {TOKENS_FILE} and {SUFFIXES_FILE} do not match {META_FILE}")
        store = cls(seq, suffixes, meta["separator"], meta)
        log.info("datastore %s: %d tokens, loaded in %.0f ms", d, len(seq), (time.perf_counter() - t0) * 1e3)
        return store

    # -- queries --------------------------------------------------------------------------------------------------
    def _pack_at(self, starts: np.ndarray) -> np.ndarray:
        """Big-endian packed keys of the `per_key` tokens from each start (numeric order == lexicographic order)."""
        key = np.zeros(len(starts), dtype=np.uint64)
        for i in range(self.per_key):
            key = (key << np.uint64(self.bits)) | self._padded[starts + i].astype(np.uint64)
        return key

    def _pack(self, tokens: list[int], fill: int) -> np.uint64:
        key = 0
        for i in range(self.per_key):
            key = (key << self.bits) | (tokens[i] if i < len(tokens) else fill)
        return np.uint64(key)

    def find(self, pattern: list[int]) -> tuple[int, int]:
        """[lo, hi): the sorted suffixes that start with `pattern` (1..MAX_MATCH token ids)."""
        if not 0 < len(pattern) <= MAX_MATCH:
            raise ValueError(f"a datastore pattern holds 1..{MAX_MATCH} tokens, got {len(pattern)}")
        lo, hi = 0, len(self.suffixes)
        if any(t < 0 or t >= self.sep for t in pattern):
            return 0, 0
        for j, keys in enumerate(self.keys):
            part = pattern[j * self.per_key:(j + 1) * self.per_key]
            if not part:
                break
            view = keys[lo:hi]
            first = int(np.searchsorted(view, self._pack(part, 0), "left"))
            last = int(np.searchsorted(view, self._pack(part, self.sep), "right"))
            lo, hi = lo + first, lo + last
            if lo >= hi:
                return 0, 0
        return lo, hi

    def longest_match(self, context: list[int], min_match: int = MIN_MATCH,
                      max_match: int = MAX_MATCH) -> tuple[int, int, int]:
        """(n, lo, hi) for the longest suffix of `context` of min_match..max_match tokens that occurs in the store
        (n = 0: none). A suffix of n tokens occurs wherever one of n + 1 does, so n is found by bisection."""
        best = (0, 0, 0)
        low, high = min_match, min(max_match, MAX_MATCH, len(context))
        while low <= high:
            mid = (low + high) // 2
            lo, hi = self.find(context[len(context) - mid:])
            if hi > lo:
                best, low = (mid, lo, hi), mid + 1
            else:
                high = mid - 1
        return best

    def draft(self, context: list[int], length: int, min_match: int = MIN_MATCH,
              max_match: int = MAX_MATCH) -> StoreDraft:
        """Up to `length` tokens continuing the context's longest matching suffix, each the most frequent next token
        among the matches that followed the draft so far (ties: the smaller id); stops at the end of an answer."""
        if len(self.suffixes) == 0 or length < 1:
            return NO_DRAFT
        n, lo, hi = self.longest_match([int(t) for t in context], min_match, max_match)
        if n == 0:
            return NO_DRAFT
        support, tokens, shares = hi - lo, [], []
        # a frequent suffix is counted on an evenly strided sample of its range: still sorted, shares barely move
        stride = -(-support // MAX_COUNTED)
        starts = np.asarray(self.suffixes[lo:hi:stride], dtype=np.int64) + n
        for d in range(min(length, MAX_DRAFT)):
            if len(starts) == 1:  # one match left: the rest of the draft is its text, up to the end of its answer
                rest = self._padded[starts[0] + d:starts[0] + min(length, MAX_DRAFT)].tolist()
                rest = rest[:rest.index(self.sep)] if self.sep in rest else rest
                return StoreDraft(tokens + rest, n, support, shares + [1.0] * len(rest))
            nxt = self._padded[starts + d]            # sorted: the range shares its first n + d tokens
            cut = np.flatnonzero(nxt[1:] != nxt[:-1]) + 1
            bounds = np.concatenate([[0], cut, [len(nxt)]])
            best = int(np.argmax(np.diff(bounds)))
            a, b = int(bounds[best]), int(bounds[best + 1])
            tok = int(nxt[a])
            if tok == self.sep:
                break
            tokens.append(tok)
            shares.append((b - a) / len(nxt))
            starts = starts[a:b]
        return StoreDraft(tokens, n, support, shares)

    @property
    def nbytes(self) -> int:
        return int(np.asarray(self.seq).nbytes + np.asarray(self.suffixes).nbytes)


def corpus_datastore(corpus_dir: str | Path, tail: int = PROMPT_TAIL, header_ids: list[int] | None = None) -> Datastore:
    """A datastore over every answer of a distill corpus (training/corpus.py). A record whose prompt is withheld (a
    published corpus keeps no prompt text) gets `header_ids` as its prompt, the chat template's assistant header:
    only a prompt's last `tail` tokens enter the store, and every prompt ends with that header."""
    from ..training.corpus import AnswerCorpus
    corpus = AnswerCorpus.open(corpus_dir)
    records = corpus.records()
    if not records:
        raise ValueError(f"{corpus_dir} holds no answers")
    if header_ids is None and any("prompt_ids" not in r for r in records):
        raise ValueError(f"{corpus_dir} withholds prompts: the assistant header (header_ids) is needed in their place")
    meta = {"model": corpus.settings.model, "answers": len(records), "source": "distill corpus",
            "answer_tokens": int(sum(len(r["answer_ids"]) for r in records))}
    prompts = [r.get("prompt_ids", header_ids) for r in records]
    return Datastore.build([r["answer_ids"] for r in records], prompts, tail, meta)
