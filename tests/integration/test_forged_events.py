"""Forged events on a real nats-server (issue 10): a raw nats-py client publishes ``evt.*``
events no source produced; the CRM's apply side dead-letters them before its inbox and its
sink, ``meshctl dlq list`` shows them with their reason, and later real changes still apply."""

from __future__ import annotations

import json
from pathlib import Path

import nats
import pytest

from mesh.cli.dlq import app as dlq_app
from mesh.envelope import Envelope, encode, encode_payload, envelope_id
from tests._secure import SecuredNatsServer as NatsServer
from tests.integration._harness import rows
from tests.integration.test_dlq import cli, listed, stream_count, wait_for
from tests.integration.test_sync import Mesh, running

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def forged(key: str, version: int, origin: str = "erp") -> Envelope:
    return Envelope(
        id=envelope_id("customers", origin, key, version), kind="customer.upserted", flow="customers",
        key=key, version=version, origin=origin, occurred_at=0,
        payload=encode_payload({"id": int(key), "name": "HACKED", "credit_limit_cents": 1}),
    )  # fmt: skip


async def test_forged_events_are_dead_lettered_and_never_reach_the_target(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    mesh = Mesh(tmp_path, nats_server)
    mesh.load.insert(5)
    async with running(mesh.agent("erp"), mesh.agent("crm")):
        await mesh.wait_synced()
        # a compromised ERP agent: its own creds may publish its origin, with any version
        nc = await nats.connect(
            nats_server.url,
            user_credentials=str(tmp_path / "erp-agent.creds"),
            inbox_prefix="_INBOX.erp-agent",
        )
        huge = forged("3", 2**62)  # would lock key 3 against every later ERP change
        await nc.jetstream().publish(
            "evt.customer.upserted.erp", encode(huge), headers={"Nats-Msg-Id": huge.id}
        )
        await nc.close()
        # another system's identity claiming the ERP in the envelope (the admin stands in for it)
        nc = await nats.connect(nats_server.url, user_credentials=str(nats_server.admin_creds))
        spoofed = forged("4", 10, origin="erp")  # claims the ERP, arrives from "billing"
        await nc.jetstream().publish(
            "evt.customer.upserted.billing", encode(spoofed), headers={"Nats-Msg-Id": "s-1"}
        )
        await nc.close()

        async def two_dead_letters() -> bool:
            return await stream_count(nats_server, "MESH_DLQ") >= 2

        await wait_for("two dead letters", two_dead_letters)
        mesh.load.update(5)  # every key, 3 and 4 included: the real changes still apply
        await mesh.wait_synced()
        assert all(r[1] != "HACKED" for r in rows(mesh.crm))

        table = await cli(dlq_app, "list", "--error", "InvalidEnvelope", server=nats_server)
        assert len(listed(table)) == 2
        entries = json.loads((await cli(dlq_app, "list", "--json", server=nats_server)).output)
    by_subject = {e["original_subject"]: e for e in entries}
    assert set(by_subject) == {"evt.customer.upserted.erp", "evt.customer.upserted.billing"}
    for e in entries:
        assert (e["error"], e["permanent"], e["attempts"], e["agent"]) == (
            "InvalidEnvelope",
            True,
            1,
            "crm-agent",
        )
    assert f"version {2**62}" in by_subject["evt.customer.upserted.erp"]["reason"]
    assert (
        "envelope origin 'erp': expected 'billing'" in by_subject["evt.customer.upserted.billing"]["reason"]
    )
    dead = mesh.crm_metrics.registry.get_sample_value(
        "mesh_dead_lettered_messages_total", {"flow": "customers", "error": "InvalidEnvelope"}
    )
    assert dead == 2
