"""The ``runs`` section of ``/status`` (the latest bulk run of each scheduled flow), and the
``mesh_runs`` bucket's age limit (:func:`ensure_runs_retention`).

Reads a :class:`~mesh.controlplane.kv.KvMirror` of the ``mesh_runs`` bucket (memory only, like
the rest of ``/status``), so it is as fresh as the agents' reports (:mod:`mesh.runs.report`).
Entries are decoded once per KV revision; one that does not decode is left out.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

from mesh.controlplane.kv import KvMirror
from mesh.errors import TransportError
from mesh.runs.report import ENTRY, RUNS_BUCKET, RunEntry, RunSummary, latest_per_flow, merge_runs
from mesh.transport import Transport

__all__ = ["RunsView", "ensure_runs_retention"]

log = logging.getLogger(__name__)
_ENC = msgspec.json.Encoder()


class RunsView:
    """``latest()``: :class:`~mesh.runs.report.RunSummary` per flow, from the mirror."""

    def __init__(self, mirror: KvMirror) -> None:
        self.mirror = mirror
        self._decoded: dict[str, tuple[int, RunEntry | None]] = {}

    def __repr__(self) -> str:
        return f"<RunsView entries={len(self._decoded)}>"

    def latest(self, now: float | None = None) -> list[RunSummary]:
        """The newest run of each flow (source record plus the sinks' counts), by flow name."""
        now = time.time() if now is None else now
        entries = self.mirror.entries
        for gone in set(self._decoded) - set(entries):
            del self._decoded[gone]
        decoded = []
        for key, e in entries.items():
            cached = self._decoded.get(key)
            if cached is None or cached[0] != e.revision:
                try:
                    entry: RunEntry | None = ENTRY.decode(e.value)
                except msgspec.DecodeError:
                    entry = None
                cached = self._decoded[key] = (e.revision, entry)
            if cached[1] is not None:
                decoded.append(cached[1])
        return latest_per_flow(merge_runs(decoded), now)


async def ensure_runs_retention(transport: Transport, max_age: float) -> bool:
    """Bring the ``mesh_runs`` bucket's entry age limit (its stream ``KV_mesh_runs``'s
    ``max_age``; 0: keep forever) to ``max_age`` seconds; True if it changed. The bucket must
    exist (the control plane creates it first).

    Raises:
        TransportError: the broker refused (e.g. no JetStream API rights) or did not answer.
    """
    stream = f"KV_{RUNS_BUCKET}"
    answer = await _js_api(transport, f"$JS.API.STREAM.INFO.{stream}", b"")
    config = answer.get("config")
    if not isinstance(config, dict):
        raise TransportError(f"stream {stream}: no config in the answer to STREAM.INFO")
    want = int(max_age * 1e9)
    if int(config.get("max_age", 0)) == want:
        return False
    config["max_age"] = want
    if want and int(config.get("duplicate_window", 0)) > want:
        config["duplicate_window"] = want  # JetStream refuses a window longer than max_age
    await _js_api(transport, f"$JS.API.STREAM.UPDATE.{stream}", _ENC.encode(config))
    log.info("KV bucket %s: entries kept %gs", RUNS_BUCKET, max_age)
    return True


async def _js_api(transport: Transport, subject: str, data: bytes) -> dict[str, Any]:
    msg = await transport.request(subject, data, timeout=10.0)
    try:
        answer = msgspec.json.decode(msg.data) if msg.data else {}
    except msgspec.DecodeError:
        answer = None
    if not isinstance(answer, dict):
        raise TransportError(f"{subject}: unexpected answer {msg.data[:200]!r}")
    err = answer.get("error")
    if err:
        what = err.get("description", err) if isinstance(err, dict) else err
        raise TransportError(f"{subject}: {what}")
    return answer
