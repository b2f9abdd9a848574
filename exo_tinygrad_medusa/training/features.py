"""On-disk self-distillation data: the answers and, per answer token, the hidden state that produced it.

Row i of a sample is the final normed hidden state at the token before answer[i] (row 0: the last prompt token),
so the base lm_head maps row i to answer[i] and Medusa head k must predict answer[i + k + 1]. Hidden states live
in one float16 numpy memmap; everything else in samples.jsonl. Samples never mix: targets are taken only from
the sample's own answer, and rows whose target lies past its end are masked."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HIDDEN_FILE, SAMPLES_FILE, META_FILE = "hidden.npy", "samples.jsonl", "meta.json"
IGNORE = -1


@dataclass
class Sample:
    prompt: str
    prompt_ids: list[int]
    answer_ids: list[int]


class FeatureWriter:
    """Appends samples and their hidden rows; meta.json is written last, so a store without it is incomplete.

    With resume=True an unfinished store of the same shape is continued: the samples whose line reached
    samples.jsonl are kept (`resumed` holds them, in order) and the next sample goes after them. A sample's line is
    written after its rows, and the rows live in a shared file mapping that outlives a killed process, so a kept
    line always has its rows. A store of another shape starts over."""

    def __init__(self, out_dir: str | Path, dim: int, capacity: int, resume: bool = False):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / META_FILE).unlink(missing_ok=True)
        self.dim, self.rows, self.resumed = dim, 0, []
        hidden_path, samples_path = self.dir / HIDDEN_FILE, self.dir / SAMPLES_FILE
        if resume and hidden_path.is_file() and samples_path.is_file():
            hidden = np.load(hidden_path, mmap_mode="r+")
            if hidden.shape == (capacity, dim) and hidden.dtype == np.float16:
                self.hidden, self.resumed = hidden, self._complete_lines(samples_path)
                self.rows = sum(len(s.answer_ids) for s in self.resumed)
                self.samples = open(samples_path, "a", buffering=1)
                return
        self.hidden = np.lib.format.open_memmap(hidden_path, mode="w+", dtype=np.float16, shape=(capacity, dim))
        self.samples = open(samples_path, "w", buffering=1)  # line-buffered: a finished sample reaches the file

    @staticmethod
    def _complete_lines(path: Path) -> list[Sample]:
        """The samples of every whole line; a line cut off by a kill is dropped from the file."""
        data = path.read_bytes()
        keep = data[:data.rfind(b"\n") + 1]
        if len(keep) < len(data):
            with open(path, "r+b") as f:
                f.truncate(len(keep))
        return [Sample(**json.loads(line)) for line in keep.decode().splitlines() if line]

    def keep(self, count: int) -> None:
        """Keep only the first `count` resumed samples; the next sample goes after them."""
        self.resumed = self.resumed[:count]
        self.samples.seek(0)
        self.samples.truncate()
        for s in self.resumed:
            self._write_line(s)
        self.rows = sum(len(s.answer_ids) for s in self.resumed)

    def add(self, sample: Sample, hidden: np.ndarray) -> None:
        if hidden.shape != (len(sample.answer_ids), self.dim):
            raise ValueError(f"expected {len(sample.answer_ids)} hidden rows of {self.dim}, got {hidden.shape}")
        self.hidden[self.rows:self.rows + len(hidden)] = hidden
        self.rows += len(hidden)
        self._write_line(sample)

    def _write_line(self, sample: Sample) -> None:
        self.samples.write(json.dumps({"prompt": sample.prompt, "prompt_ids": sample.prompt_ids,
                                       "answer_ids": sample.answer_ids}) + "\n")

    def close(self, **info) -> None:
        self.hidden.flush()
        self.samples.close()
        (self.dir / META_FILE).write_text(json.dumps({"rows": self.rows, "dim": self.dim, **info}, indent=2))


@dataclass
class FeatureStore:
    """A finished store: hidden (rows, D) float16 memmap, samples, and each sample's first row."""
    hidden: np.ndarray
    samples: list[Sample]
    offsets: np.ndarray
    meta: dict

    @classmethod
    def open(cls, directory: str | Path) -> "FeatureStore":
        d = Path(directory)
        if not (d / META_FILE).is_file():
            raise FileNotFoundError(f"{d} is not a finished feature store (no {META_FILE})")
        meta = json.loads((d / META_FILE).read_text())
        samples = [Sample(**json.loads(line)) for line in (d / SAMPLES_FILE).read_text().splitlines() if line]
        lengths = np.array([len(s.answer_ids) for s in samples], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        if offsets[-1] != meta["rows"]:
            raise ValueError(f"{d}: samples cover {offsets[-1]} rows but meta.json says {meta['rows']}")
        hidden = np.load(d / HIDDEN_FILE, mmap_mode="r")
        return cls(hidden[:meta["rows"]], samples, offsets, meta)

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    def labels(self, num_heads: int, sample_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, labels (rows, 1 + num_heads)): column 0 is the base model's own next token, column k + 1
        head k's target; IGNORE past the sample's end."""
        ids = np.arange(len(self.samples)) if sample_ids is None else sample_ids
        rows, labels = [], []
        for s in ids:
            answer = np.array(self.samples[s].answer_ids, dtype=np.int32)
            n = len(answer)
            lab = np.full((n, num_heads + 1), IGNORE, dtype=np.int32)
            for k in range(min(num_heads + 1, n)):  # an answer shorter than the heads reach has fewer targets
                lab[:n - k, k] = answer[k:]
            rows.append(np.arange(self.offsets[s], self.offsets[s] + n))
            labels.append(lab)
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, num_heads + 1), dtype=np.int32)
        return np.concatenate(rows), np.concatenate(labels)


def merge_stores(parts: list[str | Path], out_dir: str | Path, **info) -> FeatureStore:
    """One store from finished stores written in parallel (one generating process per core), samples in order."""
    stores = [FeatureStore.open(p) for p in parts]
    dims = {s.meta["dim"] for s in stores}
    if len(dims) != 1:
        raise ValueError(f"feature stores of different hidden sizes cannot be merged: {sorted(dims)}")
    writer = FeatureWriter(out_dir, dims.pop(), sum(s.tokens for s in stores))
    for store in stores:
        for i, sample in enumerate(store.samples):
            writer.add(sample, np.asarray(store.hidden[store.offsets[i]:store.offsets[i + 1]]))
    writer.close(parts=[s.meta for s in stores], **info)
    return FeatureStore.open(out_dir)
