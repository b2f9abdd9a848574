"""One status line on stderr for what a command is doing before its output starts ("loading model", "compiling
kernels"). Shown only on a terminal, where it is rewritten in place and cleared before the output; elsewhere (pipes,
logs, tests) it goes to the log at INFO, so stderr keeps exactly the summary or the one error line."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)


class Status:
    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()
        self.start, self.width = time.perf_counter(), 0

    def show(self, message: str) -> None:
        log.info("%s", message)
        if self.live:
            line = f"exo-medusa: {message} [{time.perf_counter() - self.start:.1f} s]"
            self.stream.write("\r" + line.ljust(self.width))
            self.stream.flush()
            self.width = len(line)

    def clear(self) -> None:
        if self.live and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
