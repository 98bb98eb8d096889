"""Our NATS JWT v2 encoder/decoder: round trip, tamper detection, jti, expiry, bad input."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import ConfigError
from mesh.security import jwt
from mesh.security.jwt import (
    AccountClaims,
    Claims,
    InvalidToken,
    OperatorClaims,
    Permission,
    ResponsePermission,
    UserClaims,
)


def _keys(kind: str) -> tuple[bytes, str]:
    seed = jwt.new_seed(kind)
    return seed, jwt.public_key_of_seed(seed)


ACCOUNT_SEED, ACCOUNT = _keys("account")
USER_SEED, USER = _keys("user")


def _user(exp: int | None = None, name: str = "A") -> Claims:
    return Claims(
        sub=USER,
        iss=ACCOUNT,
        name=name,
        exp=exp,
        nats=UserClaims(
            pub=Permission(allow=["evt.*.*.crm"]),
            sub=Permission(allow=["_INBOX.A.>"]),
            resp=ResponsePermission(1, 0),
            issuer_account=ACCOUNT,
        ),
    )


def _parts(token: str) -> list[bytes]:
    return [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in token.split(".")]


def test_round_trip_keeps_every_claim() -> None:
    token = jwt.encode(_user(), ACCOUNT_SEED)
    claims = jwt.decode(token, trusted=ACCOUNT, kind=UserClaims)
    assert claims.sub == USER
    assert claims.iss == ACCOUNT
    assert claims.name == "A"
    assert isinstance(claims.nats, UserClaims)
    assert claims.nats.pub.allow == ["evt.*.*.crm"]
    assert claims.nats.resp == ResponsePermission(1, 0)
    assert abs(claims.iat - time.time()) < 60


def test_wire_format_is_nats_v2() -> None:
    token = jwt.encode(_user(), ACCOUNT_SEED)
    header, body, signature = _parts(token)
    assert json.loads(header) == {"typ": "JWT", "alg": "ed25519-nkey"}
    payload = json.loads(body)
    # nats-io/jwt refuses a JWT without nats.version (it reads it as version 0)
    assert payload["nats"]["version"] == 2
    assert payload["nats"]["type"] == "user"
    assert payload["nats"]["subs"] == payload["nats"]["data"] == payload["nats"]["payload"] == -1
    assert "=" not in token
    assert len(signature) == 64


def test_account_claims_encode_jetstream_revocations_and_signing_keys() -> None:
    op_seed = jwt.new_seed("operator")
    op = jwt.public_key_of_seed(op_seed)
    claims = Claims(
        sub=ACCOUNT,
        iss=op,
        name="MESH",
        nats=AccountClaims(signing_keys=["AKEY"], revocations={USER: 123}),
    )
    payload = json.loads(_parts(jwt.encode(claims, op_seed))[1])["nats"]
    assert payload["limits"]["disk_storage"] == -1
    assert payload["limits"]["mem_storage"] == -1
    assert payload["signing_keys"] == ["AKEY"]
    assert payload["revocations"] == {USER: 123}
    assert payload["version"] == 2
    assert payload["type"] == "account"


def test_jti_is_base32_sha512_256_of_the_claims_without_jti_like_nats_io_jwt() -> None:
    token = jwt.encode(_user(), ACCOUNT_SEED)
    claims = jwt.decode(token)
    unsigned = msgspec.json.encode(msgspec.structs.replace(claims, jti=""))
    expected = base64.b32encode(hashlib.new("sha512_256", unsigned).digest()).rstrip(b"=").decode()
    assert claims.jti == expected
    other = jwt.decode(jwt.encode(_user(name="B"), ACCOUNT_SEED))
    assert other.jti != claims.jti


def test_tampered_claims_are_refused() -> None:
    token = jwt.encode(_user(), ACCOUNT_SEED)
    header, _body, sig = token.split(".")
    widened = json.loads(_parts(token)[1])
    widened["nats"]["pub"]["allow"] = [">"]
    forged_body = base64.urlsafe_b64encode(json.dumps(widened).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidToken, match="bad signature"):
        jwt.decode(f"{header}.{forged_body}.{sig}")


def test_untrusted_issuer_is_refused_even_when_self_consistent() -> None:
    other_seed, other = _keys("account")
    forged = jwt.encode(msgspec.structs.replace(_user(), iss=other), other_seed)
    with pytest.raises(InvalidToken, match="not a trusted key"):
        jwt.decode(forged, trusted={ACCOUNT, "ASIGNING"})
    assert jwt.decode(forged, trusted=[other]).iss == other


def test_expiry_is_enforced() -> None:
    token = jwt.encode(_user(exp=int(time.time()) + 100), ACCOUNT_SEED)
    assert jwt.decode(token, trusted=ACCOUNT).exp is not None
    with pytest.raises(InvalidToken, match="expired at"):
        jwt.decode(token, trusted=ACCOUNT, now=time.time() + 101)


def test_wrong_kind_is_refused() -> None:
    token = jwt.encode(_user(), ACCOUNT_SEED)
    with pytest.raises(InvalidToken, match="where a OperatorClaims was expected"):
        jwt.decode(token, kind=OperatorClaims)


def test_signing_with_another_seed_than_iss_is_refused() -> None:
    with pytest.raises(InvalidToken, match="not the key of iss"):
        jwt.encode(_user(), USER_SEED)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a.b",
        "a.b.c.d",
        "!!!.???.###",
        "e30.e30.e30",  # {} . {} . {}
        base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"HS256"}').decode().rstrip("=") + ".e30.e30",
    ],
)
def test_bad_input_is_one_clear_error(token: str) -> None:
    with pytest.raises(InvalidToken) as info:
        jwt.decode(token)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ConfigError)


@given(st.text(max_size=300))
def test_any_text_is_a_clear_error_never_a_crash(text: str) -> None:
    with pytest.raises(InvalidToken):
        jwt.decode(text)


@pytest.mark.parametrize(
    ("key", "kind", "message"),
    [
        ("UNOTAKEY", None, "bad base32|not an nkey"),
        (USER[:-1] + ("A" if USER[-1] != "A" else "B"), None, "checksum|not an nkey"),
        (USER, "account", "not an account public key"),
    ],
    ids=["not-base32", "bad-checksum", "wrong-kind"],
)
def test_bad_public_keys(key: str, kind: str | None, message: str) -> None:
    with pytest.raises(InvalidToken, match=message):
        jwt.public_key(key, kind)


def test_bad_seed() -> None:
    with pytest.raises(InvalidToken, match="not a valid nkey seed"):
        jwt.public_key_of_seed("SUAnotaseed")
