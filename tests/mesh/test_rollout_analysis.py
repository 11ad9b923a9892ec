"""Judging analysis windows (pure), and turning cumulative samples into windows."""

from __future__ import annotations

import math

import pytest
from servemesh.registry.v1 import registry_pb2 as rpb

from mesh.controller.analysis import Golden, Thresholds, Verdict, judge
from mesh.controller.metrics import Calls, Window
from mesh.controller.rollouts import desired_split

INF = math.inf


def _w(requests: float, errors: float = 0.0, p99_bucket: float = 0.1, tokens: float | None = None) -> Window:
    """A window whose calls all fall in the bucket ending at `p99_bucket` seconds."""
    return Window(requests, errors, ((0.05, 0.0), (p99_bucket, requests), (INF, requests)), tokens)


def _by_metric(measurements):  # type: ignore[no-untyped-def]
    return {m.metric: m for m in measurements}


def test_a_healthy_canary_passes() -> None:
    verdict, ms = judge(_w(100, 0, tokens=1000), _w(400, 1, tokens=4000), Thresholds())
    assert verdict == Verdict.PASS
    assert [m.metric for m in ms] == ["requests", "error_rate", "latency_p99_s", "cost_per_request"]


def test_error_rate_over_one_percent_fails_and_names_the_numbers() -> None:
    verdict, ms = judge(_w(100, 5), _w(100, 5), Thresholds())
    assert verdict == Verdict.FAIL
    err = _by_metric(ms)["error_rate"]
    assert err.verdict == Verdict.FAIL and err.canary == pytest.approx(0.05) and err.threshold == pytest.approx(0.01)
    assert "5.00%" in err.detail


def test_error_rate_above_stable_by_more_than_the_margin_fails_even_under_one_percent() -> None:
    t = Thresholds(max_error_rate=0.01, max_error_rate_margin=0.002)
    assert judge(_w(1000, 8), _w(1000, 1), t)[0] == Verdict.FAIL  # 0.8% > 0.1% + 0.2%
    assert judge(_w(1000, 2), _w(1000, 1), t)[0] == Verdict.PASS  # 0.2% <= 0.3%


def test_too_few_requests_is_inconclusive_never_a_pass_even_with_errors() -> None:
    verdict, ms = judge(_w(5, 1), _w(500), Thresholds(min_requests=20))
    assert verdict == Verdict.INCONCLUSIVE
    assert _by_metric(ms)["requests"].verdict == Verdict.INCONCLUSIVE
    assert judge(_w(500), _w(5), Thresholds(min_requests=20))[0] == Verdict.INCONCLUSIVE


def test_p99_over_three_times_stable_fails() -> None:
    verdict, ms = judge(_w(100, p99_bucket=1.0), _w(100, p99_bucket=0.1), Thresholds())
    assert verdict == Verdict.FAIL and _by_metric(ms)["latency_p99_s"].verdict == Verdict.FAIL
    assert judge(_w(100, p99_bucket=0.25), _w(100, p99_bucket=0.1), Thresholds())[0] == Verdict.PASS


def test_a_slow_canary_within_the_latency_slack_of_stable_passes() -> None:
    # p99 248 ms against 60 ms: four times stable's, but under the default 250 ms noise floor above it
    canary, stable = _w(100, p99_bucket=0.25), _w(100, p99_bucket=0.06)
    verdict, ms = judge(canary, stable, Thresholds())
    assert verdict == Verdict.PASS and _by_metric(ms)["latency_p99_s"].threshold == pytest.approx(0.0599 + 0.25)
    assert "at least 250 ms over it" in _by_metric(ms)["latency_p99_s"].detail
    assert judge(canary, stable, Thresholds(latency_slack_s=0.1))[0] == Verdict.FAIL


def test_cost_per_request_over_twice_stable_fails() -> None:
    verdict, ms = judge(_w(100, tokens=2500), _w(100, tokens=1000), Thresholds())
    assert verdict == Verdict.FAIL and _by_metric(ms)["cost_per_request"].canary == 25
    assert judge(_w(100, tokens=1900), _w(100, tokens=1000), Thresholds())[0] == Verdict.PASS


def test_golden_drop_over_ten_percent_fails_and_a_missing_run_is_inconclusive() -> None:
    assert judge(_w(100), _w(100), Thresholds(), Golden(0.8, 1.0))[0] == Verdict.FAIL
    assert judge(_w(100), _w(100), Thresholds(), Golden(0.95, 1.0))[0] == Verdict.PASS
    assert judge(_w(100), _w(100), Thresholds(), Golden(None, 1.0, "timed out"))[0] == Verdict.INCONCLUSIVE


def test_window_between_samples_and_counter_reset() -> None:
    a = Calls(100, 2, ((0.1, 90), (INF, 100)), tokens=1000)
    b = Calls(160, 5, ((0.1, 140), (INF, 160)), tokens=1600)
    w = Window.between(a, b)
    assert (w.requests, w.errors, w.buckets, w.tokens) == (60, 3, ((0.1, 50), (INF, 60)), 600)
    # a restart: counters start from zero again; the window counts what the new process did
    c = Calls(30, 1, ((0.1, 30), (INF, 30)), tokens=300)
    r = Window.between(b, c)
    assert (r.requests, r.errors, r.buckets, r.tokens) == (30, 1, ((0.1, 30), (INF, 30)), 300)


def test_quantile_interpolates_like_histogram_quantile() -> None:
    w = Window(100, 0, ((0.1, 50), (0.2, 100), (INF, 100)))
    assert w.quantile(0.5) == pytest.approx(0.1)
    assert w.quantile(0.75) == pytest.approx(0.15)
    assert math.isnan(Window(0, 0, ((INF, 0),)).quantile(0.99))
    assert Window(10, 0, ((0.1, 0), (INF, 10))).quantile(0.99) == 0.1  # open-ended: highest finite bound


def test_desired_split_for_shadow_canary_and_full() -> None:
    r = rpb.Rollout(stable_deployment="deployments/s", canary_deployment="deployments/c")
    assert desired_split(r, 0, 10.0) == ([("deployments/s", 100)], [("deployments/c", 10.0)])
    assert desired_split(r, 10, 0.0) == ([("deployments/s", 90), ("deployments/c", 10)], [])
    assert desired_split(r, 100, 10.0) == ([("deployments/c", 100)], [])
