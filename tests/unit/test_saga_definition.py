"""Saga definitions: templates and the config errors an operator sees (file + field path)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.errors import ConfigError
from mesh.saga.definition import RetryPolicy, load_orchestrator_config, parse_orchestrator_config, render
from mesh.saga.state import decode_record, encode_record, new_record, saga_id
from mesh.security.permissions import permissions_for_orchestrator

GOOD = """
[orchestrator]
name = "orch"

[nats]
creds = "orch.creds"

[[sagas]]
name = "q2c"
trigger = { subject = "evt.deal.won.crm" }

[[sagas.steps]]
name = "order"
subject = "api.erp.sales_order.create"
request = { customer = "$trigger.payload.customer", note = "deal ${trigger.key}" }
compensate = { subject = "api.erp.sales_order.cancel", request = { id = "$steps.order.id" } }

[[sagas.steps]]
name = "ship"
kind = "publish_await"
subject = "cmd.erp.ship"
request = { order = "$steps.order.id" }
await_event = "evt.shipment.created.erp"
match = { "payload.order" = "$steps.order.id" }

[[sagas.steps]]
name = "cool_off"
kind = "wait"
duration = 1.5
"""


def test_a_good_config_loads_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "orchestrator.toml"
    path.write_text(GOOD)
    cfg = load_orchestrator_config(path)
    assert cfg.nats.creds == str(tmp_path / "orch.creds")
    saga = cfg.saga("q2c")
    assert saga is not None
    assert [s.kind for s in saga.steps] == ["call", "publish_await", "wait"]
    perms = permissions_for_orchestrator(cfg)
    assert "cmd.erp.ship" in perms.pub.allow
    assert "dlq.saga.q2c" in perms.pub.allow
    assert "$JS.API.CONSUMER.MSG.NEXT.MESH_EVENTS.saga-q2c" in perms.pub.allow
    assert not any(p.startswith("evt.") for p in perms.pub.allow)
    assert perms.sub.allow == ["_INBOX.orch.>"]


@pytest.mark.parametrize(
    ("old", "new", "path", "message"),
    [
        (
            'subject = "api.erp.sales_order.create"',
            'subject = "erp.sales_order.create"',
            "sagas[0].steps[0].subject",
            "a call step needs an api.> subject",
        ),
        (
            'compensate = { subject = "api.erp',
            'compensate = { subject = "erp',
            "sagas[0].steps[0].compensate.subject",
            "a compensation calls an api.> subject",
        ),
        (
            '"$trigger.payload.customer"',
            '"$trigger_.payload.customer"',
            "sagas[0].steps[0].request",
            "a path starts with trigger, steps or saga",
        ),
        ('match = { "payload.order" = "$steps.order.id" }', "", "sagas[0].steps[1].match", "needs a match"),
        ("duration = 1.5", "", "sagas[0].steps[2]", "exactly one of duration and until"),
        (
            'subject = "evt.deal.won.crm"',
            'subject = "deal.won"',
            "sagas[0].trigger.subject",
            "must be an event",
        ),
    ],
)
def test_config_errors_name_the_field(old: str, new: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_orchestrator_config(GOOD.replace(old, new, 1), source="orch.toml")
    assert any(p.path == path and message in p.message for p in info.value.problems), info.value.lines()
    assert str(info.value).startswith(f"orch.toml: {path}: ")


def test_a_step_may_only_use_earlier_steps() -> None:
    text = GOOD.replace(
        'request = { order = "$steps.order.id" }', 'request = { order = "$steps.cool_off.x" }'
    )
    with pytest.raises(
        ConfigError, match=r"sagas\[0\].steps\[1\].request: \$steps.cool_off.x: no earlier step"
    ):
        parse_orchestrator_config(text, source="orch.toml")


def test_unknown_keys_and_bad_types_are_errors_with_a_path() -> None:
    with pytest.raises(ConfigError, match=r"orch.toml: sagas\[0\].steps\[0\]"):
        parse_orchestrator_config(GOOD.replace("compensate = {", "compensat = {", 1), source="orch.toml")
    with pytest.raises(ConfigError, match="declared twice"):
        parse_orchestrator_config(GOOD.replace('name = "ship"', 'name = "order"'), source="orch.toml")


def test_render_replaces_whole_values_and_embedded_paths() -> None:
    ctx = {"trigger": {"payload": {"n": 3, "items": [{"sku": "A"}]}, "key": "deal:1"}, "steps": {}}
    template = {
        "n": "$trigger.payload.n",
        "s": "deal ${trigger.key} x${trigger.payload.n}",
        "l": ["$trigger.payload.items.0.sku"],
        "k": 1,
    }
    assert render(template, ctx) == {"n": 3, "s": "deal deal:1 x3", "l": ["A"], "k": 1}
    with pytest.raises(KeyError, match=r"trigger\.payload\.missing"):
        render("$trigger.payload.missing", ctx)


def test_retry_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(attempts=5, backoff=1.0, multiplier=2.0, max_backoff=5.0)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]


def test_saga_ids_are_deterministic_subject_tokens_and_records_round_trip() -> None:
    cfg = parse_orchestrator_config(GOOD)
    sid = saga_id("q2c", "env-1")
    assert sid == saga_id("q2c", "env-1") != saga_id("q2c", "env-2")
    assert sid.startswith("q2c-")
    assert "." not in sid
    rec = new_record(cfg.sagas[0], sid, {"id": "env-1"}, owner="r1", lease=5.0)
    back = decode_record(encode_record(rec))
    assert back == rec
    assert [s.state for s in back.steps] == ["pending"] * 3
    assert not back.claimable(rec.lease_until - 1)
    assert back.claimable(rec.lease_until + 1)


def test_the_readme_example_is_a_valid_config() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Orchestration (sagas)") :]
    example = section[section.index("```toml\n") + 8 :]
    example = example[: example.index("```")]
    cfg = parse_orchestrator_config(example, source="README.md")
    assert [s.name for s in cfg.sagas[0].steps] == ["order", "shipped", "cool_off"]


def test_the_quote_to_cash_example_is_a_valid_config_whose_compensations_name_the_error() -> None:
    path = Path(__file__).parents[2] / "examples" / "quote-to-cash" / "orchestrator.toml"
    text = (
        path.read_text(encoding="utf-8").replace("${metrics_port}", "0").replace("${nats_url}", "nats://x:1")
    )
    cfg = parse_orchestrator_config(text, source=str(path))
    saga = cfg.sagas[0]
    assert (saga.name, saga.trigger.subject) == ("quote-to-cash", "evt.deal.upserted.crm")
    compensated = {s.name: s.compensate for s in saga.steps if s.compensate is not None}
    assert sorted(compensated) == ["deal_processing", "sales_order"]
    ctx = {"trigger": {"payload": {"deal_id": 3}}, "saga": {"id": "s", "name": "q", "error": "refused"},
           "steps": {"sales_order": {"order_id": 7}}}  # fmt: skip
    assert render(compensated["sales_order"].request, ctx) == {"order_id": 7, "reason": "refused"}
    assert render(compensated["deal_processing"].request, ctx)["reason"] == "refused"
    assert "trace.q2c-orchestrator.*" in permissions_for_orchestrator(cfg).pub.allow


def test_meshctl_orchestrator_check_prints_each_problem_and_exits_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mesh.cli.main import app

    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(GOOD)
    bad.write_text(
        GOOD.replace('subject = "cmd.erp.ship"', 'subject = "erp.ship"').replace("duration = 1.5", "")
    )
    result = CliRunner().invoke(app, ["orchestrator", "check", str(good), str(bad)])
    assert result.exit_code == 2
    assert f"{good}: ok (1 saga(s): q2c)" in result.output
    assert f"{bad}: sagas[0].steps[1].subject: publish_await publishes a cmd.> subject" in result.output
    assert f"{bad}: sagas[0].steps[2]: a wait step needs exactly one of duration and until" in result.output
    result = CliRunner().invoke(app, ["orchestrator", "run", "--config", str(bad)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
