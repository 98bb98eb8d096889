"""Permission violations, correlated with the operations waiting on them.

nats-server answers a publish or a subscription its credentials do not allow with an
asynchronous ``-ERR 'Permissions Violation for Publish to "<subject>"'`` (or ``Subscription``)
and nothing else: the request behind it would wait for its whole timeout. nats-py hands that
line to the error callback only. :class:`Denials` matches it, by subject, with the operations
in flight and cancels them, so they raise :class:`~mesh.transport.Refused` at once.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio

from mesh.transport.base import Refused

_VIOLATION = re.compile(r'Permissions Violation for (Publish|Subscription) to "([^"]*)"', re.IGNORECASE)


def parse_violation(text: str) -> tuple[str, str] | None:
    """``("publish" | "subscribe", subject)`` of a server permission violation; None for any
    other error text."""
    m = _VIOLATION.search(text)
    if m is None:
        return None
    return ("publish" if m.group(1).lower() == "publish" else "subscribe"), m.group(2)


@dataclass(eq=False)
class Pending:
    """One operation waiting: the subjects it publishes to and subscribes to (a subscription
    given as a prefix ending in ``.`` matches every subject under it)."""

    publish: frozenset[str]
    subscribe: frozenset[str]
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    denied: str | None = None
    """``publish to <subject>`` or ``subscribe to <subject>`` once the server refused it."""

    def match(self, op: str, subject: str) -> str | None:
        """The subject as this operation spelled it when it is the refused one (nats-py hands
        the server's error text over lower-cased, so subjects compare without case)."""
        wanted = self.publish if op == "publish" else self.subscribe
        low = subject.lower()
        for w in wanted:
            if w.lower() == low:
                return w
            if w.endswith(".") and low.startswith(w.lower()):
                return w + subject[len(w) :]
        return None

    def check(self) -> None:
        """Raise Refused when the server refused this operation."""
        if self.denied is not None:
            raise Refused(f"permission denied: {self.denied}")


class Denials:
    """The operations in flight on one connection, and the subscriptions the server refused."""

    def __init__(self) -> None:
        self._pending: set[Pending] = set()
        self.refused_subscriptions: set[str] = set()
        """Subjects (lower-cased) whose subscription the server refused; they stay refused until
        subscribed again."""

    def __repr__(self) -> str:
        refused = len(self.refused_subscriptions)
        return f"<Denials pending={len(self._pending)} refused_subscriptions={refused}>"

    def report(self, text: str) -> tuple[str, str] | None:
        """Take one error line from the server: when it is a permission violation, fail every
        pending operation on that subject; returns what was refused (None for other errors)."""
        parsed = parse_violation(text)
        if parsed is None:
            return None
        op, subject = parsed
        if op == "subscribe":
            self.refused_subscriptions.add(subject.lower())
        for p in list(self._pending):
            spelled = p.match(op, subject) if p.denied is None else None
            if spelled is not None:
                p.denied = f"{op} to {spelled}"
                p.scope.cancel()
        return parsed

    @contextlib.contextmanager
    def pending(self, *, publish: tuple[str, ...] = (), subscribe: tuple[str, ...] = ()) -> Iterator[Pending]:
        """Track one operation: run it inside ``with p.scope:`` (cancelled when refused), then
        call ``p.check()``."""
        for s in subscribe:
            self.refused_subscriptions.discard(s.lower())
        p = Pending(frozenset(publish), frozenset(subscribe))
        self._pending.add(p)
        try:
            yield p
        finally:
            self._pending.discard(p)
