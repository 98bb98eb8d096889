"""Parent before child on one agent (a flow's ``after``; README "Parent before child").

A child flow (``after = { flow = "orders", key = "order_id" }``) applies a record only once the
parent it references (the child's canonical field ``key``, encoded as sources encode keys) has
been applied here by the parent flow's sink and not deleted since. A parent flow applies a delete
only once every child applied here that references that parent has been deleted here. Anything
else is *held*: the caller naks it with a delay (see ``Apply``), and it is dead-lettered only
when it is still held at the end of ``retry.integrity_retry``.

What "applied here" means comes from :class:`~mesh.store.AppliedKeys`, which :meth:`Hold.record`
fills once the sink's writes are durable and before the inbox records them: a crash between
the two leaves the state ahead of the inbox, never behind (the redelivery finds the record
stale and records it again).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec

from mesh.config import AfterConfig
from mesh.envelope import Envelope, decode_payload
from mesh.errors import DecodeError
from mesh.store import AppliedKey, AppliedKeys

__all__: list[str] = []

_json = msgspec.json.Encoder()


def parent_key(after: AfterConfig, row: dict[str, object]) -> str | None:
    """The parent key a child's canonical ``row`` references, encoded as sources encode keys (a
    string as is, anything else in JSON, several fields as a JSON array); None when a field is
    null or missing (no parent: never held)."""
    fields = [after.key] if isinstance(after.key, str) else after.key
    values = [row.get(f) for f in fields]
    if any(v is None for v in values):
        return None
    if len(values) == 1:
        value = values[0]
        return value if isinstance(value, str) else _json.encode(value).decode()
    return _json.encode(values).decode()


class Hold:
    """Decides which records of one flow must wait for a parent or for their children, and
    records what the flow applied (only when it is a parent or a child)."""

    def __init__(
        self, flow: str, after: AfterConfig | None, is_parent: Callable[[], bool], state: AppliedKeys
    ) -> None:
        self.flow = flow
        self.after = after
        self.is_parent = is_parent
        """Whether some flow of this agent names this one in its ``after`` (asked each batch:
        flows change while the agent runs)."""
        self.state = state

    def __repr__(self) -> str:
        after = f" after {self.after.flow}" if self.after else ""
        return f"<Hold {self.flow}{after}>"

    @property
    def active(self) -> bool:
        return self.after is not None or self.is_parent()

    def _parent_of(self, env: Envelope) -> str | None:
        if self.after is None or env.is_delete:
            return None
        try:
            return parent_key(self.after, decode_payload(env))
        except DecodeError:
            return None  # the mapping step dead-letters it; nothing to hold

    async def blocked(self, envs: Sequence[Envelope]) -> dict[str, str]:
        """Envelope id -> why it must wait, for the records of ``envs`` that must wait.

        Raises:
            SystemUnavailable: the store is busy (retry the batch).
        """
        out: dict[str, str] = {}
        if self.after is not None:
            parents = {env.id: key for env in envs if (key := self._parent_of(env)) is not None}
            there = await self.state.present(self.after.flow, sorted(set(parents.values())))
            for eid, key in parents.items():
                if key not in there:
                    out[eid] = (
                        f"parent {self.after.flow} {key!r} (field {self.after.key!r}) not applied here yet:"
                        f" held (after = {self.after.flow!r})"
                    )
        if self.is_parent():
            deletes = {env.id: env.key for env in envs if env.is_delete}
            if deletes:
                children = await self.state.children(self.flow, sorted(set(deletes.values())))
                for eid, key in deletes.items():
                    if kids := children.get(key):
                        shown = ", ".join(f"{f} {k!r}" for f, k in kids[:3])
                        more = f" and {len(kids) - 3} more" if len(kids) > 3 else ""
                        out[eid] = (
                            f"delete of {self.flow} {key!r} waits for its {len(kids)} children applied here"
                            f" ({shown}{more}) to be deleted first"
                        )
        if out:
            # A record older than what this flow already applied for its key is stale: the sink's
            # version guard skips it, so holding it (until the budget ends) would be wrong, e.g. a
            # line's first upsert redelivered after the line and then its order were deleted.
            by_id = {env.id: env for env in envs if env.id in out}
            newest = await self.state.versions(self.flow, sorted({env.key for env in by_id.values()}))
            for eid, env in by_id.items():
                if newest.get(env.key, 0) >= env.version:
                    del out[eid]
        return out

    async def record(self, envs: Sequence[Envelope]) -> None:
        """Record that the sink settled ``envs`` (applied, unchanged, stale or echo): each key is
        there at its version, or deleted.

        Raises:
            SystemUnavailable: the store is busy; StopError: it is unusable.
        """
        if not envs or not self.active:
            return
        rows = []
        for env in envs:
            parent = self._parent_of(env)
            rows.append(AppliedKey(
                self.flow, env.key, env.version, env.is_delete,
                self.after.flow if parent is not None and self.after is not None else None, parent,
            ))  # fmt: skip
        await self.state.record(rows)
