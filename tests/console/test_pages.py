"""The console's page logic in NiceGUI's simulated browser, over a real registry and SloService."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from nicegui.testing import User
from servemesh.registry.v1 import registry_pb2 as rpb

from console.auth import Role, set_user
from console.pages import Console
from console.settings import ConsoleSettings
from tests.console.conftest import PASSWORDS, Backends, console_user, eventually, sign_in

pytestmark = pytest.mark.timeout(60)


async def _route(backends: Backends, name: str) -> rpb.Route:
    return (await backends.stub.GetRoute(rpb.GetRouteRequest(name=f"routes/{name}"))).route


async def _confirm(user: User, reason: str) -> None:
    await user.should_see(marker="reason")
    user.find(marker="reason").type(reason)
    user.find(marker="confirm").click()


async def test_pages_need_a_sign_in_and_a_wrong_password_is_refused(console: tuple[User, Console]) -> None:
    user, _ = console
    await user.open("/routing")
    await user.should_see(marker="sign-in")  # redirected to the sign-in page
    await sign_in(user, "olivia", "not her password")
    await user.should_see("wrong user name or password")
    await sign_in(user, "olivia")
    await user.should_see(marker="whoami")
    await user.should_see("olivia (operator)")


async def test_overview_shows_slo_tiles_per_route_class_red_when_breached(console: tuple[User, Console]) -> None:
    user, _ = console
    await sign_in(user, "victor")
    await user.should_see(marker="class-chat_short")
    # the SloService's chat_short has 20% server errors: breached, so the class is red
    badge = user.find(marker="status-chat_short").elements.pop()
    assert badge.text == "red" and badge.props["color"] == "negative"
    await user.should_see("chat_short-server_errors: 20.00% (< 1%)")


async def test_operator_flips_a_route_with_a_reason_and_it_is_audited_with_the_user(
    console: tuple[User, Console], backends: Backends
) -> None:
    user, _ = console
    await sign_in(user, "olivia")
    await user.open("/routing")
    user.find(marker="flip-inference").click()
    await _confirm(user, "engine on fire")
    await user.should_see("inference: flip to inference-small")
    route = await _route(backends, "inference")
    assert [(b.deployment, b.weight) for b in route.backends] == [
        ("deployments/inference-stable", 0),
        ("deployments/inference-small", 100),
    ]
    entries = (await backends.stub.ListAuditEntries(rpb.ListAuditEntriesRequest(resource="routes/inference"))).entries
    assert entries[0].reason == "engine on fire" and entries[0].actor.endswith(" as olivia")


async def test_a_stale_page_gets_a_conflict_not_an_overwrite(console: tuple[User, Console], backends: Backends) -> None:
    user, _ = console
    await sign_in(user, "olivia")
    await user.open("/routing")
    # someone else changes the route after the page read it
    route = await _route(backends, "inference")
    del route.backends[:]
    route.backends.extend(
        [
            rpb.WeightedBackend(deployment="deployments/inference-stable", weight=50),
            rpb.WeightedBackend(deployment="deployments/inference-small", weight=50),
        ]
    )
    await backends.stub.UpdateRoute(
        rpb.UpdateRouteRequest(route=route, update_mask=field_mask_pb2.FieldMask(paths=["backends"]), reason="other")
    )
    user.find(marker="flip-inference").click()
    await _confirm(user, "flip from a stale page")
    await user.should_see("Conflict")
    after = await _route(backends, "inference")
    assert [b.weight for b in after.backends] == [50, 50]


async def test_a_viewer_cannot_flip_and_a_demoted_operator_is_refused_at_the_click(
    console: tuple[User, Console], backends: Backends
) -> None:
    user, _ = console
    await sign_in(user, "victor")
    await user.open("/routing")
    flip = user.find(marker="flip-inference").elements.pop()
    assert not flip.enabled
    # an operator's page is open; the role is taken away before the click
    await sign_in(user, "olivia")
    await user.open("/routing")
    set_user(backends.users, "olivia", Role.VIEWER, PASSWORDS["olivia"])
    user.find(marker="flip-inference").click()
    await user.should_see("olivia is a viewer: only operators can change the mesh")
    assert [b.weight for b in (await _route(backends, "inference")).backends] == [100, 0]


async def test_weights_lock_and_header_override_each_land_as_set(
    console: tuple[User, Console], backends: Backends
) -> None:
    user, _ = console
    await sign_in(user, "olivia")
    await user.open("/routing")
    user.find(marker="weight-inference-inference-small").elements.pop().value = 25
    user.find(marker="weight-inference-inference-stable").elements.pop().value = 75
    user.find(marker="apply-inference").click()
    await _confirm(user, "warm the small engine")
    await user.should_see("inference: set weights")
    assert [b.weight for b in (await _route(backends, "inference")).backends] == [75, 25]

    user.find(marker="lock-inference").click()  # "lock to" defaults to the small engine's deployment
    await _confirm(user, "incident 42: small only")
    await user.should_see("inference: lock to inference-small")
    route = await _route(backends, "inference")
    assert route.locked and [(b.deployment, b.weight) for b in route.backends] == [("deployments/inference-small", 100)]
    await user.open("/routing")
    await user.should_see(marker="locked-inference")
    assert not user.find(marker="flip-inference").elements.pop().enabled  # a locked route refuses changes
    user.find(marker="unlock-inference").click()
    await _confirm(user, "incident 42 over")
    await user.should_see("inference: unlock")
    assert not (await _route(backends, "inference")).locked

    await user.open("/routing")
    with user.scope(marker="override-gateway"):
        user.find("value").type("always")
        user.find(kind=ui_select()).elements.pop().value = "deployments/gateway-canary"
        user.find("Set override").click()
    await _confirm(user, "let QA reach the canary")
    await user.should_see("gateway: override x-servemesh-canary: always -> gateway-canary")
    (o,) = (await _route(backends, "gateway")).header_overrides
    assert (o.header, o.value, o.deployment) == ("x-servemesh-canary", "always", "deployments/gateway-canary")


def ui_select():  # type: ignore[no-untyped-def]
    from nicegui import ui

    return ui.select


async def test_a_cancelled_dialog_changes_nothing(console: tuple[User, Console], backends: Backends) -> None:
    user, _ = console
    await sign_in(user, "olivia")
    await user.open("/routing")
    before = await _route(backends, "inference")
    user.find(marker="flip-inference").click()
    await user.should_see(marker="reason")
    user.find(marker="cancel").click()
    await user.should_not_see(marker="reason")
    assert (await _route(backends, "inference")).etag == before.etag


async def test_rollout_actions_and_window_measurements(console: tuple[User, Console], backends: Backends) -> None:
    user, c = console
    await backends.stub.CreateRollout(
        rpb.CreateRolloutRequest(
            rollout=rpb.Rollout(
                name="rollouts/canary-7",
                route="routes/gateway",
                stable_deployment="deployments/gateway-stable",
                canary_deployment="deployments/gateway-canary",
                steps=[
                    rpb.RolloutStep(
                        weight=0, mirror_percent=20, pause=duration_pb2.Duration(seconds=60), analysis=True
                    ),
                    rpb.RolloutStep(weight=10, pause=duration_pb2.Duration(seconds=60), analysis=True),
                    rpb.RolloutStep(weight=100),
                ],
            ),
            reason="ship v7",
        )
    )
    await c.sampler.sample()
    await sign_in(user, "olivia")
    await user.open("/rollouts")
    await user.should_see(marker="rollout-canary-7")
    await user.should_see("[shadow 20%] -> 10% -> 100%")
    assert user.find(marker="state-canary-7").elements.pop().text == "pending"
    user.find(marker="pause-canary-7").click()
    await _confirm(user, "hold for the launch")
    await user.should_see("canary-7: pause (paused)")
    r = (await backends.stub.GetRollout(rpb.GetRolloutRequest(name="rollouts/canary-7"))).rollout
    assert r.state == rpb.Rollout.STATE_PAUSED and r.history[-1].actor.endswith(" as olivia")
    assert r.history[-1].reason == "hold for the launch"


async def test_audit_page_filters_by_user(console: tuple[User, Console], backends: Backends) -> None:
    user, _ = console
    await sign_in(user, "olivia")
    await user.open("/routing")
    user.find(marker="flip-inference").click()
    await _confirm(user, "audit me")
    await user.should_see("inference: flip to inference-small")
    await user.open("/audit")
    table = user.find(marker="audit").elements.pop()
    assert len(table.rows) == 7  # 4 deployments, 2 routes, the flip
    user.find(marker="filter-actor").type("olivia")
    user.find(marker="filter").click()
    await eventually(lambda: len(table.rows) == 1)
    (row,) = table.rows
    assert row["reason"] == "audit me" and row["resource"] == "routes/inference" and row["actor"].endswith("olivia")
    assert "inference-small 100" in row["change"]


async def test_repeated_wrong_passwords_lock_the_name_out(console: tuple[User, Console]) -> None:
    user, _ = console
    for _ in range(5):
        await sign_in(user, "olivia", "guess-guess-guess")
        await user.should_see("wrong user name or password")
    await sign_in(user, "olivia", PASSWORDS["olivia"])  # the right password, but too late
    await user.should_see("too many failed sign-ins")
    await sign_in(user, "victor")  # other names are not locked
    await user.should_see("victor (viewer)")


async def test_sessions_expire(backends: Backends) -> None:
    settings = ConsoleSettings(home=backends.home, users_file=backends.users, session_ttl_s=1.0)
    async with console_user(settings, backends.state) as (user, _):
        await sign_in(user, "olivia")
        await user.should_see("olivia (operator)")
        await asyncio.sleep(1.2)
        await user.open("/routing")
        await user.should_see(marker="sign-in")


async def test_engines_page_says_which_engine_could_not_be_read(console: tuple[User, Console]) -> None:
    user, _ = console
    await sign_in(user, "victor")
    await user.open("/engines")
    await user.should_see("deployments/inference-stable: UNAVAILABLE")
