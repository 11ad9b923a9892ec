"""`servemesh rollout ...`: progressive rollouts of a canary deployment on a route.

`start` registers a rollout; the rollout controller then walks its steps (shadow traffic, then
growing shares of the route's traffic), judging each analysis window, and rolls the canary back
on a failed one. `status` shows where rollouts are and what analysis measured; `pause`,
`resume`, `promote` and `abort` are the operator's levers; `watch` follows one until it ends.

Steps, in the order they run:

    --shadow 10:60s      first, copy 10% of the route's requests to the canary for 60s (its
                         responses are discarded); `--shadow off` for none
    --step 1:60s         then send the canary 1% of the traffic for 60s; repeat --step for each
    --step 50:hold       ... 50%, held until `servemesh rollout resume` (or promote)
    --step 100           ... and finally everything

Without --step the ladder is 1%, 10%, 50% for 60s each, then 100%; without --step or --shadow
the registry's default steps apply (the same, after a 60s shadow step at 10%). Every step is
analysed (canary against stable over the same windows) unless --no-analysis.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import duration_pb2, timestamp_pb2
from rich.markup import escape
from rich.table import Table
from servemesh.registry.v1 import registry_pb2 as rpb
from servemesh.registry.v1 import registry_pb2_grpc as rpb_grpc

from mesh.cli_keys import parse_duration
from mesh.cli_route import Home, Reason, _call, _dep_name, _route_name, _short, err, out

rollout_app = typer.Typer(
    help="Rollouts: move a route's traffic to a canary step by step, with analysis and automatic rollback.",
    no_args_is_help=True,
)

R = rpb.Rollout
M = rpb.Measurement
ENDED = (R.STATE_PROMOTED, R.STATE_ABORTED, R.STATE_ROLLED_BACK)
_STATES = {
    R.STATE_PENDING: ("pending", "white"),
    R.STATE_PROGRESSING: ("progressing", "cyan"),
    R.STATE_PAUSED: ("paused", "yellow"),
    R.STATE_PROMOTED: ("promoted", "green"),
    R.STATE_ABORTED: ("aborted", "red"),
    R.STATE_ROLLED_BACK: ("rolled back", "red"),
}
_VERDICTS = {
    M.VERDICT_PASS: ("pass", "green"),
    M.VERDICT_FAIL: ("FAIL", "red"),
    M.VERDICT_INCONCLUSIVE: ("inconclusive", "yellow"),
}
#: the ladder after a --shadow step when no --step is given
DEFAULT_LADDER = ("1:60s", "10:60s", "50:60s", "100")
_WEIGHT_RE = re.compile(r"(\d{1,3})%?")
PAGE = 500
#: active rollouts `status` lists (at most one per route: far more than any registry holds)
MAX_ACTIVE = 10_000


# --- step specs --------------------------------------------------------------------------


def _pause(text: str, param_hint: str) -> timedelta:
    """`60s`, `5m`, `1h30m`, `0` or `hold` (held until an operator resumes)."""
    text = text.strip().lower()
    if text in ("0", "hold"):
        return timedelta(0)
    try:
        value = parse_duration(text)
    except typer.BadParameter:
        value = None
    if value is None:
        raise typer.BadParameter(
            f"{text!r}: expected a pause such as 60s, 5m or 1h30m, or 'hold' (until resumed)", param_hint=param_hint
        )
    return value


def _percent(text: str, param_hint: str, *, low: int) -> int:
    match = _WEIGHT_RE.fullmatch(text.strip())
    if match is None or not low <= int(match.group(1)) <= 100:
        raise typer.BadParameter(f"{text!r}: expected a percentage in [{low}, 100], e.g. 10", param_hint=param_hint)
    return int(match.group(1))


def parse_step(spec: str, *, analysis: bool = True) -> rpb.RolloutStep:
    """`WEIGHT[:PAUSE]` -> a step: `1:60s`, `10%:5m`, `50:hold`, `100` (a pause of 0: not held,
    or held until resumed when it is not the last step at 100%)."""
    weight_text, _, pause_text = spec.partition(":")
    if weight_text.strip() in ("0", "0%"):
        raise typer.BadParameter(
            f"{spec!r}: a step of 0% is a shadow step: use --shadow PCT:PAUSE", param_hint="--step"
        )
    step = rpb.RolloutStep(weight=_percent(weight_text, "--step", low=1))
    pause = _pause(pause_text, "--step") if pause_text else timedelta(0)
    if pause:
        step.pause.FromTimedelta(pause)
    step.analysis = analysis and (step.weight < 100 or bool(pause))
    return step


def parse_shadow(spec: str, *, analysis: bool = True) -> rpb.RolloutStep | None:
    """`PCT[:PAUSE]` -> a shadow step (weight 0, PCT% of requests mirrored; pause 60s by
    default); `off` -> None."""
    if spec.strip().lower() in ("off", "none", "0"):
        return None
    pct_text, _, pause_text = spec.partition(":")
    step = rpb.RolloutStep(weight=0, mirror_percent=_percent(pct_text, "--shadow", low=1), analysis=analysis)
    step.pause.FromTimedelta(_pause(pause_text, "--shadow") if pause_text else timedelta(seconds=60))
    return step


def build_steps(steps: list[str], shadow: str | None, *, analysis: bool = True) -> list[rpb.RolloutStep]:
    """The steps to send: [] (the registry's default) when neither --step nor --shadow is given."""
    if not steps and shadow is None:
        return []
    first = parse_shadow(shadow, analysis=analysis) if shadow is not None else None
    ladder = [parse_step(s, analysis=analysis) for s in (steps or DEFAULT_LADDER)]
    return ([first] if first is not None else []) + ladder


# --- formatting ----------------------------------------------------------------------------


def _rollout_name(name: str) -> str:
    return name if name.startswith("rollouts/") else f"rollouts/{name}"


def _seconds(d: duration_pb2.Duration) -> float:
    return d.seconds + d.nanos / 1e9


def _dur(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes) + [f"{secs}s"] * bool(secs)
    return "".join(parts) or "0s"


def _when(ts: timestamp_pb2.Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _state(state: int) -> str:
    label, color = _STATES.get(state, ("?", "white"))
    return f"[{color}]{label}[/{color}]"


def _verdict(verdict: int) -> str:
    label, color = _VERDICTS.get(verdict, ("-", "white"))
    return f"[{color}]{label}[/{color}]"


def _num(value: float) -> str:
    return f"{value:.4g}"


def describe_step(step: rpb.RolloutStep, *, last: bool = False) -> str:
    """`shadow 10% for 1m`, `1% for 1m + mirror 5%`, `50% until resumed`, `100%`."""
    text = f"shadow {step.mirror_percent:g}%" if step.weight == 0 else f"{step.weight}%"
    if step.weight and step.mirror_percent:
        text += f" + mirror {step.mirror_percent:g}%"
    pause = _seconds(step.pause)
    if pause:
        text += f" for {_dur(pause)}"
    elif not (last and step.weight == 100):
        text += " until resumed"
    return text + (" (analysed)" if step.analysis else "")


def _step_of(r: rpb.Rollout) -> str:
    n = len(r.steps)
    if r.current_step >= n:
        return f"{n}/{n} done"
    step = r.steps[r.current_step]
    return f"{r.current_step + 1}/{n}: {describe_step(step, last=r.current_step == n - 1)}"


def _last_verdict(r: rpb.Rollout) -> str:
    return _verdict(r.windows[-1].verdict) if r.windows else "-"


def _print_line(verb: str, r: rpb.Rollout) -> None:
    out.print(
        f"{verb} {escape(r.name)}: {_state(r.state)}, step {escape(_step_of(r))}; canary"
        f" {r.applied_weight}%, mirror {r.applied_mirror_percent:g}%"
    )


async def _list(stub: rpb_grpc.RegistryServiceStub, *, active_only: bool, limit: int) -> list[rpb.Rollout]:
    """Up to `limit` rollouts, newest first."""
    found: list[rpb.Rollout] = []
    token = ""
    while len(found) < limit:
        request = rpb.ListRolloutsRequest(
            active_only=active_only, page_size=min(limit - len(found), PAGE), page_token=token
        )
        page = await stub.ListRollouts(request, timeout=10)
        found += page.rollouts
        token = page.next_page_token
        if not token:
            break
    return found


# --- commands ------------------------------------------------------------------------------


@rollout_app.command("start")
def rollout_start(
    route: Annotated[str, typer.Argument(help="Route id, e.g. inference.")],
    canary: Annotated[str, typer.Option(help="The new deployment.")],
    reason: Reason,
    stable: Annotated[
        str, typer.Option(help="The deployment the route serves now (default: its only backend with weight > 0).")
    ] = "",
    name: Annotated[str, typer.Option(help="Rollout id (default: <route>-<UTC time>).")] = "",
    step: Annotated[
        list[str] | None,
        typer.Option(
            help="WEIGHT[:PAUSE], e.g. 1:60s, 50:hold, 100; repeat in order (default: 1, 10, 50 for 60s, 100)."
        ),
    ] = None,
    shadow: Annotated[
        str | None, typer.Option(help="PCT[:PAUSE]: a first step mirroring PCT% to the canary, e.g. 10:60s; or off.")
    ] = None,
    no_analysis: Annotated[
        bool, typer.Option("--no-analysis", help="Take each step when its pause ends, without analysis.")
    ] = False,
    window: Annotated[str, typer.Option(help="Analysis window, e.g. 10s (default: 10s).")] = "",
    min_requests: Annotated[
        int, typer.Option(help="Fewer requests per window are inconclusive (default: 20).", show_default=False)
    ] = 0,
    max_error_rate: Annotated[
        float, typer.Option(help="Canary error rate that fails, in (0, 1] (default: 0.01).", show_default=False)
    ] = 0,
    golden_set: Annotated[str, typer.Option(help="Golden set run against both deployments each window.")] = "",
    home: Home = None,
) -> None:
    """Start a rollout of a canary deployment on a route; the rollout controller walks its steps."""
    steps = build_steps(list(step or []), shadow, analysis=not no_analysis)
    route_name = _route_name(route)
    rollout_id = name or f"{_short(route_name)[:47]}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    rollout = rpb.Rollout(name=_rollout_name(rollout_id), route=route_name, canary_deployment=_dep_name(canary))
    rollout.steps.extend(steps)
    if window:
        rollout.analysis.window.FromTimedelta(_pause(window, "--window"))
    rollout.analysis.min_requests = min_requests
    rollout.analysis.max_error_rate = max_error_rate
    rollout.analysis.golden_set = golden_set

    async def run(stub: rpb_grpc.RegistryServiceStub) -> rpb.Rollout:
        if stable:
            rollout.stable_deployment = _dep_name(stable)
        else:
            current = (await stub.GetRoute(rpb.GetRouteRequest(name=route_name), timeout=10)).route
            serving = [b.deployment for b in current.backends if b.weight > 0]
            if len(serving) != 1:
                raise typer.BadParameter(
                    f"{route_name} sends traffic to {', '.join(map(_short, serving)) or 'nothing'}: name the"
                    " deployment to start from with --stable",
                    param_hint="--stable",
                )
            rollout.stable_deployment = serving[0]
        request = rpb.CreateRolloutRequest(rollout=rollout, reason=reason)
        return (await stub.CreateRollout(request, timeout=10)).rollout

    created = _call(home, run)
    n = len(created.steps)
    plan = ", then ".join(describe_step(s, last=i == n - 1) for i, s in enumerate(created.steps))
    out.print(
        f"started {escape(created.name)} on {escape(created.route)}: {escape(_short(created.stable_deployment))} ->"
        f" {escape(_short(created.canary_deployment))}",
        highlight=False,
    )
    out.print(f"steps: {escape(plan)}", highlight=False)
    out.print("pending: the rollout controller takes the first step; follow it with `servemesh rollout watch`")


@rollout_app.command("status")
def rollout_status(
    name: Annotated[str | None, typer.Argument(help="Rollout id (default: every active and recent rollout).")] = None,
    recent: Annotated[int, typer.Option(help="Ended rollouts to list besides the active ones.")] = 10,
    home: Home = None,
) -> None:
    """Where rollouts are: state, step, applied weights and the last analysis windows."""
    if name:
        r = _call(home, lambda stub: stub.GetRollout(rpb.GetRolloutRequest(name=_rollout_name(name)), timeout=10))
        _print_rollout(r.rollout)
        return

    async def run(stub: rpb_grpc.RegistryServiceStub) -> list[rpb.Rollout]:
        active = await _list(stub, active_only=True, limit=MAX_ACTIVE)
        latest = await _list(stub, active_only=False, limit=recent) if recent > 0 else []
        names = {r.name for r in active}
        return active + [r for r in latest if r.name not in names]

    rollouts = _call(home, run)
    if not rollouts:
        out.print("no rollouts yet: start one with `servemesh rollout start ROUTE --canary DEPLOYMENT --reason ...`")
        return
    table = Table("rollout", "route", "stable -> canary", "state", "step", "canary", "mirror", "last window", "created")
    for r in rollouts:
        table.add_row(
            escape(_short(r.name)),
            escape(_short(r.route)),
            escape(f"{_short(r.stable_deployment)} -> {_short(r.canary_deployment)}"),
            _state(r.state),
            escape(_step_of(r)),
            f"{r.applied_weight}%",
            f"{r.applied_mirror_percent:g}%",
            _last_verdict(r),
            _when(r.create_time),
        )
    out.print(table)


def _print_rollout(r: rpb.Rollout) -> None:
    out.print(
        f"[bold]{escape(r.name)}[/bold] on {escape(r.route)}: {escape(_short(r.stable_deployment))} ->"
        f" {escape(_short(r.canary_deployment))}",
        highlight=False,
    )
    out.print(f"state: {_state(r.state)}   step {escape(_step_of(r))}", highlight=False)
    out.print(
        f"applied: canary {r.applied_weight}% of the traffic, {r.applied_mirror_percent:g}% mirrored"
        f"   step started {_when(r.step_start_time) or '-'}   created {_when(r.create_time)}",
        highlight=False,
    )
    if r.message:
        out.print(f"message: {escape(r.message)}", highlight=False)
    a = r.analysis
    out.print(
        f"analysis: window {_dur(_seconds(a.window))}, at least {a.min_requests} requests, errors <="
        f" {a.max_error_rate:g} (stable + {a.max_error_rate_margin:g}), p99 <= {a.max_latency_ratio:g}x"
        f" (+{a.latency_slack_seconds * 1000:g} ms slack), cost <="
        f" {a.max_cost_ratio:g}x" + (f", golden set {escape(a.golden_set)}" if a.golden_set else ""),
        highlight=False,
    )

    steps = Table("#", "step", "", title="steps")
    n = len(r.steps)
    for i, s in enumerate(r.steps):
        mark = "<- now" if i == r.current_step and r.state not in ENDED else ""
        steps.add_row(str(i + 1), escape(describe_step(s, last=i == n - 1)), mark)
    out.print(steps)

    if r.windows:
        windows = Table("ended", "step", "verdict", "source", "measurements", title="last analysis windows")
        for w in list(r.windows)[-5:]:
            summary = ", ".join(f"{m.metric} {_VERDICTS.get(m.verdict, ('-',))[0]}" for m in w.measurements)
            windows.add_row(_when(w.end_time), str(w.step + 1), _verdict(w.verdict), escape(w.source), escape(summary))
        out.print(windows)
        last = r.windows[-1]
        measured = Table("metric", "canary", "stable", "threshold", "verdict", "detail", title="latest window")
        for m in last.measurements:
            measured.add_row(
                escape(m.metric),
                _num(m.canary),
                _num(m.stable),
                _num(m.threshold),
                _verdict(m.verdict),
                escape(m.detail),
            )
        out.print(measured)
    else:
        out.print("no analysis windows yet")

    history = Table("time", "change", "step", "by", "reason", title="history (latest)")
    for e in list(r.history)[-6:]:
        change = _STATES.get(e.to_state, ("?",))[0]
        if e.from_state and e.from_state != e.to_state:
            change = f"{_STATES.get(e.from_state, ('?',))[0]} -> {change}"
        elif e.from_state:
            change = "step"
        history.add_row(_when(e.time), change, str(min(e.step + 1, n)), escape(e.actor), escape(e.reason))
    out.print(history)


def _operate(verb: str, rpc: str, request_type: type, name: str, reason: str, home: Path | None) -> None:
    """One of PauseRollout, ResumeRollout, PromoteRollout, AbortRollout: they take the same request."""
    request = request_type(name=_rollout_name(name), reason=reason)
    r = _call(home, lambda stub: getattr(stub, rpc)(request, timeout=10)).rollout
    _print_line(verb, r)


@rollout_app.command("pause")
def rollout_pause(name: Annotated[str, typer.Argument(help="Rollout id.")], reason: Reason, home: Home = None) -> None:
    """Hold a rollout at its current step (weights stay, analysis goes on)."""
    _operate("paused", "PauseRollout", rpb.PauseRolloutRequest, name, reason, home)


@rollout_app.command("resume")
def rollout_resume(name: Annotated[str, typer.Argument(help="Rollout id.")], reason: Reason, home: Home = None) -> None:
    """Let a paused rollout go on; its current step starts its pause again."""
    _operate("resumed", "ResumeRollout", rpb.ResumeRolloutRequest, name, reason, home)


@rollout_app.command("promote")
def rollout_promote(
    name: Annotated[str, typer.Argument(help="Rollout id.")], reason: Reason, home: Home = None
) -> None:
    """Skip the remaining steps: the canary gets all of the route's traffic."""
    _operate("promoted", "PromoteRollout", rpb.PromoteRolloutRequest, name, reason, home)


@rollout_app.command("abort")
def rollout_abort(name: Annotated[str, typer.Argument(help="Rollout id.")], reason: Reason, home: Home = None) -> None:
    """Stop a rollout: the canary gets no more traffic and no more mirrored requests."""
    _operate("aborted", "AbortRollout", rpb.AbortRolloutRequest, name, reason, home)


@rollout_app.command("watch")
def rollout_watch(name: Annotated[str, typer.Argument(help="Rollout id.")], home: Home = None) -> None:
    """Print a line at every change of a rollout until it ends; exits 0 once promoted, 1 otherwise."""
    wanted = _rollout_name(name)

    async def run(stub: rpb_grpc.RegistryServiceStub) -> int:
        seen = ""
        async for message in stub.WatchRollouts(rpb.WatchRolloutsRequest()):
            r = next((r for r in message.rollouts if r.name == wanted), None)
            if r is None:
                err.print(f"error: NOT_FOUND: {wanted} does not exist", markup=False, highlight=False)
                return 1
            if r.etag == seen:
                continue
            seen = r.etag
            verdict = f"; last window {_last_verdict(r)}" if r.windows else ""
            text = f" - {escape(r.message)}" if r.message else ""
            out.print(
                f"{_when(r.update_time)} {_state(r.state)} step {escape(_step_of(r))}; canary {r.applied_weight}%,"
                f" mirror {r.applied_mirror_percent:g}%{verdict}{text}",
                highlight=False,
            )
            if r.state in ENDED:
                return 0 if r.state == R.STATE_PROMOTED else 1
        return 1

    try:
        code = _call(home, run)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code)
