"""The webhook source over real HTTP (its own uvicorn server on a loopback port, httpx client):
signatures and rotation, the replay window, replayed delivery ids, malformed and oversized
bodies, routing, back-pressure, and "2xx only after the outbox commit".

The agent's capture loop is played by :func:`capture`, which calls ``read`` and ``committed`` as
``agents.connector.Capture`` does (the commit in between is the agent's outbox transaction).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from adapters.webhook.config import WebhookSourceConfig
from adapters.webhook.source import WebhookSource, sign
from agents.connector import open_source
from mesh.adapters import ChangeBatch
from mesh.config import parse_agent_config
from mesh.envelope import envelope_id
from mesh.errors import ConfigError

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

SECRET = "whsec_primary_0123456789"
OLD_SECRET = "whsec_previous_9876543210"
ENV = {"HOOK_SECRET": SECRET, "HOOK_SECRET_OLD": OLD_SECRET}


def make_config(tmp_path: Path, **overrides: Any) -> WebhookSourceConfig:
    fields: dict[str, Any] = {
        "adapter": "webhook",
        "port": 0,
        "state_path": str(tmp_path / "webhook.db"),
        "secret_env": "HOOK_SECRET",
        "key_field": "data.id",
        "version_field": "data.version",
        "type_field": "type",
        "delete_types": ["customer.deleted"],
        "row_field": "data",
        "ack_timeout": 10.0,
    }
    fields.update(overrides)
    return msgspec.convert(fields, WebhookSourceConfig)


def event(key: int, version: int, kind: str = "customer.updated", **row: Any) -> dict[str, Any]:
    return {"type": kind, "data": {"id": key, "version": version, **row}}


async def post(
    client: httpx.AsyncClient,
    url: str,
    body: Any,
    *,
    secret: str = SECRET,
    timestamp: int | None = None,
    delivery_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", "Webhook-Signature": sign(secret, data, timestamp)}
    if delivery_id is not None:
        sent["Webhook-Id"] = delivery_id
    sent.update(headers or {})
    return await client.post(url, content=data, headers=sent)


async def capture(source: WebhookSource, batches: list[ChangeBatch], limit: int = 100) -> None:
    """The agent's capture loop: read, (commit to the outbox), committed."""
    cursor = None
    while True:
        batch = await source.read(cursor, limit)
        batches.append(batch)
        cursor = batch.cursor
        await source.committed(cursor)


@asynccontextmanager
async def receiver(
    tmp_path: Path, *, run_capture: bool = True, **overrides: Any
) -> AsyncIterator[tuple[WebhookSource, httpx.AsyncClient, list[ChangeBatch]]]:
    batches: list[ChangeBatch] = []
    source = WebhookSource(make_config(tmp_path, **overrides), environ=ENV)
    async with source, httpx.AsyncClient(timeout=20) as client, anyio.create_task_group() as tg:
        if run_capture:
            tg.start_soon(capture, source, batches)
        yield source, client, batches
        tg.cancel_scope.cancel()


def keys(batches: list[ChangeBatch]) -> list[tuple[str, int]]:
    return [(c.key, c.version) for b in batches for c in b.changes]


async def wait_queued(source: WebhookSource, n: int) -> None:
    with anyio.fail_after(10):
        while source.queued < n:
            await anyio.sleep(0.01)


# --- acceptance only after the commit ----------------------------------------------------------


async def test_answered_only_after_the_outbox_commit(tmp_path: Path) -> None:
    async with receiver(tmp_path, run_capture=False) as (source, client, _):
        assert source.url is not None
        answer: list[httpx.Response] = []
        stamp = int(time.time())

        async def send() -> None:
            answer.append(await post(client, source.url or "", event(7, 3, name="Ada"), timestamp=stamp))

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            batch = await source.read(None, 10)
            assert [(c.key, c.version, c.deleted, c.row) for c in batch.changes] == [
                ("7", 3, False, {"id": 7, "version": 3, "name": "Ada"})
            ]
            assert batch.changes[0].occurred_at == stamp * 1000
            # Handed to the agent but not committed yet: still no answer. A retry from the old
            # cursor returns the same batch.
            # A full round trip of another request lets the first one's handler run if it could.
            assert (await client.get(source.url or "")).status_code == 405
            assert source.waiting == 1
            assert not answer
            assert await source.read(None, 10) == batch
            await source.committed(batch.cursor)
        assert answer[0].status_code == 200
        assert answer[0].json() == {"status": "accepted", "events": 1}


# --- signatures ------------------------------------------------------------------------------------


async def test_bad_missing_and_tampered_signatures_are_401(tmp_path: Path) -> None:
    async with receiver(tmp_path) as (source, client, batches):
        url = source.url or ""
        body = json.dumps(event(1, 1)).encode()
        wrong = await post(client, url, body, secret="not-the-secret")
        assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid signature")
        missing = await client.post(url, content=body)
        assert (missing.status_code, missing.json()["error"]) == (401, "missing Webhook-Signature header")
        signature = sign(SECRET, body)
        tampered = await client.post(
            url, content=body.replace(b'"id": 1', b'"id": 2'), headers={"Webhook-Signature": signature}
        )
        assert tampered.status_code == 401
        no_stamp = await client.post(
            url, content=body, headers={"Webhook-Signature": signature.split(",", 1)[1]}
        )
        assert (no_stamp.status_code, no_stamp.json()["error"]) == (
            401,
            "missing timestamp (t= in Webhook-Signature)",
        )
        garbage = await client.post(url, content=body, headers={"Webhook-Signature": "t=abc,v1=zz"})
        assert garbage.status_code == 401
        for response in (wrong, missing, tampered, no_stamp, garbage):
            assert "Traceback" not in response.text
            assert SECRET not in response.text
        ok = await post(client, url, body)
        assert ok.status_code == 200
    assert keys(batches) == [("1", 1)]


async def test_secret_rotation(tmp_path: Path) -> None:
    async with receiver(tmp_path, rotation_secret_envs=["HOOK_SECRET_OLD"]) as (source, client, batches):
        url = source.url or ""
        assert (await post(client, url, event(1, 1), secret=OLD_SECRET)).status_code == 200
        assert (await post(client, url, event(2, 1), secret=SECRET)).status_code == 200
        # A sender mid-rotation signs with both secrets; one wrong signature among them is fine.
        body = json.dumps(event(3, 1)).encode()
        stamp = int(time.time())
        both = sign("retired-secret", body, stamp) + "," + sign(SECRET, body, stamp).split(",", 1)[1]
        response = await client.post(url, content=body, headers={"Webhook-Signature": both})
        assert response.status_code == 200
        retired = await post(client, url, event(4, 1), secret="retired-secret")
        assert retired.status_code == 401
    assert keys(batches) == [("1", 1), ("2", 1), ("3", 1)]


async def test_timestamp_header_and_base64_signatures(tmp_path: Path) -> None:
    async with receiver(tmp_path, timestamp_header="Webhook-Timestamp", signature_encoding="base64") as (
        source,
        client,
        batches,
    ):
        body = json.dumps(event(5, 2)).encode()
        stamp = int(time.time())
        signature = sign(SECRET, body, stamp, encoding="base64").split(",", 1)[1]
        headers = {"Webhook-Signature": signature, "Webhook-Timestamp": str(stamp)}
        assert (await client.post(source.url or "", content=body, headers=headers)).status_code == 200
        headers["Webhook-Timestamp"] = str(stamp + 1)  # the timestamp is signed too
        assert (await client.post(source.url or "", content=body, headers=headers)).status_code == 401
    assert keys(batches) == [("5", 2)]


async def test_stale_and_future_timestamps_are_401(tmp_path: Path) -> None:
    async with receiver(tmp_path, tolerance=300.0) as (source, client, batches):
        url = source.url or ""
        now = int(time.time())
        stale = await post(client, url, event(1, 1), timestamp=now - 400)
        future = await post(client, url, event(1, 1), timestamp=now + 400)
        for response in (stale, future):
            assert response.status_code == 401
            assert response.json()["error"] == "timestamp outside the tolerance (stale or from the future)"
        assert (await post(client, url, event(1, 1), timestamp=now - 200)).status_code == 200
    assert keys(batches) == [("1", 1)]


# --- delivery ids ----------------------------------------------------------------------------------


async def test_replayed_delivery_id_is_not_a_second_event(tmp_path: Path) -> None:
    async with receiver(tmp_path) as (source, client, batches):
        url = source.url or ""
        first = await post(client, url, event(1, 1), delivery_id="evt_1")
        assert first.json() == {"status": "accepted", "events": 1}
        again = await post(client, url, event(1, 1), delivery_id="evt_1")
        assert (again.status_code, again.json()) == (200, {"status": "duplicate"})
        other = await post(client, url, event(1, 2), delivery_id="evt_2")
        assert other.json()["status"] == "accepted"
    assert keys(batches) == [("1", 1), ("1", 2)]
    # Remembered in the state file: a new receiver (the agent restarted) still knows the ids.
    async with receiver(tmp_path) as (source, client, batches):
        again = await post(client, source.url or "", event(1, 1), delivery_id="evt_1")
        assert again.json() == {"status": "duplicate"}
    assert batches == []


async def test_retry_while_the_first_delivery_waits_shares_its_answer(tmp_path: Path) -> None:
    async with receiver(tmp_path, run_capture=False) as (source, client, _batches):
        answers: list[httpx.Response] = []

        async def send() -> None:
            answers.append(await post(client, source.url or "", event(9, 1), delivery_id="evt_9"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            await wait_queued(source, 1)
            tg.start_soon(send)  # the sender timed out and retries while we still commit
            with anyio.fail_after(10):
                while source.waiting < 2:
                    await anyio.sleep(0.01)
            batch = await source.read(None, 10)
            await source.committed(batch.cursor)
        assert sorted(a.json()["status"] for a in answers) == ["accepted", "duplicate"]
        assert [(c.key, c.version) for c in batch.changes] == [("9", 1)]
        assert source.queued == 0


async def test_crash_between_commit_and_id_record_recaptures_the_same_change(tmp_path: Path) -> None:
    """The agent died after its outbox commit, before ``committed()``: the sender got no 2xx and
    re-sends; the id is not recorded, so the event is captured again, as the same change, hence
    with the same envelope id, which the outbox, JetStream and the inbox absorb."""
    body = json.dumps(event(4, 9)).encode()
    stamp = int(time.time())
    answers: list[httpx.Response] = []
    source = WebhookSource(make_config(tmp_path), environ=ENV)
    async with httpx.AsyncClient(timeout=20) as client, anyio.create_task_group() as tg:
        await source.open()

        async def send() -> None:
            headers = {"Webhook-Signature": sign(SECRET, body, stamp), "Webhook-Id": "evt_4"}
            answers.append(await client.post(source.url or "", content=body, headers=headers))

        tg.start_soon(send)
        before = await source.read(None, 10)
        # ... the agent's outbox commits `before` here, and the process dies ...
        await source.aclose()
    assert answers[0].status_code == 503
    async with receiver(tmp_path, run_capture=False) as (again, client, _), anyio.create_task_group() as tg:
        tg.start_soon(partial(post, client, again.url or "", body, delivery_id="evt_4"))
        resent = await again.read(None, 10)
        await again.committed(resent.cursor)
    # Re-signed later, so occurred_at may differ; what the id is made of does not.
    assert [(c.key, c.version, c.deleted, c.row) for c in resent.changes] == [
        (c.key, c.version, c.deleted, c.row) for c in before.changes
    ]
    ids = {envelope_id("customers", "billing", c.key, c.version) for c in before.changes + resent.changes}
    assert len(ids) == 1


# --- bodies ----------------------------------------------------------------------------------------


async def test_malformed_json_is_400_and_unmappable_events_422(tmp_path: Path) -> None:
    async with receiver(tmp_path) as (source, client, batches):
        url = source.url or ""
        broken = await post(client, url, b'{"type": "customer.updated", "data": {')
        assert (broken.status_code, broken.json()) == (
            400,
            {"error": "body is not valid JSON", "status": 400},
        )
        no_key = await post(client, url, {"type": "customer.updated", "data": {"version": 1}})
        assert (no_key.status_code, no_key.json()["error"]) == (422, "no field data.id")
        bad_version = await post(client, url, event(1, 1) | {"data": {"id": 1, "version": "soon"}})
        assert bad_version.status_code == 422
        array = await post(client, url, [event(1, 1)])
        assert array.status_code == 422
        assert "batch = true" in array.json()["error"]
    assert batches == []


async def test_too_large_bodies_are_413(tmp_path: Path) -> None:
    async with receiver(tmp_path, max_body_bytes=1024) as (source, client, batches):
        url = source.url or ""
        big = event(1, 1, notes="x" * 2000)
        declared = await post(client, url, big)
        assert declared.status_code == 413

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
            for _ in range(4):
                yield b" " * 400

        streamed = await client.post(url, content=chunks(), headers={"Webhook-Signature": "t=1,v1=00"})
        assert (streamed.status_code, streamed.json()["error"]) == (413, "body larger than 1024 bytes")
        assert (await post(client, url, event(1, 1, notes="fits"))).status_code == 200
    assert keys(batches) == [("1", 1)]


async def test_other_paths_404_and_methods_405(tmp_path: Path) -> None:
    async with receiver(tmp_path, path="/hooks/crm") as (source, client, _):
        url = source.url or ""
        assert url.endswith("/hooks/crm")
        get = await client.get(url)
        assert (get.status_code, get.headers["allow"], get.json()["error"]) == (
            405,
            "POST",
            "method not allowed",
        )
        assert (await client.put(url, content=b"{}")).status_code == 405
        base = url.removesuffix("/hooks/crm")
        for other in ("/", "/hooks", "/hooks/crm/", "/webhook"):
            response = await post(client, base + other, event(1, 1))
            assert (response.status_code, response.json()["error"]) == (404, "not found"), other


async def test_batches_deletes_ignored_types_and_timestamp_versions(tmp_path: Path) -> None:
    async with receiver(
        tmp_path,
        batch=True,
        version_field=None,
        accept_types=["customer.updated", "customer.deleted"],
    ) as (source, client, batches):
        url = source.url or ""
        stamp = int(time.time())
        body = [event(1, 0), {"type": "invoice.paid", "data": {"id": 5}}, event(2, 0, "customer.deleted")]
        response = await post(client, url, body, timestamp=stamp)
        assert response.json() == {"status": "accepted", "events": 2}
        ignored = await post(client, url, {"type": "invoice.paid", "data": {"id": 5}})
        assert ignored.json() == {"status": "ignored", "events": 0, "ignored": 1}
    changes = [c for b in batches for c in b.changes]
    # Without version_field the version is the signed timestamp in microseconds + the index.
    assert [(c.key, c.version, c.deleted) for c in changes] == [
        ("1", stamp * 1_000_000 + 0, False),
        ("2", stamp * 1_000_000 + 2, True),
    ]


async def test_iso_versions_and_a_request_split_across_batches(tmp_path: Path) -> None:
    async with receiver(tmp_path, run_capture=False, batch=True) as (source, client, _):
        answer: list[httpx.Response] = []
        body = [
            {"type": "customer.updated", "data": {"id": "a", "version": "2026-11-27T08:00:00.000001Z"}},
            {"type": "customer.updated", "data": {"id": "b", "version": 5}},
            {"type": "customer.updated", "data": {"id": "c", "version": "17"}},
        ]

        async def send() -> None:
            answer.append(await post(client, source.url or "", body))

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            first = await source.read(None, 2)
            await source.committed(first.cursor)
            assert (await client.get(source.url or "")).status_code == 405  # (see above)
            assert source.waiting == 1  # its last event is not committed yet
            assert not answer
            second = await source.read(first.cursor, 2)
            await source.committed(second.cursor)
        assert answer[0].json() == {"status": "accepted", "events": 3}
        assert [c.key for c in first.changes] == ["a", "b"]
        assert [c.key for c in second.changes] == ["c"]
        assert first.changes[0].version == 1_795_766_400_000_001
        assert (first.changes[1].version, second.changes[0].version) == (5, 17)
        assert int(second.cursor) > int(first.cursor)


# --- back-pressure and stopping -------------------------------------------------------------------


async def test_full_queue_is_503_with_retry_after(tmp_path: Path) -> None:
    async with receiver(tmp_path, run_capture=False, queue_size=1, retry_after=7) as (source, client, _):
        answers: list[httpx.Response] = []

        async def send() -> None:
            answers.append(await post(client, source.url or "", event(1, 1)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            await wait_queued(source, 1)
            full = await post(client, source.url or "", event(2, 1))
            assert (full.status_code, full.headers["retry-after"]) == (503, "7")
            assert "queue_size" in full.json()["error"]
            batch = await source.read(None, 10)
            await source.committed(batch.cursor)
        assert answers[0].status_code == 200
        assert [c.key for c in batch.changes] == ["1"]


async def test_not_committed_in_time_is_503_and_not_captured(tmp_path: Path) -> None:
    async with receiver(tmp_path, run_capture=False, ack_timeout=0.2) as (source, client, batches):
        late = await post(client, source.url or "", event(1, 1), delivery_id="evt_late")
        assert (late.status_code, late.headers["retry-after"]) == (503, "5")
        assert late.json()["error"] == "not captured within ack_timeout"
        async with anyio.create_task_group() as tg:
            tg.start_soon(capture, source, batches)
            # The sender retries: the abandoned first attempt was dropped, the retry is captured.
            again = await post(client, source.url or "", event(1, 1), delivery_id="evt_late")
            assert again.json()["status"] == "accepted"
            tg.cancel_scope.cancel()
    assert keys(batches) == [("1", 1)]


async def test_stopping_answers_waiting_requests_503(tmp_path: Path) -> None:
    source = WebhookSource(make_config(tmp_path), environ=ENV)
    answers: list[httpx.Response] = []
    async with httpx.AsyncClient(timeout=20) as client, anyio.create_task_group() as tg:
        await source.open()
        url = source.url or ""

        async def send() -> None:
            answers.append(await post(client, url, event(1, 1)))

        tg.start_soon(send)
        await wait_queued(source, 1)
        await source.aclose()
        await source.aclose()  # idempotent
    assert (answers[0].status_code, answers[0].headers["retry-after"]) == (503, "5")
    assert answers[0].json()["error"] == "the receiver is stopping"
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await post(client, url, event(1, 1))


# --- configuration ---------------------------------------------------------------------------------


def test_config_parses_and_resolves_the_state_path(tmp_path: Path) -> None:
    text = """
[agent]
name = "billing-agent"
system = "billing"
state_dir = "state"
[[flows]]
name = "customers"
entity = "customer"
[flows.source]
adapter = "webhook"
port = 8443
state_path = "state/webhook.db"
secret_env = "BILLING_WEBHOOK_SECRET"
key_field = "data.object.id"
version_field = "data.object.updated"
type_field = "type"
delete_types = ["customer.deleted"]
row_field = "data.object"
"""
    cfg = parse_agent_config(text, source="agent.toml", base=tmp_path)
    source = cfg.flows[0].source
    assert isinstance(source, WebhookSourceConfig)
    assert source.state_path == str(tmp_path / "state" / "webhook.db")
    assert (source.host, source.path, source.signature_header, source.id_header) == (
        "127.0.0.1", "/webhook", "Webhook-Signature", "Webhook-Id",
    )  # fmt: skip
    assert isinstance(open_source(source), WebhookSource)

    with pytest.raises(ConfigError) as bad_header:
        parse_agent_config(text.replace('row_field = "data.object"', 'signature_header = "X Sig"'))
    assert bad_header.value.path == "flows[0].source.signature_header"
    with pytest.raises(ConfigError) as no_type:
        parse_agent_config(text.replace('type_field = "type"', ""), source="agent.toml")
    assert "agent.toml" in str(no_type.value)
    assert "type_field: required with delete_types" in str(no_type.value)
    assert no_type.value.path == "flows[0].source"
    with pytest.raises(ConfigError) as no_secret:
        parse_agent_config(text.replace('secret_env = "BILLING_WEBHOOK_SECRET"', 'secret = "abc"'))
    assert no_secret.value.path is not None
    assert no_secret.value.path.startswith("flows[0].source")


async def test_missing_secret_and_busy_port_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HOOK_SECRET_OLD"):
        await WebhookSource(
            make_config(tmp_path, rotation_secret_envs=["HOOK_SECRET_OLD"]), environ={"HOOK_SECRET": SECRET}
        ).open()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        source = WebhookSource(make_config(tmp_path, port=port), environ=ENV)
        with pytest.raises(ConfigError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
            await source.open()
        await source.aclose()
    source = WebhookSource(make_config(tmp_path), environ=ENV)
    assert SECRET not in repr(source)
    assert "closed" in repr(source)
