"""A one-line progress bar on stderr: done/total, rate, ETA and whatever numbers the caller adds."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class Progress:
    def __init__(self, total: int, label: str, unit: str = "it", stream=None, min_interval: float = 0.5,
                 enabled: bool = True):
        self.total, self.label, self.unit, self.enabled = total, label, unit, enabled
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.done, self.last_draw, self.min_interval = 0, 0.0, min_interval
        self.rate_units = 0  # what the rate counts (e.g. tokens) when it differs from `done`

    def update(self, advance: int = 1, rate_units: int | None = None, **fields) -> None:
        self.done += advance
        self.rate_units += advance if rate_units is None else rate_units
        now = time.perf_counter()
        if not self.enabled or (now - self.last_draw < self.min_interval and self.done < self.total):
            return
        self.last_draw = now
        elapsed = now - self.start
        rate = self.rate_units / elapsed if elapsed > 0 else 0.0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        extra = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        width = 24
        filled = int(width * min(self.done, self.total) / max(self.total, 1))
        line = (f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{rate:.1f} {self.unit}/s eta {_clock(eta)} {extra}")
        self.stream.write(line.ljust(100)[:200])
        self.stream.flush()

    def close(self) -> float:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
        return time.perf_counter() - self.start


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def resume_progress(state_dir: Path, config: dict) -> dict | None:
    """A training run's saved progress.json (written last, so its presence means the state beside it is whole), or
    None when there is none; a state written with other settings than `config` is refused."""
    if not (state_dir / "progress.json").is_file():
        return None
    progress = json.loads((state_dir / "progress.json").read_text())
    if progress["config"] != config:
        raise ValueError(f"--resume: {state_dir} was written with different settings: {progress['config']}")
    return progress
