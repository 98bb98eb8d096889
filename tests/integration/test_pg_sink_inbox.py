"""The PostgreSQL sink keeps its own inbox: handled ids commit with the writes (real PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.sql.postgres import PostgresSink
from mesh.adapters import Applied
from mesh.errors import RejectedRecord
from tests._pg import PgCluster
from tests.integration.test_pg_sink import CUSTOMERS, config, db, rec, rows

pytestmark = pytest.mark.anyio
__all__ = ["db"]  # the fixture, re-used


async def test_apply_recording_commits_the_handled_ids_with_the_writes(
    pg_cluster: PgCluster, pg_db: str, db: Any
) -> None:
    db.execute(CUSTOMERS)
    async with PostgresSink(config(pg_cluster, pg_db)) as sink:
        assert sink.keeps_inbox
        assert await sink.apply([rec("3", 5, {"id": 3, "name": "kept"})]) == [Applied.APPLIED]
        skipped = [("echo-id", "customers", "9", 1, "echo")]
        batch = [
            rec("1", 1, {"id": 1, "name": "a"}), rec("2", 1, {"id": 2, "name": None}), rec("3", 4, {"id": 3}),
        ]  # fmt: skip
        out = await sink.apply_recording(batch, "customers", skipped)
        assert isinstance(out[1], RejectedRecord)  # the batch went record by record: still recorded
        assert [out[0], out[2]] == [Applied.APPLIED, Applied.STALE]
        assert await sink.handled(["1-1", "2-1", "3-4", "echo-id"]) == {"1-1", "3-4", "echo-id"}
        assert await sink.apply_recording([], "customers", [("e2", "customers", "8", 1, "not_owner")]) == []
        assert await sink.handled(["e2"]) == {"e2"}
        assert await sink.forget_handled(3600) == 0
        db.execute("UPDATE _mesh_inbox SET applied_at = 0 WHERE id = 'echo-id'")
        assert await sink.forget_handled(3600) == 1
    assert rows(db, "SELECT id, flow, key, version, outcome FROM _mesh_inbox ORDER BY id") == [
        ("1-1", "customers", "1", 1, "applied"), ("3-4", "customers", "3", 4, "stale"),
        ("e2", "customers", "8", 1, "not_owner"),
    ]  # fmt: skip
    assert rows(db, "SELECT id, name FROM customers ORDER BY id") == [(1, "a"), (3, "kept")]
