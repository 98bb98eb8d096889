"""System API operations on a JSON REST API: the ``operation`` role of the ``rest`` adapter
(README "System APIs").

One HTTP request per call: ``method`` to ``path`` (a template: ``/orders/{id}`` takes the
request field ``id``, URL-encoded), with the query parameters of ``query`` (name -> request path)
and, except for GET and DELETE, a JSON body: the whole request, or the fields ``body`` maps
(body field -> dotted request path). The result is the response JSON, or the part at
``response_path`` (dotted). The idempotency key (already hashed) goes in the
``idempotency_header`` (default ``Idempotency-Key``), so an API that honours it never applies a
retried call twice; the mesh itself replays stored results (``mesh_api_results``) but cannot see
inside an API that ignores the header, so a call whose claim was abandoned by a crashed replica
is sent again with the same key.

Status codes: 2xx ok; 404 ``not_found``; 409 ``conflict``; 400, 422 and other 4xx ``rejected``
(the API refused, with its message); 408, 429, 5xx and connection failures ``unavailable``.
"""

from __future__ import annotations

import contextlib
import re
import urllib.parse
from collections.abc import Callable
from typing import Annotated, Any, Literal, Self

import msgspec

from adapters.rest.config import RestAuth, _resolve_auth
from mesh._config_base import AdapterConfig, PositiveFloat, Token
from mesh.api import ApiError, Call, Operation
from mesh.errors import ConfigProblem, SystemUnavailable
from mesh.policy import policy_gate

__all__ = ["RestOperation", "RestOperationConfig"]

_FIELD = re.compile(r"\{([A-Za-z_][\w.]*)\}")


class RestOperationConfig(AdapterConfig, frozen=True, tag="rest"):
    base_url: Annotated[str, msgspec.Meta(pattern=r"^https?://[^/?#@]+(/[^?#]*)?$")]
    path: Annotated[str, msgspec.Meta(min_length=1)]
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    body: dict[str, str] | None = None
    query: dict[str, str] = {}
    response_path: str = ""
    idempotency_header: str | None = "Idempotency-Key"
    headers: dict[str, str] = {}
    auth: RestAuth | None = None
    timeout: PositiveFloat = 10.0
    policy: Token | None = None
    """A shared API policy (``[policies.<name>]`` in the agent config) every call passes:
    rate, concurrency and daily quota shared with every agent naming it (README "Shared rate
    limits and quotas (API policy)"); a spent quota answers ``unavailable``."""

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        return msgspec.structs.replace(self, auth=_resolve_auth(self.auth, resolve))

    def problems(self) -> list[ConfigProblem]:
        if not self.path.startswith("/"):
            return [ConfigProblem("path", "must start with '/'")]
        return []


def _get(request: dict[str, Any], path: str) -> Any:
    value: Any = request
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ApiError("bad_request", f"request: {path}: missing (the REST call needs it)", False)
        value = value[part]
    return value


def _message(response: Any) -> str:
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        for k in ("message", "error", "detail", "reason"):
            if isinstance(doc.get(k), str):
                return str(doc[k])[:300]
    return (response.text or response.reason_phrase or "")[:300]


class RestOperation(Operation):
    """One operation on a REST API (one httpx client per operation)."""

    def __init__(self, cfg: RestOperationConfig) -> None:
        self.cfg = cfg
        self._client: Any = None

    def __repr__(self) -> str:
        return f"<RestOperation {self.cfg.method} {self.cfg.base_url}{self.cfg.path}>"

    async def open(self) -> None:
        import httpx

        from adapters.rest._auth import Credentials

        creds = Credentials(self.cfg.auth, what="REST operation")
        self._client = httpx.AsyncClient(
            base_url=self.cfg.base_url,
            headers={**self.cfg.headers, **creds.headers},
            timeout=httpx.Timeout(self.cfg.timeout),
            follow_redirects=False,
            auth=creds.auth,
        )
        creds.bind(self._client)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def run(self, request: dict[str, Any], call: Call) -> Any:
        import httpx

        cfg = self.cfg
        path = _FIELD.sub(lambda m: urllib.parse.quote(str(_get(request, m.group(1))), safe=""), cfg.path)
        params = {name: _get(request, p) for name, p in cfg.query.items()}
        headers: dict[str, str] = {}
        if call.key is not None and cfg.idempotency_header:
            headers[cfg.idempotency_header] = call.key
        if call.traceparent:
            headers["traceparent"] = call.traceparent
        if call.correlation_id:
            headers["X-Correlation-Id"] = call.correlation_id
        json_body: Any = None
        if cfg.method not in ("GET", "DELETE"):
            json_body = request if cfg.body is None else {k: _get(request, p) for k, p in cfg.body.items()}
        where = f"{cfg.method} {cfg.base_url}{cfg.path}"
        try:
            async with contextlib.AsyncExitStack() as stack:
                if cfg.policy is not None:
                    gate = policy_gate(cfg.policy)
                    await gate.acquire()
                    await stack.enter_async_context(gate.slot())
                response = await self._client.request(
                    cfg.method, path, params=params or None, json=json_body, headers=headers
                )
        except httpx.HTTPError as exc:
            raise SystemUnavailable(f"{where}: {type(exc).__name__}") from None
        status = response.status_code
        if 200 <= status < 300:
            if not response.content:
                return {}
            try:
                doc = response.json()
            except ValueError:
                raise ApiError("internal", f"{where}: the answer is not JSON", False) from None
            for part in filter(None, cfg.response_path.split(".")):
                if not isinstance(doc, dict) or part not in doc:
                    raise ApiError("internal", f"{where}: the answer has no {cfg.response_path}", False)
                doc = doc[part]
            return doc
        text = f"{where} answered {status}: {_message(response)}"
        if status == 404:
            raise ApiError("not_found", text, False)
        if status == 409:
            raise ApiError("conflict", text, False)
        if status in (408, 429) or status >= 500:
            raise SystemUnavailable(text)
        raise ApiError("rejected", text, False)
