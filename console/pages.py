"""The console's pages: Overview, Engines, Routing, Rollouts, Indexes, Audit, and sign-in.

Every page checks the session first (signed in, not expired, the user still in the users file);
every change re-checks it at the click, asks for a reason, and goes to the registry (or
retrieval) as the signed-in user with the version the page read, so a stale page gets a
conflict instead of overwriting someone else's change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

from fastapi.responses import RedirectResponse
from google.protobuf import json_format
from nicegui import app, ui
from servemesh.inference.v1 import inference_pb2 as ipb
from servemesh.mesh.v1 import slo_service_pb2 as slo_pb2
from servemesh.registry.v1 import registry_pb2 as rpb

from console.auth import Authenticator, SignInError, User
from console.backend import Backend, Conflict, ConsoleError, in_effect
from console.history import Sampler, burn_rate, engine_key, status_color
from mesh.route_edits import flipped, locked_to, unlocked, weighted, with_override

MAX_CHART_POINTS = 600
MAX_REASON_CHARS = 512
R = rpb.Rollout
S = slo_pb2.SloStatus
COLORS = {"green": "positive", "amber": "warning", "red": "negative"}
STATE_NAMES = {
    S.STATE_NO_DATA: "no data",
    S.STATE_OK: "ok",
    S.STATE_WARNING: "warning",
    S.STATE_BREACHED: "breached",
}
ROLLOUT_STATES = {
    R.STATE_PENDING: "pending",
    R.STATE_PROGRESSING: "progressing",
    R.STATE_PAUSED: "paused",
    R.STATE_PROMOTED: "promoted",
    R.STATE_ABORTED: "aborted",
    R.STATE_ROLLED_BACK: "rolled back",
}
HEALTH = {
    ipb.ENGINE_HEALTH_SERVING: "serving",
    ipb.ENGINE_HEALTH_NOT_SERVING: "not serving",
}
BREAKER = {0: "closed", 1: "half-open", 2: "open"}
NAV = [("/", "Overview"), ("/engines", "Engines"), ("/routing", "Routing"), ("/rollouts", "Rollouts"),
       ("/indexes", "Indexes"), ("/audit", "Audit")]  # fmt: skip


@dataclass
class Console:
    """What the pages share: the backend, the sampler and the sign-in checks."""

    backend: Backend
    sampler: Sampler
    auth: Authenticator
    session_ttl_s: float
    refresh_s: float

    # -- sessions --------------------------------------------------------------------------------

    def current_user(self) -> User | None:
        """The signed-in user, or None (never signed in, expired, or removed from the users file)."""
        store = app.storage.user
        name, since = store.get("name"), store.get("signed_in_at")
        if not isinstance(name, str) or not isinstance(since, int | float):
            return None
        if time.time() - since > self.session_ttl_s:
            store.clear()
            return None
        return self.auth.user(name)

    def require_operator(self) -> User:
        """At the click: the user must still be signed in and an operator (roles are re-read)."""
        user = self.current_user()
        if user is None:
            raise PermissionError("your session has ended: sign in again")
        if not user.can_change:
            raise PermissionError(f"{user.name} is a viewer: only operators can change the mesh")
        return user


def tid(element: Any, name: str) -> Any:
    """Mark an element for the simulated user and give it a data-testid for a real browser."""
    return element.mark(name).props(f"data-testid={name}")


def _fmt_s(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.2f}%"


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _time(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")


Points = tuple[tuple[float, float], ...]


def downsample(points: list[tuple[float, float]], limit: int = MAX_CHART_POINTS) -> Points:
    """At most `limit` points for a chart, keeping each bucket's worst (highest) value: a spike
    on-call must see is never averaged away. Times in ms for ECharts.

    Tuples, not lists: NiceGUI wraps every list and dict of an element's options in an observable
    (about 1 ms per 100 points), and leaves tuples alone; JSON makes arrays of both."""
    if len(points) <= limit:
        return tuple((t * 1000, v) for t, v in points)
    size = math.ceil(len(points) / limit)
    out = []
    for i in range(0, len(points), size):
        t, v = max(points[i : i + size], key=itemgetter(1))
        out.append((t * 1000, v))
    return tuple(out)


def slo_target(slo: slo_pb2.Slo) -> str:
    if slo.kind == slo_pb2.Slo.KIND_TTFT:
        return f"p{slo.objective * 100:g} <= {_fmt_s(slo.threshold.ToTimedelta().total_seconds())}"
    return f"< {(1 - slo.objective) * 100:g}%"


def slo_value(status: slo_pb2.SloStatus) -> str:
    if status.state == S.STATE_NO_DATA:
        return "no data"
    if status.slo.kind == slo_pb2.Slo.KIND_TTFT:
        return _fmt_s(status.value)
    return _pct(status.value)


def _chart(title: str, series: dict[str, Points], unit: str = "") -> ui.echart:
    return ui.echart(_chart_options(title, series, unit)).classes("w-full h-56")


def _chart_options(title: str, series: dict[str, Points], unit: str = "") -> dict[str, Any]:
    return {
        "animation": False,
        "title": {"text": title, "textStyle": {"fontSize": 13}},
        "tooltip": {"trigger": "axis"},
        "legend": {"type": "scroll", "bottom": 0},
        "grid": {"left": 60, "right": 20, "top": 35, "bottom": 45},
        "xAxis": {"type": "time"},
        "yAxis": {"type": "value", "name": unit},
        "series": [{"name": name, "type": "line", "showSymbol": False, "data": data} for name, data in series.items()],
    }


def _set_series(chart: ui.echart, series: dict[str, Points]) -> None:
    chart.options["series"] = [
        {"name": name, "type": "line", "showSymbol": False, "data": data} for name, data in series.items()
    ]
    chart.update()


async def ask_reason(title: str, detail: str = "") -> str | None:
    """A dialog asking why; None if cancelled. The reason lands in the audit log."""
    # on the page's layout, not beside the button: a refreshing part of the page (every
    # refresh_s) would delete a dialog opened inside it
    with ui.context.client.layout, ui.dialog() as dialog, ui.card().classes("w-[32rem]"):
        ui.label(title).classes("text-lg font-bold")
        if detail:
            ui.label(detail).classes("text-sm whitespace-pre-wrap")
        reason = (
            ui.input(
                "Reason (recorded in the audit log)",
                validation={f"1-{MAX_REASON_CHARS} characters": lambda v: 0 < len(v.strip()) <= MAX_REASON_CHARS},
            )
            .classes("w-full")
            .mark("reason")
            .props("data-testid=reason")
        )
        with ui.row():
            ui.button("Cancel", on_click=lambda: dialog.submit(None)).props("flat").mark("cancel")

            def confirm() -> None:
                if reason.validate():
                    dialog.submit(reason.value.strip())

            tid(ui.button("Confirm", on_click=confirm).props("color=negative"), "confirm")
    result = await dialog
    dialog.delete()
    return result


def register(c: Console) -> None:
    """Add every page to NiceGUI's app."""

    def frame(title: str, user: User) -> None:
        ui.page_title(f"{title} · servemesh console")
        with ui.header().classes("items-center gap-4 bg-slate-800"):
            ui.label("servemesh").classes("text-lg font-bold")
            for path, name in NAV:
                ui.link(name, path).classes(
                    "text-white no-underline" + (" font-bold underline" if name == title else "")
                )
            ui.space()
            tid(ui.label(f"{user.name} ({user.role.value})"), "whoami")
            ui.button("Sign out", on_click=sign_out).props("flat color=white").mark("sign-out")

    def sign_out() -> None:
        app.storage.user.clear()
        ui.navigate.to("/login")

    def guard(path: str) -> User | RedirectResponse:
        user = c.current_user()
        if user is None:
            return RedirectResponse(f"/login?next={path}")
        return user

    def errors_banner(errors: tuple[str, ...] | list[str]) -> None:
        for e in errors:
            with ui.row().classes("w-full bg-amber-100 text-amber-900 p-2 rounded"):
                ui.icon("warning")
                ui.label(e).classes("text-sm")

    async def act(what: str, change: Callable[[User, str], Awaitable[str]], detail: str = "") -> bool:
        """Check the role, ask the reason, make the change; report what happened. True if changed."""
        try:
            c.require_operator()
        except PermissionError as exc:
            ui.notify(str(exc), type="negative")
            return False
        reason = await ask_reason(what, detail)
        if reason is None:
            return False
        try:
            user = c.require_operator()  # again: the dialog may have stayed open past the session
            message = await change(user, reason)
        except PermissionError as exc:
            ui.notify(str(exc), type="negative")
            return False
        except Conflict as exc:
            ui.notify(f"Conflict: {exc}", type="negative", multi_line=True, timeout=0, close_button="reload")
            return False
        except ConsoleError as exc:
            ui.notify(str(exc), type="negative", multi_line=True, timeout=15000)
            return False
        ui.notify(message, type="positive")
        await c.sampler.sample()
        return True

    # -- sign-in ---------------------------------------------------------------------------------

    @ui.page("/login")
    def login(next: str = "/") -> None:
        target = next if next.startswith("/") and not next.startswith("//") else "/"
        ui.page_title("Sign in · servemesh console")
        with ui.card().classes("absolute-center w-96"):
            ui.label("servemesh console").classes("text-xl font-bold")
            if not c.auth.has_users():
                ui.label(
                    "No console users yet. Add one on the mesh's machine:\n"
                    "servemesh console user add NAME --role operator"
                ).classes("whitespace-pre-wrap text-sm").mark("no-users")
            name = tid(ui.input("User name").classes("w-full"), "name")
            password = tid(ui.input("Password", password=True).classes("w-full"), "password")
            message = ui.label("").classes("text-negative").mark("login-error")

            def submit() -> None:
                try:
                    user = c.auth.sign_in(name.value or "", password.value or "")
                except SignInError as exc:
                    message.text = str(exc)
                    password.value = ""
                    return
                app.storage.user.clear()
                app.storage.user.update(name=user.name, signed_in_at=time.time())
                ui.navigate.to(target)

            password.on("keydown.enter", submit)
            tid(ui.button("Sign in", on_click=submit).classes("w-full"), "sign-in")

    # -- overview --------------------------------------------------------------------------------

    @ui.page("/")
    def overview() -> RedirectResponse | None:
        user = guard("/")
        if isinstance(user, RedirectResponse):
            return user
        frame("Overview", user)

        @ui.refreshable
        def tiles() -> None:
            snap = c.sampler.latest
            errors_banner(snap.errors)
            by_class: dict[str, list[slo_pb2.SloStatus]] = {}
            for s in snap.slos:
                by_class.setdefault(s.slo.route_class, []).append(s)
            with ui.row().classes("w-full gap-4"):
                for route_class, statuses in sorted(by_class.items()):
                    color = status_color(s.state for s in statuses)
                    with ui.card().classes("min-w-72").mark(f"class-{route_class}"):
                        with ui.row().classes("items-center"):
                            ui.badge(color, color=COLORS[color]).mark(f"status-{route_class}")
                            ui.label(route_class).classes("text-lg font-bold")
                        for s in statuses:
                            burn = burn_rate(s)
                            with ui.row().classes("w-full justify-between text-sm"):
                                ui.label(f"{s.slo.name}: {slo_value(s)} ({slo_target(s.slo)})")
                                ui.label(
                                    f"{STATE_NAMES.get(s.state, '?')}"
                                    + (f", burn 1h {burn:.2f}x" if burn is not None else "")
                                )
                with ui.card().classes("min-w-48"):
                    ui.label("tokens/s").classes("text-sm")
                    tps = snap.tokens_per_s
                    ui.label("-" if tps is None else f"{tps:.1f}").classes("text-2xl").mark("tokens-per-s")
                with ui.card().classes("min-w-48"):
                    ui.label("queue depth").classes("text-sm")
                    q = snap.queue_depth
                    ui.label("-" if q is None else str(q)).classes("text-2xl").mark("queue-depth")
            if not snap.slos and not snap.errors:
                ui.label("waiting for the first sample ...")
            ui.label(f"as of {datetime.fromtimestamp(snap.time or time.time()).strftime('%H:%M:%S')}").classes(
                "text-xs text-gray-500"
            ).mark("as-of")

        def series(prefix: str) -> dict[str, Points]:
            h = c.sampler.history
            return {n.removeprefix(prefix): downsample(h.series(n)) for n in h.names(prefix)}

        def ttft_series() -> dict[str, Points]:
            return {k: v for k, v in series("slo/").items() if k.endswith("-ttft")}

        def bad_series() -> dict[str, Points]:
            return {k: v for k, v in series("slo/").items() if not k.endswith("-ttft")}

        tiles()
        with ui.grid(columns=2).classes("w-full"):
            charts = {
                "ttft": (_chart("TTFT p95, last hour", ttft_series(), "s"), ttft_series),
                "bad": (_chart("5xx and timeouts (fraction), last hour", bad_series()), bad_series),
                "burn": (_chart("error-budget burn rate (1h window)", series("burn/"), "x"), lambda: series("burn/")),
                "load": (
                    _chart("tokens/s and queue depth", _load_series(c)),
                    lambda: _load_series(c),
                ),
            }
        for name, (chart, _) in charts.items():
            chart.mark(f"chart-{name}")

        def update() -> None:
            tiles.refresh()
            for chart, fn in charts.values():
                _set_series(chart, fn())

        ui.timer(c.refresh_s, update)
        return None

    # -- engines ---------------------------------------------------------------------------------

    @ui.page("/engines")
    def engines() -> RedirectResponse | None:
        user = guard("/engines")
        if isinstance(user, RedirectResponse):
            return user
        frame("Engines", user)
        columns = [
            {"name": k, "label": label, "field": k, "align": "left"}
            for k, label in [
                ("engine", "engine"),
                ("health", "health"),
                ("model", "model"),
                ("card", "card sha256"),
                ("ttft_ema", "TTFT EMA (gateway)"),
                ("ttft_p50", "TTFT p50 (engine)"),
                ("error_rate", "error rate"),
                ("breaker", "breaker"),
                ("queue", "queue"),
                ("running", "running"),
                ("kv", "KV cache"),
            ]
        ]

        def rows() -> list[dict[str, str]]:
            out = []
            for e in c.sampler.latest.engines:
                eng = e.engine
                ttft = eng.recent_ttft_p50.ToTimedelta().total_seconds() if eng.HasField("recent_ttft_p50") else None
                out.append(
                    {
                        "engine": engine_key(e),
                        "health": HEALTH.get(eng.health, "unknown")
                        + (f": {eng.health_detail}" if eng.health_detail else ""),
                        "model": eng.model,
                        "card": eng.model_card_sha256[:12] or "-",
                        "ttft_ema": _fmt_s(e.ttft_ema_s),
                        "ttft_p50": _fmt_s(ttft),
                        "error_rate": _pct(e.error_rate),
                        "breaker": BREAKER.get(e.breaker, "-") if e.breaker is not None else "-",
                        "queue": str(eng.queue_depth),
                        "running": str(eng.running_requests),
                        "kv": _pct(eng.kv_cache_usage),
                    }
                )
            return out

        banner = ui.column().classes("w-full")
        with banner:
            errors_banner(c.sampler.latest.errors)
        table = ui.table(columns=columns, rows=rows(), row_key="engine").classes("w-full").mark("engines")
        charts: dict[str, ui.echart] = {}
        grid = ui.grid(columns=2).classes("w-full")

        def engine_series(key: str) -> dict[str, Points]:
            h = c.sampler.history
            return {
                label: downsample(h.series(f"engine/{key}/{name}"))
                for name, label in [
                    ("ttft_ema", "TTFT EMA s"),
                    ("ttft_p50", "TTFT p50 s"),
                    ("queue", "queue"),
                    ("kv", "KV cache"),
                    ("error_rate", "error rate"),
                ]
            }

        def update() -> None:
            table.rows = rows()
            table.update()
            banner.clear()
            with banner:
                errors_banner(c.sampler.latest.errors)
            for e in c.sampler.latest.engines:
                key = engine_key(e)
                if key not in charts:
                    with grid:
                        charts[key] = _chart(key, engine_series(key)).mark(f"chart-{key}")
                else:
                    _set_series(charts[key], engine_series(key))

        update()
        ui.timer(c.refresh_s, update)
        return None

    # -- routing ---------------------------------------------------------------------------------

    @ui.page("/routing")
    async def routing() -> RedirectResponse | None:
        user = guard("/routing")
        if isinstance(user, RedirectResponse):
            return user
        frame("Routing", user)
        try:  # read now, not from the last sample: changes are made against what this page shows
            routes, deployments = await c.backend.routes(), await c.backend.deployments()
        except ConsoleError as exc:
            errors_banner([str(exc)])
            return None
        #: the routes as this page read them: changes are made against these etags
        read: dict[str, rpb.Route] = {r.name: r for r in routes}
        effect_labels: dict[str, ui.label] = {}
        stale_labels: dict[str, ui.label] = {}

        def effect_text(route: rpb.Route) -> str:
            done, total = in_effect(route, c.sampler.latest.nodes)
            if not total:
                return f"revision {route.revision} (no Envoys: --no-mesh)"
            return f"revision {route.revision}: in effect on {done}/{total} Envoys"

        async def change(route: rpb.Route, new: rpb.Route, paths: list[str], what: str) -> None:
            async def do(u: User, reason: str) -> str:
                stored = await c.backend.update_route(new, paths, reason, u.name)
                read[stored.name] = stored
                return f"{_short(stored.name)}: {what} (revision {stored.revision})"

            if await act(f"{what} on {_short(route.name)}?", do, _describe(new)):
                cards.refresh()

        @ui.refreshable
        def cards() -> None:
            for name, route in sorted(read.items()):
                options = [d.name for d in deployments if d.service == route.service]
                with ui.card().classes("w-full").mark(f"route-{_short(name)}"):
                    with ui.row().classes("items-center gap-4"):
                        ui.label(_short(name)).classes("text-lg font-bold")
                        ui.label(f"service {route.service}, class {route.route_class or '(default)'}").classes(
                            "text-sm"
                        )
                        if route.locked:
                            ui.badge("locked", color="warning").mark(f"locked-{_short(name)}")
                        effect_labels[name] = tid(
                            ui.label(effect_text(route)).classes("text-sm"), f"effect-{_short(name)}"
                        )
                        stale_labels[name] = ui.label("").classes("text-negative text-sm").mark(f"stale-{_short(name)}")
                    sliders: dict[str, ui.slider] = {}
                    for b in route.backends:
                        with ui.row().classes("w-full items-center"):
                            ui.label(_short(b.deployment)).classes("w-48")
                            sliders[b.deployment] = (
                                ui.slider(min=0, max=100, step=1, value=b.weight)
                                .props("label-always")
                                .classes("w-96")
                                .mark(f"weight-{_short(name)}-{_short(b.deployment)}")
                            )
                    for o in route.header_overrides:
                        ui.label(f"override: {o.header}: {o.value} -> {_short(o.deployment)}").classes("text-sm")
                    for m in route.mirrors:
                        ui.label(f"mirror: {m.percent:g}% -> {_short(m.deployment)} (shadow)").classes("text-sm")
                    can = user.can_change and not route.locked
                    with ui.row():
                        b1 = tid(ui.button("Flip to backup", on_click=lambda r=route: _flip(r)), f"flip-{_short(name)}")
                        b2 = ui.button(
                            "Apply weights",
                            on_click=lambda r=route, s=sliders: change(
                                r, weighted(r, {d: int(x.value) for d, x in s.items()}), ["backends"], "set weights"
                            ),
                        ).mark(f"apply-{_short(name)}")
                        lock_to = ui.select(options, value=_small(options, deployments), label="lock to").classes(
                            "w-56"
                        )
                        b3 = ui.button(
                            "Lock",
                            on_click=lambda r=route, s=lock_to: change(
                                r, locked_to(r, s.value), ["backends", "locked"], f"lock to {_short(s.value or '')}"
                            ),
                        ).mark(f"lock-{_short(name)}")
                        for b in (b1, b2, b3):
                            b.set_enabled(can)
                        if route.locked:
                            u = ui.button(
                                "Unlock",
                                on_click=lambda r=route: change(r, unlocked(r), ["locked"], "unlock"),
                            ).mark(f"unlock-{_short(name)}")
                            u.set_enabled(user.can_change)
                    with ui.expansion("Header override").classes("w-full").mark(f"override-{_short(name)}"):
                        with ui.row().classes("items-end"):
                            header = ui.input("header", value="x-servemesh-canary").classes("w-56")
                            value = ui.input("value").classes("w-40")
                            target = ui.select(options, label="deployment").classes("w-56")
                            ob = ui.button(
                                "Set override",
                                on_click=lambda r=route, h=header, v=value, t=target: _override(
                                    r, h.value, v.value, t.value
                                ),
                            )
                            ob.set_enabled(can)
                    if not user.can_change:
                        ui.label("viewers look; operators change").classes("text-xs text-gray-500")

        async def _flip(route: rpb.Route) -> None:
            try:
                new = flipped(route)
            except ValueError as exc:
                ui.notify(str(exc), type="warning")
                return
            to = next(b.deployment for b in new.backends if b.weight == 100)
            await change(route, new, ["backends"], f"flip to {_short(to)}")

        async def _override(route: rpb.Route, header: str, value: str, deployment: str | None) -> None:
            if not header or not value or not deployment:
                ui.notify("an override needs a header, a value and a deployment", type="warning")
                return
            new = with_override(route, header.strip().lower(), value.strip(), deployment)
            await change(route, new, ["header_overrides"], f"override {header}: {value} -> {_short(deployment)}")

        cards()
        ui.label("Envoys").classes("text-lg font-bold mt-4")
        node_cols = [
            {"name": k, "label": k, "field": k, "align": "left"}
            for k in ("envoy", "connected", "in sync", "registry revision", "acked (clusters / listeners / routes)")
        ]

        def node_rows() -> list[dict[str, str]]:
            return [
                {
                    "envoy": n.name.removeprefix("nodes/"),
                    "connected": "yes" if n.connected else "no",
                    "in sync": "yes" if n.in_sync else "no",
                    "registry revision": str(n.registry_revision),
                    "acked (clusters / listeners / routes)": " / ".join(
                        r.acked_version[:8] or "-" for r in n.resources
                    ),
                }
                for n in c.sampler.latest.nodes
            ]

        nodes = ui.table(columns=node_cols, rows=node_rows(), row_key="envoy").classes("w-full").mark("nodes")

        def update() -> None:
            current = {r.name: r for r in c.sampler.latest.routes}
            for name, route in read.items():
                if name in effect_labels:
                    effect_labels[name].text = effect_text(route)
                now = current.get(name)
                if name in stale_labels:
                    stale_labels[name].text = (
                        "changed elsewhere since this page loaded: reload before changing it"
                        if now is not None and now.etag != route.etag
                        else ""
                    )
            nodes.rows = node_rows()
            nodes.update()

        ui.timer(c.refresh_s, update)
        return None

    # -- rollouts --------------------------------------------------------------------------------

    @ui.page("/rollouts")
    def rollouts() -> RedirectResponse | None:
        user = guard("/rollouts")
        if isinstance(user, RedirectResponse):
            return user
        frame("Rollouts", user)

        @ui.refreshable
        def body() -> None:
            snap = c.sampler.latest
            errors_banner(snap.errors)
            if not snap.rollouts:
                ui.label("no rollouts (servemesh rollout start ...)")
            for r in sorted(snap.rollouts, key=lambda r: r.create_time.ToNanoseconds(), reverse=True):
                _rollout_card(r)

        def _rollout_card(r: rpb.Rollout) -> None:
            short = _short(r.name)
            n = len(r.steps)
            with ui.card().classes("w-full").mark(f"rollout-{short}"):
                with ui.row().classes("items-center gap-4"):
                    ui.label(short).classes("text-lg font-bold")
                    ui.badge(ROLLOUT_STATES.get(r.state, "?")).mark(f"state-{short}")
                    ui.label(
                        f"{_short(r.route)}: {_short(r.stable_deployment)} -> {_short(r.canary_deployment)}, "
                        f"step {min(r.current_step + 1, n)}/{n}, canary weight {r.applied_weight}%"
                        + (f", mirror {r.applied_mirror_percent:g}%" if r.applied_mirror_percent else "")
                    ).classes("text-sm")
                if r.message:
                    ui.label(r.message).classes("text-sm")
                ui.label(
                    " -> ".join(
                        f"{'[' if i == r.current_step else ''}"
                        + (f"shadow {s.mirror_percent:g}%" if s.weight == 0 and s.mirror_percent else f"{s.weight}%")
                        + f"{']' if i == r.current_step else ''}"
                        for i, s in enumerate(r.steps)
                    )
                ).classes("text-sm font-mono")
                cols = [
                    {"name": k, "label": k, "field": k, "align": "left"}
                    for k in ("window", "step", "verdict", "metric", "canary", "stable", "threshold", "detail")
                ]
                rows = []
                for w in list(r.windows)[-8:][::-1]:
                    step = r.steps[w.step] if w.step < n else None
                    shadow = step is not None and step.weight == 0 and step.mirror_percent > 0
                    for m in w.measurements:
                        rows.append(
                            {
                                "id": f"{_time(w.end_time)}-{m.metric}",
                                "window": _time(w.end_time),
                                "step": f"{w.step + 1}" + (" (shadow)" if shadow else ""),
                                "verdict": rpb.Measurement.Verdict.Name(m.verdict).removeprefix("VERDICT_").lower(),
                                "metric": m.metric,
                                "canary": f"{m.canary:.4g}",
                                "stable": f"{m.stable:.4g}",
                                "threshold": f"{m.threshold:.4g}",
                                "detail": m.detail,
                            }
                        )
                if rows:
                    ui.table(columns=cols, rows=rows, row_key="id").classes("w-full").props("dense").mark(
                        f"windows-{short}"
                    )
                active = r.state in (R.STATE_PENDING, R.STATE_PROGRESSING, R.STATE_PAUSED)
                with ui.row():
                    for action in ("promote", "pause", "resume", "abort"):
                        b = ui.button(
                            action.capitalize(), on_click=lambda a=action, name=r.name: _rollout(name, a)
                        ).mark(f"{action}-{short}")
                        b.set_enabled(user.can_change and active)

        async def _rollout(name: str, action: str) -> None:
            async def do(u: User, reason: str) -> str:
                r = await c.backend.rollout_action(name, action, reason, u.name)
                return f"{_short(name)}: {action} ({ROLLOUT_STATES.get(r.state, '?')})"

            if await act(f"{action.capitalize()} {_short(name)}?", do):
                body.refresh()

        body()
        ui.timer(c.refresh_s, body.refresh)
        return None

    # -- indexes ---------------------------------------------------------------------------------

    @ui.page("/indexes")
    async def indexes() -> RedirectResponse | None:
        user = guard("/indexes")
        if isinstance(user, RedirectResponse):
            return user
        frame("Indexes", user)
        container = ui.column().classes("w-full")

        async def load() -> None:
            try:
                views, errors = await c.backend.indexes()
            except ConsoleError as exc:
                views, errors = [], [str(exc)]
            container.clear()
            with container:
                errors_banner(errors)
                if not views and not errors:
                    ui.label("no indexes (servemesh index build ...)")
                for v in views:
                    with ui.card().classes("w-full").mark(f"index-{v.index.name}"):
                        ui.label(v.index.name).classes("text-lg font-bold")
                        ui.label(
                            f"{v.index.documents} documents, {v.index.chunks} chunks, {v.index.builds} builds; "
                            f"current {_short(v.index.current_manifest) or '-'}"
                            + (" (stale: documents changed since)" if v.index.stale else "")
                        ).classes("text-sm")
                        for m in v.manifests:
                            with ui.row().classes("items-center gap-4 text-sm"):
                                ui.label(_short(m.name)).classes("font-mono")
                                ui.label(_time(m.create_time))
                                ui.label(f"{m.counts.chunks} chunks, inputs {m.inputs_sha256[:12]}")
                                if m.current:
                                    ui.badge("current", color="positive")
                                else:
                                    b = ui.button("Pin", on_click=lambda name=m.name: pin(name)).props("dense")
                                    b.mark(f"pin-{_short(m.name)}").set_enabled(user.can_change)

        async def pin(name: str) -> None:
            async def do(u: User, reason: str) -> str:
                resp = await c.backend.pin_manifest(name, reason, u.name)
                return f"pinned {_short(resp.manifest.name)} (was {_short(resp.previous) or '-'})"

            if await act(f"Pin {_short(name)} as the current manifest?", do):
                await load()

        await load()
        return None

    # -- audit -----------------------------------------------------------------------------------

    @ui.page("/audit")
    async def audit() -> RedirectResponse | None:
        user = guard("/audit")
        if isinstance(user, RedirectResponse):
            return user
        frame("Audit", user)
        with ui.row().classes("items-end"):
            resource = ui.input("resource (e.g. routes/inference)").classes("w-72").mark("filter-resource")
            actor = ui.input("actor or user contains").classes("w-72").mark("filter-actor")
            ui.button("Filter", on_click=lambda: load()).mark("filter")
        cols = [
            {"name": k, "label": k, "field": k, "align": "left"}
            for k in ("time", "actor", "action", "resource", "reason", "change")
        ]
        table = ui.table(columns=cols, rows=[], row_key="revision").classes("w-full").mark("audit")
        banner = ui.column().classes("w-full")

        async def load() -> None:
            banner.clear()
            try:
                entries = await c.backend.audit(resource.value.strip(), actor.value.strip())
            except ConsoleError as exc:
                with banner:
                    errors_banner([str(exc)])
                return
            table.rows = [
                {
                    "revision": f"{e.revision}-{e.resource}",
                    "time": _time(e.time),
                    "actor": e.actor,
                    "action": rpb.AuditEntry.Action.Name(e.action).removeprefix("ACTION_").lower(),
                    "resource": e.resource,
                    "reason": e.reason,
                    "change": _diff(e),
                }
                for e in entries
            ]
            table.update()

        await load()
        return None


def _load_series(c: Console) -> dict[str, Points]:
    h = c.sampler.history
    return {"tokens/s": downsample(h.series("tokens_per_s")), "queue depth": downsample(h.series("queue_depth"))}


def _small(options: list[str], deployments: list[rpb.Deployment]) -> str | None:
    """The deployment to lock to by default: the one running the small engine, if any."""
    for d in deployments:
        if d.name in options and d.engine == "small":
            return d.name
    return options[0] if options else None


def _describe(route: rpb.Route) -> str:
    lines = [f"backends: {', '.join(f'{_short(b.deployment)} {b.weight}' for b in route.backends)}"]
    if route.header_overrides:
        lines.append(
            "overrides: "
            + ", ".join(f"{o.header}: {o.value} -> {_short(o.deployment)}" for o in route.header_overrides)
        )
    if route.locked:
        lines.append("locked")
    return "\n".join(lines)


def _diff(e: rpb.AuditEntry) -> str:
    """The top-level fields that changed, as before -> after."""
    before = json_format.MessageToDict(e.before) if e.HasField("before") else {}
    after = json_format.MessageToDict(e.after) if e.HasField("after") else {}
    ignore = {"etag", "revision", "updateTime", "createTime", "windows", "history", "stepStartTime"}
    parts = []
    for key in sorted({*before, *after} - ignore):
        if before.get(key) != after.get(key):
            parts.append(f"{key}: {_compact(before.get(key))} -> {_compact(after.get(key))}")
    return "; ".join(parts)[:400]


def _compact(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list) and value and all(isinstance(v, dict) and "deployment" in v for v in value):
        return ", ".join(f"{_short(v['deployment'])} {v.get('weight', v.get('percent', ''))}".strip() for v in value)
    return str(value)
