"""A security dir (``meshctl security init``), the authority that loads it, .creds files,
enrollment tokens, account revocations and the nats-server config."""

from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mesh.cli.main import app
from mesh.errors import ConfigError
from mesh.security.authority import (
    ENROLL_PREFIX,
    Authority,
    creds_text,
    parse_enrollment_token,
    read_creds,
    write_creds,
)
from mesh.security.jwt import (
    AccountClaims,
    InvalidToken,
    OperatorClaims,
    UserClaims,
    decode,
    new_seed,
    public_key_of_seed,
)
from mesh.security.permissions import agent_permissions
from mesh.security.setup import init_security_dir, server_config

EXPECTED = {
    "operator.jwt",
    "keys/operator.nk",
    "keys/operator-signing.nk",
    "keys/sys-account.nk",
    "keys/mesh-account.nk",
    "keys/mesh-account-signing.nk",
    "creds/admin.creds",
    "creds/control-plane.creds",
    "creds/sys.creds",
    "accounts/SYS.jwt",
    "accounts/MESH.jwt",
    "security.json",
    "nats-auth.conf",
}


@pytest.fixture(scope="module")
def sec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sec") / "sec"
    init_security_dir(d)
    return d


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_writes_every_file_private(sec: Path) -> None:
    files = {str(p.relative_to(sec)) for p in sec.rglob("*") if p.is_file()}
    assert files == EXPECTED
    for p in sec.rglob("*"):
        assert _mode(p) == (0o700 if p.is_dir() else 0o600), p
    assert _mode(sec) == 0o700


def test_init_chain_of_trust(sec: Path) -> None:
    keys = json.loads((sec / "security.json").read_text())
    op = decode((sec / "operator.jwt").read_text(), trusted=keys["operator"], kind=OperatorClaims)
    assert isinstance(op.nats, OperatorClaims)
    assert op.nats.signing_keys == [keys["operator_signing_key"]]
    assert op.nats.system_account == keys["system_account"]
    mesh = decode((sec / "accounts/MESH.jwt").read_text(), trusted=op.nats.signing_keys, kind=AccountClaims)
    assert isinstance(mesh.nats, AccountClaims)
    assert mesh.sub == keys["mesh_account"]
    assert mesh.nats.signing_keys == [keys["mesh_account_signing_key"]]
    assert mesh.nats.limits.disk_storage == -1  # JetStream on
    sys_acc = decode((sec / "accounts/SYS.jwt").read_text(), trusted=op.nats.signing_keys)
    assert sys_acc.sub == keys["system_account"]
    for name in ("admin", "control-plane"):
        creds = read_creds(sec / "creds" / f"{name}.creds")
        claims = decode(creds.jwt, trusted=keys["mesh_account_signing_key"], kind=UserClaims)
        assert isinstance(claims.nats, UserClaims)
        assert creds.name == name
        assert claims.nats.issuer_account == keys["mesh_account"]
    assert decode(read_creds(sec / "creds/sys.creds").jwt, trusted=keys["system_account"]).name == "sys"
    for name, seed_file in (("operator", "operator"), ("mesh_account", "mesh-account")):
        assert public_key_of_seed((sec / "keys" / f"{seed_file}.nk").read_text()) == keys[name]


def test_auth_config_uses_the_full_resolver_and_preloads_both_accounts(sec: Path) -> None:
    conf = (sec / "nats-auth.conf").read_text()
    keys = json.loads((sec / "security.json").read_text())
    assert "type: full" in conf
    assert "allow_delete: false" in conf
    assert 'interval: "2m"' in conf
    assert f"system_account: {keys['system_account']}" in conf
    assert f"  {keys['mesh_account']}: " in conf
    assert f"  {keys['system_account']}: " in conf
    assert str(sec / "resolver") in conf


def test_init_refuses_a_non_empty_dir_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("mine")
    with pytest.raises(ConfigError, match=r"not empty.*--force"):
        init_security_dir(tmp_path)
    first = init_security_dir(tmp_path, force=True)
    assert {str(p.relative_to(tmp_path)) for p in first} == EXPECTED


def test_cli_init(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["security", "init", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "creds/admin.creds" in result.output
    assert "nats-auth.conf" in result.output
    again = runner.invoke(app, ["security", "init", str(tmp_path / "s")])
    assert again.exit_code == 2
    assert "is not empty" in again.output
    assert "Traceback" not in again.output


def test_server_config(sec: Path, tmp_path: Path) -> None:
    conf = server_config(sec, resolver_dir=tmp_path / "r", store_dir=tmp_path / "st", port=4333)
    assert 'listen: "127.0.0.1:4333"' in conf
    assert str(tmp_path / "st") in conf
    assert "tls" not in conf
    with_tls = server_config(
        sec, resolver_dir=tmp_path / "r", store_dir=tmp_path / "st", tls_cert="c.pem", tls_key="k.pem",
        tls_ca="ca.pem", tls_verify=True,
    )  # fmt: skip
    assert "cert_file" in with_tls
    assert "ca_file" in with_tls
    assert "verify: true" in with_tls
    with pytest.raises(ConfigError, match="both a certificate and a key"):
        server_config(sec, resolver_dir=tmp_path / "r", store_dir=tmp_path / "st", tls_cert="c.pem")
    with pytest.raises(ConfigError, match="not a complete mesh security dir"):
        server_config(tmp_path, resolver_dir=tmp_path / "r", store_dir=tmp_path / "st")


def test_load_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not a mesh security dir.*meshctl security init"):
        Authority.load(tmp_path)


def test_issue_user_is_verified_by_the_authority(sec: Path) -> None:
    auth = Authority.load(sec)
    seed = new_seed("user")
    pk = public_key_of_seed(seed)
    token = auth.issue_user("A", pk, agent_permissions("A", ["crm"], [], []), expires=time.time() + 60)
    claims = auth.verify_user(token)
    assert claims.name == "A"
    assert claims.sub == pk
    assert claims.exp is not None
    with pytest.raises(ConfigError, match="single NATS subject token"):
        auth.issue_user("A.B", pk, agent_permissions("A", [], [], []))
    with pytest.raises(InvalidToken, match="not a user public key"):
        auth.issue_user("A", auth.keys.mesh_account, agent_permissions("A", [], [], []))
    other = tmp_dir_authority(sec.parent / "other")
    with pytest.raises(InvalidToken, match="not a trusted key"):
        auth.verify_user(other.issue_user("A", pk, agent_permissions("A", [], [], [])))
    assert "seed" not in repr(auth).lower()


def tmp_dir_authority(d: Path) -> Authority:
    if not d.exists():
        init_security_dir(d)
    return Authority.load(d)


def test_creds_round_trip(sec: Path, tmp_path: Path) -> None:
    auth = Authority.load(sec)
    seed = new_seed("user")
    jwt = auth.issue_user("A", public_key_of_seed(seed), agent_permissions("A", [], [], []))
    path = write_creds(tmp_path / "new" / "A.creds", jwt, seed)
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    creds = read_creds(path)
    assert (creds.jwt, creds.seed, creds.name) == (jwt, seed.decode(), "A")
    assert seed.decode() not in repr(creds)
    # the layout nats-py reads: the JWT alone on the line after its BEGIN line
    lines = creds_text(jwt, seed).splitlines()
    assert lines[lines.index("-----BEGIN NATS USER JWT-----") + 1] == jwt
    assert lines[lines.index("-----BEGIN USER NKEY SEED-----") + 1] == seed.decode()


def test_bad_creds_files(sec: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_creds(tmp_path / "missing.creds")
    (tmp_path / "junk.creds").write_text("hello")
    with pytest.raises(InvalidToken, match=r"not a NATS .creds file"):
        read_creds(tmp_path / "junk.creds")
    good = read_creds(sec / "creds" / "admin.creds")
    write_creds(tmp_path / "mixed.creds", good.jwt, new_seed("user"))
    with pytest.raises(InvalidToken, match="seed is not the key"):
        read_creds(tmp_path / "mixed.creds")


def test_enrollment_token_round_trip_and_expiry(sec: Path) -> None:
    auth = Authority.load(sec)
    token, token_id = auth.enrollment_token("crm-agent", ttl=60)
    assert token.startswith(ENROLL_PREFIX)
    assert "\n" not in token
    parsed = parse_enrollment_token(f"  {token}\n")
    assert parsed.name == "crm-agent"
    assert parsed.token_id == token_id
    claims = auth.verify_user(parsed.jwt)
    assert isinstance(claims.nats, UserClaims)
    assert claims.nats.pub.allow == ["mesh.cp.register.crm-agent"]
    assert parsed.seed not in repr(parsed)
    with pytest.raises(InvalidToken, match=r"enrollment token for crm-agent expired at .*ask for a new one"):
        parse_enrollment_token(token, now=time.time() + 61)
    with pytest.raises(ConfigError, match="ttl must be positive"):
        auth.enrollment_token("crm-agent", ttl=0)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[len(ENROLL_PREFIX) :],  # prefix lost
        lambda t: t[:-20],  # truncated
        lambda t: t[: len(ENROLL_PREFIX)] + "!!" + t[len(ENROLL_PREFIX) + 2 :],
        lambda t: ENROLL_PREFIX + base64.urlsafe_b64encode(b'{"name":"x"}').decode(),
        lambda t: ENROLL_PREFIX + base64.urlsafe_b64encode(b'{"name":"x","jwt":"a.b.c","seed":"S"}').decode(),
    ],
)
def test_malformed_enrollment_tokens(sec: Path, mangle: object) -> None:
    token, _ = Authority.load(sec).enrollment_token("crm-agent", ttl=60)
    assert callable(mangle)
    with pytest.raises(InvalidToken) as info:
        parse_enrollment_token(mangle(token))
    assert "\n" not in str(info.value)


def test_revoked_account_jwt(sec: Path, tmp_path: Path) -> None:
    auth = Authority.load(sec)
    user = public_key_of_seed(new_seed("user"))
    token = auth.revoked_account_jwt({user: 1234})
    claims = decode(token, trusted=auth.keys.operator_signing_key, kind=AccountClaims)
    assert isinstance(claims.nats, AccountClaims)
    assert claims.sub == auth.keys.mesh_account
    assert claims.nats.revocations == {user: 1234}
    assert claims.nats.signing_keys == [auth.keys.mesh_account_signing_key]
    with pytest.raises(InvalidToken, match="not a user public key"):
        auth.revoked_account_jwt({auth.keys.mesh_account: 1})
    # without the operator signing seed the dir can issue users but not sign account updates
    copy = tmp_path / "nosign"
    init_security_dir(copy)
    (copy / "keys" / "operator-signing.nk").unlink()
    with pytest.raises(ConfigError, match=r"operator-signing.nk is missing"):
        Authority.load(copy).revoked_account_jwt({})


def test_creds_into_an_existing_dir_leave_its_mode_and_force_tightens_a_security_dir(
    sec: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    good = read_creds(sec / "creds" / "admin.creds")
    assert _mode(write_creds(shared / "a.creds", good.jwt, good.seed)) == 0o600
    assert _mode(shared) == 0o755
    init_security_dir(shared, force=True)
    assert _mode(shared) == 0o700
