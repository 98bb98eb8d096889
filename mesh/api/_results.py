"""Idempotency records in the JetStream KV bucket ``mesh_api_results`` (README "System APIs").

Key ``<system>.<sha256(idempotency key)>``; value JSON ``{"state": "running", "owner", "until",
"request"}`` (a claim) or ``{"state": "done", "reply", "request"}``. Every write is a
compare-and-swap on the key's last sequence, done with plain JetStream publishes and direct gets
whose subjects name the key, so a NATS permission confines an agent to its own system's keys.
"""

from __future__ import annotations

import hashlib
from typing import Any

from mesh.api._wire import decode, encode
from mesh.errors import TransportError
from mesh.transport import NoResponders, Transport

RESULTS_BUCKET = "mesh_api_results"

_WRONG_LAST_SEQUENCE = 10071


class Conflict(Exception):
    """The compare-and-swap lost: somebody else wrote the key first."""


def hashed(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def kv_key(system: str, key: str) -> str:
    return f"{system}.{hashed(key)}"


class Results:
    """CAS access to one system's keys in ``mesh_api_results``."""

    def __init__(self, transport: Transport, *, timeout: float = 5.0) -> None:
        self.transport = transport
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<Results bucket={RESULTS_BUCKET}>"

    async def get(self, key: str) -> tuple[dict[str, Any] | None, int]:
        """(value, revision) read in one direct get: value None when absent or deleted; revision
        0 when never written (a deleted key keeps its tombstone's revision, which the next
        write must name).

        Raises:
            TransportError: no such bucket, or the broker refused or did not answer.
        """
        subject = f"$JS.API.DIRECT.GET.KV_{RESULTS_BUCKET}.$KV.{RESULTS_BUCKET}.{key}"
        try:
            msg = await self.transport.request(subject, b"", timeout=self.timeout)
        except NoResponders:
            raise TransportError(
                f"KV {RESULTS_BUCKET} does not exist (the control plane creates it)"
            ) from None
        status = msg.headers.get("Status", "")
        if status == "404":
            return None, 0
        if status:
            raise TransportError(
                f"KV {RESULTS_BUCKET}: read {key}: {status} {msg.headers.get('Description', '')}"
            )
        try:
            revision = int(msg.headers.get("Nats-Sequence", ""))
        except ValueError:
            raise TransportError(f"KV {RESULTS_BUCKET}: read {key}: no sequence in the answer") from None
        if msg.headers.get("KV-Operation") in ("DEL", "PURGE"):
            return None, revision
        return decode(msg.data), revision

    async def write(self, key: str, value: dict[str, Any] | None, revision: int) -> int:
        """Write ``value`` (None: delete) if the key's last revision is ``revision`` (0: never
        written). Returns the new revision.

        Raises:
            Conflict: the key moved on meanwhile.
            TransportError: the broker refused or did not answer.
        """
        headers = {"Nats-Expected-Last-Subject-Sequence": str(revision)}
        data = b""
        if value is None:
            headers["KV-Operation"] = "DEL"
        else:
            data = encode(value)
        subject = f"$KV.{RESULTS_BUCKET}.{key}"
        msg = await self.transport.request(subject, data, timeout=self.timeout, headers=headers)
        ack = decode(msg.data) if msg.data else {}
        err = ack.get("error") if isinstance(ack, dict) else None
        if err:
            if err.get("err_code") == _WRONG_LAST_SEQUENCE:
                raise Conflict(key)
            raise TransportError(f"KV {RESULTS_BUCKET}: write {key}: {err.get('description', err)}")
        if not isinstance(ack, dict) or "seq" not in ack:
            raise TransportError(f"KV {RESULTS_BUCKET}: write {key}: unexpected answer {msg.data[:200]!r}")
        return int(ack["seq"])


async def ensure_results_bucket(
    transport: Transport, *, replicas: int = 1, memory: bool = False, ttl: float = 24 * 3600.0
) -> bool:
    """Create the ``mesh_api_results`` bucket (direct get, one value per key, entries kept
    ``ttl`` seconds) unless it exists. True if created.

    Raises:
        TransportError: the broker refused (e.g. no permission) or did not answer.
    """
    config = {
        "name": f"KV_{RESULTS_BUCKET}",
        "description": "connector mesh: System API results (idempotency)",
        "subjects": [f"$KV.{RESULTS_BUCKET}.>"],
        "retention": "limits",
        "max_msgs_per_subject": 1,
        "max_age": int(ttl * 1e9),
        "discard": "new",
        "storage": "memory" if memory else "file",
        "num_replicas": replicas,
        "allow_direct": True,
        "allow_rollup_hdrs": True,
        "deny_delete": True,
        "deny_purge": False,
        "duplicate_window": int(min(ttl, 120.0) * 1e9),
    }
    msg = await transport.request(f"$JS.API.STREAM.CREATE.KV_{RESULTS_BUCKET}", encode(config), timeout=10.0)
    answer = decode(msg.data) if msg.data else {}
    err = answer.get("error") if isinstance(answer, dict) else None
    if not err:
        return True
    if err.get("err_code") == 10058:  # stream name already in use: it exists
        return False
    raise TransportError(f"cannot create KV bucket {RESULTS_BUCKET}: {err.get('description', err)}")
