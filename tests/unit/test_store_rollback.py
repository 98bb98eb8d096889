"""A write transaction that ends while nothing is left to roll back (cancelled while its COMMIT
was awaited: the worker thread committed anyway) re-raises the original exception, not a
StopError from the ROLLBACK."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from mesh.store.inbox import Inbox

pytestmark = pytest.mark.anyio


async def test_cancelled_after_the_commit_keeps_the_cancellation(tmp_path: Path) -> None:
    async with Inbox(tmp_path / "inbox.db") as inbox:
        with anyio.CancelScope() as scope:
            async with inbox.write() as db:
                await db.execute("COMMIT")  # what the worker did while the caller was cancelled
                scope.cancel()
                await anyio.sleep(1)  # the cancellation arrives here
        assert scope.cancelled_caught
        async with inbox.write() as db:  # the store is still usable
            await db.execute("SELECT 1")


async def test_an_error_inside_the_transaction_still_rolls_back(tmp_path: Path) -> None:
    async with Inbox(tmp_path / "inbox.db") as inbox:
        with pytest.raises(RuntimeError, match="boom"):
            async with inbox.write() as db:
                await db.execute("CREATE TABLE t (x INTEGER)")
                raise RuntimeError("boom")
        assert await inbox.scalar("SELECT count(*) FROM sqlite_master WHERE name = 't'") == 0
