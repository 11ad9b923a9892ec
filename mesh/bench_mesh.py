"""`servemesh mesh bench`: what the mesh adds to a request, beside a bare Envoy chain measured in the same run.

One process drives everything on loopback, on free ports:

  no-mesh      GatewayService on a `--no-mesh` Mesh: client -> gateway -> inference, plaintext
               over loopback ports
  mesh         the same services on a mesh Mesh: client -TLS-> edge -mTLS-> gateway sidecar
               -unix-> gateway -unix-> sidecar outbound -mTLS-> inference sidecar -unix-> inference
  direct echo  a trivial grpc.aio echo pair, plaintext over loopback ports: client -> echo front
               -> echo back
  bare chain   the same echo apps behind Envoys of the same shape, built with the same config
               builders (static bootstraps, no control plane): client -TLS-> edge -mTLS-> front
               sidecar -unix-> echo front -unix-> outbound -mTLS-> back sidecar -unix-> echo back

Unary is GatewayService.GetVersion (it calls inference's ListEngines, so it crosses every hop
generation does) against Echo/Unary; streaming is GatewayService.StreamGenerate (a few greedy
tokens on the small engine) against Echo/Stream (as many chunks). The mesh's cost is mesh minus
no-mesh; the bare chain's cost is bare chain minus direct echo. For streams, engine compute and
queueing dominate and vary, so the cost compares the hops' share of the first chunk: the
client's time to first text minus the engine's own TTFT (x-servemesh-engine-ttft-ms trailer).

All paths and levels run in every round, rounds are interleaved (the path order rotates each
round), so a drift of this shared machine hits every path alike. Every client channel has the
same options and no interceptors. Route flip-to-effect time is measured in the mesh against a
second gateway deployment (canary): the time from UpdateRoute returning until a burst of
GetVersion calls through the edge all answer from the newly routed deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mesh import certs
from mesh.bench import quantile
from mesh.envoy import config as envoy
from mesh.envoy.process import EnvoyProcess
from mesh.launcher import free_port, free_port_run

ECHO_SERVICE = "servemesh.bench.v1.Echo"
ECHO_UNARY = f"/{ECHO_SERVICE}/Unary"
ECHO_STREAM = f"/{ECHO_SERVICE}/Stream"
PAYLOAD = b"x" * 128
PROMPT = "Say hi"
#: the issue's targets
MAX_ADDED_P50_S = 0.002
MAX_COST_RATIO = 1.25
MAX_FLIP_P95_S = 0.5
FLIP_BURST = 8
FLIP_TIMEOUT_S = 5.0
UNARY_TIMEOUT_S = 10.0
STREAM_TIMEOUT_S = 120.0

MESH, NO_MESH, CHAIN, DIRECT = "mesh", "no-mesh", "bare chain", "direct echo"
PATHS = (NO_MESH, MESH, DIRECT, CHAIN)
UNARY, STREAM = "unary", "stream"


# --- the echo app (a subprocess: `python -m mesh.bench_mesh echo ...`) -----------------------


class _EchoHandler(grpc.GenericRpcHandler):
    """Echo/Unary and Echo/Stream on raw bytes: answered here, or relayed to `upstream` when set."""

    def __init__(self, upstream: grpc.aio.Channel | None, chunks: int) -> None:
        self._chunks = chunks
        self._up_unary = upstream.unary_unary(ECHO_UNARY) if upstream else None
        self._up_stream = upstream.unary_stream(ECHO_STREAM) if upstream else None

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method == ECHO_UNARY:
            return grpc.unary_unary_rpc_method_handler(self._unary)
        if details.method == ECHO_STREAM:
            return grpc.unary_stream_rpc_method_handler(self._stream)
        return None

    async def _unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if self._up_unary is None:
            return request
        return await self._up_unary(request, timeout=UNARY_TIMEOUT_S)

    async def _stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        if self._up_stream is None:
            for _ in range(self._chunks):
                yield request
            return
        async for chunk in self._up_stream(request, timeout=STREAM_TIMEOUT_S):
            yield chunk


async def serve_echo(listen: str, upstream: str, authority: str, chunks: int) -> None:
    options = [("grpc.default_authority", authority)] if authority else []
    channel = grpc.aio.insecure_channel(upstream, options=options) if upstream else None
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([_EchoHandler(channel, chunks)])
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(listen)
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mesh.bench_mesh")
    sub = parser.add_subparsers(dest="command", required=True)
    echo = sub.add_parser("echo", help="the benchmark's echo app")
    echo.add_argument("--listen", required=True, help="127.0.0.1:<port> or unix:<path>")
    echo.add_argument("--upstream", default="", help="relay to this echo (host:port) instead of answering")
    echo.add_argument("--authority", default="", help="authority of the relayed calls (the sidecar's route)")
    echo.add_argument("--chunks", type=int, default=4, help="messages per Echo/Stream")
    args = parser.parse_args(argv)
    asyncio.run(serve_echo(args.listen, args.upstream, args.authority, args.chunks))


# --- ports ---------------------------------------------------------------------------------


def _channel_options() -> list[tuple[str, object]]:
    from services.common.client import CHANNEL_OPTIONS

    return list(CHANNEL_OPTIONS)


def _tls_channel(target: str, ca_path: Path) -> grpc.aio.Channel:
    """TLS to an edge, as MeshState.channel("gateway") dials it."""
    creds = grpc.ssl_channel_credentials(root_certificates=ca_path.read_bytes())
    options = [*_channel_options(), ("grpc.ssl_target_name_override", "edge")]
    return grpc.aio.secure_channel(target, creds, options=options)


def _plain_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=_channel_options())


# --- the bare chain ------------------------------------------------------------------------


class EchoChain:
    """Two echo pairs: one called directly (loopback ports, like --no-mesh), one behind Envoys
    shaped like the mesh's.

    The front sidecar plays the gateway's (identity "gateway", inbound + outbound), the back
    sidecar the inference's (identity "inference"), the edge the mesh's edge (TLS, rate limit,
    transcoder); RBAC from the same policy file, clusters and routes from the same builders.
    As in the mesh, the chain's apps listen on Unix sockets in a 0700 directory and the front
    app reaches its sidecar's outbound listener on one.
    """

    def __init__(self, home: Path, log: Callable[[str], None], chunks: int) -> None:
        self.home, self._log, self._chunks = home, log, chunks
        self.ports = {name: free_port() for name in ("direct-back", "direct-front", "back-in", "front-in", "edge")}
        self.sockets = home / "run" / "sockets"
        self.unix = {name: self.sockets / f"{name}.sock" for name in ("back", "front", "front-out")}
        self.admin = {name: free_port() for name in ("edge", "front", "back")}
        self.procs: list[object] = []  # Supervisor | EnvoyProcess, in start order
        self.envoys: dict[str, EnvoyProcess] = {}
        self.ca_path = home / "certs" / "ca.crt"

    @property
    def direct_target(self) -> str:
        return f"127.0.0.1:{self.ports['direct-front']}"

    @property
    def edge_target(self) -> str:
        return f"127.0.0.1:{self.ports['edge']}"

    def proxy_pids(self) -> list[int]:
        return [e.pid for e in self.envoys.values() if e.pid is not None]

    async def _echo(self, name: str, listen: str, upstream: str = "", authority: str = "") -> None:
        from mesh.launcher import REPO, grpc_health_check
        from mesh.supervisor import Supervisor

        argv = [sys.executable, "-m", "mesh.bench_mesh", "echo", "--listen", listen, "--chunks", str(self._chunks)]
        if upstream:
            argv += ["--upstream", upstream, "--authority", authority]
        sup = Supervisor(
            f"echo-{name}",
            argv,
            cwd=REPO,
            env=dict(os.environ),
            health=grpc_health_check(listen),
            log_path=self.home / "logs" / f"echo-{name}.log",
            start_timeout_s=60.0,
        )
        await self._start(sup)

    async def _start(self, proc: object) -> None:
        self._log(f"starting {proc.name} ...")  # type: ignore[attr-defined]
        await proc.start()  # type: ignore[attr-defined]
        self.procs.append(proc)

    async def start(self) -> None:
        p, a, u = self.ports, self.admin, self.unix
        ids = certs.ensure_identities(self.home / "certs", ("edge", "gateway", "inference"))
        for ident in ids.values():
            envoy.write_sds_files(ident)
        shutil.rmtree(self.sockets, ignore_errors=True)
        self.sockets.mkdir(mode=0o700, parents=True)
        policy = envoy.load_policy()
        await self._echo("direct-back", f"127.0.0.1:{p['direct-back']}")
        await self._echo("direct-front", f"127.0.0.1:{p['direct-front']}", f"127.0.0.1:{p['direct-back']}")
        await self._echo("back", f"unix:{u['back']}")
        await self._echo("front", f"unix:{u['front']}", f"unix:{u['front-out']}", "inference")
        # the unary method is retried on UNAVAILABLE like GetVersion / ListEngines are in the mesh
        back_routes = envoy.ServiceRoutes(
            "inference", [envoy.RouteSpec("", [(envoy.cluster_name("echo-back"), 100)], idempotent_methods=("Unary",))]
        )
        boots = {
            "back": envoy.sidecar_bootstrap(
                envoy.Node("echo-back", "inference"),
                ids["inference"],
                admin_port=a["back"],
                inbound_port=p["back-in"],
                app_port=u["back"],
                xds_address=None,
                policy=policy,
            ),
            "front": envoy.sidecar_bootstrap(
                envoy.Node("echo-front", "gateway", u["front-out"]),
                ids["gateway"],
                admin_port=a["front"],
                inbound_port=p["front-in"],
                app_port=u["front"],
                xds_address=None,
                policy=policy,
                static_clusters=[
                    envoy.deployment_cluster(
                        "echo-back", "127.0.0.1", p["back-in"], ids["gateway"], certs.spiffe_id("inference")
                    )
                ],
                static_listeners=[
                    envoy.outbound_listener(
                        u["front-out"], route_config=envoy.route_configuration("outbound", [back_routes])
                    )
                ],
            ),
            "edge": envoy.edge_bootstrap(
                ids["edge"],
                admin_port=a["edge"],
                edge_port=p["edge"],
                xds_address=None,
                node=envoy.Node("echo-edge", "edge"),
                route_config=envoy.edge_route_configuration(
                    "edge",
                    [
                        envoy.ServiceRoutes(
                            "gateway",
                            [
                                envoy.RouteSpec(
                                    "", [(envoy.cluster_name("echo-front"), 100)], idempotent_methods=("Unary",)
                                )
                            ],
                            [ECHO_SERVICE],
                        )
                    ],
                ),
                static_clusters=[
                    envoy.deployment_cluster(
                        "echo-front", "127.0.0.1", p["front-in"], ids["edge"], certs.spiffe_id("gateway")
                    )
                ],
            ),
        }
        names = {"back": "chain-back-sidecar", "front": "chain-front-sidecar", "edge": "chain-edge"}
        for name in ("back", "front", "edge"):  # like the mesh: default Envoy concurrency, warn logs
            self.envoys[name] = EnvoyProcess(names[name], boots[name], self.home / "run" / "envoy")
            await self._start(self.envoys[name])

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            self._log(f"stopping {proc.name}")  # type: ignore[attr-defined]
            await proc.stop()  # type: ignore[attr-defined]
        self.procs.clear()
        self.envoys.clear()


# --- measurements --------------------------------------------------------------------------


@dataclass
class Sample:
    round: int
    #: unary: the call's latency; stream: time to the first chunk with text
    first: float
    #: stream: until the stream ended (unary: = first)
    total: float
    #: the hops' share of `first`: minus the engine's TTFT for StreamGenerate (nan if not reported)
    hops: float


@dataclass
class Result:
    path: str
    kind: str
    concurrency: int
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    errors: int = 0
    last_error: str = ""
    #: CPU seconds of the Envoys on the path while it ran
    proxy_cpu: float = 0.0

    def values(self, what: str, rnd: int | None = None) -> list[float]:
        out = [getattr(s, what) for s in self.samples if rnd is None or s.round == rnd]
        return [v for v in out if not math.isnan(v)]

    def q_ms(self, what: str, q: float, rnd: int | None = None) -> float:
        return quantile(self.values(what, rnd), q) * 1e3

    def rate(self) -> float:
        return len(self.samples) / self.wall if self.wall else float("nan")

    def proxy_us_per_request(self) -> float:
        return self.proxy_cpu / len(self.samples) * 1e6 if self.samples else float("nan")


def _cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time of processes, summed over their threads (ns resolution, from schedstat); gone ones count 0."""
    total = 0
    for pid in pids:
        for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(stat.read_text().split()[0])
    return total / 1e9


Call = Callable[[], Awaitable[tuple[float, float, float]]]


async def _level(
    call: Call, result: Result, rnd: int, concurrency: int, total: int, pids: Callable[[], list[int]]
) -> None:
    """`total` calls, `concurrency` at a time; samples, errors, wall time and proxy CPU go to `result`."""
    queue = iter(range(total))
    watched = pids()
    cpu_before = _cpu_seconds(watched)

    async def worker() -> None:
        for _ in queue:
            try:
                first, end, hops = await call()
            except Exception as exc:  # counted and reported, never hidden
                result.errors += 1
                result.last_error = f"{type(exc).__name__}: {exc}"[:200]
            else:
                result.samples.append(Sample(rnd, first, end, hops))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall += time.perf_counter() - start
    result.proxy_cpu += _cpu_seconds(watched) - cpu_before


class Clients:
    """One channel per path (same options, no interceptors) and the calls measured on each."""

    def __init__(self, channels: dict[str, grpc.aio.Channel], max_tokens: int) -> None:
        from servemesh.gateway.v1 import gateway_pb2 as gpb
        from servemesh.gateway.v1 import gateway_pb2_grpc as gpb_grpc

        self.channels = channels
        self._gpb = gpb
        self._gateways = {p: gpb_grpc.GatewayServiceStub(channels[p]) for p in (MESH, NO_MESH)}
        self._unary = {p: channels[p].unary_unary(ECHO_UNARY) for p in (DIRECT, CHAIN)}
        self._stream = {p: channels[p].unary_stream(ECHO_STREAM) for p in (DIRECT, CHAIN)}
        self._request = gpb.StreamGenerateRequest(
            prompt=PROMPT, params=gpb.DecodingParams(max_tokens=max_tokens, temperature=0)
        )

    def call(self, path: str, kind: str) -> Call:
        if path in (MESH, NO_MESH):
            return (lambda: self._get_version(path)) if kind == UNARY else (lambda: self._generate(path))
        return (lambda: self._echo_unary(path)) if kind == UNARY else (lambda: self._echo_stream(path))

    async def _get_version(self, path: str) -> tuple[float, float, float]:
        start = time.perf_counter()
        await self._gateways[path].GetVersion(self._gpb.GetVersionRequest(), timeout=UNARY_TIMEOUT_S)
        took = time.perf_counter() - start
        return took, took, took

    async def _generate(self, path: str) -> tuple[float, float, float]:
        from services.common.interceptors import ENGINE_TTFT_KEY

        start = time.perf_counter()
        call = self._gateways[path].StreamGenerate(self._request, timeout=STREAM_TIMEOUT_S)
        first = None
        async for msg in call:
            if first is None and msg.text_delta:
                first = time.perf_counter() - start
        end = time.perf_counter() - start
        if first is None:
            raise RuntimeError("the stream produced no text")
        trailers = dict(await call.trailing_metadata() or ())
        engine = float(trailers[ENGINE_TTFT_KEY]) / 1e3 if ENGINE_TTFT_KEY in trailers else float("nan")
        return first, end, first - engine

    async def _echo_unary(self, path: str) -> tuple[float, float, float]:
        start = time.perf_counter()
        await self._unary[path](PAYLOAD, timeout=UNARY_TIMEOUT_S)
        took = time.perf_counter() - start
        return took, took, took

    async def _echo_stream(self, path: str) -> tuple[float, float, float]:
        start = time.perf_counter()
        first = None
        async for _ in self._stream[path](PAYLOAD, timeout=STREAM_TIMEOUT_S):
            if first is None:
                first = time.perf_counter() - start
        end = time.perf_counter() - start
        if first is None:
            raise RuntimeError("the stream produced no chunk")
        return first, end, first

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()


# --- route flips ---------------------------------------------------------------------------


@dataclass
class Flips:
    took: list[float] = field(default_factory=list)
    #: flips whose effect was not seen within FLIP_TIMEOUT_S (counted as that long)
    timed_out: int = 0
    errors: int = 0


class Flipper:
    """Flips routes/gateway between the stable and the canary deployment of the mesh, timing each flip."""

    ROUTE = "routes/gateway"
    STABLE, CANARY = "deployments/gateway-stable", "deployments/gateway-canary"

    def __init__(self, mesh: object, gateway_channel: grpc.aio.Channel) -> None:
        from servemesh.gateway.v1 import gateway_pb2 as gpb
        from servemesh.gateway.v1 import gateway_pb2_grpc as gpb_grpc

        self._mesh = mesh
        self._gpb = gpb
        self._gateway = gpb_grpc.GatewayServiceStub(gateway_channel)

    async def start_canary(self) -> None:
        from servemesh.registry.v1 import registry_pb2 as rpb

        m = self._mesh
        ports = {k: free_port() for k in ("app", "metrics", "in", "admin")}
        await m.register(  # type: ignore[attr-defined]
            rpb.Deployment(name=self.CANARY, service="gateway", version="canary", endpoint=f"127.0.0.1:{ports['in']}")
        )
        await m.start_gateway(  # type: ignore[attr-defined]
            "gateway-canary", ports["app"], ports["metrics"], ports["in"], ports["admin"]
        )
        await self._set(self.STABLE)  # both listed, the canary at 0
        await self.settle()

    async def _set(self, to: str) -> int:
        from servemesh.registry.v1 import registry_pb2 as rpb
        from servemesh.registry.v1 import registry_pb2_grpc as rpb_grpc

        async with self._mesh.channel("registry") as ch:  # type: ignore[attr-defined]
            stub = rpb_grpc.RegistryServiceStub(ch)
            route = (await stub.GetRoute(rpb.GetRouteRequest(name=self.ROUTE), timeout=10)).route
            del route.backends[:]
            route.backends.extend(
                rpb.WeightedBackend(deployment=d, weight=100 if d == to else 0) for d in (self.STABLE, self.CANARY)
            )
            req = rpb.UpdateRouteRequest(
                route=route,
                update_mask=field_mask_pb2.FieldMask(paths=["backends"]),
                reason="servemesh mesh bench: flip-to-effect",
            )
            return int((await stub.UpdateRoute(req, timeout=10)).route.revision)

    async def settle(self, revision: int = 0, timeout: float = 10.0) -> None:
        """Until every Envoy has acked the latest configuration (so each flip starts from rest)."""
        from servemesh.mesh.v1 import mesh_pb2, mesh_pb2_grpc

        deadline = time.monotonic() + timeout
        async with self._mesh.channel("control-plane") as ch:  # type: ignore[attr-defined]
            stub = mesh_pb2_grpc.ControlPlaneServiceStub(ch)
            while time.monotonic() < deadline:
                try:
                    nodes = (await stub.ListNodes(mesh_pb2.ListNodesRequest(), timeout=5)).nodes
                except grpc.aio.AioRpcError:  # not worth failing the run: give the Envoys a moment instead
                    await asyncio.sleep(0.5)
                    return
                if nodes and all(n.in_sync and n.registry_revision >= revision for n in nodes):
                    return
                await asyncio.sleep(0.05)

    async def flip(self, to: str, flips: Flips) -> None:
        revision = await self._set(to)
        start = time.perf_counter()
        want = to.rsplit("/", 1)[-1]
        while (took := time.perf_counter() - start) < FLIP_TIMEOUT_S:
            burst = [self._gateway.GetVersion(self._gpb.GetVersionRequest(), timeout=5) for _ in range(FLIP_BURST)]
            answers = await asyncio.gather(*burst, return_exceptions=True)
            flips.errors += sum(isinstance(a, BaseException) for a in answers)
            if all(not isinstance(a, BaseException) and a.deployment == want for a in answers):
                flips.took.append(time.perf_counter() - start)
                break
        else:
            flips.timed_out += 1
            flips.took.append(took)
        await self.settle(revision)


# --- the run -------------------------------------------------------------------------------


@dataclass
class Run:
    levels: list[int]
    rounds: int
    unary_requests: int
    stream_requests: int
    max_tokens: int
    flips: int
    results: dict[tuple[str, str, int], Result] = field(default_factory=dict)
    flip: Flips = field(default_factory=Flips)
    rounds_done: int = 0
    partial: str = ""
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def count(self, kind: str, level: int) -> int:
        # the engine decodes one stream at a time: at the top levels one stream per slot is all the time allows
        return max(self.unary_requests, 4 * level) if kind == UNARY else max(self.stream_requests, level)


async def _measure(
    run: Run,
    clients: Clients,
    flipper: Flipper,
    pids: dict[str, Callable[[], list[int]]],
    deadline: float,
    log: Callable[[str], None],
) -> None:
    for path in PATHS:  # warm-up: connections, TLS sessions, caches, the engine's first runs
        log(f"warm-up: {path} ...")
        for kind, n in ((UNARY, 50), (STREAM, 4)):
            await _level(clients.call(path, kind), Result(path, kind, 4), -1, 4, n, pids[path])
    pairs = run.flips // 2  # spread over the rounds, the first rounds taking any remainder
    flip_pairs = [pairs // run.rounds + (1 if r < pairs % run.rounds else 0) for r in range(run.rounds)]
    for rnd in range(run.rounds):
        order = PATHS[rnd % len(PATHS) :] + PATHS[: rnd % len(PATHS)]  # rotate: no path always goes first
        for level in run.levels:
            for kind in (UNARY, STREAM):
                for path in order:
                    if time.monotonic() > deadline:
                        run.partial = f"time budget reached in round {rnd + 1}"
                        return
                    log(f"round {rnd + 1}/{run.rounds}, concurrency {level}: {path} {kind} ...")
                    result = run.results.setdefault((path, kind, level), Result(path, kind, level))
                    await _level(clients.call(path, kind), result, rnd, level, run.count(kind, level), pids[path])
        for i in range(flip_pairs[rnd]):
            for to in (Flipper.CANARY, Flipper.STABLE):  # in pairs: each round ends on stable
                if time.monotonic() > deadline:
                    run.partial = f"time budget reached during the flips of round {rnd + 1}"
                    return
                await flipper.flip(to, run.flip)
            log(f"round {rnd + 1}/{run.rounds}: {2 * (i + 1)}/{2 * flip_pairs[rnd]} flips")
        run.rounds_done = rnd + 1


async def run_mesh_bench(
    home: Path,
    levels: list[int],
    *,
    rounds: int = 2,
    unary_requests: int = 200,
    stream_requests: int = 24,
    max_tokens: int = 4,
    flips: int = 50,
    budget_s: float = 540.0,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> bool:
    """Bring up both meshes and the echo chain, measure, stop everything, print the tables.

    Returns True when every target was met. Everything started is stopped on return, on error,
    on Ctrl-C and on SIGTERM; the run's directory is removed unless something failed.
    """
    from mesh.launcher import Mesh, Ports
    from services.inference.models import prepare_model

    run = Run(levels, rounds, unary_requests, stream_requests, max_tokens, 2 * (flips // 2))
    base = home / "bench-mesh" / time.strftime("%Y%m%d-%H%M%S")
    model_dir, card = await asyncio.to_thread(prepare_model, home / "models")
    engines: list[dict[str, object]] = [
        {"id": "small", "kind": "small", "model": card.model_id, "model_dir": str(model_dir)}
    ]
    classes = {"chat_short": {"engine": "small", "default_max_tokens": 64, "max_tokens_limit": 256}}
    gateway_env = {"SERVEMESH_GATEWAY_ROUTE_CLASSES": json.dumps(classes)}
    mesh_ports = Ports(
        **{f.name: free_port() for f in dataclasses.fields(Ports) if f.name != "admin"}, admin=free_port_run(4)
    )
    plain_ports = Ports(**{f.name: free_port() for f in dataclasses.fields(Ports) if f.name != "admin"})
    # what the mesh costs, alone: no API keys on either side
    meshed = Mesh(base / "mesh", mesh_ports, engines, log, gateway_env=gateway_env, auth=False)
    plain = Mesh(base / "no-mesh", plain_ports, engines, log, mesh=False, gateway_env=gateway_env, auth=False)
    chain = EchoChain(base / "chain", log, max_tokens)
    clients: Clients | None = None
    channels: list[grpc.aio.Channel] = []
    failed = False

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        started = time.monotonic()
        for what, starting in (("mesh", meshed.start()), ("no-mesh", plain.start()), ("echo chain", chain.start())):
            log(f"--- starting the {what} ---")
            await starting
        flip_channel = meshed.channel("gateway")
        channels.append(flip_channel)
        flipper = Flipper(meshed, flip_channel)
        log("--- starting the canary gateway ---")
        await flipper.start_canary()
        log(f"everything is up in {time.monotonic() - started:.0f} s")
        clients = Clients(
            {
                MESH: meshed.channel("gateway"),
                NO_MESH: _plain_channel(f"127.0.0.1:{plain_ports.gateway}"),
                DIRECT: _plain_channel(chain.direct_target),
                CHAIN: _tls_channel(chain.edge_target, chain.ca_path),
            },
            max_tokens,
        )

        def mesh_pids() -> list[int]:
            names = ("edge", "gateway-stable", "inference-stable")
            return [e.pid for n, e in meshed.envoys.items() if n in names and e.pid is not None]

        pids = {MESH: mesh_pids, NO_MESH: lambda: [], DIRECT: lambda: [], CHAIN: chain.proxy_pids}
        run.load_before = os.getloadavg()
        await _measure(run, clients, flipper, pids, time.monotonic() + budget_s, log)
        run.load_after = os.getloadavg()
    except Exception:
        failed = True
        raise
    finally:
        if task is not None:
            loop.remove_signal_handler(signal.SIGTERM)
        if clients is not None:
            await clients.close()
        for ch in channels:
            await ch.close()
        for stopping in (chain.stop(), plain.stop(), meshed.stop()):
            try:
                await stopping
            except Exception as exc:  # keep stopping the others
                log(f"error while stopping: {exc!r}")
        if failed:
            log(f"logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    text, met = render(run)
    print(text)
    return met


# --- the tables ----------------------------------------------------------------------------


def _ms(v: float, digits: int = 2) -> str:
    return "-" if math.isnan(v) else f"{v:.{digits}f}"


@dataclass
class Cost:
    """mesh cost (mesh - no-mesh) and bare chain cost (chain - direct) of one measure at one level."""

    label: str
    level: int
    mesh: float
    mesh_rounds: list[float]
    bare: float
    bare_rounds: list[float]
    judged: bool

    @property
    def ratio(self) -> float:
        return self.mesh / self.bare if self.bare > 0 else float("nan")

    @property
    def met(self) -> bool:
        return not (math.isnan(self.mesh) or math.isnan(self.bare)) and self.mesh <= MAX_COST_RATIO * self.bare


def _costs(run: Run) -> list[Cost]:
    measures = [
        ("unary p50", UNARY, "first", 0.5, True),
        ("unary p99", UNARY, "first", 0.99, False),
        ("stream: hops' share of first chunk p50", STREAM, "hops", 0.5, True),
        ("stream: total p50 (engine-bound)", STREAM, "total", 0.5, False),
    ]
    out = []
    for level in run.levels:
        for label, kind, what, q, judged in measures:
            r = {p: run.results.get((p, kind, level), Result(p, kind, level)) for p in PATHS}

            def diff(a: str, b: str, rnd: int | None = None) -> float:
                return r[a].q_ms(what, q, rnd) - r[b].q_ms(what, q, rnd)  # noqa: B023

            rounds = range(run.rounds_done)
            out.append(
                Cost(
                    label,
                    level,
                    diff(MESH, NO_MESH),
                    [diff(MESH, NO_MESH, i) for i in rounds],
                    diff(CHAIN, DIRECT),
                    [diff(CHAIN, DIRECT, i) for i in rounds],
                    judged,
                )
            )
    return out


def render(run: Run) -> tuple[str, bool]:
    """The markdown tables, and whether every target was met."""
    lines: list[str] = []
    la, lb = run.load_before, run.load_after
    lines += [
        "",
        f"{run.rounds_done} of {run.rounds} interleaved rounds on {os.cpu_count()} cores (load average "
        f"{la[0]:.2f} before, {lb[0]:.2f} after); per path, level and round: max({run.unary_requests}, 4 x level) "
        f"unary calls, max({run.stream_requests}, level) streams of {run.max_tokens} greedy tokens on the "
        f"small engine (echo: {run.max_tokens} chunks).",
    ]
    if run.partial:
        lines.append(f"**PARTIAL RUN: {run.partial}; the numbers below cover what ran.**")
    lines += [
        "",
        "Unary: GatewayService.GetVersion (-> inference ListEngines) for no-mesh / mesh; Echo/Unary "
        "(front -> back) for direct echo / bare chain.",
        "",
        "| conc | path | p50 ms | p99 ms | req/s | Envoy CPU µs/req | calls | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for level in run.levels:
        for path in PATHS:
            r = run.results.get((path, UNARY, level))
            if r is None:
                continue
            cpu = "-" if path in (NO_MESH, DIRECT) else _ms(r.proxy_us_per_request(), 0)
            lines.append(
                f"| {level} | {path} | {_ms(r.q_ms('first', 0.5))} | {_ms(r.q_ms('first', 0.99))} | "
                f"{r.rate():.0f} | {cpu} | {len(r.samples)} | {r.errors} |"
            )
    lines += [
        "",
        "Streaming: GatewayService.StreamGenerate for no-mesh / mesh; Echo/Stream for direct echo / bare chain. "
        "Hops' share = time to first chunk minus the engine's own TTFT (echo: all of it).",
        "",
        "| conc | path | first chunk p50 ms | first chunk p99 ms | hops' share p50 ms | total p50 ms | "
        "total p99 ms | streams/s | Envoy CPU µs/stream | streams | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in run.levels:
        for path in PATHS:
            r = run.results.get((path, STREAM, level))
            if r is None:
                continue
            cpu = "-" if path in (NO_MESH, DIRECT) else _ms(r.proxy_us_per_request(), 0)
            lines.append(
                f"| {level} | {path} | {_ms(r.q_ms('first', 0.5))} | {_ms(r.q_ms('first', 0.99))} | "
                f"{_ms(r.q_ms('hops', 0.5))} | {_ms(r.q_ms('total', 0.5))} | {_ms(r.q_ms('total', 0.99))} | "
                f"{r.rate():.1f} | {cpu} | {len(r.samples)} | {r.errors} |"
            )

    verdicts: list[tuple[str, bool]] = []
    lines += [
        "",
        f"Cost: mesh cost = mesh - no-mesh, bare chain cost = bare chain - direct echo (per round in "
        f"parentheses). Target: mesh cost <= {MAX_COST_RATIO}x bare chain cost at every level (p50 rows "
        f"marked judged); the other rows are for information.",
        "",
        "| conc | measure | mesh cost ms | bare chain cost ms | ratio | target met |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for c in _costs(run):
        rounds_m = ", ".join(_ms(v) for v in c.mesh_rounds)
        rounds_b = ", ".join(_ms(v) for v in c.bare_rounds)
        if c.judged:
            verdict = "yes" if c.met else "**NO**"
            verdicts.append((f"{c.label} at concurrency {c.level}: mesh cost <= {MAX_COST_RATIO}x bare chain", c.met))
        else:
            verdict = "(info)"
        # a ratio to an engine-bound difference means nothing: that row only shows the difference
        ratio = "-" if math.isnan(c.ratio) or "engine-bound" in c.label else f"{c.ratio:.2f}x"
        lines.append(
            f"| {c.level} | {c.label} | {_ms(c.mesh)} ({rounds_m}) | {_ms(c.bare)} ({rounds_b}) | {ratio} | {verdict} |"
        )

    if 1 in run.levels:
        added = next(c.mesh for c in _costs(run) if c.level == 1 and c.label == "unary p50")
        ok = not math.isnan(added) and added <= MAX_ADDED_P50_S * 1e3
        verdicts.insert(0, (f"the mesh adds <= {MAX_ADDED_P50_S * 1e3:.0f} ms p50 at concurrency 1 (unary)", ok))
        lines += [
            "",
            f"Mesh adds {_ms(added)} ms p50 at concurrency 1 (unary; target <= 2 ms): "
            f"{'met' if ok else '**NOT MET**'}.",
        ]

    f = run.flip
    p50, p95 = quantile(f.took, 0.5) * 1e3, quantile(f.took, 0.95) * 1e3
    flip_ok = bool(f.took) and not math.isnan(p95) and p95 <= MAX_FLIP_P95_S * 1e3 and len(f.took) >= run.flips
    verdicts.append((f"route flip-to-effect p95 <= {MAX_FLIP_P95_S * 1e3:.0f} ms over {run.flips} flips", flip_ok))
    lines += [
        "",
        f"Route flip-to-effect: UpdateRoute(routes/gateway, stable/canary 100/0 <-> 0/100) returns -> a burst of "
        f"{FLIP_BURST} GetVersion calls through the edge all answer from the new deployment.",
        "",
        "| flips | p50 ms | p95 ms | max ms | not seen within 5 s | call errors while flipping | p95 <= 500 ms |",
        "|---:|---:|---:|---:|---:|---:|---|",
        f"| {len(f.took)} | {_ms(p50, 0)} | {_ms(p95, 0)} | {_ms(max(f.took, default=float('nan')) * 1e3, 0)} | "
        f"{f.timed_out} | {f.errors} | {'yes' if flip_ok else '**NO**'} |",
    ]
    errors = sum(r.errors for r in run.results.values())
    if errors:
        worst = max(run.results.values(), key=lambda r: r.errors)
        lines += [
            "",
            f"**{errors} calls failed** (most on {worst.path} {worst.kind} at concurrency "
            f"{worst.concurrency}: {worst.last_error}).",
        ]
    missed = [name for name, ok in verdicts if not ok]
    met = not missed and not run.partial and not errors
    lines += [
        "",
        f"Targets: {len(verdicts) - len(missed)} of {len(verdicts)} met"
        + (f"; missed: {'; '.join(missed)}." if missed else ".")
        + (" (partial run)" if run.partial else ""),
    ]
    return "\n".join(lines), met


if __name__ == "__main__":
    main()
