"""The Prometheus rules: generated from the SLOs, committed, checked and unit-tested by promtool."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mesh.cli import app
from mesh.slo import rules
from mesh.slo.config import load_config

pytestmark = pytest.mark.timeout(300)
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def _promtool() -> str:
    path = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(path).exists():
        pytest.fail("promtool is not installed: `make system` installs it (Debian package prometheus)")
    return path


def test_the_committed_rules_are_what_the_slos_generate() -> None:
    config = load_config()
    assert rules.stale(config, DEPLOY) == [], "run `servemesh slo rules` and commit deploy/prometheus/"
    assert (DEPLOY / rules.RULES_FILE).read_text() == rules.render_rules(config)


def test_a_changed_slo_makes_the_files_stale(tmp_path: Path) -> None:
    config = load_config()
    rules.write(config, tmp_path)
    assert rules.stale(config, tmp_path) == []
    slos = list(config.slos)
    slos[0] = slos[0].model_copy(update={"objective": 0.98})
    changed = config.model_copy(update={"slos": tuple(slos)})
    assert rules.stale(changed, tmp_path) == [tmp_path / rules.RULES_FILE, tmp_path / rules.TESTS_FILE]


def test_rules_cover_every_slo_window_and_alert() -> None:
    config = load_config()
    groups = {g["name"]: g["rules"] for g in rules.rules(config)["groups"]}
    recorded = {(r["record"], r["labels"]["slo"]) for r in groups["servemesh-slo-ratios"]}
    names = [s.name for s in config.slos]
    windows = ("5m", "30m", "1h", "6h")
    assert recorded == {(f"slo:servemesh_bad_fraction:ratio_rate{w}", n) for w in windows for n in names}
    alerts = groups["servemesh-slo-alerts"]
    assert {(a["alert"], a["labels"]["slo"]) for a in alerts} == {
        (alert, n) for alert in ("SloFastBurn", "SloSlowBurn", "SloBreached") for n in names
    }
    runbooks = {s.name: s.runbook for s in config.slos}
    for alert in alerts:
        assert alert["annotations"]["runbook"] == runbooks[alert["labels"]["slo"]]
        assert alert["labels"]["severity"] == {"SloFastBurn": "page", "SloSlowBurn": "ticket"}.get(
            alert["alert"], "page"
        )
        assert alert.get("for") == ("5m" if alert["alert"] == "SloBreached" else None)
    fast = next(a for a in alerts if a["alert"] == "SloFastBurn" and a["labels"]["slo"] == "chat_short-ttft")
    assert fast["expr"] == (
        'slo:servemesh_bad_fraction:ratio_rate5m{slo="chat_short-ttft"} > 0.72 and '
        'slo:servemesh_bad_fraction:ratio_rate1h{slo="chat_short-ttft"} > 0.72'
    )  # 14.4 x the 5% budget
    ttft = next(r for r in groups["servemesh-slo-ratios"] if r["labels"]["slo"] == "rag_long-ttft")
    assert 'le="2.5"' in ttft["expr"] and "servemesh_generation_time_to_first_token_seconds_count" in ttft["expr"]
    (spike,) = groups["servemesh-safety-alerts"]
    assert spike["alert"] == "SafetyRefusalsSpike" and "servemesh_gateway_safety_refusals_total[5m]" in spike["expr"]
    assert spike["annotations"]["runbook"] == config.safety_spike.runbook


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(DEPLOY / rules.RULES_FILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 57 rules found" in result.stdout


async def test_promtool_unit_tests_fire_and_hold_every_alert() -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [_promtool(), "test", "rules", str(DEPLOY / rules.TESTS_FILE)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a fast-burn alert on the wrong threshold fails them."""
    for name in (rules.RULES_FILE, rules.TESTS_FILE):
        shutil.copy(DEPLOY / name, tmp_path / name)
    text = (tmp_path / rules.RULES_FILE).read_text()
    wrong = 'slo:servemesh_bad_fraction:ratio_rate5m{slo="code-timeouts"} > 0.072'
    assert wrong in text
    (tmp_path / rules.RULES_FILE).write_text(text.replace(wrong, wrong[:-5] + "0.005"))  # 1x the budget
    result = subprocess.run(
        [_promtool(), "test", "rules", str(tmp_path / rules.TESTS_FILE)], capture_output=True, text=True, timeout=280
    )
    assert result.returncode == 1 and "SloFastBurn" in result.stdout + result.stderr


def test_the_cli_writes_and_checks_the_files(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["slo", "rules", "--check"]).exit_code == 0  # the committed ones
    wrote = runner.invoke(app, ["slo", "rules", "--out", str(tmp_path)])
    assert wrote.exit_code == 0 and rules.RULES_FILE in wrote.stdout
    assert (tmp_path / rules.RULES_FILE).read_text() == (DEPLOY / rules.RULES_FILE).read_text()
    assert (tmp_path / rules.TESTS_FILE).read_text() == (DEPLOY / rules.TESTS_FILE).read_text()
    (tmp_path / rules.RULES_FILE).write_text("groups: []\n")
    stale = runner.invoke(app, ["slo", "rules", "--check", "--out", str(tmp_path)])
    assert stale.exit_code == 1 and "servemesh slo rules" in stale.stderr
    printed = runner.invoke(app, ["slo", "rules", "--print"])
    assert printed.exit_code == 0 and printed.stdout == rules.render_rules(load_config())
    bad = tmp_path / "slos.yaml"
    bad.write_text("period: 30d\n")
    refused = runner.invoke(app, ["slo", "rules", "--config", str(bad), "--out", str(tmp_path)])
    assert refused.exit_code == 2 and "fast_burn" in refused.stderr
