"""Fuzzing the secret checks: the PostgreSQL DSN check of the SQL adapters' configs and
:func:`mesh.redact.redact_urls`.

Properties: any DSN is accepted or refused with a one-line ConfigError that never repeats it; an
accepted DSN holds no password in libpq's own reading; a password put in any form libpq takes
(``password=``, URL userinfo, ``?password=``, percent-encoded key or value) is refused without
being echoed; DSNs without one are accepted. ``redact_urls`` never fails, never leaves the
password of a generated URL in its output, keeps text without URLs unchanged, and is idempotent.
"""

from __future__ import annotations

import string
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

from mesh.config import decode_adapter_config
from mesh.errors import ConfigError
from mesh.redact import redact_urls
from tests.fuzz._support import assert_clear_config_error, text_any

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(600)]


def _refused_without_echo(exc: ConfigError, dsn: str) -> None:
    assert_clear_config_error(exc)
    assert all(len(dsn) < 6 or dsn not in m for _, m in exc.problems), "the DSN is echoed"


def _decode(role: str, dsn: str) -> Any:
    spec = {"adapter": "postgres", "dsn": dsn, "table": "t", "key": "id"}
    return decode_adapter_config(role, spec)  # type: ignore[arg-type]


dsn_text = text_any | st.lists(
    st.sampled_from(
        [
            "host=db",
            "dbname=erp",
            "user=mesh",
            "password=",
            "'",
            "\\",
            " ",
            "=",
            "postgresql://",
            "@",
            ":",
            "/",
            "?",
            "&",
            "%",
            "%70",
            "#",
            "passfile=x",
            "service=s",
            "sslmode=require",
        ]
    )
    | text_any,
    max_size=8,
).map("".join)


@given(st.sampled_from(["source", "sink"]), dsn_text)
@example("source", "postgresql://mesh@db/erp?password")
@example("sink", "host=db password='")
def test_any_dsn_is_accepted_without_a_password_or_refused_without_echo(role: str, dsn: str) -> None:
    assume(dsn)
    try:
        cfg = _decode(role, dsn)
    except ConfigError as exc:
        _refused_without_echo(exc, dsn)
        return
    assert not conninfo_to_dict(cfg.dsn).get("password")


_REFUSAL = "must not hold a password (name an environment variable in password_env)"
"""The fixed text of the refusal (adapters/sql/config.py)."""

secret_words = st.text(
    string.ascii_letters + string.digits + "!$&()*+,;=-._~ #@:/?'\\%", min_size=6, max_size=20
)
hosts = st.sampled_from(["db", "db.internal", "10.0.0.7", "[::1]"])


def _libpq_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@st.composite
def dsns_with_a_password(draw: st.DrawFn) -> tuple[str, str]:
    password = draw(secret_words.filter(lambda p: p.strip() == p))
    host = draw(hosts)
    form = draw(st.sampled_from(["keyword", "userinfo", "query", "query-encoded-key", "userinfo-encoded"]))
    if form == "keyword":
        dsn = f"host={host} dbname=erp user=mesh password={_libpq_quote(password)}"
    elif form == "userinfo":
        dsn = f"postgresql://mesh:{quote(password, safe='')}@{host}/erp"
    elif form == "userinfo-encoded":
        encoded = "".join(f"%{b:02X}" for b in password.encode())
        dsn = f"postgres://mesh:{encoded}@{host}/erp"
    elif form == "query":
        dsn = f"postgresql://mesh@{host}/erp?sslmode=prefer&password={quote(password, safe='')}"
    else:
        dsn = f"postgresql://mesh@{host}/erp?%70assword={quote(password, safe='')}"
    return dsn, password


@given(st.sampled_from(["source", "sink"]), dsns_with_a_password())
def test_a_password_in_any_form_is_refused_and_never_echoed(role: str, case: tuple[str, str]) -> None:
    dsn, password = case
    with pytest.raises(ConfigError) as info:
        _decode(role, dsn)
    assert_clear_config_error(info.value)
    # A password that is a word of the refusal itself ("passwo") cannot tell an echo apart.
    text = str(info.value).replace(_REFUSAL, "")
    assert password not in text
    assert quote(password, safe="") not in text


@given(
    st.sampled_from(["source", "sink"]),
    hosts,
    st.sampled_from(["erp", "north_wind"]),
    st.text(string.ascii_lowercase + "_", min_size=1, max_size=10),
)
def test_dsns_without_a_password_are_accepted(role: str, host: str, db: str, user: str) -> None:
    for dsn in (f"host={host.strip('[]')} dbname={db} user={user}", f"postgresql://{user}@{host}/{db}"):
        assert _decode(role, dsn).dsn == dsn


# --- redact_urls -----------------------------------------------------------------------------------

schemes = st.sampled_from(["nats", "tls", "postgresql", "https", "ws", "s3+https"])
userinfo_chars = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:%"


@st.composite
def urls_with_a_password(draw: st.DrawFn) -> tuple[str, str]:
    user = draw(st.text(string.ascii_letters + string.digits + "-._~", max_size=8))
    password = draw(st.text(userinfo_chars, min_size=4, max_size=20).filter(lambda p: p.strip(":") == p))
    host = draw(st.sampled_from(["hub", "hub.example.com", "10.0.0.1", "[::1]"]))
    port = draw(st.sampled_from(["", ":4222", ":5432"]))
    path = draw(st.sampled_from(["", "/", "/erp?sslmode=require", "/x#frag"]))
    return f"{draw(schemes)}://{user}:{password}@{host}{port}{path}", password


@given(
    st.lists(urls_with_a_password(), min_size=1, max_size=3),
    st.lists(text_any, min_size=4, max_size=4),
    st.booleans(),
)
@example([("nats://u:p%40ss@hub:4222", "p%40ss")], ["", "", "", ""], False)
@example([("nats://a:b@c@hub:4222", "b@c")], ["connect to ", " failed", "", ""], False)
def test_redact_urls_never_leaves_a_password(
    urls: list[tuple[str, str]], around: list[str], as_list: bool
) -> None:
    pieces = [u for u, _ in urls]
    text: Any = pieces if as_list else around[0] + " ".join(pieces) + around[1]
    out = redact_urls(text)
    for _url, password in urls:
        assume(password not in (around[0] + around[1]))
        assert password not in out, f"{password!r} left in {out!r}"
    assert redact_urls(out) == out


@given(st.text(st.characters(codec="utf-8"), max_size=200))
def test_redact_urls_takes_any_text(text: str) -> None:
    out = redact_urls(text)
    assert redact_urls(out) == out
    if "://" not in text:
        assert out == text
