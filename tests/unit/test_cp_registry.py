"""Registry rules on the in-memory bucket: idempotent registration, conflicts, revocation,
refused heartbeats, and the state-dir files the agent keeps."""

from __future__ import annotations

import pytest

from mesh.controlplane.identity import (
    Credentials,
    load_credentials,
    load_or_create_identity,
    remove_credentials,
    save_credentials,
)
from mesh.controlplane.kv import MemoryBucket
from mesh.controlplane.models import (
    Deregister,
    Done,
    Heartbeat,
    HeartbeatAck,
    HeartbeatPayload,
    Refused,
    Register,
    Registered,
    Revoke,
    decode_reply,
    decode_request,
    encode,
)
from mesh.controlplane.registry import Registry
from mesh.errors import ConfigError, DecodeError

pytestmark = pytest.mark.anyio

IDENTITY = "i" * 43


def reg(identity: str = IDENTITY, credential: str | None = None, name: str = "erp") -> Register:
    return Register(
        name=name, site="plant-1", identity=identity, version="1", host="h", credential=credential
    )


def hb(agent_id: str, credential: str, errors: int = 0) -> Heartbeat:
    return Heartbeat(
        agent_id=agent_id,
        name="erp",
        credential=credential,
        seq=1,
        sent_at=0,
        interval=5,
        version="1",
        payload=HeartbeatPayload(errors=errors),
    )


async def test_register_is_idempotent_per_identity() -> None:
    audits: list[tuple[str, str, str]] = []

    async def audit(kind: str, who: str, target: str, what: str, detail: dict[str, str]) -> None:
        audits.append((kind, target, what))

    r = Registry(MemoryBucket(), replica="cp", audit=audit)
    first = await r.register(reg())
    assert isinstance(first, Registered)
    assert first.created
    assert first.credential
    same = await r.register(reg(credential=first.credential))
    assert isinstance(same, Registered)
    assert same.agent_id == first.agent_id
    assert same.credential is None
    lost = await r.register(reg())  # the agent lost its credentials: a new one, same id
    assert isinstance(lost, Registered)
    assert lost.agent_id == first.agent_id
    assert lost.credential
    assert isinstance(await r.heartbeat(hb(first.agent_id, first.credential)), Refused)
    assert isinstance(await r.heartbeat(hb(first.agent_id, lost.credential)), HeartbeatAck)
    other = await r.register(reg(identity="o" * 43))
    assert isinstance(other, Refused)
    assert other.code == "conflict"
    assert [a[0] for a in audits] == ["register"] * 3


async def test_revoke_refuses_heartbeats_and_registration_until_deregistered() -> None:
    r = Registry(MemoryBucket(), replica="cp")
    first = await r.register(reg())
    assert isinstance(first, Registered)
    assert first.credential
    assert isinstance(await r.revoke(Revoke(name="erp", reason="stolen", actor="ann")), Done)
    refused = await r.heartbeat(hb(first.agent_id, first.credential))
    assert isinstance(refused, Refused)
    assert refused.code == "revoked"
    assert "ann" in refused.reason
    again = await r.register(reg(credential=first.credential))
    assert isinstance(again, Refused)
    assert again.code == "revoked"
    assert isinstance(await r.revoke(Revoke(name="erp")), Done)  # idempotent
    assert isinstance(await r.deregister(Deregister(name="erp")), Done)
    unknown = await r.heartbeat(hb(first.agent_id, first.credential))
    assert isinstance(unknown, Refused)
    assert unknown.code == "unknown"
    gone = await r.deregister(Deregister(name="erp"))
    assert isinstance(gone, Refused)
    assert gone.code == "unknown"
    fresh = await r.register(reg(identity="n" * 43))
    assert isinstance(fresh, Registered)
    assert fresh.created
    assert fresh.agent_id != first.agent_id


async def test_heartbeat_error_growth_is_recorded() -> None:
    bucket = MemoryBucket()
    r = Registry(bucket, replica="cp")
    first = await r.register(reg())
    assert isinstance(first, Registered)
    assert first.credential
    assert isinstance(await r.heartbeat(hb(first.agent_id, first.credential, errors=2)), HeartbeatAck)
    entry = await bucket.get("heartbeat.erp")
    assert entry is not None
    assert b'"errors":2' in entry.value


def test_wire_codec_roundtrip_and_errors() -> None:
    req = reg()
    assert decode_request(encode(req)) == req
    assert isinstance(decode_reply(encode(Refused(code="unknown", reason="x"))), Refused)
    with pytest.raises(DecodeError, match="bad control-plane request"):
        decode_request(b'{"kind":"register","name":"bad name!"}')
    with pytest.raises(DecodeError):
        decode_request(b'{"kind":"explode"}')
    assert "i" * 43 not in repr(Credentials(agent_id="a", name="n", site="s", token="i" * 43))


def test_identity_and_credentials_files(tmp_path: object) -> None:
    from pathlib import Path

    d = Path(str(tmp_path)) / "state" / "agent"
    token = load_or_create_identity(d)
    assert load_or_create_identity(d) == token
    assert len(token) >= 43
    assert (d / "identity").stat().st_mode & 0o777 == 0o600
    assert d.stat().st_mode & 0o777 == 0o700
    assert load_credentials(d) is None
    creds = Credentials(agent_id="a", name="n", site="s", token="t" * 43)
    save_credentials(d, creds)
    assert (d / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert load_credentials(d) == creds
    (d / "credentials.json").write_text("{nope")
    with pytest.raises(ConfigError, match="register the agent again"):
        load_credentials(d)
    assert remove_credentials(d)
    assert not remove_credentials(d)
    assert list(d.glob(".*tmp")) == []


def test_metric_total_sums_matching_samples() -> None:
    from prometheus_client import CollectorRegistry, Counter

    from mesh.heartbeat import metric_total

    r = CollectorRegistry()
    c = Counter("mesh_dead_lettered_messages", "x", ["flow", "error"], registry=r)
    c.labels("customers", "DecodeError").inc(2)
    c.labels("customers", "RejectedRecord").inc(3)
    c.labels("orders", "DecodeError").inc(7)
    assert metric_total(r, "mesh_dead_lettered_messages_total", flow="customers") == 5
    assert metric_total(r, "mesh_dead_lettered_messages_total") == 12
    assert metric_total(r, "mesh_nothing_total") == 0
