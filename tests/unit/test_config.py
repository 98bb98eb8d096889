from __future__ import annotations

from pathlib import Path

import pytest

from mesh.config import load_agent_config, parse_agent_config
from mesh.errors import ConfigError

GOOD = """
[agent]
name = "erp-agent"
system = "erp"
state_dir = "state"

[nats]
servers = ["nats://127.0.0.1:4222"]

[[flows]]
name = "customers"
entity = "customer"

[flows.source]
adapter = "sqlite"
path = "erp.db"
table = "customers"
key = "id"
"""


def test_good_config_loads_and_resolves_paths_against_the_file(tmp_path: Path) -> None:
    file = tmp_path / "conf" / "agent.toml"
    file.parent.mkdir()
    file.write_text(GOOD)
    cfg = load_agent_config(file)
    assert cfg.agent.name == "erp-agent"
    assert cfg.agent.state_dir == str(tmp_path / "conf" / "state")
    src = cfg.flows[0].source
    assert src is not None
    assert src.path == str(tmp_path / "conf" / "erp.db")
    assert src.mode == "changes"
    assert src.batch_size == 1000
    assert cfg.flows[0].consumer.max_deliver == 10


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ("batch_size", 'key = "id"\nbatch_size = "lots"'),
            "flows[0].source.batch_size: expected `int`, got `str`",
        ),
        (("tabel", 'key = "id"\ntabel = "x"'), "flows[0].source: object contains unknown field `tabel`"),
        (
            ("adapter", 'adapter = "oracle"'),
            "flows[0].source.adapter: invalid value 'oracle' (expected one of the installed source ",
        ),
        (("name", 'name = "erp agent"'), "agent.name: expected `str` matching regex"),
        (
            ("mode", 'key = "id"\nmode = "cursor"'),
            'flows[0].source.cursor_column: required when mode = "cursor"',
        ),
        (("mode", 'key = "id"\nmode = "magic"'), "flows[0].source.mode: invalid enum value 'magic'"),
        (("servers", "servers = []"), "nats.servers: expected at least one server URL"),
        (("batch", 'key = "id"\nbatch_size = 0'), "flows[0].source.batch_size: expected `int` >= 1"),
    ],
    ids=lambda v: v[0] if isinstance(v, tuple) else "",
)
def test_bad_config_names_file_field_and_expectation(change: tuple[str, str], message: str) -> None:
    field, replacement = change
    anchors = {
        "batch_size": 'key = "id"',
        "tabel": 'key = "id"',
        "adapter": 'adapter = "sqlite"',
        "name": 'name = "erp-agent"',
        "mode": 'key = "id"',
        "servers": 'servers = ["nats://127.0.0.1:4222"]',
        "batch": 'key = "id"',
    }
    text = GOOD.replace(anchors[field], replacement, 1)
    with pytest.raises(ConfigError) as info:
        parse_agent_config(text, source="/etc/mesh/agent.toml")
    text_of_error = str(info.value)
    assert text_of_error.startswith("/etc/mesh/agent.toml: ")
    assert message in text_of_error


def test_missing_required_field() -> None:
    with pytest.raises(ConfigError, match=r"agent: object missing required field `system`"):
        parse_agent_config(GOOD.replace('system = "erp"', ""), source="a.toml")


def test_flow_without_source_or_sink_and_duplicate_names() -> None:
    lone = '\n[[flows]]\nname = "orphans"\nentity = "customer"\n'
    with pytest.raises(ConfigError, match=r"flows\[1\]: a flow needs a \[source\], a \[sink\] or both"):
        parse_agent_config(GOOD + lone, source="a.toml")
    dup = GOOD + GOOD[GOOD.index("[[flows]]") :]
    with pytest.raises(ConfigError, match=r"flows\[1\].name: duplicate flow name 'customers'"):
        parse_agent_config(dup, source="a.toml")


def test_toml_syntax_error_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"a.toml: not valid TOML: .*line 1"):
        parse_agent_config("[agent\n", source="a.toml")
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"{missing}: cannot read config"):
        load_agent_config(missing)


def test_retry_policy_defaults_overrides_and_delays() -> None:
    from mesh.config import RetryConfig
    from mesh.errors import DecodeError, RejectedRecord, SystemUnavailable, TransportError

    policy = RetryConfig(initial_delay=1, multiplier=2, max_delay=5, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 5, 5]
    assert policy.action(SystemUnavailable("x")) == "retry"
    assert policy.action(TransportError("x")) == "retry"
    assert policy.action(RejectedRecord("x")) == "dead_letter"
    assert policy.action(ValueError("x")) == "dead_letter"
    custom = RetryConfig(errors={"RejectedRecord": "retry", "SystemUnavailable": "dead_letter"})
    assert custom.action(RejectedRecord("x")) == "retry"
    assert custom.action(SystemUnavailable("x")) == "dead_letter"
    assert custom.action(DecodeError("x")) == "dead_letter"
    jittery = RetryConfig(initial_delay=10, jitter=0.2)
    assert all(8 <= jittery.delay(1) <= 12 for _ in range(100))


def test_retry_policy_rejects_unknown_error_class() -> None:
    text = GOOD + '\n[flows.retry]\nerrors = { RejectedRecrod = "retry" }\n'
    with pytest.raises(ConfigError, match=r"flows\[0\].retry.errors.RejectedRecrod: unknown error class"):
        parse_agent_config(text, source="a.toml")
    with pytest.raises(ConfigError, match=r"flows\[0\].retry.errors\[...\]: invalid enum value .ignore."):
        parse_agent_config(
            GOOD + '\n[flows.retry]\nerrors = { RejectedRecord = "ignore" }\n', source="a.toml"
        )


def test_building_the_config_decoders_never_crashes_the_interpreter() -> None:
    """msgspec 0.22 segfaulted at interpreter exit (in the garbage collector, about one run in
    four) once one Struct used a pattern-constrained str both as ``X | list[X]`` and as
    ``X | list[X] | None``: `meshctl config check` and every agent died with SIGSEGV on the way
    out. Build every config decoder (the ones made from the installed adapter plugins, as every
    loader uses them) in fresh interpreters and demand a clean exit each time."""
    import subprocess
    import sys

    code = (
        "import msgspec, mesh.config as m\n"
        "t = m.agent_config_type(); assert len(m.flow_config_type().__struct_fields__) > 2\n"
        "msgspec.json.Decoder(t); msgspec.json.schema(t); msgspec.json.Decoder(m.AgentConfig)\n"
    )
    codes = [subprocess.run([sys.executable, "-c", code], capture_output=True).returncode for _ in range(12)]
    assert codes == [0] * 12
