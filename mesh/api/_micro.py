"""The one place mesh.api touches nats-py: the NATS services protocol (``nats.micro``).

nats-py runs each endpoint's callback in a task of its own; :func:`start_service` callbacks
only hand the request over (to a channel the server's own task group drains), so no work runs
in nats-py's tasks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service, ServiceConfig

NO_RESPONDERS: tuple[type[BaseException], ...] = (nats.errors.NoRespondersError,)
TIMEOUTS: tuple[type[BaseException], ...] = (nats.errors.TimeoutError,)


@dataclass(frozen=True, slots=True)
class Incoming:
    """One request to an endpoint: what arrived and how to answer it."""

    subject: str
    data: bytes
    headers: dict[str, str]
    respond: Callable[[bytes, dict[str, str]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    name: str
    subject: str
    accept: Callable[[Incoming], bool]
    """Takes the request over (True) or refuses it (False: answered with ``busy``)."""
    busy: tuple[bytes, dict[str, str]]
    metadata: dict[str, str]


async def start_service(
    nc: Any,
    *,
    name: str,
    version: str,
    description: str,
    metadata: dict[str, str],
    endpoints: Sequence[EndpointSpec],
) -> Service:
    """Start service ``name`` on the nats-py client ``nc`` with ``endpoints`` (queue group ``q``:
    replicas share the calls). Stop it with :func:`stop_service`."""
    svc = await add_service(
        nc, ServiceConfig(name=name, version=version, description=description, metadata=metadata)
    )
    try:
        for ep in endpoints:
            await svc.add_endpoint(
                EndpointConfig(
                    name=ep.name,
                    subject=ep.subject,
                    handler=_handler(ep.accept, ep.busy),
                    metadata=ep.metadata,
                )
            )
        await nc.flush()
    except BaseException:
        await stop_service(svc)
        raise
    return svc


def _handler(
    accept: Callable[[Incoming], bool], busy: tuple[bytes, dict[str, str]]
) -> Callable[[Request], Awaitable[None]]:
    async def handle(req: Request) -> None:
        async def respond(data: bytes, headers: dict[str, str]) -> None:
            await req.respond(data, headers=headers or None)

        if not accept(Incoming(req.subject, req.data, dict(req.headers or {}), respond)):
            await respond(*busy)

    return handle


async def stop_service(svc: Service) -> None:
    """Unsubscribe every endpoint and discovery subject; quiet if the connection is gone."""
    import anyio

    # Shielded and bounded: it runs while the server's task group is being cancelled.
    with anyio.CancelScope(shield=True), anyio.move_on_after(2), contextlib.suppress(Exception):
        await svc.stop()


def service_id(svc: Service) -> str:
    return svc.id


async def check_subscriptions(nc: Any, subjects: Sequence[str], timeout: float = 5.0) -> str | None:
    """After subscribing: the first of ``subjects`` the server refused, or None. Two round
    trips, as :meth:`mesh.transport.JetStream.subscribe` does (a refusal may trail the first)."""
    for _ in range(2):
        await nc.flush(timeout=max(1, int(timeout)))
    denials = getattr(nc, "denials", None)
    refused: set[str] = getattr(denials, "refused_subscriptions", set())
    for s in subjects:
        if s.lower() in refused:
            return s
    return None


async def request_many(nc: Any, subject: str, *, timeout: float, idle: float = 0.25) -> list[bytes]:
    """Every reply to one request on ``subject``: collected until ``timeout``, or until ``idle``
    seconds pass without another once one came (the NATS services discovery pattern)."""
    import anyio

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replies: list[bytes] = []
    try:
        await nc.publish(subject, b"", reply=inbox)
        with anyio.move_on_after(timeout):
            while True:
                try:
                    msg = await sub.next_msg(timeout=idle if replies else timeout)
                except nats.errors.TimeoutError:
                    break
                replies.append(msg.data)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return replies
