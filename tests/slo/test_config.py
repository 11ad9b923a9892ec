"""The SLO definitions: the seed file, validation, and runbooks that are real commands."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import typer
from pydantic import ValidationError
from typer.exceptions import TyperException

from mesh.cli import app
from mesh.slo.config import (
    ConfigError,
    Slo,
    SloConfig,
    SloKind,
    format_duration,
    load_config,
    parse_duration,
)
from services.common.metrics import TTFT_BUCKETS
from services.gateway.settings import GatewaySettings


def test_the_seed_file_has_the_objectives_of_each_route_class() -> None:
    config = load_config()
    slos = {s.name: s for s in config.slos}
    assert (slos["chat_short-ttft"].objective, slos["chat_short-ttft"].threshold_s) == (0.95, 0.8)
    assert (slos["rag_long-ttft"].objective, slos["rag_long-ttft"].threshold_s) == (0.95, 2.5)
    for route_class in ("chat_short", "rag_long", "code"):
        assert slos[f"{route_class}-server_errors"].objective == 0.99  # 5xx < 1%
        assert slos[f"{route_class}-timeouts"].objective == 0.995  # DEADLINE_EXCEEDED < 0.5%
    assert slos["code-timeouts"].bad_codes == ("DEADLINE_EXCEEDED",)
    assert set(slos["code-server_errors"].bad_codes) == {"INTERNAL", "UNAVAILABLE", "UNKNOWN", "DATA_LOSS"}
    # Google SRE workbook: 5m & 1h at 14.4x, 30m & 6h at 6x, over 30 days
    assert config.period == 30 * 86400
    fast, slow = config.fast_burn, config.slow_burn
    assert (fast.short_window, fast.long_window, fast.factor) == (300, 3600, 14.4)
    assert (slow.short_window, slow.long_window, slow.factor) == (1800, 21600, 6)
    assert config.windows == (300, 1800, 3600, 21600)
    assert (config.sample_interval, config.breach_for, config.value_window) == (15, 300, 300)
    assert [s.name for s in config.for_route_class("rag_long")] == [
        "rag_long-server_errors",
        "rag_long-timeouts",
        "rag_long-ttft",
    ]


def test_ttft_thresholds_are_bounds_of_the_gateway_histogram() -> None:
    """Prometheus can only count "within the threshold" exactly at a bucket bound."""
    assert {0.8, 2.5} <= set(TTFT_BUCKETS)
    with pytest.raises(ValidationError, match="threshold_s: 0.7 is not a bucket bound of the TTFT histogram"):
        Slo(route_class="chat_short", kind=SloKind.TTFT, objective=0.95, threshold_s=0.7, runbook="servemesh x")


def test_every_slo_names_a_route_class_the_gateway_has() -> None:
    gateway_classes = set(GatewaySettings().route_classes)
    assert set(load_config().route_classes) <= gateway_classes


def _resolve(argv: list[str]) -> None:
    """Parse `argv` as the real CLI would, down to the command, without running it;
    AssertionError naming what is wrong (an unknown command or option, a missing one)."""
    command = typer.main.get_command(app)
    ctx = command.make_context("servemesh", [], resilient_parsing=True)
    args = list(argv)
    try:
        while hasattr(command, "get_command"):  # a group: the next word names the command
            assert args, f"{' '.join(argv)} names a group, not a command"
            name = args.pop(0)
            sub = command.get_command(ctx, name)
            assert sub is not None, f"{name!r} is not a command of {ctx.command_path!r}"
            command, group = sub, hasattr(sub, "get_command")
            ctx = command.make_context(name, [] if group else args, parent=ctx, resilient_parsing=group)
    except TyperException as exc:
        raise AssertionError(f"{' '.join(argv)}: {exc}") from None


def test_runbooks_are_commands_the_cli_has_with_their_required_options() -> None:
    config = load_config()
    runbooks = [s.runbook for s in config.slos] + [config.safety_spike.runbook]
    used = set()
    for runbook in runbooks:
        argv = shlex.split(runbook)
        assert argv[0] == "servemesh"
        _resolve(argv[1:])  # raises on an unknown command, option, or a missing --reason
        used.add(tuple(argv[1:3]))
    assert {("route", "flip"), ("route", "lock"), ("index", "pin")} <= used
    # the checker itself refuses what the CLI would
    for bad in ("route flop x", "route flip inference --to inference-stable", "index pin docs --reason r", "route"):
        with pytest.raises(AssertionError):
            _resolve(shlex.split(bad))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"objective": 1.0}, "objective"),
        ({"objective": 0}, "objective"),
        ({"route_class": "Chat Short"}, "route_class"),
        ({"kind": "ttft"}, "threshold_s: required for a ttft SLO"),
        ({"threshold_s": 0.8}, "threshold_s: only ttft SLOs have one"),
        ({"runbook": "rm -rf /"}, "runbook"),
        ({"kind": "latency"}, "kind"),
    ],
)
def test_an_slo_is_validated(change: dict, message: str) -> None:
    base = {"route_class": "code", "kind": "timeouts", "objective": 0.995, "runbook": "servemesh route list"}
    with pytest.raises(ValidationError, match=message):
        Slo.model_validate(base | change)


def _config(**change) -> dict:
    data = load_config().model_dump(by_alias=True)
    return data | change


def test_the_whole_config_is_validated() -> None:
    SloConfig.model_validate(_config())
    slos = _config()["slos"]
    with pytest.raises(ValidationError, match="chat_short-ttft is defined twice"):
        SloConfig.model_validate(_config(slos=[*slos, slos[0]]))
    with pytest.raises(ValidationError, match="value_window: must be one of the alerts' short windows"):
        SloConfig.model_validate(_config(value_window="10m"))
    with pytest.raises(ValidationError, match="sample_interval: must be at most a quarter"):
        SloConfig.model_validate(_config(sample_interval="2m"))
    with pytest.raises(ValidationError, match="short_window must be shorter than long_window"):
        SloConfig.model_validate(_config(fast_burn={"short_window": "1h", "long_window": "5m", "factor": 14.4,
                                                    "severity": "page"}))  # fmt: skip
    with pytest.raises(ValidationError, match="can never be reached"):
        SloConfig.model_validate(_config(safety_spike=_config()["safety_spike"] | {"factor": 12}))
    with pytest.raises(ValidationError, match="is not a duration"):
        SloConfig.model_validate(_config(period="a month"))
    with pytest.raises(ValidationError, match="slos"):
        SloConfig.model_validate(_config(slos=[]))


def test_load_config_names_the_file_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("slos: [")
    with pytest.raises(ConfigError, match="not YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "wrong.yaml").write_text("period: 30d\n")
    with pytest.raises(ConfigError, match=r"wrong\.yaml: fast_burn: Field required"):
        load_config(tmp_path / "wrong.yaml")


def test_durations_read_and_write_the_prometheus_way() -> None:
    assert [parse_duration(d) for d in ("5m", "1h", "30d", "1h30m", "800ms", "15s", 42)] == [
        300, 3600, 2592000, 5400, 0.8, 15, 42,
    ]  # fmt: skip
    assert [format_duration(s) for s in (300, 1800, 3600, 21600, 2592000, 5400, 180000)] == [
        "5m", "30m", "1h", "6h", "30d", "1h30m", "2d2h",
    ]  # fmt: skip
    for bad in ("", "5", "5 minutes", "m", "1.5h", True):
        with pytest.raises(ValueError):
            parse_duration(bad)
