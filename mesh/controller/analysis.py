"""Judging one analysis window: the canary against stable over the same interval.

Pure functions over measured windows, so every threshold is tested without a mesh. A
window with too few requests to either deployment is inconclusive, never a pass; a
window fails if any measurement fails (Argo Rollouts' and Flagger's rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from mesh.controller.metrics import Window


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Thresholds:
    """AnalysisSpec with its defaults filled in (the registry stores them filled)."""

    min_requests: int = 20
    max_error_rate: float = 0.01
    max_error_rate_margin: float = 0.005
    max_latency_ratio: float = 3.0
    max_cost_ratio: float = 2.0
    max_golden_drop: float = 0.1
    latency_slack_s: float = 0.25


@dataclass(frozen=True)
class Measurement:
    metric: str
    canary: float
    stable: float
    threshold: float
    verdict: Verdict
    detail: str


@dataclass(frozen=True)
class Golden:
    """Pass rates of the golden set on each deployment during the window (None: not run or failed to run)."""

    canary: float | None
    stable: float | None
    detail: str = ""


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _latency_limit(stable_p99: float, t: Thresholds) -> float:
    """Canary p99 above this fails: the ratio to stable's, and never closer to stable's than the slack."""
    return max(t.max_latency_ratio * stable_p99, stable_p99 + t.latency_slack_s)


def judge(
    canary: Window, stable: Window, t: Thresholds, golden: Golden | None = None
) -> tuple[Verdict, list[Measurement]]:
    """The window's verdict and its measurements, in a fixed order."""
    out: list[Measurement] = []
    enough = canary.requests >= t.min_requests and stable.requests >= t.min_requests
    out.append(
        Measurement(
            "requests",
            canary.requests,
            stable.requests,
            t.min_requests,
            Verdict.PASS if enough else Verdict.INCONCLUSIVE,
            f"canary {canary.requests:.0f}, stable {stable.requests:.0f} requests (at least {t.min_requests} each)",
        )
    )
    err_limit = min(t.max_error_rate, stable.error_rate + t.max_error_rate_margin)
    if not enough:
        verdict = Verdict.INCONCLUSIVE
    else:
        verdict = Verdict.FAIL if canary.error_rate > err_limit else Verdict.PASS
    out.append(
        Measurement(
            "error_rate",
            canary.error_rate,
            stable.error_rate,
            err_limit,
            verdict,
            f"canary {_pct(canary.error_rate)} ({canary.errors:.0f} errors), stable {_pct(stable.error_rate)}; "
            f"limit {_pct(err_limit)} (max {_pct(t.max_error_rate)}, stable + {_pct(t.max_error_rate_margin)})",
        )
    )
    c99, s99 = canary.quantile(0.99), stable.quantile(0.99)
    if not enough or math.isnan(c99) or math.isnan(s99):
        verdict, limit = Verdict.INCONCLUSIVE, _latency_limit(s99, t) if not math.isnan(s99) else 0.0
    else:
        limit = _latency_limit(s99, t)
        verdict = Verdict.FAIL if c99 > limit else Verdict.PASS
    out.append(
        Measurement(
            "latency_p99_s",
            0.0 if math.isnan(c99) else c99,
            0.0 if math.isnan(s99) else s99,
            limit,
            verdict,
            f"canary p99 {c99 * 1000:.1f} ms, stable {s99 * 1000:.1f} ms"
            f" (limit {t.max_latency_ratio:g}x stable and at least {t.latency_slack_s * 1000:g} ms over it)",
        )
    )
    ccost, scost = canary.cost_per_request, stable.cost_per_request
    if ccost is not None and scost is not None:
        limit = t.max_cost_ratio * scost
        if not enough:
            verdict = Verdict.INCONCLUSIVE
        elif ccost == 0 and scost == 0:
            verdict = Verdict.PASS
        else:
            verdict = Verdict.FAIL if ccost > limit else Verdict.PASS
        out.append(
            Measurement(
                "cost_per_request",
                ccost,
                scost,
                limit,
                verdict,
                f"canary {ccost:.1f}, stable {scost:.1f} tokens per request (limit {t.max_cost_ratio:g}x stable)",
            )
        )
    if golden is not None:
        if golden.canary is None or golden.stable is None:
            out.append(Measurement("golden_pass_rate", 0.0, 0.0, 0.0, Verdict.INCONCLUSIVE, golden.detail.lstrip("; ")))
        else:
            limit = golden.stable * (1 - t.max_golden_drop)
            verdict = Verdict.FAIL if golden.canary < limit else Verdict.PASS
            out.append(
                Measurement(
                    "golden_pass_rate",
                    golden.canary,
                    golden.stable,
                    limit,
                    verdict,
                    f"canary {_pct(golden.canary)}, stable {_pct(golden.stable)} of goldens passed "
                    f"(limit: at most {_pct(t.max_golden_drop)} of stable's lower){golden.detail}",
                )
            )
    verdicts = {m.verdict for m in out}
    if Verdict.FAIL in verdicts:
        return Verdict.FAIL, out
    if Verdict.INCONCLUSIVE in verdicts:
        return Verdict.INCONCLUSIVE, out
    return Verdict.PASS, out
