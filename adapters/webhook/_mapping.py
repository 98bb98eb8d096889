"""Turning a webhook's JSON body into changes: key, version, type, row by configured paths.

Guarantees: the same body and signed timestamp always give the same changes with the same keys
and versions, so a re-sent event gets the same envelope id (I2). A body that does not fit the
mapping raises :class:`MappingError` naming the event and the field; nothing of it is captured
(a batch is taken whole or not at all).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from adapters.webhook.config import WebhookSourceConfig
from mesh.adapters import Change

__all__ = ["MAX_DEPTH", "EventMapper", "MappingError", "TooDeep", "parse_json"]

_INT_RE = re.compile(r"[+-]?[0-9]{1,19}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_INT64 = range(-(2**63), 2**63)
_MAX_KEY = 512
_decoder = msgspec.json.Decoder()
_row_encoder = msgspec.msgpack.Encoder()  # the envelope payload's encoding (msgpack integers are 64-bit)


class MappingError(Exception):
    """The body is JSON but not an event (or batch) this source can map: answer 422."""


class TooDeep(msgspec.DecodeError):
    """The body is JSON nested deeper than the limit."""


MAX_DEPTH = 64
"""Deepest nesting of arrays and objects a body may have (events are shallow documents)."""


def parse_json(body: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """The decoded body.

    Raises:
        msgspec.DecodeError: not valid JSON, or nested deeper than ``max_depth`` (answer 400;
            a deep document raises :class:`TooDeep`, never a ``RecursionError``).
    """
    try:
        document = _decoder.decode(body)
    except RecursionError:
        raise TooDeep(f"JSON nested deeper than {max_depth} levels") from None
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > max_depth:
            raise TooDeep(f"JSON nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return document


def _get(event: dict[str, Any], path: str) -> Any:
    value: Any = event
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(path)
        value = value[part]
    return value


def _timestamp_us(text: str) -> int | None:
    """ISO-8601 text (``Z`` allowed; naive = UTC) as microseconds since the epoch."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MICROSECOND


class EventMapper:
    """Maps decoded bodies to changes, as the config's paths say."""

    def __init__(self, cfg: WebhookSourceConfig) -> None:
        self.cfg = cfg
        self._delete = frozenset(cfg.delete_types)
        self._accept = None if cfg.accept_types is None else frozenset(cfg.accept_types)

    def changes(self, body: Any, timestamp: int) -> tuple[list[Change], int]:
        """(the changes of ``body`` in order, how many events were ignored by type).

        ``timestamp`` is the signed unix timestamp: it is ``occurred_at`` and, without
        ``version_field``, the version (microseconds, plus the event's index in the body).

        Raises:
            MappingError: not an object (or, with ``batch``, a list of objects), or an event
                lacks its key, has a key or version of the wrong kind, a type that is not text,
                or an integer beyond 64 bits (which an envelope cannot carry).
        """
        if isinstance(body, list):
            if not self.cfg.batch:
                raise MappingError("a JSON array of events needs batch = true; expected one JSON object")
            events = body
        else:
            events = [body]
        changes: list[Change] = []
        ignored = 0
        for index, event in enumerate(events):
            where = f"event {index}: " if isinstance(body, list) else ""
            if not isinstance(event, dict):
                raise MappingError(f"{where}expected a JSON object, got {type(event).__name__}")
            try:
                change = self._change(event, index, timestamp)
            except MappingError as exc:
                raise MappingError(f"{where}{exc}") from None
            if change is None:
                ignored += 1
            else:
                changes.append(change)
        return changes, ignored

    def _change(self, event: dict[str, Any], index: int, timestamp: int) -> Change | None:
        cfg = self.cfg
        deleted = False
        if cfg.type_field is not None:
            kind = self._field(event, cfg.type_field)
            if not isinstance(kind, str):
                raise MappingError(f"{cfg.type_field}: expected text, got {type(kind).__name__}")
            if self._accept is not None and kind not in self._accept:
                return None
            deleted = kind in self._delete
        key = self._field(event, cfg.key_field)
        if isinstance(key, bool) or not isinstance(key, str | int) or key == "":
            raise MappingError(f"{cfg.key_field}: expected non-empty text or an integer, got {key!r}"[:200])
        key_text = str(key)
        if len(key_text) > _MAX_KEY:
            raise MappingError(f"{cfg.key_field}: longer than {_MAX_KEY} characters")
        if cfg.version_field is None:
            version = timestamp * 1_000_000 + index
        else:
            version = self._version(self._field(event, cfg.version_field))
        row = event
        if cfg.row_field is not None:
            row = self._field(event, cfg.row_field)
            if not isinstance(row, dict):
                raise MappingError(f"{cfg.row_field}: expected a JSON object, got {type(row).__name__}")
        try:  # what the envelope cannot carry would stop the capture loop later: refuse it now
            _row_encoder.encode(row)
        except OverflowError:
            raise MappingError("an integer in the event is beyond 64 bits; send it as a string") from None
        return Change(key=key_text, version=version, deleted=deleted, row=row, occurred_at=timestamp * 1000)

    def _field(self, event: dict[str, Any], path: str) -> Any:
        try:
            return _get(event, path)
        except KeyError:
            raise MappingError(f"no field {path}") from None

    def _version(self, value: Any) -> int:
        path = self.cfg.version_field
        version: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            version = value
        elif isinstance(value, float) and value.is_integer():
            version = int(value)
        elif isinstance(value, str):
            text = value.strip()
            version = int(text) if _INT_RE.fullmatch(text) else _timestamp_us(text)
        if version is None or version not in _INT64:
            raise MappingError(f"{path}: expected an integer or an ISO-8601 timestamp, got {value!r}"[:200])
        return version
