"""Config of the webhook receiver: ``adapter = "webhook"`` (a source only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal, Self

import msgspec

from mesh.config import AdapterConfig, EnvName, FieldPath, HeaderName, PositiveFloat, PositiveInt
from mesh.secrets import SecretFile, exactly_one

__all__ = ["WebhookSourceConfig"]


class WebhookSourceConfig(AdapterConfig, frozen=True, tag="webhook"):
    """Signed inbound HTTP as a source: a SaaS POSTs JSON events (see adapters/webhook/source.py).

    A request is answered 2xx only once its events are committed to the agent's outbox; 503 with
    ``Retry-After`` otherwise (the sender retries, nothing is lost).
    """

    port: Annotated[int, msgspec.Meta(ge=0, le=65535)]
    """TCP port to listen on (0: a free port, logged at start; a sender needs a fixed one)."""
    state_path: Annotated[str, msgspec.Meta(min_length=1)]
    """The source's own SQLite file: delivery ids already captured (relative to this file)."""
    key_field: FieldPath
    """Path of the entity key in each event (a string or an integer)."""
    secret_env: EnvName | None = None
    """Name of the environment variable that holds the HMAC-SHA256 signing secret."""
    secret_file: SecretFile | None = None
    """Or a file that holds it (e.g. a Kubernetes secret mount; a trailing newline is dropped).
    Exactly one of ``secret_env`` and ``secret_file``."""
    host: str = "127.0.0.1"
    path: Annotated[str, msgspec.Meta(pattern=r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$")] = "/webhook"
    """The one URL path that accepts POSTs (anything else: 404; other methods: 405)."""
    rotation_secret_envs: list[EnvName] = msgspec.field(default_factory=list)
    """More secrets accepted while a secret is rotated (the old or the new one)."""
    rotation_secret_files: list[SecretFile] = msgspec.field(default_factory=list)
    """The same, from files."""
    signature_header: HeaderName = "Webhook-Signature"
    """``t=<unix seconds>,v1=<hmac>[,v1=<hmac>...]`` (Stripe's scheme), or only the signatures
    when ``timestamp_header`` is set. The HMAC is over ``"<timestamp>." + body``."""
    signature_scheme: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+$")] = "v1"
    """Name of the signature entries in the header (``v1=...``)."""
    signature_encoding: Literal["hex", "base64"] = "hex"
    timestamp_header: HeaderName | None = None
    """A header of its own holding the unix timestamp (default: ``t=`` in ``signature_header``)."""
    id_header: HeaderName | None = "Webhook-Id"
    """Header with the sender's delivery id: a delivery id already captured is answered 200
    ``duplicate`` and not captured again. Requests without one are captured every time."""
    tolerance: PositiveFloat = 300.0
    """Seconds the signed timestamp may differ from our clock (either way) before a 401."""
    version_field: FieldPath | None = None
    """Path of the event's version: an integer, or an ISO-8601 timestamp (microseconds since the
    epoch). Default: the signed timestamp in microseconds (plus the event's index in a batch)."""
    type_field: FieldPath | None = None
    """Path of the event type (a string)."""
    delete_types: list[str] = msgspec.field(default_factory=list)
    """Event types that mean the entity was deleted (needs ``type_field``)."""
    accept_types: list[str] | None = None
    """Only these event types become changes; others are answered 200 ``ignored`` (needs
    ``type_field``; default: every type)."""
    row_field: FieldPath | None = None
    """Path of the object that becomes the row (default: the whole event)."""
    batch: bool = False
    """Also accept a JSON array of events in one request (all captured together, or none)."""
    max_body_bytes: PositiveInt = 1 << 20
    """Larger request bodies are refused with 413."""
    header_timeout: PositiveFloat = 10.0
    """Seconds a sender has to send a request's headers (after connecting or after the previous
    response on a kept-alive connection); a slower one is cut off (slowloris)."""
    body_timeout: PositiveFloat = 30.0
    """Seconds a sender has to send a request's body once its headers are in."""
    queue_size: PositiveInt = 1000
    """Requests waiting for the agent to capture them; when full: 503 with ``Retry-After``."""
    ack_timeout: PositiveFloat = 10.0
    """Seconds a request waits for its events to reach the outbox before a 503."""
    retry_after: PositiveInt = 5
    """Seconds sent in ``Retry-After`` with every 503."""
    id_retention: PositiveFloat = 7 * 24 * 3600.0
    """Seconds delivery ids are remembered. Keep it longer than the sender retries."""
    batch_size: PositiveInt = 1000
    """Most changes the capture loop takes per outbox transaction."""

    def __post_init__(self) -> None:
        exactly_one(self.secret_env, self.secret_file, "secret")
        if (self.delete_types or self.accept_types is not None) and self.type_field is None:
            raise ValueError("type_field: required with delete_types or accept_types")
        ts_header = self.timestamp_header
        if ts_header is not None and ts_header.lower() == self.signature_header.lower():
            raise ValueError("timestamp_header: must differ from signature_header")

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(
            self,
            state_path=resolve(self.state_path),
            secret_file=None if self.secret_file is None else resolve(self.secret_file),
            rotation_secret_files=[resolve(p) for p in self.rotation_secret_files],
        )
