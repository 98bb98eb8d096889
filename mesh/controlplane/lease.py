"""Leader election among control-plane replicas: one lease key, compare-and-swap, no clocks.

The lease is the key ``leader`` in bucket ``mesh_leader``; its value names the holder and a term.

* **Acquire**: create the key if absent (``create``), or take over an expired lease with
  ``update(..., revision=seen)``: compare-and-swap, so of several replicas racing exactly one
  wins.
* **Renew**: the leader rewrites the key every ``renew_every`` seconds, again by CAS on the
  revision it holds; a failed CAS means someone else took over, and it steps down at once.
* **Expiry without synchronised clocks**: a follower does not read a timestamp; it watches the
  key's *revision*. When the revision has not changed for ``ttl`` seconds of the follower's own
  monotonic clock, the holder has stopped renewing and the lease is taken over.
* **Safety**: the leader counts its lease from the moment it *sent* the renewal and steps down
  by itself once ``ttl - renew_every`` seconds pass without a successful one (NATS away, process
  stalled), so it stops acting as leader before any follower can take over (ttl after it *saw*
  that renewal). Only clock *rates* matter, not offsets.
* A replica that finds the lease still naming itself (it stepped down while NATS was away, or it
  restarted under the same name) reclaims it at once by CAS. Replica names must therefore be
  unique (the default ``<host>-<pid>`` is).
* **Failover time**: after the leader dies, a follower takes over within about
  ``ttl + poll_every`` seconds (default 5 + 0.5 s). A leader that stops gracefully deletes the
  lease (by CAS) so a follower takes over within one poll.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import msgspec
from anyio.abc import TaskStatus

from mesh.controlplane.kv import Bucket, Entry, RevisionConflict
from mesh.errors import TransportError

__all__ = ["LEASE_KEY", "LeaderLease", "Lease"]

log = logging.getLogger(__name__)

LEASE_KEY = "leader"


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """The lease value: who holds it and since which takeover (``term`` grows by one each)."""

    holder: str
    term: int
    ttl: float


_decoder = msgspec.json.Decoder(Lease)


class LeaderLease:
    """Runs the election for one replica; :attr:`is_leader` is this replica's current role.

    Use :meth:`wait` to block until the role is the one wanted; ``on_change(is_leader)`` is called
    on every change (for metrics and logs).
    """

    def __init__(
        self,
        bucket: Bucket,
        holder: str,
        *,
        ttl: float = 5.0,
        renew_every: float = 1.0,
        poll_every: float = 0.5,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not 0 < renew_every < ttl / 2:
            raise ValueError(f"lease: need 0 < renew_every ({renew_every}) < ttl/2 ({ttl / 2})")
        self.bucket = bucket
        self.holder = holder
        self.ttl = ttl
        self.renew_every = renew_every
        self.poll_every = poll_every
        self.on_change = on_change
        self.is_leader = False
        self.leader: str | None = None
        """The holder this replica last saw (itself when leading)."""
        self.term = 0
        self._held: Entry | None = None
        self._valid_until = 0.0
        self._seen_revision = -1
        self._seen_at = 0.0
        self._changed = anyio.Event()

    def __repr__(self) -> str:
        role = "leader" if self.is_leader else f"follower of {self.leader}"
        return f"<LeaderLease {self.holder} {role} term={self.term}>"

    async def wait(self, *, leader: bool) -> None:
        """Return once this replica's role is ``leader`` (True) or follower (False)."""
        while self.is_leader != leader:
            await self._changed.wait()

    def _set_role(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        if not leader:
            self._held = None
        log.info(
            "control plane %s: %s (term %d)", self.holder, "leading" if leader else "following", self.term
        )
        self._changed.set()
        self._changed = anyio.Event()
        if self.on_change is not None:
            self.on_change(leader)

    async def run(self, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Take part in the election until cancelled; on the way out, release a held lease."""
        task_status.started()
        try:
            while True:
                # A leader never lets a round or a sleep run past the end of its lease.
                bound = max(self.renew_every, 0.5)
                if self.is_leader:
                    bound = max(0.01, min(bound, self._valid_until - anyio.current_time()))
                try:
                    with anyio.fail_after(bound):
                        await self._round()
                except (TransportError, TimeoutError) as exc:
                    log.debug("lease round failed: %s", exc)
                if self.is_leader and anyio.current_time() >= self._valid_until:
                    log.warning("control plane %s: lease not renewed in time; stepping down", self.holder)
                    self._set_role(False)
                pause = self.poll_every
                if self.is_leader:
                    pause = min(self.renew_every, max(0.0, self._valid_until - anyio.current_time()))
                await anyio.sleep(pause)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await self.release()

    async def release(self) -> None:
        """Give the lease up (delete it if still ours) so a follower takes over at once."""
        held = self._held
        self._set_role(False)
        if held is None:
            return
        try:
            await self.bucket.delete(LEASE_KEY, revision=held.revision)
            log.info("control plane %s: lease released", self.holder)
        except (TransportError, RevisionConflict) as exc:
            log.debug("lease release: %s", exc)

    def _value(self, term: int) -> bytes:
        return msgspec.json.encode(Lease(holder=self.holder, term=term, ttl=self.ttl))

    async def _round(self) -> None:
        now = anyio.current_time()
        if self.is_leader and self._held is not None:
            try:
                revision = await self.bucket.update(LEASE_KEY, self._value(self.term), self._held.revision)
            except RevisionConflict:
                log.warning("control plane %s: lease taken over by another replica", self.holder)
                self._set_role(False)
                return
            self._held = Entry(LEASE_KEY, b"", revision)
            self._valid_until = now + self.ttl - self.renew_every
            return
        current = await self.bucket.get(LEASE_KEY)
        if current is None:
            await self._acquire(now, None, term=self.term + 1)
            return
        try:
            lease = _decoder.decode(current.value)
        except msgspec.DecodeError:
            lease = Lease(holder="?", term=0, ttl=self.ttl)
        self.leader = lease.holder
        self.term = max(self.term, lease.term)
        if lease.holder == self.holder:
            # Our own lease (we stepped down while NATS was away, or restarted under the same
            # name): nobody has taken it since, so reclaim it now, by CAS as always.
            log.info("control plane %s: reclaiming its own lease", self.holder)
            await self._acquire(now, current, term=lease.term)
            return
        if current.revision != self._seen_revision:
            self._seen_revision, self._seen_at = current.revision, now
            return
        if now - self._seen_at > max(self.ttl, lease.ttl):
            log.info("control plane %s: lease of %s expired; taking over", self.holder, lease.holder)
            await self._acquire(now, current, term=lease.term + 1)

    async def _acquire(self, now: float, current: Entry | None, *, term: int) -> None:
        value = self._value(term)
        try:
            if current is None:
                revision = await self.bucket.create(LEASE_KEY, value)
            else:
                revision = await self.bucket.update(LEASE_KEY, value, current.revision)
        except RevisionConflict:
            return  # another replica was faster
        self._held = Entry(LEASE_KEY, value, revision)
        self._valid_until = now + self.ttl - self.renew_every
        self.term = term
        self.leader = self.holder
        self._set_role(True)
