"""What an adapter implements to serve a System API operation (the ``operation`` role of
:class:`mesh.plugins.AdapterPlugin`).

An :class:`Operation` runs one configured operation against its system. Guarantees it must keep:

* :meth:`Operation.run` with a ``call.key`` has an effect at most once per key when the system
  allows it (SQL: the statement and the row recording the key commit in one transaction, so a
  second run with the key returns the recorded result instead of executing), and
  :meth:`Operation.recorded` finds the result of a committed run after a crash.
* Errors are :class:`~mesh.api.ApiError` or the mesh error tree: ``SystemUnavailable`` becomes
  ``unavailable`` (retryable), ``RejectedRecord`` ``rejected``, ``ConfigError`` ``internal``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Self

__all__ = ["Call", "Operation", "Replayed"]


@dataclass(frozen=True, slots=True)
class Call:
    """One call's context: ``key`` is the hashed idempotency key (None for reads without one),
    ``deadline`` absolute unix seconds."""

    operation: str
    key: str | None
    deadline: float
    correlation_id: str = ""
    causation_id: str = ""
    traceparent: str = ""


class Operation(abc.ABC):
    """One System API operation of a system (an async context manager)."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare (connect, create the ``mesh_api_calls`` table). Raises ConfigError/SystemUnavailable."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`open` took. Idempotent."""

    @abc.abstractmethod
    async def run(self, request: dict[str, Any], call: Call) -> Any:
        """Execute with the (validated) request; return the JSON-able result.

        Raises:
            ApiError, SystemUnavailable, RejectedRecord, ConfigError: see the module docstring.
        """

    async def recorded(self, key: str) -> Any | None:
        """The result a committed run with ``key`` recorded in the system, or None (never
        recorded there, or the adapter cannot record: then the caller runs it again)."""
        return None


@dataclass(frozen=True, slots=True)
class Replayed:
    """Returned by :meth:`Operation.run` when the system had already recorded a run with the
    call's key (its ``result`` is that run's)."""

    result: Any
