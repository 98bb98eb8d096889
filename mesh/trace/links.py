"""Linking an echo back to its cause: what an agent applied, remembered for a short while.

When agent A applies change E (correlation C) to its system S and then captures a change of the
same ``entity:key`` from S within ``[trace] link_window`` seconds, that change is most likely
E's effect (a two-way sync's echo, or a trigger in S reacting to it). :class:`CauseLinks` lets
the capture take C as its correlation id, E as its ``causation_id`` and a child of E's
``traceparent``, so ``meshctl trace`` shows ERP -> CRM -> ERP as one transaction even when
ownership then suppresses the echo. In memory only, bounded; a heuristic by key and time, not a
proof (documented in the README).

Only entities this agent also captures are remembered (``entities``): a sink-only agent keeps no
links, and one that captures keeps at most ``window`` seconds (and ``max_entries``) of applied
changes, expired as new ones arrive, so a long drain does not grow the process.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["CauseLinks", "Link"]


class Link(NamedTuple):
    correlation_id: str
    envelope_id: str
    traceparent: str
    at: float


class CauseLinks:
    """``entity:key`` -> the last change applied to it here, for ``window`` seconds."""

    def __init__(
        self,
        window: float = 60.0,
        max_entries: int = 100_000,
        entities: set[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self._clock = clock
        self.max_entries = max_entries
        self.entities = entities
        """The entities whose applied changes are remembered: those a capture of this agent may
        look up (None: every entity)."""
        self._links: OrderedDict[str, Link] = OrderedDict()

    def __repr__(self) -> str:
        return f"<CauseLinks window={self.window:g}s entries={len(self._links)}>"

    def watch(self, entity: str) -> None:
        """Remember applied changes of ``entity`` from now on (a capture of it started here)."""
        if self.entities is not None:
            self.entities.add(entity)

    def remember(
        self, business_key: str, correlation_id: str, envelope_id: str, traceparent: str, entity: str = ""
    ) -> None:
        """Remember the change applied to ``business_key`` (of ``entity``, when given: ignored
        unless watched); drops those older than the window and the oldest beyond ``max_entries``."""
        if self.window <= 0 or (entity and self.entities is not None and entity not in self.entities):
            return
        now = self._clock()
        links = self._links
        links[business_key] = Link(correlation_id, envelope_id, traceparent, now)
        links.move_to_end(business_key)
        while len(links) > self.max_entries:
            links.popitem(last=False)
        while links and now - next(iter(links.values())).at > self.window:
            links.popitem(last=False)

    def cause_of(self, business_key: str) -> Link | None:
        """The change applied to ``business_key`` within the window, if any (kept: several
        captured changes may follow one applied change)."""
        link = self._links.get(business_key)
        if link is None:
            return None
        if self._clock() - link.at > self.window:
            del self._links[business_key]
            return None
        return link
