"""SQL storage of the registry (SQLAlchemy Core) on SQLite or PostgreSQL.

The tables below describe the schema the Alembic migrations (migrations/versions) create;
the schema is only ever created or changed by those migrations, run at start-up by
Store.migrate(); a test checks that the two agree.

Backends, header overrides and mirrors are child tables rather than JSON columns: their
foreign keys let the database itself refuse to drop a deployment a route still uses, "which
routes use deployment X" is an indexed query on both databases, and UNIQUE(route_id,
deployment_id) holds "each deployment at most once per route" (per list). A route has at
most 16 + 8 + 4 children, so replacing them all on update is cheap. Audit before/after snapshots are
JSON (JSONB on PostgreSQL): they are documents, read back whole, never queried into.
So is an API key's list of route classes.

A rollout is one JSON document (steps, analysis spec, status, its last 100 analysis windows,
history), read and written whole, plus the columns its queries need: route, state, create
time (newest first) and etag. Its references are not foreign keys: a rollout outlives its
route and deployments as a record of what happened. A partial unique index holds "at most
one active (pending, progressing, paused) rollout per route" in the database itself.
Non-finite numbers in a document (a ratio over a zero) are stored as "Infinity",
"-Infinity" and "NaN", as the protobuf JSON mapping writes them: JSON has no such numbers.

API keys are keyed by their public key id alone (unique across tenants: the gateway
resolves a presented secret by the id inside it, without knowing the tenant). The table
holds a keyed hash of the secret (services.registry.keys), never the secret itself.

Writers are serialized: every write transaction first takes the next value of the
single-row revision counter (an UPDATE, which holds the row lock on PostgreSQL until
commit) and on SQLite starts with BEGIN IMMEDIATE (the database write lock). So the
checks a change makes (etag, lock, references) see the latest committed state and
nothing can change it before the commit; the etag is compared once more by the
conditional UPDATE/DELETE itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from services.common.errors import Aborted
from services.registry.errors import DatabaseUnavailable
from services.registry.resources import (
    ACTIVE_ROLLOUT_STATES,
    DEPLOYMENTS,
    ROLLOUTS,
    ROUTES,
    TENANTS,
    Action,
    AnalysisSpec,
    AnalysisWindow,
    ApiKey,
    AuditEntry,
    Deployment,
    HeaderOverride,
    Measurement,
    Rollout,
    RolloutEvent,
    RolloutState,
    RolloutStep,
    Route,
    RouteMirror,
    Tenant,
    Verdict,
    WeightedBackend,
    api_key_name,
    key_state,
    resource_id,
)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: pg_advisory_xact_lock key held while migrating ("registry" in ASCII)
MIGRATION_LOCK_KEY = 0x7265676973747279

T = TypeVar("T")

Json = JSON().with_variant(JSONB(), "postgresql")

metadata = MetaData()

registry_state = Table(
    "registry_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("revision", BigInteger, nullable=False),
    CheckConstraint("id = 1", name="ck_registry_state_single_row"),
)

deployments = Table(
    "deployments",
    metadata,
    Column("id", String(63), primary_key=True),
    Column("service", String(63), nullable=False, index=True),
    Column("version", String(63), nullable=False),
    Column("endpoint", String(300), nullable=False),
    Column("engine", String(63), nullable=False),
    Column("model_id", String(256), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("metrics_url", String(512), nullable=False, server_default=""),
)

routes = Table(
    "routes",
    metadata,
    Column("id", String(63), primary_key=True),
    Column("service", String(63), nullable=False),
    Column("route_class", String(63), nullable=False),
    Column("locked", Boolean, nullable=False),
    Column("timeout_us", BigInteger, nullable=True),
    Column("etag", String(32), nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    UniqueConstraint("service", "route_class", name="uq_routes_service_route_class"),
)

route_backends = Table(
    "route_backends",
    metadata,
    Column("route_id", String(63), ForeignKey("routes.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("deployment_id", String(63), ForeignKey("deployments.id", ondelete="RESTRICT"), nullable=False, index=True),
    Column("weight", Integer, nullable=False),
    UniqueConstraint("route_id", "deployment_id", name="uq_route_backends_route_id_deployment_id"),
)

route_header_overrides = Table(
    "route_header_overrides",
    metadata,
    Column("route_id", String(63), ForeignKey("routes.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("header", String(64), nullable=False),
    Column("value", String(256), nullable=False),
    Column("deployment_id", String(63), ForeignKey("deployments.id", ondelete="RESTRICT"), nullable=False, index=True),
)

route_mirrors = Table(
    "route_mirrors",
    metadata,
    Column("route_id", String(63), ForeignKey("routes.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("deployment_id", String(63), ForeignKey("deployments.id", ondelete="RESTRICT"), nullable=False, index=True),
    Column("percent", Double, nullable=False),
    UniqueConstraint("route_id", "deployment_id", name="uq_route_mirrors_route_id_deployment_id"),
)

audit_entries = Table(
    "audit_entries",
    metadata,
    Column("revision", BigInteger, primary_key=True, autoincrement=False),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", String(16), nullable=False),
    Column("resource", String(128), nullable=False, index=True),
    Column("reason", String(500), nullable=False),
    Column("before", Json, nullable=True),
    Column("after", Json, nullable=True),
)

tenants = Table(
    "tenants",
    metadata,
    Column("id", String(63), primary_key=True),
    Column("display_name", String(128), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("tenant_id", String(63), ForeignKey("tenants.id", ondelete="RESTRICT"), nullable=False),
    #: HMAC-SHA256 of the secret under the registry's pepper, hex
    Column("secret_hash", String(64), nullable=False),
    Column("tier", String(16), nullable=False),
    Column("route_classes", Json, nullable=False),
    Column("display_name", String(128), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("expire_time", DateTime(timezone=True), nullable=True),
    Column("revoke_time", DateTime(timezone=True), nullable=True),
    Index("ix_api_keys_tenant_id_id", "tenant_id", "id"),
)

#: the SQL condition of an active rollout (the partial unique index and the queries share it)
ACTIVE_ROLLOUT_SQL = "state IN ({})".format(", ".join(f"'{state.value}'" for state in ACTIVE_ROLLOUT_STATES))

rollouts = Table(
    "rollouts",
    metadata,
    Column("id", String(63), primary_key=True),
    Column("route_id", String(63), nullable=False, index=True),
    Column("state", String(16), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("etag", String(32), nullable=False),
    #: everything else of the rollout (rollout_document)
    Column("document", Json, nullable=False),
    Index("ix_rollouts_create_time_id", "create_time", "id"),
    Index(
        "uq_rollouts_route_id_active",
        "route_id",
        unique=True,
        sqlite_where=text(ACTIVE_ROLLOUT_SQL),
        postgresql_where=text(ACTIVE_ROLLOUT_SQL),
    ),
)


def _utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Tx:
    """The queries of one transaction. For writes, `revision` and `now` belong to the change."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.revision = 0
        self.now = datetime.now(UTC)

    # revision ----------------------------------------------------------------------

    def current_revision(self) -> int:
        return int(self.conn.execute(select(registry_state.c.revision).where(registry_state.c.id == 1)).scalar_one())

    def take_revision(self) -> int:
        """Claim the next revision for this transaction's change (Store.write does it first: it
        serializes writers on PostgreSQL, as BEGIN IMMEDIATE does on SQLite)."""
        stmt = (
            update(registry_state)
            .where(registry_state.c.id == 1)
            .values(revision=registry_state.c.revision + 1)
            .returning(registry_state.c.revision)
        )
        return int(self.conn.execute(stmt).scalar_one())

    # deployments -------------------------------------------------------------------

    @staticmethod
    def _deployment(row: Any) -> Deployment:
        return Deployment(
            name=DEPLOYMENTS + row.id,
            service=row.service,
            version=row.version,
            endpoint=row.endpoint,
            engine=row.engine,
            model_id=row.model_id,
            create_time=_utc(row.create_time),
            metrics_url=row.metrics_url,
        )

    def get_deployment(self, dep_id: str) -> Deployment | None:
        row = self.conn.execute(select(deployments).where(deployments.c.id == dep_id)).first()
        return None if row is None else self._deployment(row)

    def deployments_by_id(self, ids: Iterable[str]) -> dict[str, Deployment]:
        ids = sorted(set(ids))
        if not ids:
            return {}
        rows = self.conn.execute(select(deployments).where(deployments.c.id.in_(ids)))
        return {row.id: self._deployment(row) for row in rows}

    def list_deployments(
        self, *, service: str = "", after: str | None = None, limit: int | None = None
    ) -> list[Deployment]:
        stmt = select(deployments).order_by(deployments.c.id)
        if service:
            stmt = stmt.where(deployments.c.service == service)
        if after is not None:
            stmt = stmt.where(deployments.c.id > after)
        if limit is not None:
            stmt = stmt.limit(limit)
        return [self._deployment(row) for row in self.conn.execute(stmt)]

    def insert_deployment(self, d: Deployment) -> None:
        self.conn.execute(
            insert(deployments).values(
                id=resource_id(d.name, DEPLOYMENTS),
                service=d.service,
                version=d.version,
                endpoint=d.endpoint,
                engine=d.engine,
                model_id=d.model_id,
                create_time=d.create_time,
                metrics_url=d.metrics_url,
            )
        )

    def delete_deployment(self, dep_id: str) -> None:
        self.conn.execute(delete(deployments).where(deployments.c.id == dep_id))

    def routes_using(self, dep_id: str) -> list[str]:
        """Ids of the routes whose backends, header overrides or mirrors name the deployment."""
        used = (
            select(route_backends.c.route_id)
            .where(route_backends.c.deployment_id == dep_id)
            .union(
                select(route_header_overrides.c.route_id).where(route_header_overrides.c.deployment_id == dep_id),
                select(route_mirrors.c.route_id).where(route_mirrors.c.deployment_id == dep_id),
            )
        )
        return sorted(self.conn.execute(used).scalars())

    # routes ------------------------------------------------------------------------

    def _routes(self, rows: Sequence[Any]) -> list[Route]:
        ids = [row.id for row in rows]
        if not ids:
            return []
        backends: dict[str, list[WeightedBackend]] = {i: [] for i in ids}
        overrides: dict[str, list[HeaderOverride]] = {i: [] for i in ids}
        mirrors: dict[str, list[RouteMirror]] = {i: [] for i in ids}
        for b in self.conn.execute(
            select(route_backends)
            .where(route_backends.c.route_id.in_(ids))
            .order_by(route_backends.c.route_id, route_backends.c.position)
        ):
            backends[b.route_id].append(WeightedBackend(DEPLOYMENTS + b.deployment_id, b.weight))
        for o in self.conn.execute(
            select(route_header_overrides)
            .where(route_header_overrides.c.route_id.in_(ids))
            .order_by(route_header_overrides.c.route_id, route_header_overrides.c.position)
        ):
            overrides[o.route_id].append(HeaderOverride(o.header, o.value, DEPLOYMENTS + o.deployment_id))
        for m in self.conn.execute(
            select(route_mirrors)
            .where(route_mirrors.c.route_id.in_(ids))
            .order_by(route_mirrors.c.route_id, route_mirrors.c.position)
        ):
            mirrors[m.route_id].append(RouteMirror(DEPLOYMENTS + m.deployment_id, m.percent))
        return [
            Route(
                name=ROUTES + row.id,
                service=row.service,
                route_class=row.route_class,
                backends=tuple(backends[row.id]),
                header_overrides=tuple(overrides[row.id]),
                locked=row.locked,
                timeout=None if row.timeout_us is None else timedelta(microseconds=row.timeout_us),
                etag=row.etag,
                revision=row.revision,
                update_time=_utc(row.update_time),
                mirrors=tuple(mirrors[row.id]),
            )
            for row in rows
        ]

    def get_route(self, route_id: str, *, for_update: bool = False) -> Route | None:
        stmt = select(routes).where(routes.c.id == route_id)
        if for_update:
            stmt = stmt.with_for_update()
        found = self._routes(self.conn.execute(stmt).all())
        return found[0] if found else None

    def route_for(self, service: str, route_class: str) -> str | None:
        """Id of the route taking (service, route_class), if any."""
        stmt = select(routes.c.id).where(routes.c.service == service, routes.c.route_class == route_class)
        return self.conn.execute(stmt).scalar_one_or_none()

    def list_routes(self, *, service: str = "", after: str | None = None, limit: int | None = None) -> list[Route]:
        stmt = select(routes).order_by(routes.c.id)
        if service:
            stmt = stmt.where(routes.c.service == service)
        if after is not None:
            stmt = stmt.where(routes.c.id > after)
        if limit is not None:
            stmt = stmt.limit(limit)
        return self._routes(self.conn.execute(stmt).all())

    @staticmethod
    def _route_values(r: Route) -> dict[str, Any]:
        return {
            "locked": r.locked,
            "timeout_us": None if r.timeout is None else r.timeout // timedelta(microseconds=1),
            "etag": r.etag,
            "revision": r.revision,
            "update_time": r.update_time,
        }

    def _insert_children(self, route_id: str, r: Route) -> None:
        if r.backends:
            self.conn.execute(
                insert(route_backends),
                [
                    {
                        "route_id": route_id,
                        "position": i,
                        "deployment_id": resource_id(b.deployment, DEPLOYMENTS),
                        "weight": b.weight,
                    }
                    for i, b in enumerate(r.backends)
                ],
            )
        if r.header_overrides:
            self.conn.execute(
                insert(route_header_overrides),
                [
                    {
                        "route_id": route_id,
                        "position": i,
                        "header": o.header,
                        "value": o.value,
                        "deployment_id": resource_id(o.deployment, DEPLOYMENTS),
                    }
                    for i, o in enumerate(r.header_overrides)
                ],
            )
        if r.mirrors:
            self.conn.execute(
                insert(route_mirrors),
                [
                    {
                        "route_id": route_id,
                        "position": i,
                        "deployment_id": resource_id(m.deployment, DEPLOYMENTS),
                        "percent": m.percent,
                    }
                    for i, m in enumerate(r.mirrors)
                ],
            )

    def _delete_children(self, route_id: str) -> None:
        for child in (route_backends, route_header_overrides, route_mirrors):
            self.conn.execute(delete(child).where(child.c.route_id == route_id))

    def insert_route(self, r: Route) -> None:
        route_id = resource_id(r.name, ROUTES)
        self.conn.execute(
            insert(routes).values(id=route_id, service=r.service, route_class=r.route_class, **self._route_values(r))
        )
        self._insert_children(route_id, r)

    def replace_route(self, r: Route, *, expected_etag: str) -> bool:
        """Write `r` over the stored route if its etag is still `expected_etag`; False if not."""
        route_id = resource_id(r.name, ROUTES)
        stmt = update(routes).where(routes.c.id == route_id, routes.c.etag == expected_etag)
        if self.conn.execute(stmt.values(**self._route_values(r))).rowcount != 1:
            return False
        self._delete_children(route_id)
        self._insert_children(route_id, r)
        return True

    def delete_route(self, route_id: str, *, expected_etag: str) -> bool:
        """Delete the route if its etag is still `expected_etag`; False if not."""
        self._delete_children(route_id)
        stmt = delete(routes).where(routes.c.id == route_id, routes.c.etag == expected_etag)
        return self.conn.execute(stmt).rowcount == 1

    # tenants -----------------------------------------------------------------------

    @staticmethod
    def _tenant(row: Any) -> Tenant:
        return Tenant(name=TENANTS + row.id, display_name=row.display_name, create_time=_utc(row.create_time))

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        row = self.conn.execute(select(tenants).where(tenants.c.id == tenant_id)).first()
        return None if row is None else self._tenant(row)

    def list_tenants(self, *, after: str | None = None, limit: int | None = None) -> list[Tenant]:
        stmt = select(tenants).order_by(tenants.c.id)
        if after is not None:
            stmt = stmt.where(tenants.c.id > after)
        if limit is not None:
            stmt = stmt.limit(limit)
        return [self._tenant(row) for row in self.conn.execute(stmt)]

    def insert_tenant(self, t: Tenant) -> None:
        self.conn.execute(
            insert(tenants).values(
                id=resource_id(t.name, TENANTS), display_name=t.display_name, create_time=t.create_time
            )
        )

    # API keys ----------------------------------------------------------------------

    def _api_key(self, row: Any) -> ApiKey:
        expire_time = None if row.expire_time is None else _utc(row.expire_time)
        revoke_time = None if row.revoke_time is None else _utc(row.revoke_time)
        return ApiKey(
            name=api_key_name(row.tenant_id, row.id),
            tier=row.tier,
            route_classes=tuple(row.route_classes),
            display_name=row.display_name,
            expire_time=expire_time,
            revoke_time=revoke_time,
            create_time=_utc(row.create_time),
            state=key_state(revoke_time, expire_time, self.now),
        )

    _KEY_COLUMNS = tuple(c for c in api_keys.c if c.name != "secret_hash")

    def get_api_key(self, key_id: str, *, for_update: bool = False) -> ApiKey | None:
        """The key (never its hash) by its key id, whatever its tenant."""
        stmt = select(*self._KEY_COLUMNS).where(api_keys.c.id == key_id)
        if for_update:
            stmt = stmt.with_for_update()
        row = self.conn.execute(stmt).first()
        return None if row is None else self._api_key(row)

    def api_key_and_hash(self, key_id: str) -> tuple[ApiKey, str] | None:
        """The key and its secret's stored hash, for verification only."""
        row = self.conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return None if row is None else (self._api_key(row), row.secret_hash)

    def list_api_keys(
        self, *, tenant_id: str = "", after: tuple[str, str] | None = None, limit: int | None = None
    ) -> list[ApiKey]:
        """Ordered by (tenant id, key id); `after` is the (tenant id, key id) the page starts after."""
        stmt = select(*self._KEY_COLUMNS).order_by(api_keys.c.tenant_id, api_keys.c.id)
        if tenant_id:
            stmt = stmt.where(api_keys.c.tenant_id == tenant_id)
        if after is not None:
            stmt = stmt.where(tuple_(api_keys.c.tenant_id, api_keys.c.id) > tuple_(*after))
        if limit is not None:
            stmt = stmt.limit(limit)
        return [self._api_key(row) for row in self.conn.execute(stmt)]

    def insert_api_key(self, k: ApiKey, secret_hash: str) -> None:
        self.conn.execute(
            insert(api_keys).values(
                id=k.key_id,
                tenant_id=k.tenant,
                secret_hash=secret_hash,
                tier=k.tier,
                route_classes=list(k.route_classes),
                display_name=k.display_name,
                create_time=k.create_time,
                expire_time=k.expire_time,
                revoke_time=k.revoke_time,
            )
        )

    def revoke_api_key(self, key_id: str, when: datetime) -> bool:
        """Set the key's revoke time if it has none yet; False if it had (or there is no such key)."""
        stmt = update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoke_time.is_(None))
        return self.conn.execute(stmt.values(revoke_time=when)).rowcount == 1

    # rollouts ----------------------------------------------------------------------

    def get_rollout(self, rollout_id: str, *, for_update: bool = False) -> Rollout | None:
        stmt = select(rollouts).where(rollouts.c.id == rollout_id)
        if for_update:
            stmt = stmt.with_for_update()
        row = self.conn.execute(stmt).first()
        return None if row is None else rollout_from_row(row)

    def active_rollout(self, route_id: str) -> str | None:
        """Id of the route's active (pending, progressing or paused) rollout, if any."""
        stmt = select(rollouts.c.id).where(rollouts.c.route_id == route_id, text(ACTIVE_ROLLOUT_SQL))
        return self.conn.execute(stmt).scalar_one_or_none()

    def list_rollouts(
        self,
        *,
        route_id: str = "",
        active_only: bool = False,
        after: tuple[datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[Rollout]:
        """Newest first (create time descending, then id); `after` is the (create time, id) the
        page starts after."""
        stmt = select(rollouts).order_by(rollouts.c.create_time.desc(), rollouts.c.id)
        if route_id:
            stmt = stmt.where(rollouts.c.route_id == route_id)
        if active_only:
            stmt = stmt.where(rollouts.c.state.in_([state.value for state in ACTIVE_ROLLOUT_STATES]))
        if after is not None:
            when, rollout_id = after
            stmt = stmt.where(
                or_(
                    rollouts.c.create_time < when,
                    (rollouts.c.create_time == when) & (rollouts.c.id > rollout_id),
                )
            )
        if limit is not None:
            stmt = stmt.limit(limit)
        return [rollout_from_row(row) for row in self.conn.execute(stmt)]

    @staticmethod
    def _rollout_values(r: Rollout) -> dict[str, Any]:
        return {"state": r.state.value, "etag": r.etag, "document": rollout_document(r)}

    def insert_rollout(self, r: Rollout) -> None:
        self.conn.execute(
            insert(rollouts).values(
                id=resource_id(r.name, ROLLOUTS),
                route_id=resource_id(r.route, ROUTES),
                create_time=r.create_time,
                **self._rollout_values(r),
            )
        )

    def replace_rollout(self, r: Rollout, *, expected_etag: str) -> bool:
        """Write `r` over the stored rollout if its etag is still `expected_etag`; False if not."""
        stmt = update(rollouts).where(rollouts.c.id == resource_id(r.name, ROLLOUTS), rollouts.c.etag == expected_etag)
        return self.conn.execute(stmt.values(**self._rollout_values(r))).rowcount == 1

    # audit -------------------------------------------------------------------------

    def insert_audit(self, e: AuditEntry) -> None:
        self.conn.execute(
            insert(audit_entries).values(
                revision=e.revision,
                time=e.time,
                actor=e.actor,
                action=e.action.value,
                resource=e.resource,
                reason=e.reason,
                before=e.before,
                after=e.after,
            )
        )

    def list_audit(
        self, *, resource: str = "", actor: str = "", before_revision: int | None = None, limit: int | None = None
    ) -> list[AuditEntry]:
        """Newest first; `actor` matches any part of the actor, ignoring case."""
        stmt = select(audit_entries).order_by(audit_entries.c.revision.desc())
        if resource:
            stmt = stmt.where(audit_entries.c.resource == resource)
        if actor:
            stmt = stmt.where(func.lower(audit_entries.c.actor).contains(actor.lower(), autoescape=True))
        if before_revision is not None:
            stmt = stmt.where(audit_entries.c.revision < before_revision)
        if limit is not None:
            stmt = stmt.limit(limit)
        return [
            AuditEntry(
                revision=row.revision,
                time=_utc(row.time),
                actor=row.actor,
                action=Action(row.action),
                resource=row.resource,
                reason=row.reason,
                before=row.before,
                after=row.after,
            )
            for row in self.conn.execute(stmt)
        ]


# --- a rollout as a JSON document ---------------------------------------------------------

_NON_FINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _num(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _float(value: float | str) -> float:
    return _NON_FINITE[value] if isinstance(value, str) else float(value)


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_time(value: str | None) -> datetime | None:
    return None if value is None else _utc(datetime.fromisoformat(value))


def _us(value: timedelta) -> int:
    return value // timedelta(microseconds=1)


def rollout_document(r: Rollout) -> dict[str, Any]:
    """Everything of a rollout but its id and create time (the row's own columns): JSON values
    only (times ISO 8601, durations in microseconds)."""
    a = r.analysis
    return {
        "route": r.route,
        "stable_deployment": r.stable_deployment,
        "canary_deployment": r.canary_deployment,
        "steps": [
            {
                "weight": s.weight,
                "mirror_percent": _num(s.mirror_percent),
                "pause_us": _us(s.pause),
                "analysis": s.analysis,
            }
            for s in r.steps
        ],
        "analysis": {
            "window_us": None if a.window is None else _us(a.window),
            "min_requests": a.min_requests,
            "max_error_rate": a.max_error_rate,
            "max_error_rate_margin": a.max_error_rate_margin,
            "max_latency_ratio": a.max_latency_ratio,
            "max_cost_ratio": a.max_cost_ratio,
            "golden_set": a.golden_set,
            "max_golden_drop": a.max_golden_drop,
            "inconclusive_limit": a.inconclusive_limit,
            "latency_slack_seconds": a.latency_slack_seconds,
        },
        "state": r.state.value,
        "current_step": r.current_step,
        "step_start_time": _time(r.step_start_time),
        "applied_weight": r.applied_weight,
        "applied_mirror_percent": _num(r.applied_mirror_percent),
        "message": r.message,
        "windows": [
            {
                "start_time": _time(w.start_time),
                "end_time": _time(w.end_time),
                "step": w.step,
                "verdict": w.verdict.value,
                "source": w.source,
                "measurements": [
                    {
                        "metric": m.metric,
                        "canary": _num(m.canary),
                        "stable": _num(m.stable),
                        "threshold": _num(m.threshold),
                        "verdict": m.verdict.value,
                        "detail": m.detail,
                    }
                    for m in w.measurements
                ],
            }
            for w in r.windows
        ],
        "history": [
            {
                "time": _time(e.time),
                "actor": e.actor,
                "from_state": e.from_state.value,
                "to_state": e.to_state.value,
                "step": e.step,
                "reason": e.reason,
            }
            for e in r.history
        ],
        "update_time": _time(r.update_time),
    }


def rollout_from_row(row: Any) -> Rollout:
    doc = row.document
    a = doc["analysis"]
    return Rollout(
        name=ROLLOUTS + row.id,
        route=doc["route"],
        stable_deployment=doc["stable_deployment"],
        canary_deployment=doc["canary_deployment"],
        steps=tuple(
            RolloutStep(
                weight=s["weight"],
                mirror_percent=_float(s["mirror_percent"]),
                pause=timedelta(microseconds=s["pause_us"]),
                analysis=s["analysis"],
            )
            for s in doc["steps"]
        ),
        analysis=AnalysisSpec(
            window=None if a["window_us"] is None else timedelta(microseconds=a["window_us"]),
            min_requests=a["min_requests"],
            max_error_rate=a["max_error_rate"],
            max_error_rate_margin=a["max_error_rate_margin"],
            max_latency_ratio=a["max_latency_ratio"],
            max_cost_ratio=a["max_cost_ratio"],
            golden_set=a["golden_set"],
            max_golden_drop=a["max_golden_drop"],
            inconclusive_limit=a["inconclusive_limit"],
            latency_slack_seconds=a.get("latency_slack_seconds"),  # absent in rollouts stored before it existed
        ),
        state=RolloutState(row.state),
        current_step=doc["current_step"],
        step_start_time=_parse_time(doc["step_start_time"]),
        applied_weight=doc["applied_weight"],
        applied_mirror_percent=_float(doc["applied_mirror_percent"]),
        message=doc["message"],
        windows=tuple(
            AnalysisWindow(
                start_time=_parse_time(w["start_time"]),
                end_time=_parse_time(w["end_time"]),
                step=w["step"],
                verdict=Verdict(w["verdict"]),
                source=w["source"],
                measurements=tuple(
                    Measurement(
                        metric=m["metric"],
                        canary=_float(m["canary"]),
                        stable=_float(m["stable"]),
                        threshold=_float(m["threshold"]),
                        verdict=Verdict(m["verdict"]),
                        detail=m["detail"],
                    )
                    for m in w["measurements"]
                ),
            )
            for w in doc["windows"]
        ),
        history=tuple(
            RolloutEvent(
                time=_utc(datetime.fromisoformat(e["time"])),
                actor=e["actor"],
                from_state=RolloutState(e["from_state"]),
                to_state=RolloutState(e["to_state"]),
                step=e["step"],
                reason=e["reason"],
            )
            for e in doc["history"]
        ),
        etag=row.etag,
        create_time=_utc(row.create_time),
        update_time=_parse_time(doc["update_time"]),
    )


class Store:
    """Connections and transactions on one database (blocking: call from worker threads)."""

    def __init__(self, url: str, *, sqlite_busy_timeout_s: float = 5.0) -> None:
        parsed = make_url(url)
        self.backend = parsed.get_backend_name()
        if self.backend == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(parsed)
            _configure_sqlite(self.engine, sqlite_busy_timeout_s)
        else:
            self.engine = create_engine(parsed, pool_pre_ping=True)

    def dispose(self) -> None:
        self.engine.dispose()

    def migrate(self) -> None:
        """Upgrade the schema to the latest migration (a no-op when it is there already)."""
        with _db_errors():
            upgrade(self.engine)

    def read(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn` in a read transaction that sees one consistent snapshot."""
        options: dict[str, Any] = {"isolation_level": "REPEATABLE READ"} if self.backend == "postgresql" else {}
        with _db_errors(), self.engine.connect().execution_options(**options) as conn, conn.begin():
            return fn(Tx(conn))

    def write(self, fn: Callable[[Tx], T]) -> tuple[T, int]:
        """Run `fn` as the change of the next revision; commit when it returns, roll back when it raises.

        Returns fn's result and the revision it committed.
        """
        with _db_errors(), self.engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn:
            with conn.begin():
                tx = Tx(conn)
                tx.revision = tx.take_revision()
                result = fn(tx)
            return result, tx.revision


@contextmanager
def _db_errors() -> Iterator[None]:
    """Database failures as domain errors: unreachable -> UNAVAILABLE, constraint -> ABORTED."""
    try:
        yield
    except OperationalError as exc:
        raise DatabaseUnavailable(_first_line(exc)) from exc
    except IntegrityError as exc:
        raise Aborted(f"conflicting concurrent change, retry: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]


def _configure_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    """WAL, foreign keys and a busy timeout on every connection; we emit BEGIN ourselves so
    that writers can take the write lock up front (BEGIN IMMEDIATE)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # the driver must not BEGIN on its own
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def alembic_config() -> Config:
    """An Alembic config built in code (no alembic.ini): the registry's migrations folder."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the migrations up to `revision` on `engine`, all in one transaction (both databases
    have transactional DDL); on PostgreSQL an advisory lock keeps two starting registries apart."""
    config = alembic_config()
    with engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
