"""`servemesh up`: the whole mesh on one machine with embedded defaults.

Prepares the model if needed, creates vLLM's venv on first use, then starts vLLM,
inference and gateway as supervised processes (restarted with backoff if they die,
stopped cleanly on Ctrl-C or SIGTERM, killed by the kernel if this process dies).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servemesh.registry.v1 import registry_pb2, registry_pb2_grpc

from mesh import certs
from mesh.envoy import config as envoy
from mesh.envoy.process import EnvoyProcess
from mesh.state import MeshState
from mesh.supervisor import Supervisor
from mesh.vllm import VllmArgs, ensure_venv, health_check
from mesh.xds.build import EDGE_HTTP_PREFIXES

REPO = Path(__file__).resolve().parent.parent


def servemesh_home(environ: dict[str, str] | None = None) -> Path:
    """Data directory: $SERVEMESH_HOME, else ~/.local/share/servemesh."""
    env = os.environ if environ is None else environ
    return Path(env.get("SERVEMESH_HOME") or Path.home() / ".local" / "share" / "servemesh")


@dataclass(frozen=True)
class Ports:
    # the services themselves with --no-mesh (loopback, plaintext); in the mesh they
    # listen on Unix sockets in <home>/run/sockets, reachable only through their sidecars
    gateway: int = 50050
    #: the gateway's OpenAI-compatible HTTP API with --no-mesh (in the mesh: through the edge)
    gateway_http: int = 8080
    inference: int = 50051
    registry: int = 50052
    retrieval: int = 50053
    rerank: int = 50054
    vllm: int = 8100
    gateway_metrics: int = 9150
    inference_metrics: int = 9151
    registry_metrics: int = 9152
    retrieval_metrics: int = 9153
    rerank_metrics: int = 9154
    control_plane_metrics: int = 9160
    controller_metrics: int = 9161
    #: the operations console (NiceGUI, HTTP on loopback)
    console: int = 8090
    # the mesh
    edge: int = 8443
    control_plane: int = 15010
    #: the rollout and SLO controller (SloService; mTLS in the mesh)
    controller: int = 15020
    gateway_inbound: int = 15050
    inference_inbound: int = 15051
    registry_inbound: int = 15052
    retrieval_inbound: int = 15053
    rerank_inbound: int = 15054
    #: Envoy admin ports: edge, gateway, inference, registry, retrieval, rerank from here up
    admin: int = 15900

    def used(self, mesh: bool, rag: bool = False) -> list[tuple[int, str]]:
        ports = [
            (self.vllm, "vllm"),
            (self.gateway_metrics, "gateway metrics"),
            (self.inference_metrics, "inference metrics"),
            (self.registry_metrics, "registry metrics"),
            (self.controller_metrics, "controller metrics"),
            (self.console, "console"),
        ]
        if rag:
            ports += [(self.retrieval_metrics, "retrieval metrics"), (self.rerank_metrics, "rerank metrics")]
        if not mesh:  # in the mesh the services listen on Unix sockets
            return [
                (self.gateway, "gateway"),
                (self.gateway_http, "gateway HTTP API"),
                (self.inference, "inference"),
                (self.registry, "registry"),
                (self.controller, "controller"),
                *([(self.retrieval, "retrieval"), (self.rerank, "rerank")] if rag else []),
                *ports,
            ]
        return [
            *ports,
            (self.edge, "edge Envoy"),
            (self.control_plane, "control plane"),
            (self.control_plane_metrics, "control plane metrics"),
            (self.controller, "controller"),
            (self.gateway_inbound, "gateway sidecar"),
            (self.inference_inbound, "inference sidecar"),
            (self.registry_inbound, "registry sidecar"),
            *([(self.retrieval_inbound, "retrieval sidecar"), (self.rerank_inbound, "rerank sidecar")] if rag else []),
            *((self.admin + i, "Envoy admin") for i in range(6 if rag else 4)),
        ]


def grpc_health_check(target: str, channel: Callable[[], grpc.aio.Channel] | None = None) -> Callable[[], object]:
    async def healthy() -> bool:
        async with channel() if channel else grpc.aio.insecure_channel(target) as channel_:
            try:
                resp = await health_pb2_grpc.HealthStub(channel_).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.aio.AioRpcError:
                return False
            return resp.status == health_pb2.HealthCheckResponse.SERVING

    return healthy


#: ports free_port handed out in this process: the kernel may offer a released port again
#: at once, and two servers of one test or benchmark must never be given the same one
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port free right now and not handed out before in this process (tests, benchmarks)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def free_port_run(n: int) -> int:
    """The first of n consecutive free loopback ports (Ports.admin is such a run)."""
    for _ in range(100):
        first = free_port()
        run = range(first, first + n)
        if _handed_out.intersection(run[1:]):
            continue
        socks: list[socket.socket] = []
        try:
            for port in run:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        _handed_out.update(run)
        return first
    raise RuntimeError(f"no {n} consecutive free ports")


def _check_free(port: int, what: str) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise SystemExit(f"error: port {port} for {what} is in use (is another `servemesh up` running?)") from None


#: identities the local CA issues: one per service and per client of the mesh
IDENTITIES = (
    "edge",
    "gateway",
    "inference",
    "registry",
    "retrieval",
    "rerank",
    "control-plane",
    "controller",
    "console",
    "cli",
)
SEED_REASON = "servemesh up: initial deployment"


class Mesh:
    """The local processes, in start order. `mesh=False` runs them direct and plaintext.

    Tests use the same pieces (start_gateway, register ...) to add canary deployments.
    """

    def __init__(
        self,
        home: Path,
        ports: Ports,
        engines: list[dict[str, object]],
        log: Callable[[str], None],
        *,
        vllm_args: VllmArgs | None = None,
        model_dir: Path | None = None,
        mesh: bool = True,
        namespace: str = "default",
        policy_path: Path | None = None,
        gateway_env: dict[str, str] | None = None,
        auth: bool = True,
        rag: bool = False,
    ) -> None:
        self.home, self.ports, self.engines, self.mesh = home, ports, engines, mesh
        #: gateway requests need an API key; `servemesh up` keeps a dev tenant's key for the CLI
        self.auth = auth
        #: run retrieval and rerank, and let the gateway answer from indexes (StreamRagAnswer)
        self.rag = rag
        self.vllm_args, self.model_dir = vllm_args, model_dir
        self.namespace = namespace
        self.gateway_env = gateway_env or {}
        self.policy = envoy.load_policy(policy_path) if mesh else None
        self.certs_dir = home / "certs"
        self.logs = home / "logs"
        self.run_dir = home / "run"
        self.sockets = self.run_dir / "sockets"
        self._log = log
        self.supervisors: list[Supervisor | EnvoyProcess] = []
        #: Envoy node id (deployment or "edge") -> its process
        self.envoys: dict[str, EnvoyProcess] = {}
        self._state_written = False
        #: whether the controller (rollouts, SLOs) runs
        self._controller = False

    def _service_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("APP_ENV", "dev")
        env.update(extra)
        return env

    async def _run(self, sup: Supervisor | EnvoyProcess) -> None:
        self._log(f"starting {sup.name} ...")
        try:
            await sup.start()
        except BaseException:  # timed out, crashed or cancelled (Ctrl-C): leave nothing running
            await sup.stop()
            raise
        self.supervisors.append(sup)
        self._log(f"{sup.name} is healthy (pid {sup.pid})")

    def _service(
        self,
        name: str,
        module: str,
        target: str,
        channel: Callable[[], grpc.aio.Channel] | None = None,
        **env: str,
    ) -> Supervisor:
        return Supervisor(
            name,
            [sys.executable, "-m", module],
            cwd=REPO,
            env=self._service_env(**env),
            health=grpc_health_check(target, channel),
            log_path=self.logs / f"{name}.log",
        )

    def _app(self, name: str, port: int, env_prefix: str) -> tuple[str, dict[str, str], envoy.LocalAddress]:
        """Where an app listens: a Unix socket only its sidecar reaches (mesh), or a loopback port.

        Returns the gRPC target, the settings env and the sidecar's view of the address.
        """
        if not self.mesh:
            return f"127.0.0.1:{port}", {f"{env_prefix}PORT": str(port)}, port
        sock = self.sockets / f"{name}.sock"
        return f"unix:{sock}", {f"{env_prefix}UNIX_SOCKET": str(sock)}, sock

    async def _sidecar(
        self,
        deployment: str,
        service: str,
        app: envoy.LocalAddress,
        inbound: int,
        admin: int,
        outbound: envoy.LocalAddress | None = None,
        app_http: envoy.LocalAddress | None = None,
        fault_injection: bool = False,
    ) -> None:
        assert self.policy is not None
        ident = certs.identity(self.certs_dir, service, self.namespace)
        boot = envoy.sidecar_bootstrap(
            envoy.Node(deployment, service, outbound),
            ident,
            admin_port=admin,
            inbound_port=inbound,
            app_port=app,
            # only a sidecar that calls other services needs the control plane
            xds_address=("127.0.0.1", self.ports.control_plane) if outbound else None,
            policy=self.policy,
            app_http=app_http,
            http_prefixes=EDGE_HTTP_PREFIXES.get(service, ()),
            fault_injection=fault_injection,
        )
        self.envoys[deployment] = EnvoyProcess(f"{deployment}-sidecar", boot, self.run_dir / "envoy")
        await self._run(self.envoys[deployment])

    def channel(self, service: str) -> grpc.aio.Channel:
        """A channel to a service as the `cli` identity (mesh) or plaintext (--no-mesh)."""
        return self.state().channel(service)

    async def register(self, deployment: registry_pb2.Deployment, route: registry_pb2.Route | None = None) -> None:
        """Create a deployment (and a route) in the registry unless one by that name exists."""
        async with self.channel("registry") as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            requests: list[tuple[Callable[..., Any], object]] = [
                (stub.CreateDeployment, registry_pb2.CreateDeploymentRequest(deployment=deployment, reason=SEED_REASON))
            ]
            if route is not None:
                requests.append((stub.CreateRoute, registry_pb2.CreateRouteRequest(route=route, reason=SEED_REASON)))
            for method, request in requests:  # in order: a route needs its deployments
                try:
                    await method(request, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                        raise

    def _endpoint(self, app_port: int, inbound: int) -> str:
        return f"127.0.0.1:{inbound if self.mesh else app_port}"

    async def start_inference(
        self,
        deployment: str,
        app_port: int,
        metrics_port: int,
        inbound: int,
        admin: int,
        *,
        fault_injection: bool = False,
        engines: list[dict[str, object]] | None = None,
    ) -> None:
        """An inference deployment (and its sidecar); `app_port` is used with --no-mesh only.

        `fault_injection` lets its sidecar abort requests when told to (EnvoyProcess.set_runtime).
        """
        target, env, app = self._app(deployment, app_port, "SERVEMESH_INFERENCE_")
        await self._run(
            self._service(
                deployment,
                "services.inference.server",
                target,
                SERVEMESH_INFERENCE_METRICS_PORT=str(metrics_port),
                SERVEMESH_INFERENCE_ENGINES=json.dumps(self.engines if engines is None else engines),
                **env,
            )
        )
        if self.mesh:
            await self._sidecar(deployment, "inference", app, inbound, admin, fault_injection=fault_injection)

    async def start_gateway(
        self,
        deployment: str,
        app_port: int,
        metrics_port: int,
        inbound: int,
        admin: int,
        http_port: int = 0,
        *,
        fault_injection: bool = False,
    ) -> None:
        """A gateway deployment (and its sidecar); `app_port` and `http_port` (its OpenAI-compatible
        API; 0 = a free port) are used with --no-mesh only. `fault_injection`: see start_inference."""
        target, env, app = self._app(deployment, app_port, "SERVEMESH_GATEWAY_")
        outbound = self.sockets / f"{deployment}.outbound.sock"
        http_sock = self.sockets / f"{deployment}.http.sock"
        upstream = (
            {
                "SERVEMESH_GATEWAY_INFERENCE_TARGET": f"unix:{outbound}",
                "SERVEMESH_GATEWAY_INFERENCE_AUTHORITY": "inference",
                "SERVEMESH_GATEWAY_HTTP_UNIX_SOCKET": str(http_sock),
                # only its sidecar can reach the gateway's sockets; the edge appends the client
                "SERVEMESH_GATEWAY_TRUST_FORWARDED_FOR": "true",
            }
            if self.mesh
            else {
                "SERVEMESH_GATEWAY_INFERENCE_TARGET": f"127.0.0.1:{self.ports.inference}",
                "SERVEMESH_GATEWAY_HTTP_PORT": str(http_port or free_port()),
            }
        )
        upstream |= self._rag_env(outbound)
        if self.auth:  # keys are verified by the registry, through the sidecar in the mesh
            upstream |= {
                "SERVEMESH_GATEWAY_AUTH__ENABLED": "true",
                "SERVEMESH_GATEWAY_AUTH__REGISTRY_TARGET": f"unix:{outbound}"
                if self.mesh
                else f"127.0.0.1:{self.ports.registry}",
                "SERVEMESH_GATEWAY_AUTH__REGISTRY_AUTHORITY": "registry" if self.mesh else "",
            }
        await self._run(
            self._service(
                deployment,
                "services.gateway.server",
                target,
                SERVEMESH_GATEWAY_METRICS_PORT=str(metrics_port),
                SERVEMESH_GATEWAY_DEPLOYMENT=deployment,
                **env,
                **upstream,
                **self.gateway_env,
            )
        )
        if self.mesh:
            await self._sidecar(
                deployment,
                "gateway",
                app,
                inbound,
                admin,
                outbound,
                app_http=http_sock,
                fault_injection=fault_injection,
            )
        if self._state_written:
            self.state().write(self.home)

    def _rag_env(self, outbound: Path) -> dict[str, str]:
        """Where the gateway finds retrieval and rerank (through its sidecar in the mesh)."""
        if not self.rag:
            return {"SERVEMESH_GATEWAY_RAG__ENABLED": "false"}
        env = {"SERVEMESH_GATEWAY_RAG__ENABLED": "true"}
        for service in ("retrieval", "rerank"):
            key = f"SERVEMESH_GATEWAY_RAG__{service.upper()}_"
            if self.mesh:
                env |= {f"{key}TARGET": f"unix:{outbound}", f"{key}AUTHORITY": service}
            else:
                env |= {f"{key}TARGET": f"127.0.0.1:{getattr(self.ports, service)}", f"{key}AUTHORITY": ""}
        return env

    async def start_rag(self) -> None:
        """Retrieval and rerank (and their sidecars), sharing the embedding model's ONNX export."""
        p = self.ports
        onnx = str(self.home / "models" / "onnx")
        for i, (service, port, metrics, inbound, env) in enumerate(
            (
                (
                    "retrieval",
                    p.retrieval,
                    p.retrieval_metrics,
                    p.retrieval_inbound,
                    {
                        "SERVEMESH_RETRIEVAL_DATA_DIR": str(self.home / "retrieval"),
                        "SERVEMESH_RETRIEVAL_EMBEDDING_CACHE_DIR": onnx,
                        "SERVEMESH_RETRIEVAL_TRUST_FORWARDED_IDENTITY": str(self.mesh).lower(),
                    },
                ),
                (
                    "rerank",
                    p.rerank,
                    p.rerank_metrics,
                    p.rerank_inbound,
                    {"SERVEMESH_RERANK_EMBEDDING_CACHE_DIR": onnx},
                ),
            )
        ):
            prefix = f"SERVEMESH_{service.upper()}_"
            target, app_env, app = self._app(service, port, prefix)
            deployment = f"{service}-stable"
            await self.register(
                registry_pb2.Deployment(
                    name=f"deployments/{deployment}",
                    service=service,
                    version="stable",
                    endpoint=self._endpoint(port, inbound),
                    metrics_url=metrics_url(metrics),
                ),
                registry_pb2.Route(
                    name=f"routes/{service}",
                    service=service,
                    backends=[registry_pb2.WeightedBackend(deployment=f"deployments/{deployment}", weight=100)],
                ),
            )
            await self._run(
                self._service(
                    deployment,
                    f"services.{service}.server",
                    target,
                    **{f"{prefix}METRICS_PORT": str(metrics)},
                    **app_env,
                    **env,
                )
            )
            if self.mesh:
                await self._sidecar(deployment, service, app, inbound, p.admin + 4 + i)

    @property
    def dev_key_path(self) -> Path:
        """The dev tenant's API key, kept 0600 for the CLI and the tour (never a production key)."""
        return self.home / "secrets" / ("dev-api-key" if self.mesh else "dev-api-key-no-mesh")

    async def _ensure_dev_key(self) -> None:
        """A tenant "dev" with an enterprise key for every route class, created once per registry."""
        path = self.dev_key_path
        async with self.channel("registry") as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            if path.exists():
                try:
                    await stub.VerifyApiKey(
                        registry_pb2.VerifyApiKeyRequest(secret=path.read_text().strip()), timeout=10
                    )
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
            try:
                await stub.CreateTenant(
                    registry_pb2.CreateTenantRequest(
                        tenant=registry_pb2.Tenant(name="tenants/dev", display_name="local development"),
                        reason=SEED_REASON,
                    ),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
            created = await stub.CreateApiKey(
                registry_pb2.CreateApiKeyRequest(
                    parent="tenants/dev",
                    api_key=registry_pb2.ApiKey(display_name="servemesh up", tier=registry_pb2.ApiKey.TIER_ENTERPRISE),
                    reason=SEED_REASON,
                ),
                timeout=10,
            )
        _write_private(path, created.secret)
        self._log(f"created the dev tenant's API key in {path}")

    def state(self) -> MeshState:
        p = self.ports
        if not self.mesh:
            return MeshState(
                mesh=False,
                gateway=f"127.0.0.1:{p.gateway}",
                registry=f"127.0.0.1:{p.registry}",
                retrieval=f"127.0.0.1:{p.retrieval}" if self.rag else "",
                controller=f"127.0.0.1:{p.controller}" if self._controller else "",
                openai=f"http://127.0.0.1:{p.gateway_http}/openai/v1",
                api_key_file=str(self.dev_key_path) if self.auth else "",
            )
        return MeshState(
            mesh=True,
            gateway=f"127.0.0.1:{p.edge}",
            registry=f"127.0.0.1:{p.registry_inbound}",
            retrieval=f"127.0.0.1:{p.retrieval_inbound}" if self.rag else "",
            openai=f"https://127.0.0.1:{p.edge}/openai/v1",
            api_key_file=str(self.dev_key_path) if self.auth else "",
            control_plane=f"127.0.0.1:{p.control_plane}",
            controller=f"127.0.0.1:{p.controller}" if self._controller else "",
            certs_dir=str(self.certs_dir),
            namespace=self.namespace,
            envoys={name: e.admin_port for name, e in self.envoys.items()},
        )

    async def start(self, vllm_python: Path | None = None) -> None:
        p = self.ports
        if self.vllm_args is not None:
            assert vllm_python is not None and self.model_dir is not None
            await self._run(
                Supervisor(
                    "vllm",
                    self.vllm_args.argv(vllm_python, self.model_dir),
                    env=self.vllm_args.env(),
                    health=health_check(self.vllm_args.url),
                    log_path=self.logs / "vllm.log",
                )
            )
        if self.mesh:
            for ident in certs.ensure_identities(self.certs_dir, IDENTITIES, self.namespace).values():
                envoy.write_sds_files(ident)
            # the apps' sockets: 0700, so only this user's processes (the sidecars) reach them
            shutil.rmtree(self.sockets, ignore_errors=True)
            self.sockets.mkdir(mode=0o700, parents=True)
        target, env, app = self._app("registry", p.registry, "SERVEMESH_REGISTRY_")
        await self._run(
            self._service(
                "registry",
                "services.registry.server",
                target,
                **env,
                SERVEMESH_REGISTRY_METRICS_PORT=str(p.registry_metrics),
                # deployments name their sidecars in the mesh and the services without it:
                # each mode keeps its own registry, so switching never leaves stale endpoints
                SERVEMESH_REGISTRY_DATA_DIR=str(self.home / ("registry" if self.mesh else "registry-no-mesh")),
                SERVEMESH_REGISTRY_TRUST_FORWARDED_IDENTITY=str(self.mesh).lower(),
                SERVEMESH_REGISTRY_API_KEY_PEPPER=_secret_file(self.home / "secrets" / "api-key-pepper"),
            )
        )
        if self.mesh:
            await self._sidecar("registry", "registry", app, p.registry_inbound, p.admin + 3)
            await self._run(
                self._service(
                    "control-plane",
                    "mesh.xds.server",
                    f"127.0.0.1:{p.control_plane}",
                    lambda: self.channel("control-plane"),
                    SERVEMESH_CONTROL_PLANE_PORT=str(p.control_plane),
                    SERVEMESH_CONTROL_PLANE_METRICS_PORT=str(p.control_plane_metrics),
                    SERVEMESH_CONTROL_PLANE_REGISTRY_TARGET=f"127.0.0.1:{p.registry_inbound}",
                    SERVEMESH_CONTROL_PLANE_CERTS_DIR=str(self.certs_dir),
                    SERVEMESH_CONTROL_PLANE_NAMESPACE=self.namespace,
                )
            )
        if self.mesh:  # so sidecars get a route to it: the gateway verifies API keys there
            await self.register(
                registry_pb2.Deployment(
                    name="deployments/registry",
                    service="registry",
                    version="stable",
                    endpoint=f"127.0.0.1:{p.registry_inbound}",
                ),
                registry_pb2.Route(
                    name="routes/registry",
                    service="registry",
                    backends=[registry_pb2.WeightedBackend(deployment="deployments/registry", weight=100)],
                ),
            )
        engine = str(self.engines[0]["id"]) if self.engines else ""
        model = str(self.engines[0].get("model", "")) if self.engines else ""
        await self.register(
            registry_pb2.Deployment(
                name="deployments/inference-stable",
                service="inference",
                version="stable",
                endpoint=self._endpoint(p.inference, p.inference_inbound),
                engine=engine,
                model_id=model,
                metrics_url=metrics_url(p.inference_metrics),
            ),
            registry_pb2.Route(
                name="routes/inference",
                service="inference",
                backends=[registry_pb2.WeightedBackend(deployment="deployments/inference-stable", weight=100)],
            ),
        )
        await self.register(
            registry_pb2.Deployment(
                name="deployments/gateway-stable",
                service="gateway",
                version="stable",
                endpoint=self._endpoint(p.gateway, p.gateway_inbound),
                metrics_url=metrics_url(p.gateway_metrics),
            ),
            registry_pb2.Route(
                name="routes/gateway",
                service="gateway",
                backends=[registry_pb2.WeightedBackend(deployment="deployments/gateway-stable", weight=100)],
                header_overrides=[],
            ),
        )
        if self.auth:
            await self._ensure_dev_key()
        if self.rag:
            await self.start_rag()
        await self.start_inference(
            "inference-stable", p.inference, p.inference_metrics, p.inference_inbound, p.admin + 2
        )
        await self.start_gateway(
            "gateway-stable", p.gateway, p.gateway_metrics, p.gateway_inbound, p.admin + 1, p.gateway_http
        )
        if self.mesh:
            ident = certs.identity(self.certs_dir, "edge", self.namespace)
            boot = envoy.edge_bootstrap(
                ident, admin_port=p.admin, edge_port=p.edge, xds_address=("127.0.0.1", p.control_plane)
            )
            self.envoys["edge"] = EnvoyProcess("edge", boot, self.run_dir / "envoy")
            await self._run(self.envoys["edge"])
        self.state().write(self.home)
        self._state_written = True
        await self.start_controller()
        await self.start_console()

    async def start_controller(self) -> None:
        """The rollout and SLO controller; it reads the Envoys' admin ports from the state file."""
        p = self.ports
        env = {
            "SERVEMESH_CONTROLLER_PORT": str(p.controller),
            "SERVEMESH_CONTROLLER_METRICS_PORT": str(p.controller_metrics),
            "SERVEMESH_CONTROLLER_HOME": str(self.home),
            "SERVEMESH_CONTROLLER_NAMESPACE": self.namespace,
        }
        if self.auth:  # golden evaluations of gateway deployments go as the dev tenant
            env["SERVEMESH_CONTROLLER_EVAL_API_KEY_FILE"] = str(self.dev_key_path)
        if self.mesh:
            env |= {
                "SERVEMESH_CONTROLLER_REGISTRY_TARGET": f"127.0.0.1:{p.registry_inbound}",
                "SERVEMESH_CONTROLLER_CERTS_DIR": str(self.certs_dir),
            }
        else:
            env["SERVEMESH_CONTROLLER_REGISTRY_TARGET"] = f"127.0.0.1:{p.registry}"
        self._controller = True
        await self._run(
            self._service(
                "controller",
                "mesh.controller.server",
                f"127.0.0.1:{p.controller}",
                (lambda: self.channel("controller")) if self.mesh else None,
                **env,
            )
        )
        self.state().write(self.home)

    async def start_console(self) -> None:
        """The operations console; it finds the mesh through the state file, as the CLI does."""
        url = f"http://127.0.0.1:{self.ports.console}"
        env = self._service_env(
            SERVEMESH_CONSOLE_HOME=str(self.home),
            SERVEMESH_CONSOLE_PORT=str(self.ports.console),
            # NiceGUI keeps each browser's session in files: under home, not the working directory
            NICEGUI_STORAGE_PATH=str(self.home / "console" / "sessions"),
        )
        env.pop("PYTEST_CURRENT_TEST", None)  # NiceGUI would take itself for a test's and not serve
        await self._run(
            Supervisor(
                "console",
                [sys.executable, "-m", "console.server"],
                cwd=REPO,
                env=env,
                health=health_check(url),
                log_path=self.logs / "console.log",
            )
        )

    async def stop(self) -> None:
        MeshState.remove(self.home)
        self._state_written = False
        for sup in reversed(self.supervisors):
            self._log(f"stopping {sup.name}")
            await sup.stop()
        self.supervisors.clear()
        self.envoys.clear()


def metrics_url(port: int) -> str:
    """Where a local service's Prometheus metrics are scraped."""
    return f"http://127.0.0.1:{port}/metrics"


def local_engines(vllm_args: VllmArgs, model_dir: Path, small_engine: bool) -> list[dict[str, object]]:
    """Inference's engines on one machine: vLLM, and the small in-process model if asked."""
    common = {
        "model": vllm_args.served_model_name,
        "model_dir": str(model_dir),
        "max_model_len": vllm_args.max_model_len,
    }
    engines: list[dict[str, object]] = [{"id": "vllm", "kind": "vllm", "url": vllm_args.url, **common}]
    if small_engine:
        engines.append({"id": "small", "kind": "small", **common})
    return engines


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    certs.write_atomic(path, text.encode(), 0o600)


def _secret_file(path: Path) -> str:
    """The random secret kept in `path` (0600), made on first use."""
    if not path.exists():
        _write_private(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def _banner(home: Path, p: Ports, vllm_args: VllmArgs, mesh_mode: bool) -> str:
    lines = [f"\nservemesh is up (logs in {home / 'logs'}):"]
    if mesh_mode:
        lines += [
            f"  edge        https://127.0.0.1:{p.edge}  (TLS: gRPC and REST/JSON, CA {home / 'certs' / 'ca.crt'})",
            f"  OpenAI API  https://127.0.0.1:{p.edge}/openai/v1  (through the edge; Bearer API key)",
            f"  registry    127.0.0.1:{p.registry_inbound}  (mTLS, internal; `servemesh route list`)",
            f"  retrieval   127.0.0.1:{p.retrieval_inbound}  (mTLS, internal; `servemesh index list`)",
            f"  control     127.0.0.1:{p.control_plane}  (xDS, mTLS; `servemesh mesh status`)",
            f"  controller  127.0.0.1:{p.controller}  (rollouts and SLOs, mTLS; `servemesh rollout status`, "
            "`servemesh slo status`)",
            f"  console     http://127.0.0.1:{p.console}  (sign in as a user of `servemesh console user add`)",
        ]
    else:
        lines += [
            f"  gateway     127.0.0.1:{p.gateway}  (gRPC, plaintext: --no-mesh)",
            f"  OpenAI API  http://127.0.0.1:{p.gateway_http}/openai/v1  (plaintext: --no-mesh)",
            f"  registry    127.0.0.1:{p.registry}  (gRPC, plaintext)",
            f"  retrieval   127.0.0.1:{p.retrieval}  (gRPC, plaintext; rerank on {p.rerank})",
            f"  console     http://127.0.0.1:{p.console}  (sign in as a user of `servemesh console user add`)",
        ]
    key = home / "secrets" / ("dev-api-key" if mesh_mode else "dev-api-key-no-mesh")
    lines += [
        f"  API key     {key}  (tenant dev; the CLI sends it; `servemesh keys create` for more)",
        f"  vLLM        {vllm_args.url}  (OpenAI-compatible, internal)",
        f"  metrics     http://127.0.0.1:{p.gateway_metrics}/metrics  http://127.0.0.1:{p.inference_metrics}/metrics",
        'try: servemesh generate "Write a haiku about meshes"    (Ctrl-C stops everything)',
        '     servemesh index build docs ./my-docs && servemesh ask --rag "What do my docs say about X?"',
    ]
    return "\n".join(lines)


async def run_up(
    home: Path,
    ports: Ports,
    vllm_args: VllmArgs,
    small_engine: bool,
    log: Callable[[str], None],
    prepare: Callable[[Path], Path],
    *,
    mesh_mode: bool = True,
) -> None:
    for port, what in ports.used(mesh_mode, rag=True):
        _check_free(port, what)
    model_dir = prepare(home / "models")
    vllm_python = await asyncio.to_thread(ensure_venv, home / "venvs" / "vllm", log)
    engines = local_engines(vllm_args, model_dir, small_engine)
    mesh = Mesh(home, ports, engines, log, vllm_args=vllm_args, model_dir=model_dir, mesh=mesh_mode, rag=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.create_task(mesh.start(vllm_python))
        done, _ = await asyncio.wait({starting, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()
            log(_banner(home, ports, vllm_args, mesh_mode))
            await stop.wait()
        else:
            starting.cancel()
    finally:
        await mesh.stop()
        log("stopped")
