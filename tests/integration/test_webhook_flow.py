"""End to end from a webhook: signed HTTP events -> a real agent process (webhook source, outbox,
relay) -> a real nats-server -> a SQLite sink agent. Senders behave like a real SaaS: each
entity's events go in order, and an event is re-sent (re-signed, same delivery id) until it
gets a 2xx. Every 2xx'd event must take effect exactly once, also when the receiving agent is
SIGKILLed right after answering 2xx while other requests are in flight.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from adapters.webhook.source import sign
from agents.connector import ConnectorAgent
from mesh.broker import free_port
from tests._secure import SecuredNatsServer as NatsServer
from tests._secure import secure_config, write_agent_config
from tests.integration._harness import (
    AgentProcess,
    agent_toml,
    assert_effect_once,
    consumer_settled,
    make_crm,
    rows,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.timeout(120)]

SECRET = "whsec_billing_5f3c1e9a7b"
SECRET_ENV = "BILLING_WEBHOOK_SECRET"


def billing_agent_toml(tmp: Path, nats_url: str, port: int) -> str:
    state = tmp / "s-billing"
    return f"""
log_level = "info"
[agent]
name = "billing-agent"
system = "billing"
state_dir = "{state}"
shutdown_grace = 2.0
[nats]
servers = ["{nats_url}"]
request_timeout = 2.0
[[flows]]
name = "customers"
entity = "customer"
[flows.source]
adapter = "webhook"
port = {port}
state_path = "{state / "webhook.db"}"
secret_env = "{SECRET_ENV}"
key_field = "data.id"
version_field = "version"
type_field = "type"
delete_types = ["customer.deleted"]
row_field = "data"
ack_timeout = 5.0
retry_after = 1
"""


def events_for(keys: int, versions: int) -> dict[int, list[dict[str, Any]]]:
    """Per key, its events in order; every fifth key ends deleted."""
    plan: dict[int, list[dict[str, Any]]] = {}
    for k in range(1, keys + 1):
        evts = [
            {"type": "customer.updated", "version": v,
             "data": {"id": k, "name": f"Customer {k} v{v}", "email": f"c{k}@example.com",
                      "credit_limit_cents": 1000 * v}}
            for v in range(1, versions + 1)
        ]  # fmt: skip
        if k % 5 == 0:
            evts.append({"type": "customer.deleted", "version": versions + 1, "data": {"id": k}})
        plan[k] = evts
    return plan


class Senders:
    """One sender per entity key, all at once; each re-sends an event until it gets a 2xx."""

    def __init__(self, url: str, plan: dict[int, list[dict[str, Any]]]) -> None:
        self.url = url
        self.plan = plan
        self.answers: Counter[str] = Counter()  # "accepted" / "duplicate" / status codes / errors
        self.acked: list[tuple[str, int]] = []  # (key, version) that got a 2xx, in order
        self.in_flight = 0
        self.changed = anyio.Event()
        """Set (and replaced) whenever a request goes out or an answer comes back."""

    def _changed(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    async def send_one(self, client: httpx.AsyncClient, evt: dict[str, Any]) -> None:
        body = json.dumps(evt).encode()
        delivery_id = f"evt_{evt['data']['id']}_{evt['version']}"
        delay = 0.05
        while True:
            headers = {"Webhook-Signature": sign(SECRET, body), "Webhook-Id": delivery_id}
            self.in_flight += 1
            self._changed()
            try:
                response = await client.post(self.url, content=body, headers=headers)
            except httpx.TransportError as exc:  # the agent is down: retry, as a sender does
                response = None
                self.answers[type(exc).__name__] += 1
            finally:
                self.in_flight -= 1
                self._changed()
            if response is not None:
                if response.status_code == 200:
                    self.answers[response.json()["status"]] += 1
                    self.acked.append((str(evt["data"]["id"]), evt["version"]))
                    return
                assert response.status_code == 503, response.text  # nothing else may happen
                self.answers["503"] += 1
            await anyio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 0.5)

    async def send_key(self, client: httpx.AsyncClient, key: int) -> None:
        for evt in self.plan[key]:
            await self.send_one(client, evt)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=10) as client, anyio.create_task_group() as tg:
            for key in self.plan:
                tg.start_soon(self.send_key, client, key)


def applied(crm: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(crm, timeout=30) as c:
        return [(str(k), int(v)) for k, v in c.execute("SELECT key, version FROM version_log ORDER BY n")]


def expected_rows(plan: dict[int, list[dict[str, Any]]]) -> list[tuple[object, ...]]:
    out = []
    for k, evts in sorted(plan.items()):
        last = evts[-1]
        if last["type"] != "customer.deleted":
            d = last["data"]
            out.append((k, d["name"], d["email"], None, d["credit_limit_cents"], None))
    return out


async def settle(crm: Path, server: NatsServer, total: int) -> None:
    with anyio.fail_after(60):
        while len(applied(crm)) < total:
            await anyio.sleep(0.1)
        # A duplicate would be a later stream message: wait until the consumer has nothing left.
        while not await anyio.to_thread.run_sync(
            consumer_settled, server.url, "customers-crm", server.admin_creds
        ):
            await anyio.sleep(0.1)


def check_exactly_once(crm: Path, plan: dict[int, list[dict[str, Any]]], senders: Senders) -> None:
    every = sorted((str(k), e["version"]) for k, evts in plan.items() for e in evts)
    assert sorted(set(senders.acked)) == every, "every event was eventually answered 2xx"
    log = applied(crm)
    doubled = [kv for kv, n in Counter(log).items() if n > 1]
    assert not doubled, f"applied twice: {doubled[:10]}"
    assert sorted(log) == every, "every 2xx'd event took effect"
    assert_effect_once(crm)
    assert rows(crm) == expected_rows(plan)


def crm_agent(tmp: Path, server: NatsServer, crm: Path) -> ConnectorAgent:
    text = agent_toml(name="crm-agent", system="crm", state=tmp / "s-crm", url=server.url, sink=crm)
    return ConnectorAgent(secure_config(text, tmp / "crm-agent.creds", server))


async def test_signed_events_arrive_exactly_once(tmp_path: Path, nats_server: NatsServer) -> None:
    port = free_port()
    config = tmp_path / "billing-agent.toml"
    write_agent_config(config, billing_agent_toml(tmp_path, nats_server.url, port), nats_server)
    crm = tmp_path / "crm.db"
    make_crm(crm)
    billing = AgentProcess(config, tmp_path / "billing-agent.log")
    plan = events_for(keys=30, versions=2)
    senders = Senders(f"http://127.0.0.1:{port}/webhook", plan)
    billing.start(env={SECRET_ENV: SECRET})
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(crm_agent(tmp_path, nats_server, crm).run)
            await senders.run()
            # A sender that missed our 2xx re-sends: answered 200 "duplicate", nothing new.
            async with httpx.AsyncClient(timeout=10) as client:
                for key in (1, 2, 3):
                    evt = plan[key][0]
                    body = json.dumps(evt).encode()
                    again = await client.post(
                        senders.url,
                        content=body,
                        headers={"Webhook-Signature": sign(SECRET, body), "Webhook-Id": f"evt_{key}_1"},
                    )
                    assert again.json() == {"status": "duplicate"}
                forged = await client.post(
                    senders.url, content=body, headers={"Webhook-Signature": "t=1,v1=00"}
                )
                assert forged.status_code == 401
            await settle(crm, nats_server, sum(len(e) for e in plan.values()))
            tg.cancel_scope.cancel()
        assert billing.alive, f"the billing agent died; see {billing.log}"
        assert billing.terminate() == 0
    finally:
        billing.kill()
    check_exactly_once(crm, plan, senders)
    assert senders.answers["accepted"] == len(senders.acked)
    log = billing.log.read_text()
    assert f"webhook receiver on http://127.0.0.1:{port}/webhook" in log
    assert SECRET not in log


@pytest.mark.crash
async def test_sigkill_right_after_2xx_loses_and_doubles_nothing(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """Three SIGKILLs from outside, each right after a 2xx with requests in flight, and the
    agent's own crash point right after the outbox commit (before the source hears of it: the
    window where a captured delivery's id is not yet recorded and its sender got no 2xx)."""
    seed = int(os.environ.get("MESH_CRASH_SEED", random.randrange(1 << 30)))
    random.seed(seed)
    print(f"seed={seed}")
    port = free_port()
    config = tmp_path / "billing-agent.toml"
    write_agent_config(config, billing_agent_toml(tmp_path, nats_server.url, port), nats_server)
    crm = tmp_path / "crm.db"
    make_crm(crm)
    billing = AgentProcess(config, tmp_path / "billing-agent.log")
    env = {SECRET_ENV: SECRET, "MESH_CRASH_POINTS": "capture.after_commit:0.06"}
    plan = events_for(keys=40, versions=3)
    total = sum(len(e) for e in plan.values())
    senders = Senders(f"http://127.0.0.1:{port}/webhook", plan)
    kill_after = sorted(random.sample(range(10, total // 2), 3))  # 2xx counts at which to kill
    kills: list[tuple[int, int]] = []  # (2xx so far, requests in flight) at each kill
    deaths = 0

    async def killer() -> None:
        floor = 0
        for threshold in kill_after:
            # Right after a 2xx of this run of the agent, with requests in flight.
            while (
                len(senders.acked) < max(threshold, floor + 3) or senders.in_flight < 3 or not billing.alive
            ):
                await senders.changed.wait()
            assert billing.proc is not None
            os.kill(billing.proc.pid, signal.SIGKILL)
            kills.append((len(senders.acked), senders.in_flight))
            floor = len(senders.acked)

    async def watchdog() -> None:
        nonlocal deaths
        while True:
            while billing.alive:
                await anyio.sleep(0.02)
            assert billing.killed_by_sigkill, f"the agent exited on its own; see {billing.log}"
            deaths += 1
            await anyio.sleep(random.uniform(0.05, 0.3))
            billing.start(env=env, wait=False)  # a blocking wait here would stall the event loop

    billing.start(env=env)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(crm_agent(tmp_path, nats_server, crm).run)
            tg.start_soon(killer)
            tg.start_soon(watchdog)
            await senders.run()
            await settle(crm, nats_server, total)
            tg.cancel_scope.cancel()
        print(f"kills at (2xx, in flight)={kills} deaths={deaths} answers={dict(senders.answers)}")
        assert len(kills) == len(kill_after)
        assert deaths >= len(kills)
    finally:
        billing.kill()
    check_exactly_once(crm, plan, senders)
    # The kills were felt: requests failed or were refused and had to be re-sent.
    assert sum(n for a, n in senders.answers.items() if a not in ("accepted", "duplicate")) > 0
