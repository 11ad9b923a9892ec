"""RegistryCore on its store, on SQLite and on PostgreSQL (every test runs on both)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from services.common.errors import FieldViolation, InvalidArgument
from services.registry.core import RegistryCore
from services.registry.errors import (
    DeploymentInUse,
    EtagMismatch,
    ResourceExists,
    ResourceNotFound,
    RouteLocked,
    ShuttingDown,
)
from services.registry.resources import Action, HeaderOverride, Route, WeightedBackend
from services.registry.servicer import resource_json
from services.registry.store import Store, metadata, upgrade

from .builders import deployment, route

pytestmark = pytest.mark.timeout(30)

ACTOR = "spiffe://servemesh.local/ns/default/sa/console"


async def seed(core: RegistryCore) -> Route:
    """Two inference deployments, one gateway deployment and the default inference route."""
    for dep in (deployment("inf-stable"), deployment("inf-canary", version="canary"), deployment("gw", "gateway")):
        await core.create_deployment(dep, reason="seed", actor=ACTOR)
    return await core.create_route(route("inference", ("inf-stable", 100)), reason="seed", actor=ACTOR)


def fields(exc: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in exc.value.violations]


# --- migrations ----------------------------------------------------------------------------


async def test_migrations_create_the_schema_on_an_empty_database_and_are_idempotent(database_url):
    store = Store(database_url)
    try:
        assert inspect(store.engine).get_table_names() == []
        store.migrate()
        tables = set(inspect(store.engine).get_table_names())
        assert tables == {
            "alembic_version",
            "registry_state",
            "deployments",
            "routes",
            "route_backends",
            "route_header_overrides",
            "audit_entries",
            "tenants",
            "api_keys",
            "route_mirrors",
            "rollouts",
        }
        store.migrate()  # a second start: nothing to do, nothing lost
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0003"
            assert conn.execute(text("SELECT id, revision FROM registry_state")).all() == [(1, 0)]
            # the store's table definitions are exactly what the migrations built
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    finally:
        store.dispose()


async def test_data_survives_a_restart(database_url):
    first = RegistryCore(Store(database_url), resource_json)
    await first.start()
    created = await seed(first)
    await first.close()
    second = RegistryCore(Store(database_url), resource_json)
    await second.start()
    try:
        assert second.revision == created.revision
        assert await second.get_route("routes/inference") == created
    finally:
        await second.close()


async def test_upgrade_from_an_empty_head_runs_each_migration_once(database_url):
    engine = create_engine(database_url)
    try:
        upgrade(engine)
        upgrade(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    finally:
        engine.dispose()


async def test_sqlite_runs_in_wal_mode_with_foreign_keys_and_a_busy_timeout(tmp_path):
    store = Store(f"sqlite+pysqlite:///{tmp_path / 'data' / 'registry.db'}", sqlite_busy_timeout_s=2.5)
    try:
        store.migrate()
        with store.engine.connect() as conn:
            pragmas = [
                conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "foreign_keys", "busy_timeout")
            ]
        assert pragmas == ["wal", 1, 2500]
    finally:
        store.dispose()


async def test_the_database_itself_refuses_to_drop_a_referenced_deployment(core, database_url):
    await seed(core)
    store = Store(database_url)
    try:
        with pytest.raises(IntegrityError), store.engine.begin() as conn:
            conn.execute(text("DELETE FROM deployments WHERE id = 'inf-stable'"))
    finally:
        store.dispose()


# --- deployments ---------------------------------------------------------------------------


async def test_create_get_list_delete_deployment(core):
    stored = await core.create_deployment(deployment("inf-stable"), reason="first", actor=ACTOR)
    assert stored.create_time is not None and stored.create_time.tzinfo is not None
    assert await core.get_deployment("deployments/inf-stable") == stored
    await core.create_deployment(deployment("gw", "gateway"), reason="second", actor=ACTOR)
    assert [d.name for d in (await core.list_deployments()).items] == ["deployments/gw", "deployments/inf-stable"]
    assert [d.name for d in (await core.list_deployments(service="gateway")).items] == ["deployments/gw"]
    with pytest.raises(ResourceExists, match="deployments/gw already exists"):
        await core.create_deployment(deployment("gw", "gateway"), reason="again", actor=ACTOR)
    await core.delete_deployment("deployments/gw", reason="gone", actor=ACTOR)
    with pytest.raises(ResourceNotFound):
        await core.get_deployment("deployments/gw")
    with pytest.raises(ResourceNotFound):
        await core.delete_deployment("deployments/gw", reason="gone again", actor=ACTOR)
    assert core.revision == 3


async def test_deployment_in_use_cannot_be_deleted(core):
    await seed(core)
    overridden = await core.update_route(
        Route(
            "routes/inference",
            "",
            header_overrides=(HeaderOverride("x-servemesh-canary", "always", "deployments/inf-canary"),),
            etag=(await core.get_route("routes/inference")).etag,
        ),
        ["header_overrides"],
        reason="canary header",
        actor=ACTOR,
    )
    for name in ("deployments/inf-stable", "deployments/inf-canary"):  # a backend; a header override
        with pytest.raises(DeploymentInUse, match="routes/inference"):
            await core.delete_deployment(name, reason="cleanup", actor=ACTOR)
    assert await core.get_route("routes/inference") == overridden
    await core.delete_deployment("deployments/gw", reason="unused", actor=ACTOR)


# --- routes ---------------------------------------------------------------------------------


async def test_route_round_trip_with_every_field(core):
    await seed(core)
    await core.create_deployment(deployment("chat-a"), reason="x", actor=ACTOR)
    wanted = Route(
        "routes/chat",
        "inference",
        "chat_short",
        (WeightedBackend("deployments/chat-a", 9000), WeightedBackend("deployments/inf-canary", 1000)),
        (HeaderOverride("x-servemesh-canary", "always", "deployments/inf-canary"),),
        locked=True,
        timeout=timedelta(seconds=12.5),
    )
    stored = await core.create_route(wanted, reason="chat class", actor=ACTOR)
    assert replace(stored, etag="", revision=0, update_time=None) == wanted
    assert stored.revision == core.revision and stored.etag
    assert await core.get_route("routes/chat") == stored


async def test_one_route_per_service_and_class(core):
    await seed(core)
    with pytest.raises(ResourceExists, match="routes/inference .*default class"):
        await core.create_route(route("other", ("inf-canary", 1)), reason="dup", actor=ACTOR)
    with pytest.raises(ResourceExists, match="routes/inference already exists"):
        await core.create_route(route("inference", ("inf-canary", 1), route_class="code"), reason="dup", actor=ACTOR)
    await core.create_route(route("code", ("inf-canary", 1), route_class="code"), reason="ok", actor=ACTOR)


async def test_references_must_exist_and_implement_the_service(core):
    await seed(core)
    bad = Route(
        "routes/gateway",
        "gateway",
        backends=(WeightedBackend("deployments/gw", 1), WeightedBackend("deployments/inf-stable", 1)),
        header_overrides=(HeaderOverride("x-a", "b", "deployments/nope"),),
    )
    with pytest.raises(InvalidArgument) as exc:
        await core.create_route(bad, reason="x", actor=ACTOR)
    assert exc.value.violations == [
        FieldViolation("route.backends[1].deployment", "deployments/inf-stable implements 'inference', not 'gateway'"),
        FieldViolation("route.header_overrides[0].deployment", "deployments/nope does not exist"),
    ]


async def test_update_replaces_only_masked_fields_and_changes_etag(core):
    created = await seed(core)
    change = Route(
        "routes/inference",
        "",
        backends=(WeightedBackend("deployments/inf-stable", 90), WeightedBackend("deployments/inf-canary", 10)),
        locked=True,  # not in the mask: ignored
        timeout=timedelta(seconds=30),
        etag=created.etag,
    )
    updated = await core.update_route(change, ["backends", "timeout"], reason="canary 10%", actor=ACTOR)
    assert updated.backends == change.backends and updated.timeout == timedelta(seconds=30)
    assert not updated.locked and updated.service == "inference"
    assert updated.etag != created.etag and updated.revision == created.revision + 1
    cleared = await core.update_route(
        replace(change, etag=updated.etag, timeout=None), ["timeout"], reason="mesh default", actor=ACTOR
    )
    assert cleared.timeout is None and cleared.backends == change.backends


async def test_stale_etag_is_aborted_naming_the_current_one(core):
    created = await seed(core)
    first = await core.update_route(
        replace(created, backends=(WeightedBackend("deployments/inf-canary", 5),)), ["backends"], reason="a", actor="a"
    )
    with pytest.raises(EtagMismatch) as exc:
        await core.update_route(replace(created, locked=True), ["locked"], reason="b", actor="b")
    assert exc.value.current_etag == first.etag and first.etag in exc.value.message
    assert exc.value.metadata["current_etag"] == first.etag
    with pytest.raises(EtagMismatch):
        await core.delete_route("routes/inference", created.etag, reason="c", actor="c")
    assert await core.get_route("routes/inference") == first


async def test_concurrent_updates_with_one_etag_exactly_one_wins(core):
    created = await seed(core)
    attempts = [
        replace(
            created,
            backends=(WeightedBackend("deployments/inf-stable", 100 - i), WeightedBackend("deployments/inf-canary", i)),
        )
        for i in range(1, 9)
    ]
    results = await asyncio.gather(
        *(core.update_route(a, ["backends"], reason=f"attempt {i}", actor=ACTOR) for i, a in enumerate(attempts)),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, Route)]
    losers = [r for r in results if not isinstance(r, Route)]
    assert len(winners) == 1 and all(isinstance(e, EtagMismatch) for e in losers), results
    (winner,) = winners
    assert {e.current_etag for e in losers} == {winner.etag}
    assert await core.get_route("routes/inference") == winner
    assert core.revision == created.revision + 1
    updates = (await core.list_audit_entries(resource="routes/inference")).items
    assert [e.action for e in updates] == [Action.UPDATE, Action.CREATE]


async def test_locked_route_takes_only_updates_that_unlock_it(core):
    created = await seed(core)
    locked = await core.update_route(replace(created, locked=True), ["locked"], reason="incident", actor=ACTOR)
    move = replace(locked, backends=(WeightedBackend("deployments/inf-canary", 1),))
    with pytest.raises(RouteLocked, match="locked=false"):
        await core.update_route(move, ["backends"], reason="rollout", actor=ACTOR)
    with pytest.raises(RouteLocked):  # locked stays true
        await core.update_route(move, ["backends", "locked"], reason="rollout", actor=ACTOR)
    with pytest.raises(RouteLocked):
        await core.delete_route("routes/inference", locked.etag, reason="cleanup", actor=ACTOR)
    unlocked = await core.update_route(
        replace(move, locked=False), ["backends", "locked"], reason="incident over", actor=ACTOR
    )
    assert not unlocked.locked and unlocked.backends == move.backends
    await core.delete_route("routes/inference", unlocked.etag, reason="cleanup", actor=ACTOR)
    with pytest.raises(ResourceNotFound):
        await core.get_route("routes/inference")


async def test_service_and_route_class_are_immutable(core):
    created = await seed(core)
    with pytest.raises(InvalidArgument) as exc:
        await core.update_route(replace(created, service="gateway"), ["backends"], reason="x", actor=ACTOR)
    assert fields(exc) == ["route.service"]
    with pytest.raises(InvalidArgument) as exc:
        await core.update_route(replace(created, route_class="code"), ["locked"], reason="x", actor=ACTOR)
    assert fields(exc) == ["route.route_class"]
    with pytest.raises(InvalidArgument) as exc:
        await core.update_route(created, ["service", "route_class", "weights"], reason="x", actor=ACTOR)
    assert fields(exc) == ["update_mask"] * 3


@pytest.mark.parametrize(
    "attempt",
    ["stale etag", "locked", "bad reference", "route exists", "class taken", "deployment in use", "deployment exists"],
)
async def test_nothing_is_written_when_a_change_fails(core, attempt):
    created = await seed(core)
    locked = await core.update_route(replace(created, locked=True), ["locked"], reason="pin", actor=ACTOR)
    before_state = await core.state()
    before_audit = (await core.list_audit_entries()).items
    calls = {
        "stale etag": lambda: core.update_route(replace(created, locked=False), ["locked"], reason="x", actor=ACTOR),
        "locked": lambda: core.delete_route("routes/inference", locked.etag, reason="x", actor=ACTOR),
        "bad reference": lambda: core.create_route(
            route("code", ("gw", 1), route_class="code"), reason="x", actor=ACTOR
        ),
        "route exists": lambda: core.create_route(
            route("inference", ("inf-stable", 1), route_class="c"), reason="x", actor=ACTOR
        ),
        "class taken": lambda: core.create_route(route("other", ("inf-stable", 1)), reason="x", actor=ACTOR),
        "deployment in use": lambda: core.delete_deployment("deployments/inf-stable", reason="x", actor=ACTOR),
        "deployment exists": lambda: core.create_deployment(deployment("gw", "gateway"), reason="x", actor=ACTOR),
    }
    with pytest.raises((InvalidArgument, EtagMismatch, RouteLocked, ResourceExists, DeploymentInUse)):
        await calls[attempt]()
    # a failed change takes no revision either: the next change gets the next number
    assert await core.state() == before_state
    assert (await core.list_audit_entries()).items == before_audit
    await core.create_deployment(deployment("later"), reason="x", actor=ACTOR)
    assert core.revision == before_state.revision + 1


# --- audit ---------------------------------------------------------------------------------


async def test_every_change_is_audited_with_before_and_after(core):
    created = await seed(core)
    updated = await core.update_route(replace(created, locked=True), ["locked"], reason="pin it", actor="alice")
    await core.update_route(replace(updated, locked=False), ["locked"], reason="unpin", actor="bob")
    await core.delete_deployment("deployments/gw", reason="unused", actor="carol as dave")
    entries = (await core.list_audit_entries()).items
    assert [e.revision for e in entries] == list(range(core.revision, 0, -1))  # newest first, one per revision
    latest = entries[0]
    assert (latest.action, latest.resource, latest.actor, latest.reason) == (
        Action.DELETE,
        "deployments/gw",
        "carol as dave",
        "unused",
    )
    assert latest.before is not None and latest.before["service"] == "gateway" and latest.after is None
    pin = next(e for e in entries if e.reason == "pin it")
    assert pin.before == resource_json(created) and pin.after == resource_json(updated)
    assert pin.before["locked"] is False and pin.after["locked"] is True and pin.after["etag"] == updated.etag
    assert pin.time == updated.update_time
    first = entries[-1]
    assert first.action == Action.CREATE and first.before is None and first.after["name"] == "deployments/inf-stable"


async def test_audit_filters_and_paging(core):
    await seed(core)
    for i in range(5):
        route_now = await core.get_route("routes/inference")
        await core.update_route(
            replace(route_now, locked=bool(i % 2)), ["locked"], reason=f"flip {i}", actor=f"user-{i % 2}"
        )
    by_route = (await core.list_audit_entries(resource="routes/inference")).items
    assert len(by_route) == 6 and all(e.resource == "routes/inference" for e in by_route)
    assert [e.reason for e in (await core.list_audit_entries(actor="USER-1")).items] == ["flip 3", "flip 1"]
    assert (await core.list_audit_entries(actor="%")).items == ()  # LIKE wildcards are literal
    pages, token = [], ""
    while True:
        page = await core.list_audit_entries(page_size=3, page_token=token)
        pages.append([e.revision for e in page.items])
        if not (token := page.next_page_token):
            break
    assert pages == [[9, 8, 7], [6, 5, 4], [3, 2, 1]]
    with pytest.raises(InvalidArgument) as exc:  # a token only fits the query it came from
        await core.list_audit_entries(
            actor="user", page_size=3, page_token=(await core.list_audit_entries(page_size=3)).next_page_token
        )
    assert fields(exc) == ["page_token"]


async def test_list_routes_and_deployments_page_by_name(core):
    for i in range(7):
        await core.create_deployment(deployment(f"d{i}", service=f"svc{i}"), reason="x", actor=ACTOR)
        await core.create_route(route(f"r{i}", (f"d{i}", 1), service=f"svc{i}"), reason="x", actor=ACTOR)
    seen, token = [], ""
    while True:
        page = await core.list_routes(page_size=3, page_token=token)
        seen.append([r.name for r in page.items])
        if not (token := page.next_page_token):
            break
    assert seen == [["routes/r0", "routes/r1", "routes/r2"], ["routes/r3", "routes/r4", "routes/r5"], ["routes/r6"]]
    assert len((await core.list_deployments()).items) == 7  # page_size 0 means 100
    exact = await core.list_deployments(page_size=7)
    assert len(exact.items) == 7 and exact.next_page_token == ""
    assert [r.name for r in (await core.list_routes(service="svc4")).items] == ["routes/r4"]


# --- watch ---------------------------------------------------------------------------------


async def test_watch_sends_the_state_then_only_the_latest_after_a_burst(core):
    created = await seed(core)
    watch = core.watch()
    first = await anext(watch)
    assert first.revision == created.revision
    assert [r.name for r in first.routes] == ["routes/inference"]
    assert [d.name for d in first.deployments] == ["deployments/gw", "deployments/inf-canary", "deployments/inf-stable"]
    current = created
    for weight in (1, 2, 3):  # three commits while the follower is busy with the first message
        current = await core.update_route(
            replace(current, backends=(WeightedBackend("deployments/inf-stable", weight),)),
            ["backends"],
            reason="burst",
            actor=ACTOR,
        )
    second = await asyncio.wait_for(anext(watch), 5)
    assert second.revision == first.revision + 3 and second.routes == (current,)
    pending = asyncio.ensure_future(anext(watch))
    await core.delete_deployment("deployments/gw", reason="x", actor=ACTOR)
    third = await asyncio.wait_for(pending, 5)
    assert third.revision == second.revision + 1 and "deployments/gw" not in [d.name for d in third.deployments]
    await watch.aclose()


async def test_followers_share_one_read_per_revision_and_end_on_close(core):
    await seed(core)
    watches = [core.watch() for _ in range(5)]
    states = [await anext(w) for w in watches]
    assert all(s is states[0] for s in states) and core.snapshot_loads == 1
    pending = [asyncio.ensure_future(anext(w)) for w in watches]
    core.close_watchers()
    for result in await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5):
        assert isinstance(result, ShuttingDown)


# --- PostgreSQL: the etag check and the write are one transaction -----------------------------


async def test_updates_queued_behind_a_lock_recheck_the_etag_when_they_get_it(postgres_url):
    """Both updates carry the same etag and start while another transaction holds the route's
    row; once it is released, the first to get the lock wins and the second must see the
    etag the first wrote (a check made before the lock would let both through)."""
    core = RegistryCore(Store(postgres_url), resource_json)
    await core.start()
    holder = create_engine(postgres_url)
    try:
        created = await seed(core)
        with holder.connect() as conn:
            conn.execute(text("SELECT id FROM routes WHERE id = 'inference' FOR UPDATE"))
            updates = [
                asyncio.ensure_future(
                    core.update_route(
                        replace(created, backends=(WeightedBackend("deployments/inf-canary", w),)),
                        ["backends"],
                        reason=f"weight {w}",
                        actor=ACTOR,
                    )
                )
                for w in (1, 2)
            ]
            waiting = text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            async with asyncio.timeout(10):  # both are parked on a lock: nothing has been checked yet
                while await asyncio.to_thread(_scalar, holder, waiting) < 2:
                    await asyncio.sleep(0.01)
            conn.rollback()
        results = await asyncio.gather(*updates, return_exceptions=True)
        winners = [r for r in results if isinstance(r, Route)]
        assert len(winners) == 1, results
        (loser,) = [r for r in results if not isinstance(r, Route)]
        assert isinstance(loser, EtagMismatch) and loser.current_etag == winners[0].etag
        assert await core.get_route("routes/inference") == winners[0]
    finally:
        holder.dispose()
        await core.close()


def _scalar(engine, query):
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()
