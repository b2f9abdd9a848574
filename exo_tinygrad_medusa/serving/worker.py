"""The model's own thread and its bounded job queue.

One worker thread owns the model: it loads it and runs every generation, so tinygrad stays on one thread and the
single KV cache serves one request at a time. It decodes the tokens and applies the request's `stop` strings itself
(one "text" event per Medusa step, a protocol.Piece), so a streamed reply and a non-streamed one are the same text;
the tokens' log-probabilities travel with the text that holds them, and none past a stop string.

At most `queue_size` requests wait while one generates (the HTTP layer answers the rest with 429), and a job whose
client hung up is dropped before it runs, or stopped at its next step while it runs.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..decoding.session import Session
from ..model.tokenizer import StreamDecoder
from .metrics import Metrics
from .protocol import ChatRequest, Piece, StopMatcher

log = logging.getLogger(__name__)
DEFAULT_QUEUE_SIZE = 8


class _Cancelled(Exception):
    """Raised inside generation when the client went away."""


class _StopFound(Exception):
    """Raised inside generation when the text reached one of the request's stop strings."""


@dataclass
class Job:
    request: ChatRequest
    # ("text", Piece) ..., then ("done", stats) or ("error", message)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class JobQueue:
    """The worker's queue with admission control: a job is admitted while fewer than `waiting` others wait
    (the one generating not counted); jobs whose client left are dropped without running."""

    def __init__(self, waiting: int):
        self.waiting, self.jobs, self.busy = waiting, collections.deque(), False
        self.cond = threading.Condition()

    def submit(self, job: Job) -> bool:
        with self.cond:
            self.jobs = collections.deque(j for j in self.jobs if not j.cancelled.is_set())
            if len(self.jobs) + self.busy > self.waiting:
                return False
            self.jobs.append(job)
            self.cond.notify()
            return True

    def depth(self) -> tuple[int, bool]:
        """(requests waiting, whether one generates)."""
        with self.cond:
            return sum(not j.cancelled.is_set() for j in self.jobs), self.busy

    def take(self) -> Job:
        with self.cond:
            while True:
                while self.jobs:
                    job = self.jobs.popleft()
                    if not job.cancelled.is_set():
                        self.busy = True
                        return job
                self.cond.wait()

    def done(self) -> None:
        with self.cond:
            self.busy = False


class ModelWorker(threading.Thread):
    """Loads the session on its own thread, then runs queued jobs one at a time."""

    def __init__(self, open_session: Callable[[], Session], queue_size: int = DEFAULT_QUEUE_SIZE):
        super().__init__(name="model-worker", daemon=True)
        self.open_session = open_session
        self.jobs = JobQueue(queue_size)
        self.ready = threading.Event()
        self.session: Session | None = None
        self.load_error: BaseException | None = None
        self.metrics = Metrics()

    def submit(self, request: ChatRequest) -> Job | None:
        """The queued job, or None when the queue is full."""
        job = Job(request)
        return job if self.jobs.submit(job) else None

    def run(self) -> None:
        try:
            self.session = self.open_session()
        except BaseException as e:  # handed to the main thread, which reports it like any CLI error
            self.load_error = e
            return
        finally:
            self.ready.set()
        while True:
            job = self.jobs.take()
            try:
                self._serve(job)
            finally:
                self.jobs.done()

    def _serve(self, job: Job) -> None:
        request, started = job.request, time.monotonic()
        out = _Released(self.session.tokenizer, request.stop)
        counted = {"tokens": 0, "calls": 0}
        calls: list[int] = []   # tokens of each on_tokens call: the prefill's first token, then one per verify step
        source = [""]           # where the coming tokens' step drafted from (on_step), when the client asked

        def on_step(kind: str) -> None:
            source[0] = kind

        def on_tokens(ids: list[int]) -> None:
            if job.cancelled.is_set():
                raise _Cancelled
            counted["tokens"] += len(ids)
            counted["calls"] += 1
            calls.append(len(ids))
            found = out.feed(ids, source[0])
            if piece := out.piece(found):
                job.events.put(("text", piece))
            if found:
                raise _StopFound

        try:
            result = self.session.generator.generate(
                request.prompt_ids, request.config, on_tokens,
                on_logprobs=out.logprobs.extend if request.logprobs is not None else None,
                on_step=on_step if request.sources else None)
            found = out.flush()
            if piece := out.piece(found, end=True):
                job.events.put(("text", piece))
            done = {"finish_reason": "stop" if found else result.finish_reason,
                    "completion_tokens": len(result.generated_ids), "steps": result.steps,
                    "mean_accepted": round(result.mean_accepted, 3)}
        except _StopFound:
            # the first call carries the prefill's token; each later one is a verify step and what it accepted
            steps = counted["calls"] - 1
            done = {"finish_reason": "stop", "completion_tokens": counted["tokens"], "steps": steps,
                    "mean_accepted": round((counted["tokens"] - 1) / steps, 3) if steps else 1.0}
        except _Cancelled:
            log.info("client went away: generation stopped after %d tokens (%.1f s)", counted["tokens"],
                     time.monotonic() - started)
            self.metrics.generation("cancelled", len(request.prompt_ids), counted["tokens"], calls[1:])
            return
        except Exception:  # a failed generation must not take the worker down; the log has the traceback
            log.exception("generation failed")
            self.metrics.generation("error", len(request.prompt_ids), counted["tokens"], calls[1:])
            job.events.put(("error", "generation failed; the server log has the details"))
            return
        self.metrics.generation(done["finish_reason"], len(request.prompt_ids), done["completion_tokens"], calls[1:])
        done["seconds"] = time.monotonic() - started
        log.info("%s: %d prompt + %d completion tokens in %.2f s, %d steps, %.2f tokens a step, finish %s",
                 request.kind, len(request.prompt_ids), done["completion_tokens"], done["seconds"], done["steps"],
                 done["mean_accepted"], done["finish_reason"])
        job.events.put(("done", done))


class _Released:
    """Token ids -> the text a client may see: decoded a token at a time (each token's offset in the text is known),
    cut at the first stop string; a token's log-probability is released with the text that completes it."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.eos = set(tokenizer.eos_token_ids)
        self.decoder, self.stopper = StreamDecoder(tokenizer, skip_special_tokens=True), StopMatcher(stops)
        self.logprobs: list = []     # TokenLogprob of each generated token, filled by the generator before its ids
        self.spans: list[tuple[int, int] | None] = []   # where each generated token's text lies (EOS: None)
        self.text, self.decoded, self.released, self.given = "", 0, 0, 0
        self.sources: list[tuple[str, int]] = []   # steps since the last piece: (source, tokens)

    def feed(self, ids: list[int], source: str = "") -> bool:
        """Decode ids (one step's, drafted from `source`); whether the text now reaches a stop string."""
        if source:
            self.sources.append((source, len(ids)))
        pieces = []
        for t in ids:
            piece = "" if t in self.eos else self.decoder.feed([t])
            self.spans.append(None if t in self.eos else (self.decoded, self.decoded + len(piece)))
            self.decoded += len(piece)
            pieces.append(piece)
        return self._release("".join(pieces))

    def flush(self) -> bool:
        """The end of generation: what the decoder held back; whether that reached a stop string."""
        tail = self.decoder.flush()
        if self._release(tail):
            return True
        self.text += (rest := self.stopper.flush())
        self.released += len(rest)
        return False

    def _release(self, text: str) -> bool:
        out, found = self.stopper.feed(text)
        self.text += out
        self.released += len(out)
        return found

    def piece(self, stopped: bool, end: bool = False) -> Piece | None:
        """The text released since the last piece, and the log-probabilities of the tokens it completes: those whose
        text is all released, or, at a stop or the end, every token whose text starts before the cut (EOS never)."""
        text, self.text = self.text, ""
        ready, final = [], stopped or end
        while self.given < min(len(self.spans), len(self.logprobs)):
            span = self.spans[self.given]
            if span is not None and (span[1] <= self.released or final and span[0] < self.released):
                ready.append((self.logprobs[self.given], span[0]))
            elif span is not None and not final:
                break  # its text is not all out yet: it goes with a later piece
            self.given += 1
        if not (text or ready):
            return None  # the steps' sources go with the piece that shows their text
        sources, self.sources = self.sources, []
        return Piece(text, ready, sources)
