"""SLO definitions: the objectives of each route class, their burn-rate alerts and runbooks.

Loaded from YAML (`mesh/slo/slos.yaml` by default). The same objects drive the controller's
continuous evaluation (mesh.slo.evaluator) and the Prometheus rules (mesh.slo.rules), so the
console, `servemesh slo status` and the alerts always judge by the same numbers.

Each SLO bounds the fraction of a route class's requests that are bad:

- ttft: the first token came later than `threshold_s` (a bound of the gateway's TTFT
  histogram, so Prometheus can count it exactly); `objective` 0.95 reads "p95 <= threshold".
- server_errors: the request ended INTERNAL, UNAVAILABLE, UNKNOWN or DATA_LOSS (HTTP 5xx).
- timeouts: the request ended DEADLINE_EXCEEDED.

Burn rate is the bad fraction over a window divided by the error budget (1 - objective): 1
spends the budget exactly over the SLO period. Alerts follow the multi-window, multi-burn-rate
scheme of the Google SRE workbook: page when both 5m and 1h burn above 14.4 (2% of a 30-day
budget in an hour), open a ticket when both 30m and 6h burn above 6 (5% in 6 hours).
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from services.common.metrics import TTFT_BUCKETS

DEFAULT_PATH = Path(__file__).with_name("slos.yaml")

#: route class ids as the registry and the gateway take them
ROUTE_CLASS_RULE = "1-63 characters of a-z, 0-9, '_' and '-', starting with a letter"
ROUTE_CLASS_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")

#: final gRPC codes that count against each error SLO
SERVER_ERROR_CODES: tuple[str, ...] = ("INTERNAL", "UNAVAILABLE", "UNKNOWN", "DATA_LOSS")
TIMEOUT_CODES: tuple[str, ...] = ("DEADLINE_EXCEEDED",)

_DURATION_RE = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?")
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


class ConfigError(Exception):
    """The SLO file is missing, not YAML, or not a valid configuration."""


def parse_duration(value: Any) -> float:
    """Seconds of a Prometheus duration ("5m", "1h30m", "30d", "800ms") or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value and (m := _DURATION_RE.fullmatch(value.strip())) and any(m.groups()):
        d, h, mi, s, ms = (int(g or 0) for g in m.groups())
        return d * 86400 + h * 3600 + mi * 60 + s + ms / 1000
    raise ValueError(f"{value!r} is not a duration such as 30s, 5m, 1h or 30d")


def format_duration(seconds: float) -> str:
    """The Prometheus spelling of whole seconds: 300 -> "5m", 5400 -> "1h30m"."""
    if seconds <= 0 or seconds != int(seconds):
        raise ValueError(f"{seconds} s is not a positive whole number of seconds")
    rest, parts = int(seconds), []
    for unit, size in _UNITS:
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class SloKind(StrEnum):
    TTFT = "ttft"
    SERVER_ERRORS = "server_errors"
    TIMEOUTS = "timeouts"


class Slo(BaseModel):
    """One objective of one route class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    route_class: str = Field(pattern=f"^{ROUTE_CLASS_RE.pattern}$")
    kind: SloKind
    #: fraction of requests that must be good, in (0, 1): 0.95 for p95, 0.99 for "5xx < 1%"
    objective: float = Field(gt=0, lt=1)
    #: ttft only: the latency bound in seconds; must be a bucket bound of the TTFT histogram
    threshold_s: float | None = Field(None, gt=0)
    #: the command on-call runs when it breaches (a `servemesh` command line)
    runbook: str = Field(min_length=1, max_length=500, pattern=r"^servemesh \S")

    @model_validator(mode="after")
    def _threshold(self) -> Slo:
        if self.kind is SloKind.TTFT:
            if self.threshold_s is None:
                raise ValueError("threshold_s: required for a ttft SLO")
            if not any(math.isclose(self.threshold_s, b) for b in TTFT_BUCKETS):
                raise ValueError(
                    f"threshold_s: {self.threshold_s} is not a bucket bound of the TTFT histogram "
                    f"(services.common.metrics.TTFT_BUCKETS: {', '.join(map(str, TTFT_BUCKETS))})"
                )
        elif self.threshold_s is not None:
            raise ValueError(f"threshold_s: only ttft SLOs have one, not {self.kind.value}")
        return self

    @property
    def name(self) -> str:
        """`{route_class}-{kind}`, e.g. "chat_short-ttft"."""
        return f"{self.route_class}-{self.kind.value}"

    @property
    def error_budget(self) -> float:
        """The fraction of requests that may be bad: 1 - objective."""
        return 1.0 - self.objective

    @property
    def bad_codes(self) -> tuple[str, ...]:
        """The final codes that make a request bad (error SLOs only)."""
        return {SloKind.SERVER_ERRORS: SERVER_ERROR_CODES, SloKind.TIMEOUTS: TIMEOUT_CODES}.get(self.kind, ())


class BurnRateAlert(BaseModel):
    """Fire when the burn rate exceeds `factor` over both windows: the long one makes it
    significant, the short one makes it stop soon after the burning stops."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    short_window: Seconds
    long_window: Seconds
    factor: float = Field(gt=0)
    severity: str = Field(pattern=r"^[a-z]+$")

    @model_validator(mode="after")
    def _order(self) -> BurnRateAlert:
        if self.short_window >= self.long_window:
            raise ValueError("short_window must be shorter than long_window")
        return self


class SafetySpike(BaseModel):
    """Alert when safety refusals over `short_window` run at more than `factor` times their
    rate over `long_window` and above `min_rate_per_s` (so a quiet gateway's first refusals
    do not page). It flags a change: the long window holds the short one, so a new level that
    lasts stops firing after about long_window / factor."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    short_window: Seconds = 300.0
    long_window: Seconds = 3600.0
    factor: float = Field(5.0, gt=1)
    min_rate_per_s: float = Field(0.05, gt=0)
    for_: Seconds = Field(120.0, alias="for")
    severity: str = Field("ticket", pattern=r"^[a-z]+$")
    runbook: str = Field(min_length=1, max_length=500, pattern=r"^servemesh \S")

    @model_validator(mode="after")
    def _ratio_can_be_reached(self) -> SafetySpike:
        # the long window contains the short one: its rate is at least short/long of the short rate
        if self.factor >= self.long_window / self.short_window:
            raise ValueError(
                f"factor: {self.factor} can never be reached (the long window holds the short one: "
                f"at most {self.long_window / self.short_window:g})"
            )
        return self


class SloConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: the period the error budget is spent over
    period: Seconds = 30 * 86400.0
    #: how often the controller scrapes the gateways (its ring buffer covers the longest window)
    sample_interval: Seconds = 15.0
    #: seconds a gateway /metrics GET may take
    scrape_timeout: Seconds = 5.0
    #: the window of the reported value, and of "breached for `breach_for`"
    value_window: Seconds = 300.0
    #: BREACHED once the value_window value has been over the objective this long (the alert's `for`)
    breach_for: Seconds = 300.0
    breach_severity: str = Field("page", pattern=r"^[a-z]+$")
    fast_burn: BurnRateAlert
    slow_burn: BurnRateAlert
    safety_spike: SafetySpike
    slos: tuple[Slo, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> SloConfig:
        bad: list[str] = []
        seen: set[str] = set()
        for i, slo in enumerate(self.slos):
            if slo.name in seen:
                bad.append(f"slos[{i}]: {slo.name} is defined twice")
            seen.add(slo.name)
        if self.value_window not in (self.fast_burn.short_window, self.slow_burn.short_window):
            bad.append("value_window: must be one of the alerts' short windows")
        if self.windows[-1] > self.period:
            bad.append("period: must be longer than every window")
        if self.sample_interval * 4 > self.windows[0]:
            bad.append("sample_interval: must be at most a quarter of the shortest window")
        if bad:
            raise ValueError("; ".join(bad))
        return self

    @property
    def windows(self) -> tuple[float, ...]:
        """Every window burn rates are reported over, shortest first (5m, 30m, 1h, 6h)."""
        a, b = self.fast_burn, self.slow_burn
        return tuple(sorted({a.short_window, a.long_window, b.short_window, b.long_window}))

    @property
    def route_classes(self) -> tuple[str, ...]:
        return tuple(sorted({slo.route_class for slo in self.slos}))

    def for_route_class(self, route_class: str = "") -> list[Slo]:
        """The SLOs ordered by name; only `route_class`'s when given."""
        return sorted((s for s in self.slos if not route_class or s.route_class == route_class), key=lambda s: s.name)


def load_config(path: Path | None = None) -> SloConfig:
    """Read and validate the SLO file (default: mesh/slo/slos.yaml)."""
    path = path or DEFAULT_PATH
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML: {exc}") from None
    try:
        return SloConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None
