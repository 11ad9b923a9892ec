"""Scrape a gateway's /metrics and keep the counter samples the SLOs are computed from.

The page is Prometheus' text exposition format, parsed with prometheus_client's own parser.
What is kept, per series (so the evaluator can tell a counter reset of one series or one
gateway from the others):

- servemesh_gateway_requests_total{route_class, code}: requests by final gRPC code;
- servemesh_generation_time_to_first_token_seconds_bucket{route_class, engine, le} and _count;
- servemesh_gateway_safety_refusals_total{topic};
- the `_created` timestamps prometheus_client exposes next to them (a new one is a reset).

`Key` names what the SLOs sum series into: requests by (route class, code), TTFT buckets by
(route class, le) and counts by route class (over engines), safety refusals in all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import httpx
from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "servemesh_gateway_requests_total"
TTFT = "servemesh_generation_time_to_first_token_seconds"
TTFT_BUCKET = f"{TTFT}_bucket"
TTFT_COUNT = f"{TTFT}_count"
SAFETY_REFUSALS = "servemesh_gateway_safety_refusals_total"
#: sample name -> the name of its series' creation time
_CREATED = {
    REQUESTS: "servemesh_gateway_requests_created",
    TTFT_BUCKET: f"{TTFT}_created",
    TTFT_COUNT: f"{TTFT}_created",
    SAFETY_REFUSALS: "servemesh_gateway_safety_refusals_created",
}
_WANTED = frozenset(_CREATED) | frozenset(_CREATED.values())
#: Prometheus' text format, not OpenMetrics (whose counters and _created read differently)
ACCEPT = "text/plain; version=0.0.4"

Labels = tuple[tuple[str, str], ...]


class SeriesId(NamedTuple):
    """One time series: its sample name and sorted labels."""

    name: str
    labels: Labels


class Key(NamedTuple):
    """What series are summed into: ("requests", route_class, code), ("ttft_bucket",
    route_class, le), ("ttft_count", route_class, None), ("safety_refusals", "", None)."""

    metric: str
    route_class: str
    detail: str | float | None = None


class ScrapeError(Exception):
    """A /metrics page could not be fetched or parsed."""


@dataclass(frozen=True, slots=True)
class Scrape:
    """The SLO counters of one /metrics page: values per series, and when each series (without
    `le`) was created, where the exporter says."""

    values: dict[SeriesId, float] = field(default_factory=dict)
    created: dict[SeriesId, float] = field(default_factory=dict)

    def summed(self) -> dict[Key, float]:
        """The values summed by `Key` (over engines, topics, ...)."""
        out: dict[Key, float] = {}
        for series, value in self.values.items():
            if (key := key_of(series)) is not None:
                out[key] = out.get(key, 0.0) + value
        return out


def parse(text: str) -> Scrape:
    """The SLO counters of a page in the text exposition format (other metrics are skipped)."""
    scrape = Scrape()
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name not in _WANTED:
                    continue
                labels = tuple(sorted(sample.labels.items()))
                if sample.name in _CREATED:
                    scrape.values[SeriesId(sample.name, labels)] = float(sample.value)
                else:
                    scrape.created[SeriesId(sample.name, labels)] = float(sample.value)
    except ValueError as exc:  # the parser's complaint about a malformed line
        raise ScrapeError(f"not the Prometheus text format: {exc}") from None
    return scrape


def created_id(series: SeriesId) -> SeriesId:
    """The `_created` series that dates `series` (a histogram's is shared by its buckets)."""
    return SeriesId(_CREATED[series.name], tuple((k, v) for k, v in series.labels if k != "le"))


def key_of(series: SeriesId) -> Key | None:
    labels = dict(series.labels)
    route_class = labels.get("route_class", "")
    if series.name == REQUESTS:
        return Key("requests", route_class, labels.get("code", ""))
    if series.name == TTFT_BUCKET:
        return Key("ttft_bucket", route_class, bucket_bound(labels.get("le", "+Inf")))
    if series.name == TTFT_COUNT:
        return Key("ttft_count", route_class)
    if series.name == SAFETY_REFUSALS:
        return Key("safety_refusals", "")
    return None


def bucket_bound(le: str | float) -> float:
    """A bucket's upper bound as a comparable float ("0.8", "0.80" and 0.8 are one bound)."""
    value = float(le)
    return value if math.isinf(value) else round(value, 9)


async def fetch(client: httpx.AsyncClient, url: str, timeout: float) -> str:
    """GET a /metrics page in the text format; ScrapeError on any failure."""
    try:
        response = await client.get(url, timeout=timeout, headers={"Accept": ACCEPT})
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise ScrapeError(f"{url}: {type(exc).__name__}: {exc}") from None
    return response.text
