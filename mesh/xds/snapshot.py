"""Immutable, versioned xDS snapshots and the per-node cache the ADS server reads.

A snapshot is everything one Envoy should run: its clusters, listeners and route
configurations, each a typed protobuf message. Versions are content hashes per resource
type, so a change to one route does not resend clusters, and a control plane restarted
with the same registry state finds every Envoy already up to date.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf.message import Message

_log = logging.getLogger(__name__)

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
#: push order: an Envoy must know a cluster before a route sends traffic to it
ORDER = (CLUSTER, LISTENER, ROUTE)
TYPE_NAMES = {CLUSTER: "clusters", LISTENER: "listeners", ROUTE: "routes"}
_TYPES: dict[str, type[Message]] = {
    CLUSTER: cluster_pb2.Cluster,
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
}


class InconsistentSnapshot(ValueError):
    """A snapshot that would send traffic nowhere (a route naming a missing cluster...)."""


def version_of(resources: Mapping[str, Message]) -> str:
    digest = hashlib.sha256()
    for name in sorted(resources):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(resources[name].SerializeToString(deterministic=True))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Snapshot:
    """One node's configuration at one registry revision. Build with `Snapshot.of`."""

    revision: int
    resources: Mapping[str, Mapping[str, Message]]
    versions: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, revision: int, resources: Iterable[Message]) -> Snapshot:
        by_type: dict[str, dict[str, Message]] = {t: {} for t in ORDER}
        for res in resources:
            type_url = next((t for t, cls_ in _TYPES.items() if isinstance(res, cls_)), None)
            if type_url is None:
                raise TypeError(f"not an xDS resource type the control plane serves: {type(res).__name__}")
            name = res.name  # type: ignore[attr-defined]
            if not name:
                raise InconsistentSnapshot(f"a {TYPE_NAMES[type_url][:-1]} has no name")
            if name in by_type[type_url]:
                raise InconsistentSnapshot(f"two {TYPE_NAMES[type_url]} named {name!r}")
            by_type[type_url][name] = res
        frozen = {t: MappingProxyType(r) for t, r in by_type.items()}
        snap = cls(revision, MappingProxyType(frozen), MappingProxyType({t: version_of(r) for t, r in by_type.items()}))
        snap.check()
        return snap

    def check(self) -> None:
        """Every cluster a route sends to exists, and every route config a listener reads exists."""
        clusters = self.resources[CLUSTER]
        for rc in self.resources[ROUTE].values():
            for vh in rc.virtual_hosts:  # type: ignore[attr-defined]
                for r in vh.routes:
                    if not r.HasField("route"):
                        continue
                    weighted = r.route.weighted_clusters.clusters
                    names = [r.route.cluster] if r.route.cluster else [w.name for w in weighted]
                    for name in names:
                        if name not in clusters:
                            raise InconsistentSnapshot(
                                f"route config {rc.name!r} ({vh.name}) sends traffic to unknown cluster {name!r}"  # type: ignore[attr-defined]
                            )
        for listener in self.resources[LISTENER].values():
            for name in _rds_names(listener):
                if name not in self.resources[ROUTE]:
                    raise InconsistentSnapshot(f"listener {listener.name!r} reads unknown route config {name!r}")  # type: ignore[attr-defined]

    def select(self, type_url: str, names: frozenset[str]) -> dict[str, Message]:
        """The resources of a type an Envoy asked for (all of them for a wildcard subscription)."""
        res = self.resources[type_url]
        return dict(res) if not names else {n: res[n] for n in names if n in res}


def _rds_names(listener: Message) -> list[str]:
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

    out = []
    for chain in listener.filter_chains:  # type: ignore[attr-defined]
        for f in chain.filters:
            hcm = hcm_pb2.HttpConnectionManager()
            if f.typed_config.Is(hcm.DESCRIPTOR) and f.typed_config.Unpack(hcm) and hcm.HasField("rds"):
                out.append(hcm.rds.route_config_name)
    return out


@dataclass(frozen=True)
class NodeInfo:
    """What the control plane knows of an Envoy from its first DiscoveryRequest."""

    id: str
    service: str
    metadata: Mapping[str, object]


#: builds a node's snapshot from the routing state; raises on a state it cannot serve
Builder = Callable[[NodeInfo, object, int], Snapshot]


class SnapshotCache:
    """The current snapshot per node, rebuilt whenever the routing state changes.

    A state that fails to build or check for a node leaves that node on its last good
    snapshot (logged and counted); other nodes still move on.
    """

    def __init__(self, builder: Builder, on_error: Callable[[str, Exception], None] | None = None) -> None:
        self._builder = builder
        self._on_error = on_error
        self._state: object | None = None
        self._revision = 0
        self._nodes: dict[str, NodeInfo] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._changed = asyncio.Condition()
        self.generation = 0

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def ready(self) -> bool:
        return self._state is not None

    def snapshot(self, node_id: str) -> Snapshot | None:
        return self._snapshots.get(node_id)

    async def set_state(self, state: object, revision: int) -> None:
        self._state, self._revision = state, revision
        for node in self._nodes.values():
            self._rebuild(node)
        await self._notify()

    async def set_snapshot(self, node_id: str, snapshot: Snapshot) -> None:
        """Serve this exact snapshot to a node (tests and tools; the registry path uses set_state)."""
        self._snapshots[node_id] = snapshot
        await self._notify()

    async def register(self, node: NodeInfo) -> None:
        known = self._nodes.get(node.id)
        self._nodes[node.id] = node
        if known != node or node.id not in self._snapshots:
            self._rebuild(node)
            await self._notify()

    async def wait_changed(self, generation: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation != generation)
            return self.generation

    def _rebuild(self, node: NodeInfo) -> None:
        if self._state is None:
            return
        try:
            self._snapshots[node.id] = self._builder(node, self._state, self._revision)
        except Exception as exc:
            _log.error("snapshot for %s at revision %d rejected: %s", node.id, self._revision, exc)
            if self._on_error:
                self._on_error(node.id, exc)

    async def _notify(self) -> None:
        async with self._changed:
            self.generation += 1
            self._changed.notify_all()
