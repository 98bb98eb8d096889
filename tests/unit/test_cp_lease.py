"""Leader election on the KV compare-and-swap contract (in-memory bucket, real clocks)."""

from __future__ import annotations

import anyio
import pytest

from mesh.controlplane.kv import Entry, MemoryBucket, RevisionConflict
from mesh.controlplane.lease import LEASE_KEY, LeaderLease
from mesh.errors import TransportError

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]

TTL, RENEW, POLL = 0.6, 0.1, 0.05


class Partitioned(MemoryBucket):
    """A bucket this replica cannot reach: every call fails like NATS being away."""

    async def get(self, key: str) -> Entry | None:
        raise TransportError("partitioned")

    async def update(self, key: str, value: bytes, revision: int) -> int:
        raise TransportError("partitioned")


def lease(bucket: MemoryBucket, name: str) -> LeaderLease:
    return LeaderLease(bucket, name, ttl=TTL, renew_every=RENEW, poll_every=POLL)


async def test_memory_bucket_is_compare_and_swap() -> None:
    b = MemoryBucket()
    r1 = await b.create("k", b"1")
    with pytest.raises(RevisionConflict):
        await b.create("k", b"2")
    r2 = await b.update("k", b"2", r1)
    with pytest.raises(RevisionConflict):
        await b.update("k", b"3", r1)
    with pytest.raises(RevisionConflict):
        await b.delete("k", revision=r1)
    await b.delete("k", revision=r2)
    assert await b.get("k") is None
    await b.create("k", b"again")


async def test_exactly_one_of_three_leads_and_a_follower_takes_over_after_the_ttl() -> None:
    bucket = MemoryBucket()
    leases = [lease(bucket, f"cp{i}") for i in range(3)]
    scopes: dict[str, anyio.CancelScope] = {}

    async def run(le: LeaderLease) -> None:
        with anyio.CancelScope() as scope:
            scopes[le.holder] = scope
            await le.run()

    async with anyio.create_task_group() as tg:
        for le in leases:
            tg.start_soon(run, le)
        with anyio.fail_after(3):
            while sum(le.is_leader for le in leases) != 1:
                await anyio.sleep(0.01)
        await anyio.sleep(3 * TTL)  # renewals keep it: still exactly one, the same one
        leaders = [le for le in leases if le.is_leader]
        assert len(leaders) == 1
        first = leaders[0]
        assert all(le.leader == first.holder for le in leases)

        # The leader is cut off from KV (a partition; for followers it is as good as dead).
        first.bucket = Partitioned()
        cut_at = anyio.current_time()
        with anyio.fail_after(5):
            while not any(le.is_leader for le in leases if le is not first):
                await anyio.sleep(0.01)
        took = anyio.current_time() - cut_at
        assert TTL - RENEW - POLL <= took <= TTL + 1.0, took
        # The cut-off leader stepped down on its own before the takeover could happen.
        assert not first.is_leader
        new = next(le for le in leases if le.is_leader)
        assert new.term == first.term + 1 or new.term > 1
        tg.cancel_scope.cancel()


async def test_graceful_stop_releases_the_lease_for_an_immediate_takeover() -> None:
    bucket = MemoryBucket()
    a, b = lease(bucket, "a"), lease(bucket, "b")
    async with anyio.create_task_group() as tg:
        sa = anyio.CancelScope()

        async def run_a() -> None:
            with sa:
                await a.run()

        tg.start_soon(run_a)
        await a.wait(leader=True)
        tg.start_soon(b.run)
        await anyio.sleep(0.2)
        assert not b.is_leader
        sa.cancel()
        began = anyio.current_time()
        with anyio.fail_after(2):
            await b.wait(leader=True)
        assert anyio.current_time() - began < TTL
        assert not a.is_leader
        tg.cancel_scope.cancel()


async def test_a_leader_whose_lease_was_taken_steps_down_at_once() -> None:
    bucket = MemoryBucket()
    changes: list[bool] = []
    a = LeaderLease(bucket, "a", ttl=TTL, renew_every=RENEW, poll_every=POLL, on_change=changes.append)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        await a.wait(leader=True)
        entry = await bucket.get(LEASE_KEY)
        assert entry is not None
        await bucket.update(LEASE_KEY, b'{"holder":"intruder","term":99,"ttl":1}', entry.revision)
        with anyio.fail_after(2):
            await a.wait(leader=False)
        assert changes == [True, False]
        tg.cancel_scope.cancel()


def test_renewal_must_fit_in_the_ttl() -> None:
    with pytest.raises(ValueError, match="renew_every"):
        LeaderLease(MemoryBucket(), "x", ttl=1.0, renew_every=0.6)


async def test_a_leader_that_stepped_down_reclaims_its_untouched_lease() -> None:
    bucket = MemoryBucket()
    a = lease(bucket, "a")
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run)
        await a.wait(leader=True)
        a.bucket = Partitioned()
        with anyio.fail_after(2):
            await a.wait(leader=False)
        a.bucket = bucket  # NATS is back and nobody took over: it leads again at once
        began = anyio.current_time()
        with anyio.fail_after(2):
            await a.wait(leader=True)
        assert anyio.current_time() - began < TTL / 2
        tg.cancel_scope.cancel()
