"""JSON REST API adapters through httpx. Import the module you need (``adapters.rest.sink``).

Only a sink exists so far (:class:`adapters.rest.sink.RestSink`); the private modules hold its
parts: ``_auth`` (secrets from the environment), ``_ratelimit`` (token bucket and 429 pauses),
``_retry`` (backoff, ``Retry-After``, circuit breaker) and ``_state`` (the local version guard).
"""

__all__: list[str] = []
