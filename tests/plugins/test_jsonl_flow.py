"""The example plugin carrying a real flow: a JSON-lines file on one connector agent, one JSON
file per key on another, through a real nats-server. The agents open both adapters through the
registry exactly as they open the built-in ones."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from agents.connector import ConnectorAgent
from mesh.metrics import Metrics
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import secure_config

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def agent(name: str, system: str, tmp: Path, server: NatsServer, side: str) -> ConnectorAgent:
    text = f"""
[agent]
name = "{name}"
system = "{system}"
state_dir = "{tmp / ("s-" + name)}"
[nats]
servers = ["{server.url}"]
[[flows]]
name = "customers"
entity = "customer"
[flows.consumer]
fetch_timeout = 0.2
{side}
"""
    return ConnectorAgent(secure_config(text, tmp / f"{name}.creds", server), metrics=Metrics())


@asynccontextmanager
async def running(*agents: ConnectorAgent) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for a in agents:
            await tg.start(a.run)
        yield
        tg.cancel_scope.cancel()


def append(file: Path, *docs: dict[str, Any]) -> None:
    with open(file, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
        f.flush()
        os.fsync(f.fileno())


def held(directory: Path) -> dict[str, dict[str, Any] | None]:
    out = {}
    for p in directory.glob("*.json"):
        doc = json.loads(p.read_bytes())
        out[doc["key"]] = None if doc["deleted"] else doc["row"]
    return out


async def until(check: Any, timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.05)


async def test_a_flow_from_a_jsonl_file_to_json_files_per_key(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    feed, out = tmp_path / "feed.jsonl", tmp_path / "out"
    feed.touch()
    source = (
        f'[flows.source]\nadapter = "jsonl"\npath = "{feed}"\ndeleted_field = "gone"\npoll_interval = 0.02'
    )
    sink = f'[flows.sink]\nadapter = "jsonl"\ndirectory = "{out}"'
    files = agent("files-agent", "files", tmp_path, nats_server, source)
    crm = agent("crm-agent", "crm", tmp_path, nats_server, sink)
    async with running(files, crm):
        append(feed, *({"id": i, "name": f"n{i}"} for i in range(1, 101)))
        await until(lambda: len(held(out)) == 100)
        append(feed, {"id": 7, "name": "seven"}, {"id": 8, "gone": True})
        await until(lambda: held(out).get("8", {}) is None and held(out)["7"] == {"id": 7, "name": "seven"})
    state = held(out)
    assert state["1"] == {"id": 1, "name": "n1"}
    assert sum(row is not None for row in state.values()) == 99
    revisions = [json.loads(p.read_bytes())["revision"] for p in out.glob("*.json")]
    assert sorted(set(revisions)) == [1, 2]  # every key written once, 7 and 8 once more: no doubles
    assert revisions.count(2) == 2
