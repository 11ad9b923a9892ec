"""Synthetic /metrics pages of gateways, in the text exposition format, for the SLO tests."""

from __future__ import annotations

import math
from collections.abc import Mapping

T0 = 1_700_000_000.0
MINUTE = 60.0


def page(
    requests: Mapping[tuple[str, str], float] | None = None,
    ttft: Mapping[tuple[str, str], Mapping[float, float]] | None = None,
    created: float | None = T0 - 3600,
) -> str:
    """requests: (route_class, code) -> count; ttft: (route_class, engine) -> {le: cumulative
    count} (the +Inf bucket is the count); `created`: when the process made its series (None:
    no _created series, as with PROMETHEUS_DISABLE_CREATED_SERIES)."""
    lines = [
        "# HELP servemesh_gateway_requests_total Generation requests finished.",
        "# TYPE servemesh_gateway_requests_total counter",
    ]
    for (rc, code), value in sorted((requests or {}).items()):
        lines.append(f'servemesh_gateway_requests_total{{route_class="{rc}",code="{code}"}} {value}')
    lines += ["# TYPE servemesh_gateway_requests_created gauge"]
    for rc, code in sorted(requests or {}) if created is not None else ():
        lines.append(f'servemesh_gateway_requests_created{{route_class="{rc}",code="{code}"}} {created}')
    name = "servemesh_generation_time_to_first_token_seconds"
    lines += [f"# HELP {name} TTFT.", f"# TYPE {name} histogram"]
    for (rc, engine), buckets in sorted((ttft or {}).items()):
        for le, value in sorted(buckets.items()):
            bound = "+Inf" if math.isinf(le) else repr(le)
            lines.append(f'{name}_bucket{{engine="{engine}",le="{bound}",route_class="{rc}"}} {value}')
        count = buckets[math.inf]
        lines.append(f'{name}_count{{engine="{engine}",route_class="{rc}"}} {count}')
        lines.append(f'{name}_sum{{engine="{engine}",route_class="{rc}"}} {count * 0.5}')
    lines += [f"# TYPE {name}_created gauge"]
    for rc, engine in sorted(ttft or {}) if created is not None else ():
        lines.append(f'{name}_created{{engine="{engine}",route_class="{rc}"}} {created}')
    lines += ["# TYPE process_cpu_seconds_total counter", "process_cpu_seconds_total 12.5"]
    return "\n".join(lines) + "\n"


class Gateways:
    """Fake gateways: `pages[url]` is what a GET of `url` returns now (an Exception is raised)."""

    def __init__(self) -> None:
        self.pages: dict[str, str | Exception] = {}
        self.fetched: list[str] = []

    async def fetch(self, url: str) -> str:
        self.fetched.append(url)
        page_ = self.pages[url]
        if isinstance(page_, Exception):
            raise page_
        return page_


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
