"""The on-prem install: the systemd unit template, ``meshctl agent install|uninstall``, and the
``${CREDENTIALS_DIRECTORY}`` paths the unit's ``LoadCredential=`` needs.

``systemd-analyze verify`` comes from Debian's ``systemd`` package; without it that test skips
with the reason, unless ``MESH_REQUIRE_SYSTEMD=1``: then it fails.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.cli.install import DEFAULT_MESHCTL, UNIT_NAME, render_unit, unit_template
from mesh.config import expand_credentials_directory, load_agent_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOYED_UNIT = ROOT / "deploy" / "systemd" / UNIT_NAME
MESHCTL = Path(sys.executable).parent / "meshctl"


def _directives(text: str) -> dict[str, list[str]]:
    """``Key`` -> every value it is given in ``[Service]``/``[Unit]``/``[Install]`` (in order)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "min": 60}
    for suffix, factor in units.items():
        if value.endswith(suffix) and value[: -len(suffix)].isdigit():
            return int(value[: -len(suffix)]) * factor
    return float(value)


def _meshctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    full.update(env or {})
    return subprocess.run([str(MESHCTL), *args], capture_output=True, text=True, env=full, timeout=120)


def _agent_toml(
    path: Path, name: str = "erp", *, state_dir: str | None = None, creds: str | None = None
) -> Path:
    state = state_dir or f"/var/lib/mesh/{name}"
    creds_line = (
        creds if creds is not None else "${CREDENTIALS_DIRECTORY:-/etc/mesh/credentials}/" + f"{name}.creds"
    )
    path.write_text(
        f'[agent]\nname = "{name}"\nsite = "plant-1"\nsystem = "erp"\nstate_dir = "{state}"\n\n'
        f'[nats]\nservers = ["nats://127.0.0.1:4222"]\ncreds = "{creds_line}"\n',
        encoding="utf-8",
    )
    return path


# -- the unit ------------------------------------------------------------------------------


def test_the_deployed_unit_is_the_one_meshctl_installs() -> None:
    assert DEPLOYED_UNIT.read_text(encoding="utf-8") == unit_template()
    assert f"ExecStart={DEFAULT_MESHCTL} agent run --config /etc/mesh/%i.toml" in unit_template()
    assert "ExecStart=/usr/bin/meshctl agent run" in render_unit("/usr/bin/meshctl")


def test_the_unit_has_the_service_settings_the_agent_needs(tmp_path: Path) -> None:
    d = _directives(unit_template())
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["User"] == "mesh"
    assert one["User"] != "root"
    assert one["StateDirectory"] == "mesh/%i"
    assert one["Restart"] == "on-failure"
    assert one["ProtectSystem"] == "strict"
    assert one["NoNewPrivileges"] == "yes"
    assert one["PrivateTmp"] == "yes"
    assert one["TimeoutStartSec"] == "infinity"
    assert _seconds(one["WatchdogSec"]) > 0
    # SIGTERM lets the agent finish its fetched batch for shutdown_grace; systemd must wait longer.
    grace = load_agent_config(_agent_toml(tmp_path / "a.toml")).agent.shutdown_grace
    assert _seconds(one["TimeoutStopSec"]) > grace
    assert "%i.creds:/etc/mesh/credentials/%i.creds" in d["LoadCredential"]
    assert one["CapabilityBoundingSet"] == ""


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        reason = "systemd-analyze not found (apt-get install systemd)"
        if os.environ.get("MESH_REQUIRE_SYSTEMD") == "1":
            pytest.fail(f"{reason} (and MESH_REQUIRE_SYSTEMD=1)")
        pytest.skip(reason)
    assert MESHCTL.is_file()
    unit = tmp_path / UNIT_NAME
    unit.write_text(render_unit(str(MESHCTL)), encoding="utf-8")
    # verify loads an instance of the template from the file's directory.
    done = subprocess.run([tool, "verify", str(tmp_path / "mesh-agent@erp.service")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "mesh-agent@" not in done.stderr, done.stderr
    # And it does check: an ExecStart that is not there is refused.
    unit.write_text(render_unit(str(tmp_path / "no-such-meshctl")), encoding="utf-8")
    bad = subprocess.run([tool, "verify", str(tmp_path / "mesh-agent@erp.service")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0
    assert "no-such-meshctl" in bad.stderr


# -- ${CREDENTIALS_DIRECTORY} ----------------------------------------------------------------


def test_credentials_directory_expands_with_its_default() -> None:
    ref = "${CREDENTIALS_DIRECTORY:-/etc/mesh/credentials}/erp.creds"
    assert expand_credentials_directory(ref, {}) == "/etc/mesh/credentials/erp.creds"
    assert expand_credentials_directory(ref, {"CREDENTIALS_DIRECTORY": "/run/credentials/x"}) == (
        "/run/credentials/x/erp.creds"
    )
    assert expand_credentials_directory("${CREDENTIALS_DIRECTORY}/a", {}) == "${CREDENTIALS_DIRECTORY}/a"
    # Only that variable: a config (or an applied flow) cannot name the agent's other variables.
    assert expand_credentials_directory("${HOME}/a", {"HOME": "/root"}) == "${HOME}/a"


def test_an_agent_reads_its_creds_and_secrets_from_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds_dir = tmp_path / "run-credentials"
    creds_dir.mkdir()
    (creds_dir / "pg-password").write_text("s3cret\n", encoding="utf-8")
    cfg_path = tmp_path / "agent.toml"
    cfg_path.write_text(
        '[agent]\nname = "erp"\nsite = "plant-1"\nsystem = "erp"\nstate_dir = "state"\n\n'
        '[nats]\nservers = ["nats://127.0.0.1:4222"]\n'
        'creds = "${CREDENTIALS_DIRECTORY:-/etc/mesh/credentials}/erp.creds"\n\n'
        '[[flows]]\nname = "orders"\nentity = "customer"\n'
        '[flows.sink]\nadapter = "postgres"\ndsn = "postgresql://mesh@db/erp"\ntable = "customers"\n'
        'key = "id"\npassword_file = "${CREDENTIALS_DIRECTORY:-/etc/mesh/credentials}/pg-password"\n',
        encoding="utf-8",
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds_dir))
    try:
        cfg = load_agent_config(cfg_path)
    except Exception as exc:  # the sql sink's fields: shown if this example drifts from them
        pytest.fail(f"example config no longer loads: {exc}")
    assert cfg.nats.creds == str(creds_dir / "erp.creds")
    sink = cfg.flows[0].sink
    assert sink is not None
    assert sink.password_file == str(creds_dir / "pg-password")  # type: ignore[attr-defined]
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert load_agent_config(cfg_path).nats.creds == "/etc/mesh/credentials/erp.creds"


# -- meshctl agent install / uninstall --------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_puts_config_unit_and_credentials_dir_in_place(tmp_path: Path) -> None:
    src = _agent_toml(tmp_path / "agent.toml")
    root = tmp_path / "root"
    done = _meshctl(
        "agent", "install", "--config", str(src), "--prefix", str(root), "--meshctl", str(MESHCTL)
    )
    assert done.returncode == 0, done.stderr
    config = root / "etc/mesh/erp.toml"
    unit = root / "etc/systemd/system" / UNIT_NAME
    creds_dir = root / "etc/mesh/credentials"
    assert config.read_bytes() == src.read_bytes()
    assert _mode(config) == 0o640
    assert unit.read_text(encoding="utf-8") == render_unit(str(MESHCTL))
    assert _mode(unit) == 0o644
    assert creds_dir.is_dir()
    assert _mode(creds_dir) == 0o700
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "etc/mesh/erp.toml", f"etc/systemd/system/{UNIT_NAME}",
    ]  # fmt: skip
    out = done.stdout
    assert "systemctl daemon-reload && systemctl enable --now mesh-agent@erp" in out
    assert "meshctl agent health erp" in out
    assert f"meshctl agent register --config {config} --token" in out
    # The installed config is valid as the service sees it and as an operator runs it by hand.
    for env in ({"CREDENTIALS_DIRECTORY": str(creds_dir)}, {}):
        check = _meshctl("config", "check", str(config), env=env)
        assert check.returncode == 0, check.stdout + check.stderr
    # Installing again (an upgrade of the config) replaces it in place.
    src.write_text(src.read_text(encoding="utf-8").replace("plant-1", "plant-2"), encoding="utf-8")
    again = _meshctl(
        "agent", "install", "--config", str(src), "--prefix", str(root), "--meshctl", str(MESHCTL)
    )
    assert again.returncode == 0, again.stderr
    assert 'site = "plant-2"' in config.read_text(encoding="utf-8")


def test_the_installed_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        reason = "systemd-analyze not found (apt-get install systemd)"
        if os.environ.get("MESH_REQUIRE_SYSTEMD") == "1":
            pytest.fail(f"{reason} (and MESH_REQUIRE_SYSTEMD=1)")
        pytest.skip(reason)
    root = tmp_path / "root"
    done = _meshctl(
        "agent", "install", "--config", str(_agent_toml(tmp_path / "a.toml")), "--prefix", str(root)
    )
    assert done.returncode == 0, done.stderr
    unit_dir = root / "etc/systemd/system"
    assert f"ExecStart={MESHCTL} " in (unit_dir / UNIT_NAME).read_text(encoding="utf-8")
    verify = subprocess.run([tool, "verify", str(unit_dir / "mesh-agent@erp.service")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert verify.returncode == 0, verify.stderr


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"state_dir": "/srv/erp"}, 'state_dir = "/var/lib/mesh/erp"'),
        (
            {"creds": "/etc/mesh/erp.creds"},
            'creds = "${CREDENTIALS_DIRECTORY:-/etc/mesh/credentials}/erp.creds"',
        ),
        ({"creds": "${CREDENTIALS_DIRECTORY:-/etc/mesh/credentials}/other.creds"}, "erp.creds"),
    ],
)
def test_install_refuses_a_config_the_unit_cannot_run(
    tmp_path: Path, kwargs: dict[str, str], message: str
) -> None:
    root = tmp_path / "root"
    done = _meshctl("agent", "install", "--config", str(_agent_toml(tmp_path / "a.toml", **kwargs)),
                    "--prefix", str(root))  # fmt: skip
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not root.exists()


def test_install_refuses_an_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "a.toml"
    bad.write_text('[agent]\nname = "erp"\n', encoding="utf-8")
    done = _meshctl("agent", "install", "--config", str(bad), "--prefix", str(tmp_path / "root"))
    assert done.returncode == 2
    assert "system" in done.stderr
    assert "Traceback" not in done.stderr


def test_uninstall_removes_config_and_creds_and_keeps_state_unless_purged(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for name in ("erp", "crm"):
        src = _agent_toml(tmp_path / f"{name}.toml", name)
        assert _meshctl("agent", "install", "--config", str(src), "--prefix", str(root)).returncode == 0
    creds = root / "etc/mesh/credentials"
    for name in ("erp", "crm"):
        (creds / f"{name}.creds").write_text("creds", encoding="utf-8")
        state = root / f"var/lib/mesh/{name}"
        state.mkdir(parents=True)
        (state / "outbox.db").write_bytes(b"data")
    unit = root / "etc/systemd/system" / UNIT_NAME

    done = _meshctl("agent", "uninstall", "erp", "--prefix", str(root))
    assert done.returncode == 0, done.stderr
    assert not (root / "etc/mesh/erp.toml").exists()
    assert not (creds / "erp.creds").exists()
    assert (root / "var/lib/mesh/erp/outbox.db").read_bytes() == b"data"  # undelivered data stays
    assert unit.exists()  # crm still uses it
    assert (root / "etc/mesh/crm.toml").exists()
    assert (creds / "crm.creds").exists()

    done = _meshctl("agent", "uninstall", "crm", "--prefix", str(root), "--purge")
    assert done.returncode == 0, done.stderr
    assert not unit.exists()
    assert not (root / "var/lib/mesh/crm").exists()
    assert _meshctl("agent", "uninstall", "crm", "--prefix", str(root)).returncode == 1


# -- the three commands, for real ---------------------------------------------------------------


class _NotifySocket:
    """The ``NOTIFY_SOCKET`` systemd gives a ``Type=notify`` service: a unix datagram socket."""

    def __init__(self, path: Path) -> None:
        import socket

        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[str] = []

    def wait_for(self, line: str, timeout: float) -> None:
        import time

        deadline = time.monotonic() + timeout
        while line not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {line} from the agent (got {self.seen})"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.seen.extend(data.decode().splitlines())

    def close(self) -> None:
        self.sock.close()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_install_with_a_token_then_the_agent_runs_as_the_unit_runs_it(tmp_path: Path) -> None:
    """``agent install --token`` registers and writes the creds where ``LoadCredential=`` reads
    them; the agent, started with the environment the unit gives it (``$CREDENTIALS_DIRECTORY``,
    ``$STATE_DIRECTORY``, ``NOTIFY_SOCKET``), sends READY=1, is healthy at the control plane, and
    stops on SIGTERM (STOPPING=1, exit 0)."""
    import signal

    from tests.integration._harness import log_tail, wait_until
    from tests.integration.test_enrollment import Mesh

    (tmp_path / "mesh").mkdir()
    mesh = Mesh(tmp_path / "mesh")
    mesh.start()
    agent: subprocess.Popen[bytes] | None = None
    notify = _NotifySocket(tmp_path / "notify.sock")
    try:
        token_file = tmp_path / "erp.token"
        mesh.cli(
            "agent",
            "token",
            "create",
            "--name",
            "erp",
            "--ttl",
            "10m",
            "--system",
            "erp",
            "-o",
            str(token_file),
        )
        src = tmp_path / "erp.toml"
        src.write_text(
            '[agent]\nname = "erp"\nsite = "plant-1"\nsystem = "erp"\n'
            'state_dir = "${STATE_DIRECTORY:-/var/lib/mesh/erp}"\n'
            "heartbeat_interval = 0.5\nmetrics_port = 0\n\n"
            f'[nats]\nservers = ["{mesh.url}"]\n'
            'creds = "${CREDENTIALS_DIRECTORY:-/etc/mesh/credentials}/erp.creds"\n',
            encoding="utf-8",
        )
        root = tmp_path / "root"
        token = token_file.read_text(encoding="utf-8").strip()
        done = _meshctl("agent", "install", "--config", str(src), "--prefix", str(root), "--token", token)
        assert done.returncode == 0, done.stdout + done.stderr
        creds = root / "etc/mesh/credentials/erp.creds"
        assert _mode(creds) == 0o600
        assert "registered erp" in done.stdout
        state = root / "var/lib/mesh/erp"
        assert state.is_dir()

        env = {
            **{k: v for k, v in os.environ.items() if k not in ("MESH_CREDS", "MESH_NATS_URL")},
            "CREDENTIALS_DIRECTORY": str(creds.parent),
            "STATE_DIRECTORY": str(state),
            "NOTIFY_SOCKET": str(notify.path),
        }
        log = tmp_path / "agent.log"
        with open(log, "wb") as out:
            agent = subprocess.Popen(
                [str(MESHCTL), "agent", "run", "--config", str(root / "etc/mesh/erp.toml")],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,
            )  # fmt: skip
        try:
            notify.wait_for("READY=1", timeout=60)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_tail(log)}") from None
        assert agent.poll() is None

        def healthy() -> bool:
            return _meshctl("agent", "health", "erp", env=mesh.env).returncode == 0

        wait_until(healthy, 60, "meshctl agent health erp to exit 0")

        agent.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", timeout=30)
        assert agent.wait(30) == 0, log_tail(log)
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        notify.close()
        mesh.stop()
