"""Continuous SLO evaluation from the gateways' /metrics, as the controller runs it.

Every `sample_interval` the evaluator scrapes each gateway and appends one timestamped sample
of cumulative counts to a ring buffer covering the longest window (6 h). Counts are made
monotonic per series and per gateway before they are summed, the way Prometheus' increase()
does it: a value lower than the one before, or a new `_created` time, is a counter reset (a
restarted process), and the new value is all increase. A series that appears on a gateway
already scraped once started from 0; a gateway's first scrape is its baseline. A window's
counts are then the difference of two samples, so several gateways sum, and a restart or a
missed scrape loses nothing.

`statuses(now)` judges each SLO from those windows: the value over the last 5 minutes (the
objective's TTFT quantile, interpolated in the histogram's buckets like histogram_quantile(),
or the bad fraction), burn rates over 5m, 30m, 1h and 6h, and a state:

- BREACHED: the fast-burn condition holds (5m and 1h burn above 14.4), or the 5-minute value
  has been over the objective for `breach_for` (5 minutes): the alerts' page conditions;
- WARNING: the slow-burn condition holds (30m and 6h burn above 6);
- NO_DATA: otherwise, when the 5-minute window has no requests;
- OK: otherwise.

The burn conditions use windows that are not yet complete (right after start-up) over what
there is, as Prometheus' rate() does; each window says whether it was complete.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import httpx

from mesh.slo import metrics
from mesh.slo.config import ROUTE_CLASS_RE, ROUTE_CLASS_RULE, Slo, SloConfig, SloKind
from mesh.slo.metrics import Key, Scrape, ScrapeError, SeriesId
from services.common.errors import FieldViolation, InvalidArgument

_log = logging.getLogger(__name__)

#: the gateways' metrics URLs: a list, or a callable (sync or async) asked before each scrape
MetricsUrls = Sequence[str] | Callable[[], Sequence[str] | Awaitable[Sequence[str]]]
Fetch = Callable[[str], Awaitable[str]]
_ALL_CODES = "*"


class State(StrEnum):
    NO_DATA = "no_data"
    OK = "ok"
    WARNING = "warning"
    BREACHED = "breached"


@dataclass(frozen=True, slots=True)
class WindowBurn:
    """The error budget burn over one window."""

    #: the window's length in seconds
    window: float
    requests: int
    bad_fraction: float
    #: bad_fraction / (1 - objective)
    burn_rate: float
    #: the buffer reaches back the whole window (else the numbers are over what there is)
    complete: bool


@dataclass(frozen=True, slots=True)
class SloStatus:
    slo: Slo
    state: State
    #: over the value window: the objective's TTFT quantile in seconds, else the bad fraction;
    #: None without requests (or TTFT beyond the histogram's largest finite bound)
    value: float | None
    #: one per configured window, shortest first
    burn_rates: tuple[WindowBurn, ...]
    #: time.time() since which the value has been over the objective; None while it is not
    breach_start: float | None

    def burn(self, window: float) -> WindowBurn:
        return next(b for b in self.burn_rates if b.window == window)


@dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative counts (reset-adjusted, summed over gateways) at one time."""

    time: float
    totals: Mapping[Key, float]


@dataclass(slots=True)
class _Source:
    """What one gateway's scrapes have added up to so far."""

    last: dict[SeriesId, float]
    created: dict[SeriesId, float]
    adjusted: dict[SeriesId, float] = field(default_factory=dict)

    def update(self, scrape: Scrape) -> None:
        for series, value in scrape.values.items():
            before = self.last.get(series)
            cid = metrics.created_id(series)
            recreated = cid in scrape.created and cid in self.created and scrape.created[cid] != self.created[cid]
            if before is None or recreated or value < before:
                increase = value  # new series, or a reset: it counted up from 0
            else:
                increase = value - before
            self.adjusted[series] = self.adjusted.get(series, 0.0) + increase
        self.last, self.created = dict(scrape.values), dict(scrape.created)


class SloEvaluator:
    """Scrapes the gateways into a ring buffer of samples and judges the SLOs of `config`.

    `metrics_urls`: the gateways' /metrics URLs, or a callable returning them (sync or async),
    asked before every scrape so gateways may come and go. `clock`: seconds since the epoch
    (time.time). `fetch`: GETs one URL's page (default: httpx, with the config's timeout)."""

    def __init__(
        self,
        config: SloConfig,
        metrics_urls: MetricsUrls,
        *,
        clock: Callable[[], float] = time.time,
        fetch: Fetch | None = None,
    ) -> None:
        self.config = config
        self._urls = metrics_urls
        self._clock = clock
        self._fetch = fetch
        self._client: httpx.AsyncClient | None = None
        longest = config.windows[-1]
        self._samples: deque[Sample] = deque(maxlen=math.ceil(longest / config.sample_interval) + 2)
        self._sources: dict[str, _Source] = {}
        #: what gateways that left the list had added up to (kept, so totals never drop)
        self._retired: dict[Key, float] = {}
        #: URL -> why its last scrape failed
        self.errors: dict[str, str] = {}
        self._tolerance = config.sample_interval / 2

    # -- scraping

    async def scrape_once(self) -> Sample | None:
        """Scrape every gateway once and append a sample; None (and nothing appended) when
        every scrape failed. Failures are in `errors`."""
        at = self._clock()
        urls = list(dict.fromkeys(await self._current_urls()))
        pages = await asyncio.gather(*(self._get(url) for url in urls), return_exceptions=True)
        self.errors = {}
        ok = 0
        for url, page in zip(urls, pages, strict=True):
            try:
                if isinstance(page, BaseException):
                    raise page
                self._add(url, page)
                ok += 1
            except Exception as exc:  # this gateway counts nothing new this time; the others do
                self.errors[url] = str(exc) if isinstance(exc, ScrapeError) else f"{type(exc).__name__}: {exc}"
                _log.warning("SLO scrape of %s failed: %s", url, self.errors[url])
        for url in [u for u in self._sources if u not in urls]:
            self._retire(url)
        if urls and not ok:
            return None
        return self.record(at)

    def record(self, at: float) -> Sample:
        """Append the sample of what the gateways add up to now, at time `at` (never before the
        last sample's)."""
        totals: dict[Key, float] = dict(self._retired)
        for source in self._sources.values():
            _add_up(totals, source.adjusted)
        if self._samples and at < self._samples[-1].time:  # the wall clock stepped back: keep the order
            at = self._samples[-1].time
        sample = Sample(at, totals)
        self._samples.append(sample)
        return sample

    @property
    def last_scrape_time(self) -> float | None:
        return self._samples[-1].time if self._samples else None

    @property
    def samples(self) -> tuple[Sample, ...]:
        return tuple(self._samples)

    async def run(self, interval: float | None = None) -> None:
        """Scrape every `interval` seconds (default: the config's sample_interval) until
        cancelled. A shorter interval than the config's shortens what the buffer covers."""
        interval = interval or self.config.sample_interval
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while True:
                try:
                    await self.scrape_once()
                except Exception:
                    _log.exception("SLO scrape failed")
                next_at = max(next_at + interval, loop.time())
                await asyncio.sleep(next_at - loop.time())
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _current_urls(self) -> list[str]:
        if not callable(self._urls):
            return list(self._urls)
        urls = self._urls()
        if inspect.isawaitable(urls):
            urls = await urls
        return list(urls)

    async def _get(self, url: str) -> str:
        if self._fetch is not None:
            return await self._fetch(url)
        if self._client is None:
            self._client = httpx.AsyncClient()
        return await metrics.fetch(self._client, url, self.config.scrape_timeout)

    def _add(self, url: str, text: str) -> None:
        scrape = metrics.parse(text)
        source = self._sources.get(url)
        if source is None:  # the baseline: what it counted before we looked is not in any window
            self._sources[url] = _Source(last=dict(scrape.values), created=dict(scrape.created))
        else:
            source.update(scrape)

    def _retire(self, url: str) -> None:
        _add_up(self._retired, self._sources.pop(url).adjusted)

    # -- judging

    def statuses(self, now: float | None = None, route_class: str = "") -> list[SloStatus]:
        """Every SLO (only `route_class`'s when given), ordered by name, as of `now` (default:
        the clock). InvalidArgument if `route_class` is not a route class id."""
        if route_class and not ROUTE_CLASS_RE.fullmatch(route_class):
            raise InvalidArgument(FieldViolation("route_class", f"must be {ROUTE_CLASS_RULE}; got {route_class!r}"))
        now = self._clock() if now is None else now
        return [self._status(slo, now) for slo in self.config.for_route_class(route_class)]

    def _status(self, slo: Slo, now: float) -> SloStatus:
        cfg = self.config
        burns = tuple(self._burn(slo, now, w) for w in cfg.windows)
        by_window = {b.window: b for b in burns}
        current = by_window[cfg.value_window]
        value = self._value(slo, now) if current.requests else None
        breach_start = self._breach_start(slo, now)
        fast, slow = cfg.fast_burn, cfg.slow_burn
        fast_burn = all(by_window[w].burn_rate > fast.factor for w in (fast.short_window, fast.long_window))
        slow_burn = all(by_window[w].burn_rate > slow.factor for w in (slow.short_window, slow.long_window))
        if fast_burn or (breach_start is not None and now - breach_start >= cfg.breach_for):
            state = State.BREACHED
        elif slow_burn:
            state = State.WARNING
        elif not current.requests:
            state = State.NO_DATA
        else:
            state = State.OK
        return SloStatus(slo, state, value, burns, breach_start)

    def _span(self, end_at: float, length: float) -> tuple[Sample, Sample, bool] | None:
        """(first, last, complete): the samples bounding the window of `length` ending at `end_at`."""
        last = bisect.bisect_right(self._samples, end_at, key=_time) - 1
        if last < 0:
            return None
        first = bisect.bisect_right(self._samples, end_at - length + self._tolerance, key=_time) - 1
        complete = first >= 0
        return self._samples[max(first, 0)], self._samples[last], complete

    def _counts(self, slo: Slo, first: Sample, last: Sample) -> tuple[float, float]:
        """(requests, bad requests) between two samples."""

        def inc(key: Key) -> float:
            return max(0.0, last.totals.get(key, 0.0) - first.totals.get(key, 0.0))

        rc = slo.route_class
        if slo.kind is SloKind.TTFT:
            assert slo.threshold_s is not None
            total = inc(Key("ttft_count", rc))
            good = inc(Key("ttft_bucket", rc, metrics.bucket_bound(slo.threshold_s)))
            return total, max(0.0, total - good)
        total = inc(Key("requests", rc, _ALL_CODES))
        return total, sum(inc(Key("requests", rc, code)) for code in slo.bad_codes)

    def _burn(self, slo: Slo, now: float, window: float) -> WindowBurn:
        span = self._span(now, window)
        if span is None:
            return WindowBurn(window, 0, 0.0, 0.0, False)
        first, last, complete = span
        total, bad = self._counts(slo, first, last)
        fraction = bad / total if total > 0 else 0.0
        return WindowBurn(window, round(total), fraction, fraction / slo.error_budget, complete)

    def _over(self, slo: Slo, end_at: float) -> bool:
        """Whether the value-window value ending at `end_at` is over the objective."""
        span = self._span(end_at, self.config.value_window)
        if span is None:
            return False
        total, bad = self._counts(slo, span[0], span[1])
        return total > 0 and bad / total > slo.error_budget

    def _breach_start(self, slo: Slo, now: float) -> float | None:
        if not self._over(slo, now):
            return None
        start = now
        for sample in reversed(self._samples):
            if sample.time > now:
                continue
            if not self._over(slo, sample.time):
                break
            start = sample.time
        return start

    def _value(self, slo: Slo, now: float) -> float | None:
        span = self._span(now, self.config.value_window)
        if span is None:
            return None
        first, last, _ = span
        if slo.kind is not SloKind.TTFT:
            total, bad = self._counts(slo, first, last)
            return bad / total if total > 0 else None
        buckets = {
            key.detail: max(0.0, value - first.totals.get(key, 0.0))
            for key, value in last.totals.items()
            if key.metric == "ttft_bucket" and key.route_class == slo.route_class
        }
        return histogram_quantile(slo.objective, buckets.items())  # type: ignore[arg-type]


def _add_up(totals: dict[Key, float], adjusted: Mapping[SeriesId, float]) -> None:
    """Add one gateway's series into `totals` by Key, requests also over every code."""
    for series, value in adjusted.items():
        if (key := metrics.key_of(series)) is not None:
            totals[key] = totals.get(key, 0.0) + value
            if key.metric == "requests":
                every = Key("requests", key.route_class, _ALL_CODES)
                totals[every] = totals.get(every, 0.0) + value


def _time(sample: Sample) -> float:
    return sample.time


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The q-quantile of cumulative (upper bound, count) buckets, as Prometheus'
    histogram_quantile(): linear interpolation within the bucket the rank falls in, the first
    bucket starting at 0, the highest finite bound when the rank falls in +Inf. None without
    observations or without a +Inf bucket."""
    ordered = sorted(buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]):
        return None
    total = ordered[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for i, (bound, count) in enumerate(ordered):
        if count >= rank:
            if math.isinf(bound):
                return ordered[i - 1][0]
            if i == 0 and bound <= 0:
                return bound
            return lower + (bound - lower) * ((rank - below) / (count - below)) if count > below else bound
        lower, below = bound, count
    return ordered[-2][0]  # pragma: no cover - the +Inf bucket holds every observation
