"""`GET /metrics`: the server's counters in Prometheus' text format (version 0.0.4), standard library only.

Requests by route and status, prompt and generated tokens, verify steps, a histogram of the tokens each step emitted
(Medusa's accepted drafts plus the bonus token: 1 for every plain step), generations by how they ended, and the
queue's depth. Routes are labelled only by the paths this server knows ("other" for the rest), so a client cannot
grow the label set.
"""
from __future__ import annotations

import threading
from collections import Counter

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")
ALIASES = {"/chat/completions": "/v1/chat/completions", "/completions": "/v1/completions", "/models": "/v1/models",
           "/healthcheck": "/health"}
STEP_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16)   # tokens a step emitted
PREFIX = "exo_medusa_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def route_label(path: str) -> str:
    path = ALIASES.get(path, path)
    return path if path in ROUTES else "other"


class Metrics:
    """Thread-safe counters: the HTTP threads count requests, the model's thread counts generations."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()       # (route, status) -> answers
        self.finished: Counter = Counter()       # finish reason ("stop", "length", "cancelled", "error") -> generations
        self.prompt_tokens = self.generated_tokens = self.steps = 0
        self.step_buckets = [0] * len(STEP_BUCKETS)
        self.step_tokens = 0                     # the histogram's sum

    def request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[route_label(path), int(status)] += 1

    def generation(self, finish: str, prompt_tokens: int, generated: int, step_tokens: list[int]) -> None:
        """One generation's end; step_tokens: what each verify step emitted (the prefill's first token not one)."""
        with self._lock:
            self.finished[finish] += 1
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += generated
            self.steps += len(step_tokens)
            self.step_tokens += sum(step_tokens)
            for n in step_tokens:
                for i, bound in enumerate(STEP_BUCKETS):
                    if n <= bound:
                        self.step_buckets[i] += 1

    def render(self, waiting: int, generating: bool) -> str:
        with self._lock:
            lines = _family("requests_total", "counter", "HTTP answers by route and status",
                            [(f'route="{r}",status="{s}"', n) for (r, s), n in sorted(self.requests.items())])
            lines += _family("generations_total", "counter", "generations by how they ended",
                             [(f'finish="{f}"', n) for f, n in sorted(self.finished.items())])
            lines += _family("prompt_tokens_total", "counter", "prompt tokens of finished generations",
                             [("", self.prompt_tokens)])
            lines += _family("generated_tokens_total", "counter", "tokens generated", [("", self.generated_tokens)])
            lines += _family("steps_total", "counter", "verify steps run", [("", self.steps)])
            lines += [f"# HELP {PREFIX}step_tokens tokens a verify step emitted (accepted drafts + the bonus token)",
                      f"# TYPE {PREFIX}step_tokens histogram"]
            lines += [f'{PREFIX}step_tokens_bucket{{le="{b}"}} {n}' for b, n in zip(STEP_BUCKETS, self.step_buckets)]
            lines += [f'{PREFIX}step_tokens_bucket{{le="+Inf"}} {self.steps}',
                      f"{PREFIX}step_tokens_sum {self.step_tokens}",
                      f"{PREFIX}step_tokens_count {self.steps}"]
        lines += _family("queue_depth", "gauge", "requests waiting for the model", [("", waiting)])
        lines += _family("generating", "gauge", "1 while the model generates", [("", int(generating))])
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str, samples: list[tuple[str, int]]) -> list[str]:
    out = [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
    return out + [f"{PREFIX}{name}{{{labels}}} {value}" if labels else f"{PREFIX}{name} {value}"
                  for labels, value in samples]
