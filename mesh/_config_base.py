"""The pieces every config Struct builds on: the strict base Structs and the shared field types.

Kept apart from :mod:`mesh.config` (which re-exports them) so that :mod:`mesh.plugins` can check
adapter declarations against :class:`AdapterConfig` while :mod:`mesh.config` decodes flows through
the registry, without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Self

import msgspec

from mesh.errors import ConfigProblem

__all__ = [
    "AdapterConfig",
    "ConfigStruct",
    "EnvName",
    "FieldPath",
    "HeaderName",
    "PositiveFloat",
    "PositiveInt",
    "Token",
]

# Names end up in NATS subjects and consumer names: keep them to one safe token.
TOKEN_PATTERN = r"^[A-Za-z0-9_-]+$(?!\n)"
Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN, min_length=1, max_length=64)]
"""A name that is safe in a NATS subject: letters, digits, ``_`` and ``-``, 1 to 64 of them."""
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
EnvName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$(?!\n)", max_length=128)]
"""The name of an environment variable that holds a secret (configs reference secrets, never
hold them)."""
HeaderName = Annotated[str, msgspec.Meta(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$(?!\n)", max_length=128)]
"""An HTTP header name."""
FieldPath = Annotated[str, msgspec.Meta(pattern=r"^[^.]+(\.[^.]+)*$", max_length=256)]
"""A dotted path into a JSON document: ``data.object.id``."""


class ConfigStruct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every config table: frozen, keyword-only, and an unknown key is an error."""


class AdapterConfig(ConfigStruct, frozen=True, tag_field="adapter"):
    """Base of every source and sink config.

    A subclass names its adapter with the Struct's ``tag`` (``class JsonlSourceConfig(AdapterConfig,
    frozen=True, tag="jsonl")``): that is the value of ``adapter = "..."`` in a flow's
    ``[flows.source]`` / ``[flows.sink]`` table, and must equal the plugin's name.
    """

    @property
    def batch_size(self) -> int:
        """Source configs: the most changes the capture loop asks ``read()`` for at once (one
        outbox transaction). 1000 unless the config declares a ``batch_size`` field of its own."""
        return 1000

    def resolved(self, resolve: Callable[[str], str]) -> Self:
        """This config with its file paths made absolute by ``resolve`` (relative to the config
        file's directory). Adapters with file-path fields override it."""
        return self

    def problems(self) -> list[ConfigProblem]:
        """Consistency problems the field types cannot express, as (path relative to this table,
        message); checked when a config is loaded or a flow applied. Default: none. (A
        ``__post_init__`` raising ``ValueError`` works too, but names only the table.)"""
        return []
