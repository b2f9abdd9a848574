"""The model's own thread and its bounded job queue.

One worker thread owns the model: it loads it and runs every generation, so tinygrad stays on one thread and the
single KV cache serves one request at a time. It decodes the tokens and applies the request's `stop` strings itself
(one "text" event per Medusa step), so a streamed reply and a non-streamed one are the same text.

At most `queue_size` requests wait while one generates (the HTTP layer answers the rest with 429), and a job whose
client hung up is dropped before it runs, or stopped at its next step while it runs.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

from ..decoding.session import Session
from ..model.tokenizer import StreamDecoder
from .openai import ChatRequest, StopMatcher

log = logging.getLogger(__name__)
DEFAULT_QUEUE_SIZE = 8


class _Cancelled(Exception):
    """Raised inside generation when the client went away."""


class _StopFound(Exception):
    """Raised inside generation when the text reached one of the request's stop strings."""


@dataclass
class Job:
    request: ChatRequest
    # ("text", str) ..., then ("done", stats) or ("error", message)
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
        tokenizer = self.session.tokenizer
        eos = set(tokenizer.eos_token_ids)
        decoder, stopper = StreamDecoder(tokenizer, skip_special_tokens=True), StopMatcher(job.request.stop)
        counted = {"tokens": 0, "calls": 0}

        def release(text: str) -> bool:
            out, found = stopper.feed(text)
            if out:
                job.events.put(("text", out))
            return found

        def on_tokens(ids: list[int]) -> None:
            if job.cancelled.is_set():
                raise _Cancelled
            counted["tokens"] += len(ids)
            counted["calls"] += 1
            if release(decoder.feed([t for t in ids if t not in eos])):
                raise _StopFound

        try:
            result = self.session.generator.generate(job.request.prompt_ids, job.request.config, on_tokens)
            if release(decoder.flush()):
                finish = "stop"
            else:
                if tail := stopper.flush():
                    job.events.put(("text", tail))
                finish = result.finish_reason
            job.events.put(("done", {"finish_reason": finish, "completion_tokens": len(result.generated_ids),
                                     "steps": result.steps, "mean_accepted": round(result.mean_accepted, 3)}))
        except _StopFound:
            # the first call carries the prefill's token; each later one is a verify step and what it accepted
            steps = counted["calls"] - 1
            job.events.put(("done", {"finish_reason": "stop", "completion_tokens": counted["tokens"], "steps": steps,
                                     "mean_accepted": round((counted["tokens"] - 1) / steps, 3) if steps else 1.0}))
        except _Cancelled:
            log.info("client went away: generation stopped after %d tokens", counted["tokens"])
        except Exception:  # a failed generation must not take the worker down; the log has the traceback
            log.exception("generation failed")
            job.events.put(("error", "generation failed; the server log has the details"))
