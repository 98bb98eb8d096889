"""The relay's publish frames are byte for byte what nats-py's own ``publish`` would write.

:meth:`JetStream.publish_many` hands a window chunk to nats-py as one buffer of ``HPUB`` frames
instead of calling ``publish`` per message; the server must see exactly the same messages
(the same ``Nats-Msg-Id``, the same headers, the same refusals of a malformed subject or header).
nats-py's frame is taken from an unconnected client's pending buffer (no socket).
"""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from mesh.envelope import CONTENT_TYPE
from mesh.transport import OutMessage
from mesh.transport.jetstream import _hpub, _Unsendable

_LIMIT = 1024 * 1024


def nats_py_frame(m: OutMessage, reply: str) -> bytes:
    async def frame() -> bytes:
        nc = Client()
        nc._max_pending_size = 1 << 30  # buffer while not connected, as during a reconnect
        headers = {"Nats-Msg-Id": m.msg_id, "Content-Type": CONTENT_TYPE, **m.headers}
        await nc.publish(m.subject, m.data, reply=reply, headers=headers)
        return b"".join(nc._pending)

    return asyncio.run(frame())


def test_an_envelope_frame_is_nats_py_s() -> None:
    m = OutMessage("evt.event.upserted.erp", b"\x8a\xa2id", "9ed7eb12-0f66-51eb-8d61-e5467c3d097e")
    assert _hpub(m, "_INBOX.a.b.1f", _LIMIT) == nats_py_frame(m, "_INBOX.a.b.1f")


def test_a_dead_letter_frame_with_its_headers_is_nats_py_s() -> None:
    headers = {"Mesh-Reason": " two\r\nlines ", "Mesh-Flow": "bench", "Nats-Msg-Id": "x"}
    m = OutMessage("dlq.bench", b"{}", "id-1", headers)
    assert _hpub(m, "_INBOX.r.7", _LIMIT) == nats_py_frame(m, "_INBOX.r.7")


_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)


@settings(max_examples=300, deadline=None)
@given(
    msg_id=_text,
    headers=st.dictionaries(st.sampled_from(["Mesh-Run", " Mesh-Stage", "", "bad key", "Mesh:x"]), _text),
    data=st.binary(max_size=40),
)
def test_any_message_is_framed_as_nats_py_does_or_refused_as_it_is(
    msg_id: str, headers: dict[str, str], data: bytes
) -> None:
    m = OutMessage("evt.x.upserted.erp", data, msg_id, headers)
    try:
        expected = nats_py_frame(m, "_INBOX.r.1")
    except nats.errors.Error:
        with pytest.raises(_Unsendable):
            _hpub(m, "_INBOX.r.1", _LIMIT)
        return
    assert _hpub(m, "_INBOX.r.1", _LIMIT) == expected


@pytest.mark.parametrize("subject", ["", "evt.a b", "evt.a\r\nPUB x 1", "evt.\tx"])
def test_a_subject_nats_py_refuses_is_not_sent(subject: str) -> None:
    m = OutMessage(subject, b"x", "id")
    with pytest.raises(nats.errors.Error):
        nats_py_frame(m, "_INBOX.r.1")
    with pytest.raises(_Unsendable):
        _hpub(m, "_INBOX.r.1", _LIMIT)


def test_a_payload_over_the_server_s_limit_is_not_sent() -> None:
    with pytest.raises(_Unsendable):
        _hpub(OutMessage("evt.x", b"x" * 11, "id"), "_INBOX.r.1", 10)
