"""SloEvaluator on synthetic scrape sequences: exact burn rates, resets, windows, states."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import pytest

from mesh.slo.config import SloConfig, load_config
from mesh.slo.evaluator import SloEvaluator, SloStatus, State, histogram_quantile
from services.common.errors import InvalidArgument

from .pages import MINUTE, T0, Clock, Gateways, page

H6, H1, M30, M5 = 21600.0, 3600.0, 1800.0, 300.0


def _config() -> SloConfig:
    """The seed SLOs, scraped every minute (so a 6-hour test is 361 scrapes)."""
    return load_config().model_copy(update={"sample_interval": 60.0})


def _evaluator(urls=("http://a/metrics",)) -> tuple[SloEvaluator, Clock, Gateways]:
    clock, gateways = Clock(), Gateways()
    return SloEvaluator(_config(), list(urls), clock=clock, fetch=gateways.fetch), clock, gateways


async def _scrape_minutes(
    evaluator: SloEvaluator, clock: Clock, gateways: Gateways, minutes: range, pages: Callable[[int], dict]
) -> None:
    for m in minutes:
        clock.now = T0 + m * MINUTE
        gateways.pages = pages(m)
        await evaluator.scrape_once()


def _by_name(statuses: list[SloStatus]) -> dict[str, SloStatus]:
    return {s.slo.name: s for s in statuses}


def _cumulative(m: int, per_minute: Callable[[int], float], start: float = 0.0) -> float:
    return start + sum(per_minute(k) for k in range(1, m + 1))


async def test_burn_rates_over_each_window_are_exact() -> None:
    """5 of 1000 requests a minute fail for 330 minutes, then 100 of 1000 for 30 minutes."""
    evaluator, clock, gateways = _evaluator()

    def pages(m: int) -> dict:
        bad = _cumulative(m, lambda k: 5 if k <= 330 else 100, start=7)  # counted before we looked
        ok = _cumulative(m, lambda k: 995 if k <= 330 else 900, start=10_000)
        return {"http://a/metrics": page({("chat_short", "OK"): ok, ("chat_short", "INTERNAL"): bad})}

    await _scrape_minutes(evaluator, clock, gateways, range(361), pages)
    got = _by_name(evaluator.statuses(T0 + 360 * MINUTE))
    errors = got["chat_short-server_errors"]
    assert [(b.window, b.requests, b.complete) for b in errors.burn_rates] == [
        (M5, 5000, True), (M30, 30000, True), (H1, 60000, True), (H6, 360000, True),
    ]  # fmt: skip
    assert [b.bad_fraction for b in errors.burn_rates] == pytest.approx([0.1, 0.1, 3150 / 60000, 4650 / 360000])
    assert [b.burn_rate for b in errors.burn_rates] == pytest.approx([10, 10, 5.25, 4650 / 360000 / 0.01])
    assert errors.value == pytest.approx(0.1)
    # over the objective since the first sample whose 5-minute window was: minute 331
    assert errors.breach_start == T0 + 331 * MINUTE and errors.state is State.BREACHED
    timeouts = got["chat_short-timeouts"]
    assert (timeouts.state, timeouts.value, timeouts.breach_start) == (State.OK, 0.0, None)
    assert timeouts.burn(M5).requests == 5000 and timeouts.burn(H6).burn_rate == 0.0
    for name in ("chat_short-ttft", "code-server_errors", "rag_long-timeouts"):  # no traffic of theirs
        assert (got[name].state, got[name].value, got[name].burn(M5).requests) == (State.NO_DATA, None, 0)


async def test_breached_only_after_five_minutes_over_the_objective() -> None:
    """2% errors (burn 2: no burn alert) from minute 10; the 5-minute value crosses 1% at minute 13."""
    evaluator, clock, gateways = _evaluator()

    def pages(m: int) -> dict:
        bad = _cumulative(m, lambda k: 20 if 10 < k <= 30 else 0)
        ok = _cumulative(m, lambda k: 980 if 10 < k <= 30 else 1000)
        return {"http://a/metrics": page({("code", "OK"): ok, ("code", "UNAVAILABLE"): bad})}

    await _scrape_minutes(evaluator, clock, gateways, range(41), pages)

    def at(minute: float) -> SloStatus:
        return _by_name(evaluator.statuses(T0 + minute * MINUTE))["code-server_errors"]

    assert (at(12).state, at(12).breach_start) == (State.OK, None)  # 40 of 5000: 0.8%
    assert (at(13).state, at(13).breach_start) == (State.OK, T0 + 13 * MINUTE)  # 60 of 5000
    assert (at(17.5).state, at(17.5).breach_start) == (State.OK, T0 + 13 * MINUTE)
    assert (at(18).state, at(18).breach_start) == (State.BREACHED, T0 + 13 * MINUTE)
    assert at(18).value == pytest.approx(0.02) and at(18).burn(M5).burn_rate == pytest.approx(2)
    assert (at(40).state, at(40).breach_start) == (State.OK, None)  # 10 minutes clean again


async def test_fast_burn_breaches_at_once_and_slow_burn_warns() -> None:
    evaluator, clock, gateways = _evaluator()

    def pages(m: int) -> dict:
        # chat_short: 20% errors from the start; rag_long: 8% timeouts for 40 minutes, then none
        return {
            "http://a/metrics": page({
                ("chat_short", "OK"): _cumulative(m, lambda k: 800),
                ("chat_short", "DATA_LOSS"): _cumulative(m, lambda k: 200),
                ("rag_long", "OK"): _cumulative(m, lambda k: 920 if k <= 40 else 1000),
                ("rag_long", "DEADLINE_EXCEEDED"): _cumulative(m, lambda k: 80 if k <= 40 else 0),
            })
        }  # fmt: skip

    await _scrape_minutes(evaluator, clock, gateways, range(47), pages)
    early = _by_name(evaluator.statuses(T0 + 3 * MINUTE))["chat_short-server_errors"]
    assert early.state is State.BREACHED and early.breach_start == T0 + MINUTE  # over for 2 minutes only
    assert early.burn(M5).burn_rate == pytest.approx(20) and early.burn(H1).burn_rate == pytest.approx(20)
    assert not early.burn(M5).complete and early.burn(M5).requests == 3000  # over the 3 minutes there are
    slow = _by_name(evaluator.statuses(T0 + 46 * MINUTE))["rag_long-timeouts"]
    assert slow.burn(M30).burn_rate == pytest.approx(24 * 80 / 30000 / 0.005)  # 6.4
    assert slow.burn(H6).burn_rate == pytest.approx(40 * 80 / 46000 / 0.005)  # incomplete: what there is
    assert (slow.state, slow.value, slow.breach_start) == (State.WARNING, 0.0, None)


async def test_counter_resets_and_several_gateways_lose_nothing() -> None:
    """Gateway a restarts at minute 10 (its counters start again from 0); gateway b's first
    error appears at minute 9; their counts are summed."""
    evaluator, clock, gateways = _evaluator(["http://a/metrics", "http://b/metrics"])

    def pages(m: int) -> dict:
        # a exposes no _created series: the drop is what tells the restart
        if m < 10:
            a = page({("chat_short", "OK"): 5000 + 100 * m, ("chat_short", "INTERNAL"): 50 + m}, created=None)
        else:  # the new process: 40 OK by the time of the scrape at minute 10
            a = page({("chat_short", "OK"): 40 + 100 * (m - 10), ("chat_short", "INTERNAL"): m - 10}, created=None)
        b_requests = {("chat_short", "OK"): 50.0 * m}
        if m >= 9:
            b_requests[("chat_short", "INTERNAL")] = 3
        return {"http://a/metrics": a, "http://b/metrics": page(b_requests)}

    await _scrape_minutes(evaluator, clock, gateways, range(13), pages)
    errors = _by_name(evaluator.statuses(T0 + 12 * MINUTE))["chat_short-server_errors"]
    # minutes 8..12: a's OK 100 + 100 + 40 + 100 + 100, its errors 1 + 1 + 0 + 1 + 1; b's OK 5 x 50, its errors 3
    assert errors.burn(M5).requests == 440 + 4 + 250 + 3
    assert errors.burn(M5).bad_fraction == pytest.approx(7 / 697)
    assert errors.burn(M30).requests == 12 * 101 - 61 + 12 * 50 + 3  # every minute since the baseline


async def test_a_new_creation_time_is_a_reset_even_when_the_value_grew() -> None:
    """A restarted gateway that counted past its old value: Prometheus' increase() would see
    20 more; the new _created time says all 120 are new."""
    evaluator, clock, gateways = _evaluator()
    sequence = [page({("code", "OK"): 100}), page({("code", "OK"): 120}, created=T0 + 30)]
    await _scrape_minutes(evaluator, clock, gateways, range(2), lambda m: {"http://a/metrics": sequence[m]})
    assert _by_name(evaluator.statuses(T0 + MINUTE))["code-timeouts"].burn(M5).requests == 120


async def test_windows_right_after_start_are_incomplete_and_count_what_there_is() -> None:
    evaluator, clock, gateways = _evaluator()
    await _scrape_minutes(
        evaluator, clock, gateways, range(21), lambda m: {"http://a/metrics": page({("code", "OK"): 1000 * m})}
    )
    status = _by_name(evaluator.statuses(T0 + 20 * MINUTE))["code-timeouts"]
    assert [(b.requests, b.complete) for b in status.burn_rates] == [
        (5000, True), (20000, False), (20000, False), (20000, False),
    ]  # fmt: skip
    assert status.state is State.OK


async def test_no_data_before_any_scrape_after_the_baseline_and_without_traffic() -> None:
    evaluator, clock, gateways = _evaluator()
    for status in evaluator.statuses(T0):
        assert (status.state, status.value, status.breach_start) == (State.NO_DATA, None, None)
        assert all(b.requests == 0 and not b.complete for b in status.burn_rates)
    assert evaluator.last_scrape_time is None
    traffic = {("chat_short", "OK"): 10_000.0}
    await _scrape_minutes(evaluator, clock, gateways, range(1), lambda m: {"http://a/metrics": page(traffic)})
    # the first scrape is the baseline: what the gateway counted before is in no window
    assert {s.state for s in evaluator.statuses(T0)} == {State.NO_DATA}
    await _scrape_minutes(evaluator, clock, gateways, range(1, 3), lambda m: {"http://a/metrics": page(traffic)})
    assert {s.state for s in evaluator.statuses(T0 + 2 * MINUTE)} == {State.NO_DATA}
    assert evaluator.last_scrape_time == T0 + 2 * MINUTE
    # data that stopped coming: ten minutes on, the 5-minute window is empty again
    await _scrape_minutes(
        evaluator, clock, gateways, range(3, 4), lambda m: {"http://a/metrics": page({("chat_short", "OK"): 10_500})}
    )
    assert _by_name(evaluator.statuses(T0 + 3 * MINUTE))["chat_short-timeouts"].state is State.OK
    assert _by_name(evaluator.statuses(T0 + 13 * MINUTE))["chat_short-timeouts"].state is State.NO_DATA


async def test_ttft_value_is_the_interpolated_quantile_over_engines() -> None:
    inf = math.inf
    evaluator, clock, gateways = _evaluator()

    def pages(m: int) -> dict:
        vllm = {0.4: 30 * m, 0.8: 50 * m, 1.2: 58 * m, 2.5: 60 * m, inf: 60 * m}
        small = {0.4: 20 * m, 0.8: 40 * m, 1.2: 40 * m, 2.5: 40 * m, inf: 40 * m}
        return {"http://a/metrics": page(ttft={("chat_short", "vllm"): vllm, ("chat_short", "small"): small})}

    await _scrape_minutes(evaluator, clock, gateways, range(11), pages)
    ttft = _by_name(evaluator.statuses(T0 + 10 * MINUTE))["chat_short-ttft"]
    # per minute over both engines: 90 of 100 within 0.8 s, 98 within 1.2 s; p95 rank 475 of 500
    assert ttft.value == pytest.approx(0.8 + 0.4 * (475 - 450) / (490 - 450))
    assert ttft.burn(M5).requests == 500 and ttft.burn(M5).bad_fraction == pytest.approx(0.1)
    assert ttft.burn(M5).burn_rate == pytest.approx(2.0)  # 10% slow against a 5% budget
    assert ttft.state is State.BREACHED and ttft.breach_start == T0 + MINUTE


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    inf = math.inf
    assert histogram_quantile(0.5, [(1.0, 50), (2.0, 100), (inf, 100)]) == pytest.approx(1.0)
    assert histogram_quantile(0.25, [(1.0, 50), (2.0, 100), (inf, 100)]) == pytest.approx(0.5)  # from 0
    assert histogram_quantile(0.75, [(2.0, 100), (1.0, 50), (inf, 100)]) == pytest.approx(1.5)  # any order
    assert histogram_quantile(0.95, [(1.0, 10), (2.0, 20), (inf, 100)]) == 2.0  # beyond: the largest bound
    assert histogram_quantile(0.95, [(1.0, 0), (inf, 0)]) is None
    assert histogram_quantile(0.95, [(1.0, 5), (2.0, 10)]) is None  # no +Inf bucket


async def test_route_class_filter_and_its_validation() -> None:
    evaluator, _, _ = _evaluator()
    assert [s.slo.name for s in evaluator.statuses(T0, route_class="chat_short")] == [
        "chat_short-server_errors",
        "chat_short-timeouts",
        "chat_short-ttft",
    ]
    assert evaluator.statuses(T0, route_class="batch") == []  # a valid id without SLOs
    with pytest.raises(InvalidArgument) as exc:
        evaluator.statuses(T0, route_class="Chat Short!")
    assert [v.field for v in exc.value.violations] == ["route_class"]
    assert "'Chat Short!'" in exc.value.violations[0].description


async def test_a_failed_scrape_counts_nothing_new_for_that_gateway_only() -> None:
    evaluator, clock, gateways = _evaluator(["http://a/metrics", "http://b/metrics"])
    ok = {"http://a/metrics": page({("code", "OK"): 0}), "http://b/metrics": page({("code", "OK"): 0})}
    await _scrape_minutes(evaluator, clock, gateways, range(1), lambda m: ok)
    clock.now = T0 + MINUTE
    gateways.pages = {"http://a/metrics": page({("code", "OK"): 100}), "http://b/metrics": ConnectionError("refused")}
    assert await evaluator.scrape_once() is not None
    assert list(evaluator.errors) == ["http://b/metrics"] and "refused" in evaluator.errors["http://b/metrics"]
    clock.now = T0 + 2 * MINUTE
    gateways.pages = {"http://a/metrics": "garbage{{{ 1\n", "http://b/metrics": TimeoutError()}
    assert await evaluator.scrape_once() is None and len(evaluator.samples) == 2  # nothing learnt: no sample
    assert set(evaluator.errors) == {"http://a/metrics", "http://b/metrics"}
    clock.now = T0 + 3 * MINUTE  # b is back: what it counted meanwhile is counted now
    gateways.pages = {"http://a/metrics": page({("code", "OK"): 100}), "http://b/metrics": page({("code", "OK"): 70})}
    await evaluator.scrape_once()
    assert evaluator.errors == {}
    assert _by_name(evaluator.statuses(T0 + 3 * MINUTE))["code-timeouts"].burn(M5).requests == 170


async def test_gateways_come_and_go_through_an_async_url_callable() -> None:
    clock, gateways = Clock(), Gateways()
    urls = ["http://a/metrics", "http://b/metrics"]

    async def current() -> list[str]:
        return list(urls)

    evaluator = SloEvaluator(_config(), current, clock=clock, fetch=gateways.fetch)

    def pages(m: int) -> dict:
        return {u: page({("code", "OK"): 10 * m}) for u in urls}

    await _scrape_minutes(evaluator, clock, gateways, range(3), pages)
    urls.remove("http://b/metrics")  # scaled down: what b counted stays counted
    await _scrape_minutes(evaluator, clock, gateways, range(3, 5), pages)
    assert gateways.fetched[-1] == "http://a/metrics" and gateways.fetched.count("http://b/metrics") == 3
    assert _by_name(evaluator.statuses(T0 + 4 * MINUTE))["code-timeouts"].burn(M5).requests == 40 + 20
    sync = SloEvaluator(_config(), lambda: ["http://a/metrics"], clock=clock, fetch=gateways.fetch)
    await sync.scrape_once()
    assert gateways.fetched[-1] == "http://a/metrics" and len(sync.samples) == 1


async def test_the_ring_buffer_covers_the_longest_window_and_no_more() -> None:
    evaluator, clock, gateways = _evaluator()
    await _scrape_minutes(
        evaluator, clock, gateways, range(400), lambda m: {"http://a/metrics": page({("code", "OK"): 100 * m})}
    )
    assert len(evaluator.samples) == 362  # 6 h of minutes, and the sample at each end
    six_hours = _by_name(evaluator.statuses(T0 + 399 * MINUTE))["code-timeouts"].burn(H6)
    assert (six_hours.requests, six_hours.complete) == (36000, True)


async def test_run_scrapes_until_cancelled() -> None:
    evaluator, _, gateways = _evaluator()
    gateways.pages = {"http://a/metrics": page({("code", "OK"): 1})}
    task = asyncio.create_task(evaluator.run(interval=0.001))
    for _ in range(1000):
        if len(evaluator.samples) >= 3:
            break
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(evaluator.samples) >= 3 and len(gateways.fetched) >= 3
