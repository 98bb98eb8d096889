"""The JetStream client's header parser gives what nats-py's own gives, for any header block."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from mesh.transport.jetstream import _Client

PIECES = [
    b"Nats-Msg-Id",
    b"a",
    b"B",
    b":",
    b" ",
    b"\t",
    b"\r\n",
    b"\r",
    b"\n",
    b"\x0b",
    b"\x1c",
    b"\xff",
    b"\xc3\xa9",
    b"-",
]


def test_the_usual_header_blocks() -> None:
    for raw in (
        b"Nats-Msg-Id: 6f1c2a47-3c1e-4a59-9d0e-8a6c0b7f5e21\r\n\r\n",
        b"Mesh-Run: r1\r\nNats-Msg-Id: x\r\nMesh-Run: r2\r\n",  # the last of a repeated name wins
        b"", b"\r\n", b"a:b", b"a b: c\r\nd:e\r\n", b": empty name\r\n", b"k\x1c: v\r\n",
        b"caf\xc3\xa9: x\r\nok: \xff\r\n", b"a:\tb \r\n", b"no colon\r\nx: 1\r\n",
    ):  # fmt: skip
        assert _Client._parse_header_lines(raw) == Client._parse_header_lines(raw), raw


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=16))
def test_any_header_block(pieces: list[bytes]) -> None:
    raw = b"".join(pieces)
    assert _Client._parse_header_lines(raw) == Client._parse_header_lines(raw)
