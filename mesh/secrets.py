"""Secret references: configs name where a secret is, never the secret itself.

Every secret field comes as a pair: ``<name>_env`` (an environment variable) and ``<name>_file``
(a file, e.g. a Kubernetes secret mount, read when the adapter or connection opens; one trailing
newline is stripped). Exactly one of the two is set. :func:`read_secret` reads either and fails
with one clear line naming the field, never the value.

Static HTTP headers are for harmless values only: :func:`secret_header_problem` refuses the
headers that carry credentials (``Authorization``, ``Cookie``, ``Proxy-Authorization``,
``X-Api-Key`` and any name containing token, secret, api-key, apikey, password or auth), so a
credential cannot end up in a flow file, the ``mesh_flows`` KV bucket or ``meshctl flow get``;
such headers go in ``headers_env`` / ``headers_file`` (header name -> variable / file).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated

import msgspec

from mesh.errors import ConfigError

__all__ = [
    "SecretFile",
    "env_problems",
    "env_references",
    "exactly_one",
    "read_secret",
    "secret_header_problem",
]

SecretFile = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
"""The path of a file that holds one secret (relative paths: to the config file, or for an
applied flow to the agent's state_dir, where it must stay like every other path)."""

_SECRET_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "x-api-key", "set-cookie"})
_SECRET_WORDS = re.compile(r"token|secret|api-?key|apikey|password|passwd|auth|session|credential", re.I)
_MAX_SECRET_BYTES = 64 * 1024


def secret_header_problem(name: str) -> str | None:
    """Why a static header ``name`` may not be configured with a literal value, or None."""
    if name.lower() in _SECRET_HEADERS or _SECRET_WORDS.search(name.replace("_", "-")):
        return (
            f"a static {name!r} header would keep a credential in the config (and in KV and "
            f'`flow get`); reference it instead: headers_env = {{ {name!r} = "ENV_VAR" }} or '
            f'headers_file = {{ {name!r} = "/path/to/secret" }}'
        )
    return None


def exactly_one(env: str | None, file: str | None, name: str) -> None:
    """Check a secret pair in a config's ``__post_init__``.

    Raises:
        ValueError: both or neither of ``<name>_env`` and ``<name>_file`` are set.
    """
    if (env is None) == (file is None):
        raise ValueError(f"{name}_env / {name}_file: set exactly one of them")


def read_secret(
    env: str | None,
    file: str | None,
    *,
    field: str,
    what: str,
    environ: Mapping[str, str] | None = None,
    label: str | None = None,
) -> str:
    """The secret named by the environment variable ``env`` or held in ``file``.

    ``field`` is the config field's name without ``_env``/``_file`` (for the message; ``label``
    replaces the whole field name when it is not such a pair, e.g. ``headers_env.X-Token``),
    ``what`` says what the secret is for (``"REST sink"``).

    Raises:
        ConfigError: the variable is unset or empty, the file cannot be read, is empty or not
            text, or neither reference is given. The message names the variable or file and the
            field, never the value.
    """
    if env is not None:
        value = (os.environ if environ is None else environ).get(env, "")
        if not value:
            where = label or f"{field}_env"
            raise ConfigError(f"{where}: environment variable {env} (a {what} secret) is not set or empty")
        return value
    if file is None:
        raise ConfigError(f"{field}_env / {field}_file: no secret configured for the {what}")
    field_file = label or f"{field}_file"
    try:
        with Path(file).open("rb") as fh:
            data = fh.read(_MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ConfigError(
            f"{field_file}: cannot read the {what} secret file {file}: {exc.strerror or exc}"
        ) from None
    if len(data) > _MAX_SECRET_BYTES:
        raise ConfigError(f"{field_file}: {file} is larger than {_MAX_SECRET_BYTES} bytes; not a secret file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{field_file}: {file} is not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    if not text:
        raise ConfigError(f"{field_file}: the {what} secret file {file} is empty")
    return text


def env_references(config: object, path: str = "flow") -> list[tuple[str, str]]:
    """Every environment variable an adapter config references as a secret: ``(field path,
    variable name)`` for each ``*_env`` string and each value of a ``*_env`` table (e.g.
    ``headers_env``), at any depth."""
    found: list[tuple[str, str]] = []
    if isinstance(config, dict):
        for key, value in config.items():
            where = f"{path}.{key}"
            if isinstance(key, str) and key.endswith("_env"):
                if isinstance(value, str):
                    found.append((where, value))
                elif isinstance(value, dict):
                    found += [(f"{where}.{k}", v) for k, v in value.items() if isinstance(v, str)]
                continue
            found += env_references(value, where)
    elif isinstance(config, list):
        for i, item in enumerate(config):
            found += env_references(item, f"{path}[{i}]")
    return found


def env_problems(config: object, allowed_env: Sequence[str], path: str = "flow") -> list[tuple[str, str]]:
    """``(field path, message)`` for every environment variable ``config`` (a flow applied
    through the control plane) references that matches none of the agent's ``allowed_env``
    patterns (shell-style, e.g. ``CRM_*``)."""
    return [
        (where, f"environment variable {name!r} is not in this agent's agent.allowed_env; "
                "applied flows may only read the secrets it lists")
        for where, name in env_references(config, path)
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed_env)
    ]  # fmt: skip
