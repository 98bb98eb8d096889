"""JSON REST API adapters through httpx. Import the module you need (``adapters.rest.sink``).

A sink (:class:`adapters.rest.sink.RestSink`) and a source
(:class:`adapters.rest.source.RestSource`); the private modules hold their shared parts:
``_auth`` (secrets from the environment, OAuth2 client credentials), ``_ratelimit`` (token
bucket and 429 pauses), ``_retry`` (backoff, ``Retry-After``, circuit breaker) and ``_state``
(the sink's local version guard).
"""

__all__: list[str] = []
