"""Engine shards on one machine: what each loads (`ShardSpec`), one process per shard (`ShardProcess`,
`python -m exo_tinygrad_medusa.serving.ring_shard`) or one thread per shard in this process (`ShardThread`), and a
`LocalRing` of them on loopback, the ring of `exo-medusa bench-ring` and of the ring fault tests.

Why threads too. Shard processes on one machine take turns on the same cores: each hop starts after the other
shard's process ran there, with cold caches (every process has its own copy of the same compiled kernels) and a
kernel pool that went to sleep, costs that nodes with machines of their own do not pay. Shard threads share this
process's compiled kernels and kernel pool; they still talk over loopback sockets with the same wire contract, so a
pass pays the framing, the sockets and the relay, and one lock keeps their engines from running tinygrad at once.
Processes are what the fault tests need (a shard killed or frozen mid-request)."""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..model.shard import Shard
from .ring import LinkConfig, RemoteShard, Ring, ShardUnavailable, shard_label

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """What a shard process loads and how its engine decodes (every shard of a ring gets the same options)."""
    model: str
    start: int
    end: int
    n_layers: int
    medusa_heads: str | None = None   # None: plain decoding
    medusa_choices: str | None = None
    medusa_enabled: bool = False      # Medusa with the card's heads when no heads are given
    max_new_tokens: int = 128
    dtype: str | None = None
    device: str | None = None
    max_context: int = 2048
    max_requests: int = 4

    @property
    def shard(self) -> Shard:
        return Shard(self.model, self.start, self.end, self.n_layers)

    def engine_options(self) -> dict:
        """ring_shard.build_engine's keywords."""
        return {"medusa_enabled": self.medusa_enabled, "medusa_heads": self.medusa_heads,
                "medusa_choices": self.medusa_choices, "max_new_tokens": self.max_new_tokens, "device": self.device,
                "dtype": self.dtype, "max_context": self.max_context, "max_requests": self.max_requests}

    def argv(self) -> list[str]:
        out = [self.model, str(self.start), str(self.end), str(self.n_layers), "--max-new-tokens",
               str(self.max_new_tokens), "--max-context", str(self.max_context), "--max-requests",
               str(self.max_requests)]
        if self.medusa_enabled or self.medusa_heads:
            out.append("--medusa-enabled")
        for flag, value in (("--medusa-heads", self.medusa_heads), ("--medusa-choices", self.medusa_choices),
                            ("--dtype", self.dtype), ("--device", self.device)):
            if value is not None:
                out += [flag, value]
        return out


def split_layers(n_layers: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges as even as possible (Exo splits by memory; equal machines get equal shares)."""
    if not 1 <= n_shards <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {n_shards} shards")
    edges = [round(i * n_layers / n_shards) for i in range(n_shards + 1)]
    return [(edges[i], edges[i + 1] - 1) for i in range(n_shards)]


class ShardProcess:
    """A shard server in its own process. Its stderr goes to a log file whose tail is quoted if it fails to start."""

    def __init__(self, spec: ShardSpec, log_dir: str | Path | None = None):
        self.spec = spec
        self.log_dir = Path(log_dir) if log_dir else None
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path: Path | None = None
        self._log = None

    def __repr__(self) -> str:
        return f"shard process {shard_label(self.spec.shard)} (pid {self.proc.pid if self.proc else None})"

    def spawn(self) -> None:
        if self.alive:
            raise RuntimeError(f"{self} is already running")
        fd, name = tempfile.mkstemp(prefix=f"shard-{self.spec.start}-{self.spec.end}-", suffix=".log",
                                    dir=self.log_dir)
        os.close(fd)
        self.log_path, self.port = Path(name), None
        self._log = self.log_path.open("w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "exo_tinygrad_medusa.serving.ring_shard", *self.spec.argv()],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
                                     cwd=str(Path(__file__).resolve().parents[2]))

    def wait_ready(self, timeout_s: float = 600.0) -> int:
        """Block until the process prints its port; a crash or timeout raises with the tail of its log."""
        deadline, buf = time.monotonic() + timeout_s, b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ShardUnavailable(f"{self} did not start within {timeout_s:g} s{self._log_tail()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 256)
                if not chunk:  # stdout closed: the process ended
                    self.proc.wait(timeout=10)
                    raise ShardUnavailable(f"{self} exited with code {self.proc.returncode} while starting"
                                           f"{self._log_tail()}")
                buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        if not line.startswith("PORT "):
            self.kill()
            raise ShardUnavailable(f"{self} printed {line!r} instead of its port{self._log_tail()}")
        self.port = int(line.split()[1])
        return self.port

    def start(self, timeout_s: float = 600.0) -> int:
        self.spawn()
        return self.wait_ready(timeout_s)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a machine lost mid-request: no goodbye on its sockets beyond what the kernel sends."""
        if self.alive:
            self.proc.kill()
        self._reap()

    def freeze(self) -> None:
        """SIGSTOP: alive and connected but silent, as a hung node or a cut cable (no reset ever arrives)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def request_stop(self) -> None:
        """Close its stdin: it exits by itself (several processes wind down in parallel before `stop` waits)."""
        if self.alive:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # a frozen process cannot read its stdin closing
                self.proc.stdin.close()
            except OSError:
                pass

    def stop(self, timeout_s: float = 30.0) -> None:
        """Close its stdin, wait for it to exit, kill it if it does not."""
        if self.proc is None:
            return
        self.request_stop()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.warning("%s did not exit after SIGKILL", self)
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe and not pipe.closed:
                    try:
                        pipe.close()
                    except OSError:
                        pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def _log_tail(self, lines: int = 15) -> str:
        tail = self.log_text().strip().splitlines()[-lines:]
        return (":\n  " + "\n  ".join(tail)) if tail else ""

    def remove_log(self) -> None:
        if self.log_path is not None and self._log is None:
            self.log_path.unlink(missing_ok=True)


class ShardThread:
    """A shard server on a thread of this process (see the module's note). The engine loads on the caller's thread
    and every shard thread runs its messages under one lock: tinygrad never runs on two threads at once."""

    lock = threading.Lock()

    def __init__(self, spec: ShardSpec):
        self.spec = spec
        self.port: int | None = None
        self.server = None
        self.thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"shard thread {shard_label(self.spec.shard)}"

    def spawn(self) -> None:
        """Nothing runs yet: loading happens in wait_ready, one shard after the other."""

    def wait_ready(self, timeout_s: float = 600.0) -> int:
        from .ring_shard import ShardServer, build_engine
        try:
            engine = build_engine(**self.spec.engine_options())
            engine.load_now(self.spec.shard)
        except Exception as e:
            raise ShardUnavailable(f"{self} could not load: {type(e).__name__}: {e}") from None
        self.server = ShardServer(engine, self.spec.shard, lock=ShardThread.lock)
        self.thread = threading.Thread(target=self.server.serve, name=repr(self), daemon=True)
        self.thread.start()
        self.port = self.server.port
        return self.port

    def start(self, timeout_s: float = 600.0) -> int:
        return self.wait_ready(timeout_s)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def request_stop(self) -> None:
        if self.alive:
            self.server.stop()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.request_stop()
        if self.thread is not None:
            self.thread.join(timeout_s)

    def kill(self) -> None:
        raise NotImplementedError(f"{self}: only shard processes can be killed or frozen (LocalRing(threads=False))")

    freeze = thaw = kill

    def remove_log(self) -> None:
        """A thread logs to this process's log."""


class LocalRing:
    """N shards on loopback (processes, or threads of this process) and a Ring over them; a context manager that
    always ends them."""

    def __init__(self, specs: list[ShardSpec], link: LinkConfig = LinkConfig(), start_timeout_s: float = 600.0,
                 log_dir: str | Path | None = None, threads: bool = False):
        self.specs, self.link, self.start_timeout_s = specs, link, start_timeout_s
        self.processes = [ShardThread(s) if threads else ShardProcess(s, log_dir) for s in specs]
        self.ring: Ring | None = None

    def start(self) -> "LocalRing":
        try:
            for p in self.processes:  # load in parallel, then wait for each
                p.spawn()
            for p in self.processes:
                p.wait_ready(self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.ring = Ring([RemoteShard(p.port, p.spec.shard, self.link) for p in self.processes])
        return self

    def set_link(self, link: LinkConfig) -> None:
        self.link = link
        for hop in self.ring.hops:
            hop.link = link

    def restart(self, index: int) -> None:
        """Start shard `index` again (an empty engine, a new port) and point the ring at it."""
        p = self.processes[index]
        p.kill()
        p.remove_log()
        p.start(self.start_timeout_s)
        self.ring.hops[index].drop()
        self.ring.hops[index].port = p.port

    def stop(self) -> None:
        for p in self.processes:
            p.request_stop()
        for p in self.processes:
            p.stop()
        for p in self.processes:
            p.remove_log()

    def __enter__(self) -> "LocalRing":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
