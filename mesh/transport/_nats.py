"""The one boundary where nats-py's exceptions become the mesh's (see :mod:`mesh.errors`).

Every module that calls nats-py catches :data:`NATS_ERRORS` or wraps the call in
:func:`translate` / :func:`translated`; none defines its own tuple.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Iterator
from typing import TypeVar

import nats.errors
import nats.js.errors

from mesh.errors import TransportError
from mesh.transport.base import NoReply, NoResponders, NotFound, Refused, RevisionConflict

T = TypeVar("T")

NATS_ERRORS = (
    nats.errors.Error,
    nats.js.errors.Error,
    TimeoutError,
    OSError,
)
"""Everything nats-py raises for a broker that is away, slow or refusing."""

TIMEOUTS = (
    nats.errors.TimeoutError,
    TimeoutError,
    nats.js.errors.FetchTimeoutError,
)

_WRONG_LAST_SEQUENCE = (10071, 10164)


@contextlib.contextmanager
def translate(what: str) -> Iterator[None]:
    """Run a block of nats-py calls; their errors leave it as the mesh's, named by ``what``.

    Raises:
        RevisionConflict: a KV compare-and-swap lost.
        NoResponders: nobody serves the subject (or no stream stores it).
        NotFound: the stream or consumer does not exist.
        Refused: JetStream refused the request.
        NoReply: nats-py timed out waiting for an answer.
        TransportError: anything else nats-py raised.
    """
    try:
        yield
    except nats.js.errors.KeyWrongLastSequenceError as exc:
        raise RevisionConflict(f"{what}: {exc.description or 'revision changed'}") from None
    except nats.errors.NoRespondersError as exc:
        raise NoResponders(f"{what}: no responders") from exc
    except nats.js.errors.NoStreamResponseError as exc:
        raise NoResponders(f"{what}: no stream stores this subject") from exc
    except nats.js.errors.NotFoundError as exc:
        raise NotFound(f"{what}: {exc.description or 'not found'}") from exc
    except nats.js.errors.APIError as exc:
        if exc.err_code in _WRONG_LAST_SEQUENCE:
            raise RevisionConflict(f"{what}: revision changed") from None
        raise Refused(f"{what}: JetStream refused: {exc.description or exc}") from exc
    except TIMEOUTS as exc:
        raise NoReply(f"{what}: no answer in time") from exc
    except NATS_ERRORS as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {exc}".rstrip(": ")) from exc


async def translated(what: str, aw: Awaitable[T]) -> T:
    """Await ``aw`` inside :func:`translate`."""
    with translate(what):
        return await aw
