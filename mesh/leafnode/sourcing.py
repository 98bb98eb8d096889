"""Hub-side stream sourcing of the leaf-node topology (``meshctl leafnode link``/``unlink``):
the hub's :data:`EDGE_STREAMS` source the streams of the same name from each site's JetStream
domain through ``$JS.<domain>.API``; :func:`watch_edge_sourcing` keeps them prompt after outages.
See :mod:`mesh.leafnode` for the topology and what crosses the link.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import msgspec

from mesh.config import StreamsConfig
from mesh.errors import TransportError
from mesh.leafnode.config import _check_token
from mesh.transport import DLQ_STREAM, EVENTS_STREAM, TRACE_STREAM, JetStream, NoResponders

__all__ = [
    "EDGE_STREAMS",
    "SourceStatus",
    "api_prefix",
    "domain_stream_messages",
    "edge_dead_letters",
    "edge_source_status",
    "edge_stream_ready",
    "ensure_domain_source",
    "ensure_edge_sourcing",
    "linked_domains",
    "remove_domain_source",
    "remove_edge_sourcing",
    "restart_domain_source",
    "watch_edge_sourcing",
]

log = logging.getLogger(__name__)

EDGE_STREAMS: tuple[str, ...] = (EVENTS_STREAM, TRACE_STREAM)
"""The hub's streams that source the stream of the same name from each linked site."""

_API_PREFIX = re.compile(r"^\$JS\.([A-Za-z0-9_-]{1,64})\.API\Z")


def api_prefix(domain: str | None) -> str:
    """The JetStream API prefix of ``domain`` (``$JS.<domain>.API``; ``$JS.API`` for None)."""
    return f"$JS.{domain}.API" if domain else "$JS.API"


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _ApiResponse(msgspec.Struct):
    error: _ApiError | None = None
    config: dict[str, Any] | None = None
    sources: list[dict[str, Any]] | None = None
    state: dict[str, Any] | None = None


_STREAM_NOT_FOUND = 10059


async def _api(
    js: JetStream, what: str, subject: str, body: dict[str, Any] | None = None, *, domain: str | None = None
) -> _ApiResponse:
    """One raw JetStream API request to ``domain`` (default: ``js``'s own); raw JSON keeps the
    stream config fields nats-py does not know."""
    domain = domain or js.domain
    data = msgspec.json.encode(body) if body is not None else b""
    try:
        reply = await js.request(f"{api_prefix(domain)}.{subject}", data, timeout=js.cfg.request_timeout)
    except NoResponders:
        raise TransportError(f"{what}: no JetStream answered in domain {domain or '(default)'}") from None
    except TransportError as exc:
        raise TransportError(f"{what}: {exc}") from exc
    try:
        return msgspec.json.decode(reply.data, type=_ApiResponse)
    except msgspec.DecodeError as exc:
        raise TransportError(f"{what}: unexpected answer: {exc}") from exc


def _is_source(src: dict[str, Any], source_stream: str, prefix: str) -> bool:
    return src.get("name") == source_stream and (src.get("external") or {}).get("api") == prefix


def _source_key(src: dict[str, Any]) -> tuple[str, str, str]:
    external = src.get("external") or {}
    return (str(src.get("name", "")), str(external.get("api", "")), str(src.get("filter_subject", "")))


async def ensure_domain_source(
    js: JetStream,
    domain: str,
    *,
    stream: str = EVENTS_STREAM,
    source_stream: str = EVENTS_STREAM,
    filter_subject: str | None = None,
    streams: StreamsConfig | None = None,
) -> bool:
    """Make ``stream`` (in ``js``'s domain) source ``source_stream`` of JetStream ``domain``.

    Idempotent: adds the source when missing, leaves the stream alone when it is there (other
    sources, e.g. other sites, are kept). The server keeps sourcing across outages by itself.
    When ``stream`` does not exist it is created by ``js.ensure_streams(streams)`` if ``streams``
    is given. Returns True when the stream config was changed. A source from the same stream and
    domain with another ``filter_subject`` is replaced (the server may then re-read the site's
    stream; the duplicate window and the sinks' inboxes absorb the copies).

    Raises:
        ConfigError: ``domain`` is not a single token.
        TransportError: JetStream unreachable, the stream missing (and no ``streams``), or the
            update refused.
    """
    _check_token("domain", domain)
    want: dict[str, Any] = {"name": source_stream, "external": {"api": api_prefix(domain)}}
    if filter_subject:
        want["filter_subject"] = filter_subject
    for _attempt in range(5):
        info = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}")
        if info.error is not None and info.error.err_code == _STREAM_NOT_FOUND and streams is not None:
            await js.ensure_streams(streams)
            continue
        if info.error is not None or info.config is None:
            desc = info.error.description if info.error else "no config"
            raise TransportError(f"stream {stream}: {desc}")
        config = info.config
        sources: list[dict[str, Any]] = list(config.get("sources") or [])
        if any(_source_key(s) == _source_key(want) for s in sources):
            return False
        # Same stream of the same domain with another filter: replace it rather than add a copy.
        sources = [s for s in sources if _source_key(s)[:2] != _source_key(want)[:2]]
        config["sources"] = [*sources, want]
        res = await _api(js, f"update stream {stream}", f"STREAM.UPDATE.{stream}", config)
        if res.error is not None:
            raise TransportError(f"update stream {stream}: {res.error.description}")
        # Verify: a concurrent update (another operator, another site) may have replaced ours.
        check = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}")
        if check.config is not None and any(
            _source_key(s) == _source_key(want) for s in check.config.get("sources") or []
        ):
            return True
        await anyio.sleep(0.1)
    raise TransportError(
        f"stream {stream}: the source from domain {domain} did not stick (concurrent updates?)"
    )


async def ensure_edge_sourcing(
    js_hub: JetStream,
    edge_domain: str,
    *,
    filter_subject: str | None = None,
    streams: StreamsConfig | None = None,
    edge_streams: tuple[str, ...] = EDGE_STREAMS,
) -> bool:
    """Make each of the hub's :data:`EDGE_STREAMS` (``MESH_EVENTS``, ``MESH_TRACE``) source the
    stream of the same name in ``edge_domain``; True when a stream config was changed.

    ``js_hub`` is connected to the hub (its own domain). ``filter_subject`` applies to the
    events source only; trace records are sourced whole. A hub stream that does not exist is
    created by ``js_hub.ensure_streams(streams)`` when ``streams`` is given (an existing one keeps
    its retention and limits). See :func:`ensure_domain_source`.

    Raises:
        ConfigError: ``edge_domain`` is not a single token.
        TransportError: as :func:`ensure_domain_source`.
    """
    changed = False
    for stream in edge_streams:
        changed |= await ensure_domain_source(
            js_hub, edge_domain, stream=stream, source_stream=stream,
            filter_subject=filter_subject if stream == EVENTS_STREAM else None, streams=streams,
        )  # fmt: skip
    return changed


async def remove_domain_source(
    js: JetStream, domain: str, *, stream: str = EVENTS_STREAM, source_stream: str = EVENTS_STREAM
) -> bool:
    """Remove ``stream``'s source from ``source_stream`` of ``domain``; False when it had none
    (or the stream does not exist). What was already sourced stays in ``stream``.

    Raises:
        ConfigError: ``domain`` is not a single token.
        TransportError: JetStream unreachable or the update refused.
    """
    _check_token("domain", domain)
    prefix = api_prefix(domain)
    info = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}")
    if info.error is not None and info.error.err_code == _STREAM_NOT_FOUND:
        return False
    if info.error is not None or info.config is None:
        raise TransportError(f"stream {stream}: {info.error.description if info.error else 'no config'}")
    sources = list(info.config.get("sources") or [])
    kept = [s for s in sources if not _is_source(s, source_stream, prefix)]
    if len(kept) == len(sources):
        return False
    res = await _api(
        js, f"update stream {stream}", f"STREAM.UPDATE.{stream}", {**info.config, "sources": kept}
    )
    if res.error is not None:
        raise TransportError(f"update stream {stream}: {res.error.description}")
    return True


async def remove_edge_sourcing(
    js_hub: JetStream, edge_domain: str, *, edge_streams: tuple[str, ...] = EDGE_STREAMS
) -> list[str]:
    """Undo :func:`ensure_edge_sourcing` (``meshctl leafnode unlink``): the hub streams that no
    longer source ``edge_domain`` (empty when none did). The site's streams are untouched.

    Raises:
        ConfigError: ``edge_domain`` is not a single token.
        TransportError: JetStream unreachable or an update refused.
    """
    return [
        stream
        for stream in edge_streams
        if await remove_domain_source(js_hub, edge_domain, stream=stream, source_stream=stream)
    ]


async def linked_domains(js: JetStream, *, stream: str = EVENTS_STREAM) -> list[str]:
    """The JetStream domains whose streams ``stream`` sources (the sites linked to this hub).

    Raises:
        TransportError: JetStream unreachable (a missing stream: no domains).
    """
    info = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}")
    if info.error is not None and info.error.err_code == _STREAM_NOT_FOUND:
        return []
    if info.error is not None or info.config is None:
        raise TransportError(f"stream {stream}: {info.error.description if info.error else 'no config'}")
    domains = []
    for src in info.config.get("sources") or []:
        m = _API_PREFIX.match(str((src.get("external") or {}).get("api", "")))
        if m and m.group(1) not in domains:
            domains.append(m.group(1))
    return domains


async def domain_stream_messages(js: JetStream, domain: str, stream: str) -> int | None:
    """How many messages ``stream`` of JetStream ``domain`` holds, asked through ``js``; None
    when it does not answer (link down, no such stream)."""
    try:
        res = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}", domain=domain)
    except TransportError:
        return None
    if res.error is not None or res.state is None:
        return None
    return int(res.state.get("messages", 0))


async def edge_dead_letters(js_hub: JetStream, *, stream: str = DLQ_STREAM) -> dict[str, int | None]:
    """Per site linked to this hub (:func:`linked_domains`): how many dead letters its own
    ``MESH_DLQ`` holds (None when the site does not answer: link down or no such stream).

    Sites' dead letters are not sourced into the hub (see the module doc): this only says where
    they are, for ``meshctl dlq list`` at the hub.

    Raises:
        TransportError: the hub's JetStream unreachable.
    """
    return {d: await domain_stream_messages(js_hub, d, stream) for d in await linked_domains(js_hub)}


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """How far a stream's source from one domain is."""

    domain: str
    stream: str
    lag: int
    """Messages of the source stream not yet stored (as last seen by the server)."""
    active: float | None
    """Seconds since the source last delivered; None when it never has (or is not running)."""
    error: str | None


async def edge_source_status(
    js: JetStream, domain: str, *, stream: str = EVENTS_STREAM
) -> SourceStatus | None:
    """Status of ``stream``'s source from ``domain``; None when it has none.

    Raises:
        TransportError: JetStream unreachable or the stream missing.
    """
    info = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}")
    if info.error is not None:
        raise TransportError(f"stream {stream}: {info.error.description}")
    prefix = api_prefix(domain)
    for src in info.sources or []:
        if (src.get("external") or {}).get("api") != prefix:
            continue
        active_ns = int(src.get("active", -1))
        err = src.get("error")
        return SourceStatus(
            domain=domain,
            stream=str(src.get("name", "")),
            lag=int(src.get("lag", 0)),
            active=active_ns / 1e9 if active_ns >= 0 else None,
            error=str(err.get("description", err)) if isinstance(err, dict) else None,
        )
    return None


async def edge_stream_ready(js: JetStream, domain: str, *, stream: str = EVENTS_STREAM) -> bool:
    """True when ``stream`` of JetStream ``domain`` answers through ``js`` (the link is up and
    the site's stream exists)."""
    try:
        res = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}", domain=domain)
    except TransportError:
        return False
    return res.error is None


async def restart_domain_source(
    js: JetStream, domain: str, *, stream: str = EVENTS_STREAM, source_stream: str = EVENTS_STREAM
) -> bool:
    """Remove and re-add ``stream``'s source from ``domain``, so the server sets it up again now.

    nats-server retries a failed source with a growing delay (10 s, 20 s, ... up to 2 min), so
    after a WAN outage a source may sit idle long after the link is back. Re-adding it starts it
    at once; the server finds where it stopped from the stream's own messages, so nothing is
    stored twice or skipped. Returns False when the stream has no such source.
    """
    prefix = api_prefix(domain)

    def ours(src: dict[str, Any]) -> bool:
        return _is_source(src, source_stream, prefix)

    info = await _api(js, f"stream {stream}", f"STREAM.INFO.{stream}")
    if info.error is not None or info.config is None:
        raise TransportError(f"stream {stream}: {info.error.description if info.error else 'no config'}")
    sources = list(info.config.get("sources") or [])
    removed = [s for s in sources if ours(s)]
    if not removed:
        return False
    config = {**info.config, "sources": [s for s in sources if not ours(s)]}
    res = await _api(js, f"update stream {stream}", f"STREAM.UPDATE.{stream}", config)
    if res.error is not None:
        raise TransportError(f"update stream {stream}: {res.error.description}")
    src = removed[0]
    await ensure_domain_source(
        js, domain, stream=stream, source_stream=source_stream, filter_subject=src.get("filter_subject")
    )
    return True


def _stalled(status: SourceStatus | None, stall_after: float) -> bool:
    if status is None:
        return False
    return status.error is not None or status.active is None or status.active > stall_after


async def watch_edge_sourcing(
    js_hub: JetStream,
    edge_domain: str,
    *,
    edge_streams: tuple[str, ...] = EDGE_STREAMS,
    interval: float = 2.0,
    stall_after: float = 5.0,
    min_restart_interval: float = 10.0,
    on_restart: Callable[[SourceStatus | None], None] | None = None,
) -> None:
    """Keep the hub's sources from ``edge_domain`` (one per stream of ``edge_streams``) present
    and prompt; runs until cancelled.

    Every ``interval`` seconds, for each stream: make sure the source exists
    (:func:`ensure_domain_source`; an agent or an operator may have replaced the stream config),
    and when it has been idle for more than ``stall_after`` seconds (or in error) while the site's
    stream answers, restart it (:func:`restart_domain_source`), at most once per
    ``min_restart_interval``. Transport errors (a hub stream missing included) are logged and
    retried, each stream on its own; the connection reconnects by itself.
    """
    last_restart = dict.fromkeys(edge_streams, -min_restart_interval)
    while True:
        for stream in edge_streams:  # one stream's trouble (e.g. missing) does not stall another's
            try:
                await ensure_domain_source(js_hub, edge_domain, stream=stream, source_stream=stream)
                status = await edge_source_status(js_hub, edge_domain, stream=stream)
                now = anyio.current_time()
                if (
                    _stalled(status, stall_after)
                    and now - last_restart[stream] >= min_restart_interval
                    and await edge_stream_ready(js_hub, edge_domain, stream=stream)
                ):
                    log.info(
                        "%s source from domain %s is stalled (%s): restarting it", stream, edge_domain, status
                    )
                    await restart_domain_source(js_hub, edge_domain, stream=stream, source_stream=stream)
                    last_restart[stream] = now
                    if on_restart is not None:
                        on_restart(status)
            except TransportError as exc:
                log.warning("watching the %s source from domain %s: %s", stream, edge_domain, exc)
        await anyio.sleep(interval)
