"""Helpers of the saga tests: system APIs served by real nats.micro services on the real secured
nats-server (counting executions by idempotency key), orchestrator configs with their own
least-privilege creds, and waits on the sagas' KV state.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import nats.micro
from anyio.abc import TaskGroup

from mesh.saga.definition import load_orchestrator_config
from mesh.saga.state import SAGA_BUCKET, SagaRecord, decode_record, saga_id
from mesh.security.authority import Authority, write_creds
from mesh.security.jwt import new_seed, public_key_of_seed
from mesh.security.permissions import permissions_for_orchestrator
from mesh.transport import JetStream, OutMessage
from tests._secure import SecuredNatsServer, create_layout

__all__ = [
    "Systems",
    "make_layout",
    "orchestrator_config",
    "publish_trigger",
    "read_saga",
    "wait_saga",
]


class Systems:
    """System API endpoints (``api.<system>.<entity>.<op>``) on nats.micro services named
    ``mesh-<system>``, per the wire contract.

    Each endpoint follows a script: a list of actions taken by its successive requests (then
    ``default[subject]``, else ``ok``): ``ok``; ``unavailable`` (retryable error); ``reject``
    (not retryable); ``late:<s>`` (execute, reply after s seconds); ``hold`` (neither execute
    nor reply); ``exec_hold`` (execute, never reply). A repeated idempotency key never executes
    again: it is answered with the first result (``replayed``).
    """

    def __init__(self, nc: Any, tg: TaskGroup) -> None:
        self.nc = nc
        self.tg = tg
        self.script: dict[str, list[str]] = {}
        self.default: dict[str, str] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.effects: Counter[str] = Counter()
        """Executions per idempotency key (must never exceed 1)."""
        self.effect_log: list[tuple[str, str]] = []
        """(subject, key) of each execution, in order."""
        self.calls: list[tuple[str, str]] = []
        """(subject, key) of each request, in arrival order."""
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight = 0
        self.bodies: dict[str, Any] = {}
        self.headers: dict[str, dict[str, str]] = {}
        """The headers of the last request per idempotency key."""

    def executed(self, subject: str) -> list[str]:
        return [k for s, k in self.effect_log if s == subject]

    async def serve(self, system: str, endpoints: list[str]) -> None:
        svc = await nats.micro.add_service(
            self.nc, name=f"mesh-{system}", version="1.0.0", metadata={"system": system, "agent": "test"}
        )
        for name in endpoints:
            entity, op = name.split(".")
            await svc.add_endpoint(
                name=f"{entity}_{op}", subject=f"api.{system}.{name}", handler=self._handle
            )

    def _action(self, subject: str) -> str:
        script = self.script.get(subject)
        if script:
            return script.pop(0)
        return self.default.get(subject, "ok")

    async def _handle(self, req: nats.micro.Request) -> None:
        subject = req.subject
        key = (req.headers or {}).get("Mesh-Idempotency-Key", "")
        self.calls.append((subject, key))
        self.headers[key] = dict(req.headers or {})
        action = self._action(subject)
        if action == "hold":
            return
        if action == "unavailable":
            await self._error(req, "unavailable", "try later", True)
            return
        if action == "reject":
            await self._error(req, "rejected", f"{subject} refuses", False)
            return
        self.in_flight[key] += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight[key])
        replayed = key in self.results
        if not replayed:
            body = json.loads(req.data)
            self.bodies[key] = body
            self.results[key] = {"id": f"{subject.split('.')[2]}-{len(self.results) + 1}", "echo": body}
            self.effects[key] += 1
            self.effect_log.append((subject, key))
        reply = json.dumps({"ok": True, "result": self.results[key], "replayed": replayed}).encode()
        if action == "exec_hold":
            self.in_flight[key] -= 1
            return
        if action.startswith("late:"):
            delay = float(action.split(":")[1])

            async def later() -> None:
                await anyio.sleep(delay)
                self.in_flight[key] -= 1
                await req.respond(reply)

            self.tg.start_soon(later)
            return
        self.in_flight[key] -= 1
        await req.respond(reply)

    async def _error(self, req: nats.micro.Request, code: str, message: str, retryable: bool) -> None:
        body = {"ok": False, "error": {"code": code, "message": message, "retryable": retryable}}
        status = {"unavailable": "503", "rejected": "422"}.get(code, "500")
        await req.respond(
            json.dumps(body).encode(),
            headers={"Nats-Service-Error": message, "Nats-Service-Error-Code": status},
        )

    @classmethod
    @asynccontextmanager
    async def running(cls, server: SecuredNatsServer, apis: dict[str, list[str]]) -> AsyncIterator[Systems]:
        nc = await nats.connect(server.url, user_credentials=str(server.admin_creds))
        try:
            async with anyio.create_task_group() as tg:
                systems = cls(nc, tg)
                for system, endpoints in apis.items():
                    await systems.serve(system, endpoints)
                yield systems
                tg.cancel_scope.cancel()
        finally:
            await nc.close()


def make_layout(server: SecuredNatsServer) -> None:
    """The mesh streams and the ``mesh_sagas`` bucket, as a control plane creates them."""
    create_layout(server)

    async def bucket() -> None:
        async with JetStream(server.nats_config(), name="test-layout") as js:
            await js.key_value(SAGA_BUCKET)

    # its own thread: callable from sync tests and from inside an async test's event loop
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(anyio.run, bucket).result()


def orchestrator_config(
    path: Path,
    server: SecuredNatsServer,
    sagas: str,
    *,
    name: str = "orchestrator",
    lease: float = 2.0,
    extra: str = "",
) -> Path:
    """Write an orchestrator config with its own least-privilege creds (``<path>.creds``)."""
    creds = path.with_suffix(".creds")
    path.write_text(
        f'[orchestrator]\nname = "{name}"\nlease = {lease}\n{extra}\n'
        f'[nats]\nservers = ["{server.url}"]\ncreds = "{creds}"\ninbox_prefix = "_INBOX.{name}"\n\n{sagas}'
    )
    cfg = load_orchestrator_config(path)
    seed = new_seed("user")
    jwt = Authority.load(server.security_dir).issue_user(
        name, public_key_of_seed(seed), permissions_for_orchestrator(cfg)
    )
    write_creds(creds, jwt, seed)
    return path


async def publish_trigger(
    server: SecuredNatsServer, subject: str, msg_id: str, body: dict[str, Any], saga: str
) -> str:
    """Publish a JSON trigger with the admin creds; the id of the saga it starts."""
    async with JetStream(server.nats_config(), name="test-trigger") as js:
        await js.publish_ack(OutMessage(subject, json.dumps(body).encode(), msg_id=msg_id))
    return saga_id(saga, msg_id)


async def read_saga(js: JetStream, sid: str) -> SagaRecord | None:
    entry = await (await js.key_value(SAGA_BUCKET, create=False)).get(sid)
    return None if entry is None else decode_record(entry.value)


async def wait_saga(
    js: JetStream, sid: str, pred: Callable[[SagaRecord], bool], timeout: float, what: str
) -> SagaRecord:
    """Poll the saga's KV record until ``pred`` holds (AssertionError with the record after
    ``timeout``)."""
    deadline = time.monotonic() + timeout
    rec = None
    while time.monotonic() < deadline:
        rec = await read_saga(js, sid)
        if rec is not None and pred(rec):
            return rec
        await anyio.sleep(0.05)
    shown = None if rec is None else msgspec.to_builtins(rec)
    raise AssertionError(f"saga {sid}: not {what} within {timeout}s: {shown}")


class OrchestratorProcess:
    """``meshctl orchestrator run`` as a child process the test can SIGKILL and restart."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 30.0) -> None:
        self.starts += 1
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mesh", "orchestrator", "run", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            if " ready: " in text:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"orchestrator not ready (exit {self.proc.poll()}):\n{self.log.read_text()[-3000:]}"
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
