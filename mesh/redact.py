"""Redaction: secrets never reach a log line, an error message or a repr.

:func:`redact_urls` replaces the userinfo of every ``scheme://user:password@host`` in a text
with ``***`` (``nats://***@hub:4222``). The log formatters apply it to every line, so a URL with
credentials that slips into a message is still not written; code that builds error messages or
reprs from configured URLs applies it itself (errors are printed by the CLI, not only logged).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["redact_urls"]

# scheme://<userinfo>@ — userinfo may hold percent-encoded bytes and any character but '/', '@'
# and whitespace; the last '@' before the host ends it (passwords may contain '@' encoded only).
# The scheme may follow any character, a letter or digit included ("0nats://u:p@h"): no \b.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


def redact_urls(text: str | Iterable[str]) -> str:
    """``text`` (or the items of a list, joined by ", ") with the userinfo of every URL hidden."""
    if not isinstance(text, str):
        text = ", ".join(text)
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)
