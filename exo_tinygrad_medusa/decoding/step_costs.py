"""What each kind of step costs on this device, as the draft planner needs it: relative to a plain one-token step.

A kind is a chain size (tokens verified: 1 is a plain step) or "heads" (the Medusa tree with its heads). Every kind
has a prior, a cost from a table; steps that run are timed and their running mean replaces the prior. The Generator
times its steps, the last shard of a ring times whole passes (every shard, link and relay in one number); both plan
with the same arithmetic, kept here once."""
from __future__ import annotations

import statistics
from typing import Callable, Hashable, Iterable

STALE_DECAY = 0.98   # per timed step: weight left to a kind's measured cost since it last ran
MEAN_WEIGHT = 0.2    # weight of a new timing in a kind's running mean


class StepCosts:
    """Running mean seconds of a step by kind, and each kind's cost relative to a plain step."""

    def __init__(self, kinds: Iterable[Hashable], prior: Callable[[Hashable], float], seconds: dict | None = None):
        """kinds: those the planner may choose; prior(kind): its cost in plain steps before (or instead of) timings;
        seconds: running means measured before (a stored session's), taken as timed just now."""
        self.kinds, self.prior = list(kinds), prior
        self.seconds: dict = dict(seconds or {})
        self._last: dict = {kind: 0 for kind in self.seconds}   # kind -> count of timed steps when it last ran
        self._timed = 0

    def record(self, kind: Hashable, seconds: float) -> None:
        self._timed += 1
        old = self.seconds.get(kind)
        self.seconds[kind] = seconds if old is None else (1 - MEAN_WEIGHT) * old + MEAN_WEIGHT * seconds
        self._last[kind] = self._timed

    def relative(self) -> dict:
        """Every kind's cost in plain steps. The unit is the timed plain step, else the unit the timed kinds imply
        through their priors. A timed kind drifts back to its prior while it does not run (STALE_DECAY a timed step),
        so that one slow measurement (a load spike) does not rule it out for the rest of the process."""
        if not self.seconds:
            return {kind: self.prior(kind) for kind in self.kinds}
        unit = self.seconds.get(1) or statistics.median(s / self.prior(k) for k, s in self.seconds.items())
        out = {}
        for kind in dict.fromkeys([*self.kinds, *self.seconds]):
            if kind in self.seconds:
                trust = STALE_DECAY ** (self._timed - self._last[kind])
                # prior + trust * (measured - prior): exact when they agree (the plain step is 1.0, not 0.99..)
                prior = self.prior(kind)
                out[kind] = prior + trust * (self.seconds[kind] / unit - prior)
            else:
                out[kind] = self.prior(kind)
        return out
