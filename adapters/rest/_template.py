"""Request templates of the REST sink: the body of one or several records (``envelope``,
``omit_nulls``, ``key_field``, ``id_field``, ``delete_body``), path templates with ``{key}`` and
``{id}``, per-record outcomes read from an answer (``results``), and readable refusals
(``error_path``; status, request and response bodies kept for the dead letter, bounded and with
every secret value masked).

Pure functions over the config: no I/O here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from urllib.parse import quote

import msgspec

from adapters.rest._paths import collect, first
from adapters.rest.config import RestSinkConfig
from mesh.adapters import SinkRecord
from mesh.errors import IntegrityPending, RejectedRecord

__all__ = [
    "BODY_LIMIT",
    "ItemResult",
    "body_of",
    "delete_item",
    "encode_json",
    "excerpt",
    "format_path",
    "guard_key",
    "has_placeholder",
    "read_results",
    "refusal",
    "refusal_reason",
    "upsert_item",
]

BODY_LIMIT = 4096  # characters of a request or response body kept in a dead letter
_EXCERPT = 200  # characters of a body quoted in a reason when no error_path finds anything
_JSON = msgspec.json.Encoder()


class ItemResult(NamedTuple):
    """How one record of a request fared, as the answer says."""

    failed: bool
    reason: str
    target_id: str | None
    answer: Any
    """This record's part of the answer (for the dead letter)."""


def format_path(template: str, key: str, target_id: str | None) -> str:
    """The path with ``{key}`` and ``{id}`` filled in, URL-encoded."""
    return template.format(key=quote(key, safe=""), id=quote(target_id or "", safe=""))


def has_placeholder(template: str) -> bool:
    """Whether the path names one record (so it cannot carry a batch)."""
    return "{key}" in template or "{id}" in template


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def upsert_item(cfg: RestSinkConfig, record: SinkRecord, target_id: str | None) -> dict[str, Any]:
    """One record's object for a create or update (before the envelope).

    Raises:
        RejectedRecord: the row cannot be encoded as JSON.
    """
    row = record.row
    if cfg.fields is not None:
        row = {name: row[name] for name in cfg.fields if name in row}
    item: dict[str, Any] = dict(row)
    if cfg.key_field:
        item[cfg.key_field] = record.key
    if cfg.id_field and target_id is not None:
        item[cfg.id_field] = target_id
    if cfg.omit_nulls:
        item = _clean(item)
    try:
        _JSON.encode(item)
    except (TypeError, ValueError, msgspec.EncodeError) as exc:
        raise RejectedRecord(f"key {record.key!r}: row is not JSON-encodable: {exc}") from None
    return item


def delete_item(cfg: RestSinkConfig, record: SinkRecord, target_id: str | None) -> dict[str, Any]:
    """The object of a ``delete_mode = "update"`` delete (archive, void)."""
    item: dict[str, Any] = dict(cfg.delete_body or {})
    if cfg.key_field:
        item[cfg.key_field] = record.key
    if cfg.id_field and target_id is not None:
        item[cfg.id_field] = target_id
    return item


def body_of(cfg: RestSinkConfig, items: Sequence[dict[str, Any]]) -> bytes:
    """The request body of ``items``: ``{"<envelope>": [...]}``, or the one item itself."""
    if cfg.envelope is not None:
        return _JSON.encode({cfg.envelope: list(items)})
    assert len(items) == 1
    return _JSON.encode(items[0])


def excerpt(content: bytes, limit: int = _EXCERPT) -> str:
    """The start of a body on one line."""
    text = " ".join(content[: limit * 4].decode("utf-8", "replace").split())
    return (text[:limit] + "...") if len(text) > limit else (text or "(empty body)")


def _decode(content: bytes) -> Any:
    try:
        return msgspec.json.decode(content)
    except msgspec.DecodeError:
        return None


def _messages(values: list[Any]) -> str:
    seen = dict.fromkeys(" ".join(str(v).split()) for v in values if not isinstance(v, dict | list))
    return "; ".join(m for m in seen if m)


def refusal_reason(cfg: RestSinkConfig, content: bytes) -> str:
    """What an error answer says is wrong: the messages at ``error_path`` (joined), or the start
    of the body."""
    if cfg.error_path is not None:
        found = _messages(collect(_decode(content), cfg.error_path))
        if found:
            return found[:1000]
    return excerpt(content)


def read_results(cfg: RestSinkConfig, content: bytes, count: int) -> list[ItemResult]:
    """Per-record outcomes of a 2xx answer to a request of ``count`` records, in request order.
    Without ``results`` every record succeeded and no id is learnt; a result missing from the
    answer counts as success without an id."""
    res = cfg.results
    if res is None:
        return [ItemResult(False, "", None, None)] * count
    doc = _decode(content)
    path = res.path or cfg.envelope
    items: list[Any]
    if path is not None:
        found = first(doc, path)
        items = found if isinstance(found, list) else []
    else:
        items = [doc]
    out = []
    for i in range(count):
        item = items[i] if i < len(items) else None
        failed = False
        if res.status is not None and item is not None:
            failed = str(first(item, res.status)) in res.failed
        reason = _messages(collect(item, res.errors)) if res.errors and item is not None else ""
        target_id = first(item, res.id) if res.id and item is not None else None
        out.append(ItemResult(failed, reason, None if target_id is None else str(target_id), item))
    return out


def refusal(
    what: str,
    status: int,
    reason: str,
    request: bytes | None,
    answer: bytes,
    redact: Callable[[str], str],
    *,
    integrity: bool = False,
) -> RejectedRecord | IntegrityPending:
    """A :class:`RejectedRecord` (or, ``integrity``: an :class:`IntegrityPending`, a status of
    ``integrity_statuses``) that carries, for the dead letter, the status and both bodies
    (bounded to :data:`BODY_LIMIT`, secret values masked by ``redact``; headers are never kept)."""
    cls = IntegrityPending if integrity else RejectedRecord
    exc = cls(redact(f"{what}: HTTP {status}: {reason or excerpt(answer)}"))
    exc.dead_letter_extra = {  # type: ignore[union-attr]  # read by the agent's dead_letter()
        "http_status": status,
        "request_body": _text(request or b"", redact),
        "response_body": _text(answer, redact),
    }
    return exc


def _text(content: bytes, redact: Callable[[str], str]) -> str:
    # Masked before it is cut: a secret that straddles the bound never leaves a prefix behind.
    text = redact(content[: BODY_LIMIT * 2].decode("utf-8", "replace"))
    return text if len(text) <= BODY_LIMIT else text[: BODY_LIMIT - 3] + "..."


def encode_json(value: Any) -> bytes:
    """``value`` as compact JSON."""
    return _JSON.encode(value)


def guard_key(record: SinkRecord) -> str:
    """The version guard's key: the record key, qualified by its scope when it has one (the same
    rule as the SQL sinks), so versions of different origins are never compared."""
    return record.key if not record.scope else f"{record.key}\x1f{record.scope}"
