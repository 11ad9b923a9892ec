"""The ADS server: state-of-the-world xDS over one aggregated gRPC stream per Envoy.

Per stream it keeps, for clusters, listeners and routes, what was sent (version, nonce)
and what the Envoy accepted. Pushes follow make-before-break:

1. clusters first, and nothing else until the Envoy has acked them; while listeners or
   routes still lag, the clusters sent are the union of the acked and the wanted ones,
   so a route never points at a cluster the Envoy has already dropped;
2. then listeners, then routes;
3. once those are acked, the clusters no longer wanted are dropped.

A NACK is logged, counted and shown in ListNodes; the Envoy keeps its last good
configuration and the rejected version is not resent (the next state change is).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyPb
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry, Counter, Gauge
from servemesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc

from mesh.certs import spiffe_id
from mesh.xds.snapshot import CLUSTER, LISTENER, ORDER, ROUTE, TYPE_NAMES, NodeInfo, Snapshot, SnapshotCache, version_of
from services.common.errors import FieldViolation, InvalidArgument

_log = logging.getLogger(__name__)
_WILDCARD = frozenset({"*"})


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.responses = Counter(
            "servemesh_xds_responses_total", "xDS responses sent, by resource type", ["type"], registry=registry
        )
        self.acks = Counter("servemesh_xds_acks_total", "xDS versions Envoys accepted", ["type"], registry=registry)
        self.nacks = Counter("servemesh_xds_nacks_total", "xDS versions Envoys rejected", ["type"], registry=registry)
        self.streams = Gauge("servemesh_xds_streams", "Open ADS streams", registry=registry)
        self.snapshot_errors = Counter(
            "servemesh_xds_snapshot_errors_total",
            "Routing states the control plane refused to turn into a node's configuration",
            registry=registry,
        )


@dataclass
class _TypeState:
    subscribed: bool = False
    names: frozenset[str] = frozenset()
    nonce: str = ""
    inflight: bool = False
    sent_version: str = ""
    sent: dict[str, Message] = field(default_factory=dict)
    acked_version: str = ""
    acked: dict[str, Message] = field(default_factory=dict)
    ack_time: float = 0.0
    nack_count: int = 0
    last_nack_version: str = ""
    last_nack_message: str = ""


@dataclass
class _NodeStatus:
    node: NodeInfo
    connected: bool = False
    connect_time: float = 0.0
    types: dict[str, _TypeState] = field(default_factory=lambda: {t: _TypeState() for t in ORDER})


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    if seconds:
        ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer, mesh_pb2_grpc.ControlPlaneServiceServicer):
    def __init__(self, cache: SnapshotCache, metrics: XdsMetrics, *, namespace: str = "default") -> None:
        self._cache = cache
        self._metrics = metrics
        self._namespace = namespace
        self._nodes: dict[str, _NodeStatus] = {}
        self._nonces = itertools.count(1)

    # -- ADS -------------------------------------------------------------------------

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        inbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | str | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for req in request_iterator:
                    inbox.put_nowait(req)
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                pass
            finally:
                inbox.put_nowait(None)

        async def watch() -> None:
            generation = self._cache.generation
            while True:
                generation = await self._cache.wait_changed(generation)
                inbox.put_nowait("changed")

        reader = asyncio.create_task(read())
        watcher = asyncio.create_task(watch())
        status: _NodeStatus | None = None
        self._metrics.streams.inc()
        try:
            while (item := await inbox.get()) is not None:
                if isinstance(item, discovery_pb2.DiscoveryRequest):
                    if status is None:
                        status = await self._open(item, context)
                    self._on_request(status, item)
                if status is not None:
                    for resp in self._pushes(status):
                        yield resp
        finally:
            reader.cancel()
            watcher.cancel()
            self._metrics.streams.dec()
            if status is not None:
                status.connected = False
                _log.info("xds: %s disconnected", status.node.id)

    async def _open(self, req: discovery_pb2.DiscoveryRequest, context: grpc.aio.ServicerContext) -> _NodeStatus:
        node = NodeInfo(
            id=req.node.id or "unknown",
            service=req.node.cluster,
            metadata=json_format.MessageToDict(req.node.metadata) if req.node.HasField("metadata") else {},
        )
        # An Envoy may only speak for the service its certificate names.
        sans = {v.decode() for v in context.auth_context().get("x509_subject_alternative_name", [])}
        if spiffe_id(node.service, self._namespace) not in sans:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {node.id!r} claims service {node.service!r}, but the peer's certificate is not that service's",
            )
        # A reconnecting Envoy starts a new stream with fresh per-type state, but it still runs
        # the clusters it had: keep them in the union until its routes have moved on.
        status = _NodeStatus(node=node, connected=True, connect_time=time.time())
        if (previous := self._nodes.get(node.id)) is not None:
            status.types[CLUSTER].acked = previous.types[CLUSTER].acked
        self._nodes[node.id] = status
        _log.info("xds: %s (%s) connected", node.id, node.service)
        await self._cache.register(node)
        return status

    def _on_request(self, status: _NodeStatus, req: discovery_pb2.DiscoveryRequest) -> None:
        if req.type_url not in status.types:
            _log.warning("xds: %s asked for %s, which this control plane does not serve", status.node.id, req.type_url)
            return
        st = status.types[req.type_url]
        kind = TYPE_NAMES[req.type_url]
        if req.response_nonce:
            if req.response_nonce != st.nonce:
                return  # answers a response superseded since; the newer one's answer will come
            st.inflight = False
            if req.HasField("error_detail"):
                st.nack_count += 1
                st.last_nack_version, st.last_nack_message = st.sent_version, req.error_detail.message
                self._metrics.nacks.labels(kind).inc()
                _log.warning(
                    "xds: %s rejected %s version %s (keeps %s): %s",
                    status.node.id,
                    kind,
                    st.sent_version,
                    st.acked_version or "none",
                    req.error_detail.message,
                )
            else:
                st.acked_version, st.acked, st.ack_time = req.version_info, st.sent, time.time()
                st.last_nack_version = st.last_nack_message = ""
                self._metrics.acks.labels(kind).inc()
        names = frozenset(req.resource_names)
        if req.type_url == ROUTE:  # RDS names its route configs; none left means unsubscribed
            st.subscribed, st.names = bool(names), names
        else:  # clusters and listeners: empty or "*" is the wildcard subscription
            st.subscribed, st.names = True, frozenset() if names <= _WILDCARD else names

    def _desired(self, snap: Snapshot, status: _NodeStatus, type_url: str) -> dict[str, Message]:
        st = status.types[type_url]
        wanted = snap.select(type_url, st.names)
        if type_url == CLUSTER and not self._settled(snap, status):
            return {**st.acked, **wanted}
        return wanted

    @staticmethod
    def _settled(snap: Snapshot, status: _NodeStatus) -> bool:
        for t in (LISTENER, ROUTE):
            st = status.types[t]
            if st.subscribed and st.acked_version != version_of(snap.select(t, st.names)):
                return False
        return True

    def _pushes(self, status: _NodeStatus) -> list[discovery_pb2.DiscoveryResponse]:
        snap = self._cache.snapshot(status.node.id)
        if snap is None:
            return []
        out = []
        for type_url in ORDER:
            st = status.types[type_url]
            if st.inflight and type_url == CLUSTER:
                break
            if not st.subscribed or st.inflight:
                continue
            resources = self._desired(snap, status, type_url)
            version = version_of(resources)
            if version == st.sent_version and resources.keys() == st.sent.keys():
                if type_url == CLUSTER and st.acked_version != st.sent_version:
                    break  # the Envoy rejected these clusters: routes to them must not follow
                continue
            st.nonce, st.inflight = str(next(self._nonces)), True
            st.sent_version, st.sent = version, resources
            resp = discovery_pb2.DiscoveryResponse(version_info=version, type_url=type_url, nonce=st.nonce)
            for name in sorted(resources):
                packed = AnyPb()
                packed.Pack(resources[name])
                resp.resources.append(packed)
            self._metrics.responses.labels(TYPE_NAMES[type_url]).inc()
            _log.info(
                "xds: %s <- %s version %s (%d, revision %d)",
                status.node.id,
                TYPE_NAMES[type_url],
                version,
                len(resources),
                snap.revision,
            )
            out.append(resp)
            if type_url == CLUSTER:
                break  # listeners and routes wait for the clusters' ACK
        return out

    # -- status ----------------------------------------------------------------------

    async def ListNodes(
        self, request: mesh_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> mesh_pb2.ListNodesResponse:
        if not 0 <= request.page_size <= 500:
            raise InvalidArgument(FieldViolation("page_size", f"must be in [0, 500]; got {request.page_size}"))
        size = request.page_size or 100
        ids = sorted(self._nodes)
        start = 0
        if request.page_token:  # the token is the last name of the previous page
            if not request.page_token.startswith("nodes/"):
                raise InvalidArgument(FieldViolation("page_token", "not a token from a previous ListNodes response"))
            start = bisect.bisect_right(ids, request.page_token.removeprefix("nodes/"))
        page = ids[start : start + size]
        more = start + size < len(ids)
        return mesh_pb2.ListNodesResponse(
            nodes=[self.node_status(n) for n in page], next_page_token=f"nodes/{page[-1]}" if more else ""
        )

    def node_status(self, node_id: str) -> mesh_pb2.Node:
        status = self._nodes[node_id]
        snap = self._cache.snapshot(node_id)
        out = mesh_pb2.Node(
            name=f"nodes/{node_id}",
            service=status.node.service,
            connected=status.connected,
            connect_time=_ts(status.connect_time),
            registry_revision=snap.revision if snap else 0,
        )
        in_sync = snap is not None
        for type_url in ORDER:
            st = status.types[type_url]
            desired = version_of(snap.select(type_url, st.names)) if snap and st.subscribed else ""
            in_sync = in_sync and (not st.subscribed or st.acked_version == desired)
            out.resources.append(
                mesh_pb2.ResourceStatus(
                    type_url=type_url,
                    desired_version=desired,
                    sent_version=st.sent_version,
                    acked_version=st.acked_version,
                    ack_time=_ts(st.ack_time),
                    nack_count=st.nack_count,
                    last_nack_message=st.last_nack_message,
                    last_nack_version=st.last_nack_version,
                )
            )
        out.in_sync = in_sync and status.connected
        return out
