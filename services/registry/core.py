"""The registry's logic: deployments, routes with etags, locks and mirrors, tenants and API
keys, rollouts, the audit log, WatchRoutes and WatchRollouts.

Every change runs as one database transaction (store.Store.write) that takes the next
registry revision, checks the request against the current state (etag, lock, references),
writes the resource and its audit entry, and commits; nothing is written when any check
fails. After the commit, followers are woken in-process (one registry process is the
writer). The database calls are blocking SQLAlchemy calls and run on a small thread pool,
so the event loop (and every open watch stream) never waits on them.

Each change wakes only the followers whose state it changed: deployment and route changes
wake WatchRoutes, rollout changes wake WatchRollouts. Tenant and API key changes take a
revision too (their audit entries are numbered by it) but wake no one: waking WatchRoutes
would push an identical configuration to every Envoy.

Rollouts. An operator creates one (PENDING) and may pause, resume, promote or abort it; the
rollout controller walks its steps, moving the route's weights with UpdateRoute (audited
there) and recording its progress with UpdateRolloutStatus. Every state change or step is
appended to the rollout's history and audited as a TRANSITION with before and after. The
controller's other status writes (applied weights, message, analysis windows, every few
seconds while a step is held) are not audited: they would flood the log with entries that
say nothing the route's own audited updates and the rollout's history do not.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from services.common.errors import FieldViolation, InvalidArgument
from services.registry.errors import (
    ApiKeyRevoked,
    DeploymentInUse,
    EtagMismatch,
    InvalidApiKey,
    ResourceExists,
    ResourceNotFound,
    RolloutActive,
    RolloutStateConflict,
    RouteLocked,
    ShuttingDown,
    StableNotServing,
)
from services.registry.keys import SecretHasher, key_id_of, new_key_id, new_secret
from services.registry.resources import (
    ACTIVE_ROLLOUT_STATES,
    ANY_TENANT,
    API_KEYS,
    DEPLOYMENTS,
    ROLLOUTS,
    ROUTES,
    TENANTS,
    Action,
    AnalysisWindow,
    ApiKey,
    AuditEntry,
    Deployment,
    Encoder,
    KeyState,
    Page,
    Resource,
    Rollout,
    RolloutEvent,
    RolloutsState,
    RolloutState,
    Route,
    RoutingState,
    Tenant,
    api_key_name,
    etag_for,
    resource_id,
)
from services.registry.validation import (
    DEFAULT_STEPS,
    MAX_WINDOWS,
    ROUTE_FIELDS,
    STATUS_FIELDS,
    UPDATABLE_FIELDS,
    api_key_name_violations,
    filled_analysis,
    id_violations,
    mirror_backend_violations,
    name_violations,
    parent_violations,
    raise_if,
    reference_violations,
    references,
    status_mask_violations,
    update_mask_violations,
    validate_api_key,
    validate_deployment,
    validate_filter,
    validate_reason,
    validate_rollout,
    validate_route_fields,
    validate_status,
    validate_tenant,
    window_violations,
)

if TYPE_CHECKING:
    from services.registry.store import Store, Tx

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 500


# --- paging -------------------------------------------------------------------------


def resolve_page_size(requested: int) -> int:
    if requested < 0 or requested > MAX_PAGE_SIZE:
        raise InvalidArgument(
            FieldViolation(
                "page_size", f"must be in [0, {MAX_PAGE_SIZE}] (0 means {DEFAULT_PAGE_SIZE}); got {requested}"
            )
        )
    return requested or DEFAULT_PAGE_SIZE


def _query_digest(query: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(query)).encode()).hexdigest()[:16]


def encode_page_token(key: str | int, query: Sequence[str]) -> str:
    payload = json.dumps({"k": key, "q": _query_digest(query)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def decode_page_token(token: str, query: Sequence[str], key_type: type[T]) -> T | None:
    """The key after which the page starts; None for the first page. Tokens are tied to the query."""
    if not token:
        return None
    bad = InvalidArgument(FieldViolation("page_token", "is not a next_page_token of this query (same filters)"))
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if not isinstance(payload, dict) or payload.get("q") != _query_digest(query):
        raise bad
    key = payload.get("k")
    if type(key) is not key_type:
        raise bad
    return key  # type: ignore[no-any-return]


def _page(rows: list[T], size: int, key: Callable[[T], str | int], query: Sequence[str]) -> Page[T]:
    """`rows` holds up to size + 1 rows: one more means there is a next page."""
    if len(rows) <= size:
        return Page(tuple(rows))
    return Page(tuple(rows[:size]), encode_page_token(key(rows[size - 1]), query))


# --- watchers -----------------------------------------------------------------------


class _Changes:
    """The latest committed revision and a way to wait for a later one (never blocks writers)."""

    def __init__(self, revision: int) -> None:
        self.revision = revision
        self.closed = False
        self._event = asyncio.Event()

    def publish(self, revision: int) -> None:
        self.revision = max(self.revision, revision)
        self._wake()

    def advance(self, revision: int) -> None:
        """Count a committed revision that followers need not hear of."""
        self.revision = max(self.revision, revision)

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_past(self, revision: int) -> None:
        """Return once a revision after `revision` is committed, or on close."""
        while self.revision <= revision and not self.closed:
            await self._event.wait()


# --- the service --------------------------------------------------------------------


#: the state changes UpdateRolloutStatus (the controller) may make; any state may stay as it is
STATUS_TRANSITIONS: dict[RolloutState, frozenset[RolloutState]] = {
    RolloutState.PENDING: frozenset({RolloutState.PROGRESSING, RolloutState.ROLLED_BACK}),
    RolloutState.PROGRESSING: frozenset({RolloutState.PAUSED, RolloutState.ROLLED_BACK, RolloutState.PROMOTED}),
    RolloutState.PAUSED: frozenset({RolloutState.ROLLED_BACK}),
}
#: what an ended rollout may still have written (the controller finishing a rollback or promotion)
ENDED_STATUS_FIELDS = ("step_start_time", "applied_weight", "applied_mirror_percent", "message")


class RegistryCore:
    """Deployments, routes, tenants, API keys, rollouts and the audit log on a Store; WatchRoutes
    and WatchRollouts for followers.

    `hasher` turns API key secrets into what the store keeps (services.registry.keys)."""

    def __init__(
        self, store: Store, encode: Encoder, *, db_threads: int = 4, hasher: SecretHasher | None = None
    ) -> None:
        self._store = store
        self._encode = encode
        self._hasher = hasher or SecretHasher()
        self._executor = ThreadPoolExecutor(max_workers=db_threads, thread_name_prefix="registry-db")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changes = _Changes(0)
        self._snapshot: RoutingState | None = None
        self._snapshot_lock = asyncio.Lock()
        #: how often the routing state was read for followers (one read serves them all)
        self.snapshot_loads = 0
        self._rollout_changes = _Changes(0)
        self._rollouts_snapshot: RolloutsState | None = None
        self._rollouts_lock = asyncio.Lock()
        #: how often every rollout was read for WatchRollouts followers
        self.rollouts_loads = 0

    async def start(self) -> None:
        """Bring the schema to the latest migration and learn the current revision."""
        self._loop = asyncio.get_running_loop()
        await self._in_thread(self._store.migrate)
        revision = await self._read(lambda tx: tx.current_revision())
        self._changes.publish(revision)
        self._rollout_changes.publish(revision)

    def close_watchers(self) -> None:
        """End every WatchRoutes and WatchRollouts stream (they fail with UNAVAILABLE: reconnect)
        and refuse new ones."""
        self._changes.close()
        self._rollout_changes.close()

    async def close(self) -> None:
        self.close_watchers()
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        await asyncio.to_thread(self._store.dispose)

    @property
    def revision(self) -> int:
        """The latest committed revision this process knows of."""
        return self._changes.revision

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def _read(self, query: Callable[[Tx], T]) -> T:
        return await self._in_thread(self._store.read, query)

    async def _write(self, change: Callable[[Tx], T], *, routing: bool = True, rollouts: bool = False) -> T:
        """Run `change` as the next revision. `routing`: it changes the routing state (wake the
        WatchRoutes followers); `rollouts`: it changes a rollout (wake the WatchRollouts ones).
        Followers not woken still count the revision."""
        loop = self._loop
        assert loop is not None, "RegistryCore.start() first"

        def run() -> T:
            result, revision = self._store.write(change)
            # From the worker thread: followers hear of the commit even if the caller went away.
            loop.call_soon_threadsafe(self._committed, revision, routing, rollouts)
            return result

        return await self._in_thread(run)

    def _committed(self, revision: int, routing: bool, rollouts: bool) -> None:
        (self._changes.publish if routing else self._changes.advance)(revision)
        (self._rollout_changes.publish if rollouts else self._rollout_changes.advance)(revision)

    def _audit(
        self,
        tx: Tx,
        actor: str,
        action: Action,
        reason: str,
        before: Resource | None,
        after: Resource | None,
    ) -> None:
        resource = after or before
        assert resource is not None
        tx.insert_audit(
            AuditEntry(
                revision=tx.revision,
                time=tx.now,
                actor=actor,
                action=action,
                resource=resource.name,
                reason=reason,
                before=None if before is None else self._encode(before),
                after=None if after is None else self._encode(after),
            )
        )

    # deployments -------------------------------------------------------------------

    async def create_deployment(self, deployment: Deployment, *, reason: str, actor: str) -> Deployment:
        raise_if(validate_deployment(deployment) + validate_reason(reason))

        def change(tx: Tx) -> Deployment:
            if tx.get_deployment(resource_id(deployment.name, DEPLOYMENTS)) is not None:
                raise ResourceExists(deployment.name)
            stored = replace(deployment, create_time=tx.now)
            tx.insert_deployment(stored)
            self._audit(tx, actor, Action.CREATE, reason, None, stored)
            return stored

        return await self._write(change)

    async def get_deployment(self, name: str) -> Deployment:
        raise_if(name_violations(name, DEPLOYMENTS))
        found = await self._read(lambda tx: tx.get_deployment(resource_id(name, DEPLOYMENTS)))
        if found is None:
            raise ResourceNotFound(name)
        return found

    async def list_deployments(
        self, *, service: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page[Deployment]:
        size = resolve_page_size(page_size)
        raise_if(id_violations(service, "service", required=False))
        query = ("deployments", service)
        after = decode_page_token(page_token, query, str)
        rows = await self._read(lambda tx: tx.list_deployments(service=service, after=after, limit=size + 1))
        return _page(rows, size, lambda d: resource_id(d.name, DEPLOYMENTS), query)

    async def delete_deployment(self, name: str, *, reason: str, actor: str) -> None:
        raise_if(name_violations(name, DEPLOYMENTS) + validate_reason(reason))
        dep_id = resource_id(name, DEPLOYMENTS)

        def change(tx: Tx) -> None:
            current = tx.get_deployment(dep_id)
            if current is None:
                raise ResourceNotFound(name)
            users = tx.routes_using(dep_id)
            if users:
                raise DeploymentInUse(name, [ROUTES + r for r in users])
            tx.delete_deployment(dep_id)
            self._audit(tx, actor, Action.DELETE, reason, current, None)

        await self._write(change)

    # routes ------------------------------------------------------------------------

    async def create_route(self, route: Route, *, reason: str, actor: str) -> Route:
        raise_if(
            validate_route_fields(route, ROUTE_FIELDS)
            + mirror_backend_violations(route, ROUTE_FIELDS)
            + validate_reason(reason)
        )
        route_id = resource_id(route.name, ROUTES)

        def change(tx: Tx) -> Route:
            if tx.get_route(route_id) is not None:
                raise ResourceExists(route.name)
            taken = tx.route_for(route.service, route.route_class)
            if taken is not None:
                klass = f"class {route.route_class!r}" if route.route_class else "the default class"
                raise ResourceExists(
                    ROUTES + taken,
                    f" for service {route.service!r}, {klass}: at most one route per service and class",
                )
            _check_references(tx, route, ROUTE_FIELDS)
            stored = replace(route, etag=etag_for(route.name, tx.revision), revision=tx.revision, update_time=tx.now)
            tx.insert_route(stored)
            self._audit(tx, actor, Action.CREATE, reason, None, stored)
            return stored

        return await self._write(change)

    async def get_route(self, name: str) -> Route:
        raise_if(name_violations(name, ROUTES))
        found = await self._read(lambda tx: tx.get_route(resource_id(name, ROUTES)))
        if found is None:
            raise ResourceNotFound(name)
        return found

    async def list_routes(self, *, service: str = "", page_size: int = 0, page_token: str = "") -> Page[Route]:
        size = resolve_page_size(page_size)
        raise_if(id_violations(service, "service", required=False))
        query = ("routes", service)
        after = decode_page_token(page_token, query, str)
        rows = await self._read(lambda tx: tx.list_routes(service=service, after=after, limit=size + 1))
        return _page(rows, size, lambda r: resource_id(r.name, ROUTES), query)

    async def update_route(self, route: Route, update_mask: Sequence[str], *, reason: str, actor: str) -> Route:
        """Replace the fields named in `update_mask` if route.etag is still the route's etag.

        A locked route only takes an update that also unlocks it (locked=false in the mask)."""
        paths = list(dict.fromkeys(update_mask))
        fields = [p for p in paths if p in UPDATABLE_FIELDS]
        violations = name_violations(route.name, ROUTES, "route.name")
        if not route.etag:
            violations.append(FieldViolation("route.etag", "required: the etag of the route as you read it"))
        violations += update_mask_violations(paths)
        raise_if(violations + validate_route_fields(route, fields) + validate_reason(reason))
        route_id = resource_id(route.name, ROUTES)
        unlocks = "locked" in fields and not route.locked

        def change(tx: Tx) -> Route:
            current = tx.get_route(route_id, for_update=True)
            if current is None:
                raise ResourceNotFound(route.name)
            if route.etag != current.etag:
                raise EtagMismatch(route.name, current.etag)
            if current.locked and not unlocks:
                raise RouteLocked(route.name, "an update must also set locked=false (update_mask 'locked')")
            immutable = [
                FieldViolation(f"route.{f}", f"is immutable; the route's is {getattr(current, f)!r}")
                for f in ("service", "route_class")
                if getattr(route, f) and getattr(route, f) != getattr(current, f)
            ]
            raise_if(immutable)
            merged = replace(current, **{f: getattr(route, f) for f in fields})
            raise_if(mirror_backend_violations(merged, fields))
            _check_references(tx, merged, fields)
            stored = replace(merged, etag=etag_for(route.name, tx.revision), revision=tx.revision, update_time=tx.now)
            if not tx.replace_route(stored, expected_etag=current.etag):
                raise EtagMismatch(route.name, current.etag)  # not reached while writers are serialized
            self._audit(tx, actor, Action.UPDATE, reason, current, stored)
            return stored

        return await self._write(change)

    async def delete_route(self, name: str, etag: str, *, reason: str, actor: str) -> None:
        """Delete the route if `etag` is still its etag; a locked route must be unlocked first."""
        violations = name_violations(name, ROUTES)
        if not etag:
            violations.append(FieldViolation("etag", "required: the etag of the route as you read it"))
        raise_if(violations + validate_reason(reason))
        route_id = resource_id(name, ROUTES)

        def change(tx: Tx) -> None:
            current = tx.get_route(route_id, for_update=True)
            if current is None:
                raise ResourceNotFound(name)
            if etag != current.etag:
                raise EtagMismatch(name, current.etag)
            if current.locked:
                raise RouteLocked(name, "unlock it (UpdateRoute with locked=false) before deleting it")
            if not tx.delete_route(route_id, expected_etag=current.etag):
                raise EtagMismatch(name, current.etag)  # not reached while writers are serialized
            self._audit(tx, actor, Action.DELETE, reason, current, None)

        await self._write(change)

    # tenants -----------------------------------------------------------------------

    async def create_tenant(self, tenant: Tenant, *, reason: str, actor: str) -> Tenant:
        raise_if(validate_tenant(tenant) + validate_reason(reason))

        def change(tx: Tx) -> Tenant:
            if tx.get_tenant(resource_id(tenant.name, TENANTS)) is not None:
                raise ResourceExists(tenant.name)
            stored = replace(tenant, create_time=tx.now)
            tx.insert_tenant(stored)
            self._audit(tx, actor, Action.CREATE, reason, None, stored)
            return stored

        return await self._write(change, routing=False)

    async def get_tenant(self, name: str) -> Tenant:
        raise_if(name_violations(name, TENANTS))
        found = await self._read(lambda tx: tx.get_tenant(resource_id(name, TENANTS)))
        if found is None:
            raise ResourceNotFound(name)
        return found

    async def list_tenants(self, *, page_size: int = 0, page_token: str = "") -> Page[Tenant]:
        size = resolve_page_size(page_size)
        query = ("tenants",)
        after = decode_page_token(page_token, query, str)
        rows = await self._read(lambda tx: tx.list_tenants(after=after, limit=size + 1))
        return _page(rows, size, lambda t: resource_id(t.name, TENANTS), query)

    # API keys ----------------------------------------------------------------------

    async def create_api_key(
        self, parent: str, key: ApiKey, *, ttl: timedelta | None = None, reason: str, actor: str
    ) -> tuple[ApiKey, str]:
        """Create a key of tenant `parent` from key's tier, route classes, display name and expire
        time (or `ttl`); returns it and its secret, which is not kept (only its keyed hash is)."""
        received = datetime.now(UTC)
        raise_if(
            parent_violations(parent, allow_any=False) + validate_api_key(key, ttl, received) + validate_reason(reason)
        )
        tenant_id = resource_id(parent, TENANTS)

        def change(tx: Tx) -> tuple[ApiKey, str]:
            if tx.get_tenant(tenant_id) is None:
                raise ResourceNotFound(parent)
            key_id = new_key_id()
            while tx.get_api_key(key_id) is not None:  # 80 random bits: practically never
                key_id = new_key_id()
            secret = new_secret(key_id)
            stored = replace(
                key,
                name=api_key_name(tenant_id, key_id),
                expire_time=tx.now + ttl if ttl is not None else key.expire_time,
                revoke_time=None,
                create_time=tx.now,
                state=KeyState.ACTIVE,
            )
            tx.insert_api_key(stored, self._hasher.hash(secret))
            self._audit(tx, actor, Action.CREATE, reason, None, stored)
            return stored, secret

        return await self._write(change, routing=False)

    @staticmethod
    def _key_in(name: str, found: ApiKey | None) -> ApiKey:
        """`found` if it is the key `name` names (its tenant, or any tenant for tenants/-)."""
        tenant = name.removeprefix(TENANTS).partition(API_KEYS)[0]
        if found is None or (tenant != ANY_TENANT and found.tenant != tenant):
            raise ResourceNotFound(name)
        return found

    async def get_api_key(self, name: str) -> ApiKey:
        raise_if(api_key_name_violations(name))
        key_id = name.rpartition("/")[2]
        return self._key_in(name, await self._read(lambda tx: tx.get_api_key(key_id)))

    async def list_api_keys(self, parent: str, *, page_size: int = 0, page_token: str = "") -> Page[ApiKey]:
        """Keys of tenant `parent` (tenants/- for every tenant), ordered by tenant, then key id."""
        size = resolve_page_size(page_size)
        raise_if(parent_violations(parent, allow_any=True))
        tenant_id = resource_id(parent, TENANTS)
        tenant_id = "" if tenant_id == ANY_TENANT else tenant_id
        query = ("api_keys", tenant_id)
        token = decode_page_token(page_token, query, str)
        after = None
        if token is not None:
            t, _, k = token.partition("/")
            after = (t, k)

        def read(tx: Tx) -> list[ApiKey]:
            if tenant_id and tx.get_tenant(tenant_id) is None:
                raise ResourceNotFound(parent)
            return tx.list_api_keys(tenant_id=tenant_id, after=after, limit=size + 1)

        rows = await self._read(read)
        return _page(rows, size, lambda k: f"{k.tenant}/{k.key_id}", query)

    async def revoke_api_key(self, name: str, *, reason: str, actor: str) -> ApiKey:
        """Revoke the key for good; ApiKeyRevoked if it is already."""
        raise_if(api_key_name_violations(name) + validate_reason(reason))
        key_id = name.rpartition("/")[2]

        def change(tx: Tx) -> ApiKey:
            current = self._key_in(name, tx.get_api_key(key_id, for_update=True))
            if current.revoke_time is not None:
                raise ApiKeyRevoked(current.name, current.revoke_time.isoformat())
            if not tx.revoke_api_key(key_id, tx.now):
                raise ApiKeyRevoked(current.name, "the same time")  # not reached while writers are serialized
            stored = replace(current, revoke_time=tx.now, state=KeyState.REVOKED)
            self._audit(tx, actor, Action.UPDATE, reason, current, stored)
            return stored

        return await self._write(change, routing=False)

    async def verify_api_key(self, secret: str) -> ApiKey:
        """The active key `secret` belongs to. InvalidApiKey, one answer for every reason (malformed,
        unknown, wrong secret, revoked, expired), so that a guesser learns nothing."""
        if not secret:
            raise InvalidArgument(FieldViolation("secret", "required: the secret the caller presented"))
        key_id = key_id_of(secret)
        if key_id is None:
            raise InvalidApiKey()
        found = await self._read(lambda tx: tx.api_key_and_hash(key_id))
        key, stored_hash = found if found is not None else (None, None)
        # hashed and compared whether or not the key exists: the same work either way
        if not self._hasher.matches(secret, stored_hash) or key is None or key.state is not KeyState.ACTIVE:
            raise InvalidApiKey()
        return key

    # rollouts ----------------------------------------------------------------------

    async def create_rollout(self, rollout: Rollout, *, reason: str, actor: str) -> Rollout:
        """Create a pending rollout of rollout.canary_deployment on rollout.route, starting from
        rollout.stable_deployment; empty steps and unset analysis fields take their defaults.
        Every other (output-only) field of `rollout` is ignored."""
        raise_if(validate_rollout(rollout) + validate_reason(reason))
        rollout_id = resource_id(rollout.name, ROLLOUTS)
        route_id = resource_id(rollout.route, ROUTES)
        stable, canary = rollout.stable_deployment, rollout.canary_deployment

        def change(tx: Tx) -> Rollout:
            if tx.get_rollout(rollout_id) is not None:
                raise ResourceExists(rollout.name)
            route = tx.get_route(route_id)
            if route is None:
                raise ResourceNotFound(rollout.route)
            found = {
                d.name: d for d in tx.deployments_by_id(resource_id(n, DEPLOYMENTS) for n in (stable, canary)).values()
            }
            for name in (canary, stable):
                if name not in found:
                    raise ResourceNotFound(name)
            if found[canary].service != route.service:
                raise InvalidArgument(
                    FieldViolation(
                        "rollout.canary_deployment",
                        f"{canary} implements {found[canary].service!r}, not {route.service!r} (the service of"
                        f" {route.name})",
                    )
                )
            if route.locked:
                raise RouteLocked(route.name, "rollouts leave a locked route alone; unlock it first")
            if not any(b.deployment == stable and b.weight > 0 for b in route.backends):
                raise StableNotServing(route, stable)
            other = tx.active_rollout(route_id)
            if other is not None:
                raise RolloutActive(route.name, ROLLOUTS + other)
            stored = Rollout(
                name=rollout.name,
                route=rollout.route,
                stable_deployment=stable,
                canary_deployment=canary,
                steps=rollout.steps or DEFAULT_STEPS,
                analysis=filled_analysis(rollout.analysis),
                state=RolloutState.PENDING,
                history=(RolloutEvent(tx.now, actor, RolloutState.UNSPECIFIED, RolloutState.PENDING, 0, reason),),
                etag=etag_for(rollout.name, tx.revision),
                create_time=tx.now,
                update_time=tx.now,
            )
            tx.insert_rollout(stored)
            self._audit(tx, actor, Action.CREATE, reason, None, stored)
            return stored

        return await self._write(change, routing=False, rollouts=True)

    async def get_rollout(self, name: str) -> Rollout:
        raise_if(name_violations(name, ROLLOUTS))
        found = await self._read(lambda tx: tx.get_rollout(resource_id(name, ROLLOUTS)))
        if found is None:
            raise ResourceNotFound(name)
        return found

    async def list_rollouts(
        self, *, route: str = "", active_only: bool = False, page_size: int = 0, page_token: str = ""
    ) -> Page[Rollout]:
        """Newest first (create time descending, then name); `route` (routes/{id}) and
        `active_only` (pending, progressing or paused) filter."""
        size = resolve_page_size(page_size)
        raise_if(name_violations(route, ROUTES, "route") if route else [])
        query = ("rollouts", route, "active" if active_only else "all")
        after = _rollout_cursor(decode_page_token(page_token, query, str))
        rows = await self._read(
            lambda tx: tx.list_rollouts(
                route_id=resource_id(route, ROUTES), active_only=active_only, after=after, limit=size + 1
            )
        )
        return _page(rows, size, _rollout_key, query)

    async def pause_rollout(self, name: str, *, reason: str, actor: str) -> Rollout:
        """Hold a pending or progressing rollout at its current step (PAUSED)."""
        return await self._operate(
            name,
            reason=reason,
            actor=actor,
            allowed=(RolloutState.PENDING, RolloutState.PROGRESSING),
            to=RolloutState.PAUSED,
            done="paused",
            refusal="only a pending or progressing rollout can be paused",
        )

    async def resume_rollout(self, name: str, *, reason: str, actor: str) -> Rollout:
        """Let a paused rollout go on (PROGRESSING); its current step starts its pause again."""
        return await self._operate(
            name,
            reason=reason,
            actor=actor,
            allowed=(RolloutState.PAUSED,),
            to=RolloutState.PROGRESSING,
            done="resumed",
            refusal="only a paused rollout can be resumed",
            restart_step=True,
        )

    async def promote_rollout(self, name: str, *, reason: str, actor: str) -> Rollout:
        """Skip the remaining steps: PROGRESSING at current_step = len(steps), so the controller
        sends the canary all of the route's traffic (and then marks it PROMOTED)."""
        return await self._operate(
            name,
            reason=reason,
            actor=actor,
            allowed=ACTIVE_ROLLOUT_STATES,
            to=RolloutState.PROGRESSING,
            done="promoted",
            refusal="it has ended; only a pending, progressing or paused rollout can be promoted",
            restart_step=True,
            to_end=True,
        )

    async def abort_rollout(self, name: str, *, reason: str, actor: str) -> Rollout:
        """Stop a rollout for good (ABORTED): the controller takes the canary's traffic and mirror away."""
        return await self._operate(
            name,
            reason=reason,
            actor=actor,
            allowed=ACTIVE_ROLLOUT_STATES,
            to=RolloutState.ABORTED,
            done="aborted",
            refusal="it has ended already; only a pending, progressing or paused rollout can be aborted",
        )

    async def _operate(
        self,
        name: str,
        *,
        reason: str,
        actor: str,
        allowed: Sequence[RolloutState],
        to: RolloutState,
        done: str,
        refusal: str,
        restart_step: bool = False,
        to_end: bool = False,
    ) -> Rollout:
        """An operator's state change: from one of `allowed` to `to`, with a history event and a
        TRANSITION audit entry; RolloutStateConflict (naming the current state) otherwise."""
        raise_if(name_violations(name, ROLLOUTS) + validate_reason(reason))
        rollout_id = resource_id(name, ROLLOUTS)

        def change(tx: Tx) -> Rollout:
            current = tx.get_rollout(rollout_id, for_update=True)
            if current is None:
                raise ResourceNotFound(name)
            if current.state not in allowed:
                raise RolloutStateConflict(name, current.state, refusal)
            step = len(current.steps) if to_end else current.current_step
            stored = replace(
                current,
                state=to,
                current_step=step,
                step_start_time=tx.now if restart_step else current.step_start_time,
                message=f"{done} by {actor}: {reason}",
                history=(*current.history, RolloutEvent(tx.now, actor, current.state, to, step, reason)),
                etag=etag_for(name, tx.revision),
                update_time=tx.now,
            )
            if not tx.replace_rollout(stored, expected_etag=current.etag):
                raise EtagMismatch(name, current.etag)  # not reached while writers are serialized
            self._audit(tx, actor, Action.TRANSITION, reason, current, stored)
            return stored

        return await self._write(change, routing=False, rollouts=True)

    async def update_rollout_status(
        self,
        rollout: Rollout,
        update_mask: Sequence[str],
        *,
        append_windows: Sequence[AnalysisWindow] = (),
        reason: str,
        actor: str,
    ) -> Rollout:
        """The controller's write: the status fields named in `update_mask` (STATUS_FIELDS) and
        analysis windows to append, if rollout.etag is still the rollout's etag.

        A state change must be one of STATUS_TRANSITIONS; an ended rollout keeps its state and
        step (only ENDED_STATUS_FIELDS change). A change of state or step is appended to the
        history and audited as a TRANSITION; other writes are not audited (module docstring).
        The mask may be empty when the call only appends windows."""
        paths = list(dict.fromkeys(update_mask))
        fields = [p for p in paths if p in STATUS_FIELDS]
        windows = tuple(append_windows)
        violations = name_violations(rollout.name, ROLLOUTS, "rollout.name")
        if not rollout.etag:
            violations.append(FieldViolation("rollout.etag", "required: the etag of the rollout as you read it"))
        if paths or not windows:
            violations += status_mask_violations(paths)
        raise_if(violations + validate_status(rollout, fields) + window_violations(windows) + validate_reason(reason))
        rollout_id = resource_id(rollout.name, ROLLOUTS)

        def change(tx: Tx) -> Rollout:
            current = tx.get_rollout(rollout_id, for_update=True)
            if current is None:
                raise ResourceNotFound(rollout.name)
            if rollout.etag != current.etag:
                raise EtagMismatch(rollout.name, current.etag)
            n = len(current.steps)
            out_of_range = [
                FieldViolation(path, f"must be in [0, {n}] (the rollout has {n} steps); got {step}")
                for path, step in [
                    *([("rollout.current_step", rollout.current_step)] if "current_step" in fields else []),
                    *((f"append_windows[{i}].step", w.step) for i, w in enumerate(windows)),
                ]
                if step > n
            ]
            raise_if(out_of_range)
            state = rollout.state if "state" in fields else current.state
            step = rollout.current_step if "current_step" in fields else current.current_step
            moved = state != current.state or step != current.current_step
            if moved and not current.active:
                raise RolloutStateConflict(
                    rollout.name,
                    current.state,
                    f"it has ended: its state and step stay; only {', '.join(ENDED_STATUS_FIELDS)} may be written",
                )
            if state != current.state and state not in STATUS_TRANSITIONS.get(current.state, frozenset()):
                allowed = sorted(STATUS_TRANSITIONS.get(current.state, frozenset()))
                raise RolloutStateConflict(
                    rollout.name,
                    current.state,
                    f"the controller may not move it to {state.value}; from {current.state.value} it may move to"
                    f" {', '.join(allowed) or 'nothing'}",
                )
            event = RolloutEvent(tx.now, actor, current.state, state, step, reason)
            stored = replace(
                current,
                **{f: getattr(rollout, f) for f in fields},
                windows=(*current.windows, *windows)[-MAX_WINDOWS:],
                history=(*current.history, event) if moved else current.history,
                etag=etag_for(rollout.name, tx.revision),
                update_time=tx.now,
            )
            if not tx.replace_rollout(stored, expected_etag=current.etag):
                raise EtagMismatch(rollout.name, current.etag)  # not reached while writers are serialized
            if moved:
                self._audit(tx, actor, Action.TRANSITION, reason, current, stored)
            return stored

        return await self._write(change, routing=False, rollouts=True)

    # audit -------------------------------------------------------------------------

    async def list_audit_entries(
        self, *, resource: str = "", actor: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page[AuditEntry]:
        """Newest first; `resource` matches exactly, `actor` any part of the actor ignoring case."""
        size = resolve_page_size(page_size)
        raise_if(validate_filter(resource, "resource") + validate_filter(actor, "actor"))
        query = ("audit", resource, actor)
        before = decode_page_token(page_token, query, int)
        rows = await self._read(
            lambda tx: tx.list_audit(resource=resource, actor=actor, before_revision=before, limit=size + 1)
        )
        return _page(rows, size, lambda e: e.revision, query)

    # watch -------------------------------------------------------------------------

    async def state(self) -> RoutingState:
        """The whole routing state at the latest revision (one read shared by every follower)."""
        async with self._snapshot_lock:
            if self._snapshot is None or self._snapshot.revision < self._changes.revision:
                self._snapshot = await self._read(_load_state)
                self.snapshot_loads += 1
            return self._snapshot

    async def watch(self) -> AsyncIterator[RoutingState]:
        """The state now, then again after each commit. A follower slower than the commits gets
        only the latest state when it is ready for the next message (bursts coalesce); writers
        never wait for followers. Fails with ShuttingDown once close_watchers() is called."""
        async for state in _follow(self._changes, self.state):
            yield state

    async def rollouts_state(self) -> RolloutsState:
        """Every rollout at the latest revision, newest first (one read shared by every follower)."""
        async with self._rollouts_lock:
            snapshot = self._rollouts_snapshot
            if snapshot is None or snapshot.revision < self._rollout_changes.revision:
                snapshot = self._rollouts_snapshot = await self._read(_load_rollouts)
                self.rollouts_loads += 1
            return snapshot

    async def watch_rollouts(self) -> AsyncIterator[RolloutsState]:
        """Every rollout now, then again after each rollout change; like watch() otherwise."""
        async for state in _follow(self._rollout_changes, self.rollouts_state):
            yield state


class _Versioned(Protocol):
    revision: int


V = TypeVar("V", bound=_Versioned)


async def _follow(changes: _Changes, load: Callable[[], Awaitable[V]]) -> AsyncIterator[V]:
    """`load()` now, then again whenever `changes` publishes a later revision (a slow follower
    gets only the latest); ShuttingDown once `changes` is closed."""
    sent = -1
    while True:
        if changes.closed:
            raise ShuttingDown()
        state = await load()
        if state.revision > sent:
            sent = state.revision
            yield state
        await changes.wait_past(sent)


def _load_state(tx: Tx) -> RoutingState:
    return RoutingState(tx.current_revision(), tuple(tx.list_routes()), tuple(tx.list_deployments()))


def _load_rollouts(tx: Tx) -> RolloutsState:
    return RolloutsState(tx.current_revision(), tuple(tx.list_rollouts()))


def _rollout_key(r: Rollout) -> str:
    """A rollout's place in the newest-first order, for page tokens: '<create time> <id>'."""
    assert r.create_time is not None
    return f"{r.create_time.isoformat()} {resource_id(r.name, ROLLOUTS)}"


def _rollout_cursor(key: str | None) -> tuple[datetime, str] | None:
    if key is None:
        return None
    when, _, rollout_id = key.partition(" ")
    try:
        return datetime.fromisoformat(when), rollout_id
    except ValueError:
        raise InvalidArgument(FieldViolation("page_token", "is not a next_page_token of this query")) from None


def _check_references(tx: Tx, route: Route, fields: Iterable[str]) -> None:
    """Backends, header overrides and mirrors must name existing deployments of the route's service."""
    refs = references(route, fields)
    found = tx.deployments_by_id(resource_id(name, DEPLOYMENTS) for _, name in refs)
    raise_if(reference_violations(route, refs, {d.name: d for d in found.values()}))
