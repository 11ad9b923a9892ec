"""`servemesh up`: the whole mesh on one machine with embedded defaults.

Prepares the model if needed, creates vLLM's venv on first use, then starts vLLM,
inference and gateway as supervised processes (restarted with backoff if they die,
stopped cleanly on Ctrl-C or SIGTERM, killed by the kernel if this process dies).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.supervisor import Supervisor
from mesh.vllm import VllmArgs, ensure_venv, health_check

REPO = Path(__file__).resolve().parent.parent


def servemesh_home(environ: dict[str, str] | None = None) -> Path:
    """Data directory: $SERVEMESH_HOME, else ~/.local/share/servemesh."""
    env = os.environ if environ is None else environ
    return Path(env.get("SERVEMESH_HOME") or Path.home() / ".local" / "share" / "servemesh")


@dataclass(frozen=True)
class Ports:
    gateway: int = 50050
    inference: int = 50051
    vllm: int = 8100
    gateway_metrics: int = 9150
    inference_metrics: int = 9151


def grpc_health_check(target: str) -> Callable[[], object]:
    async def healthy() -> bool:
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.aio.AioRpcError:
                return False
            return resp.status == health_pb2.HealthCheckResponse.SERVING

    return healthy


def _check_free(port: int, what: str) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise SystemExit(f"error: port {port} for {what} is in use (is another `servemesh up` running?)") from None


class Mesh:
    """The local processes, in start order."""

    def __init__(
        self,
        home: Path,
        ports: Ports,
        vllm_args: VllmArgs,
        model_dir: Path,
        small_engine: bool,
        log: Callable[[str], None],
    ) -> None:
        self.home, self.ports, self.vllm_args, self.model_dir = home, ports, vllm_args, model_dir
        self._small = small_engine
        self._log = log
        self.supervisors: list[Supervisor] = []

    def _service_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("APP_ENV", "dev")
        env.update(extra)
        return env

    def engines(self) -> list[dict[str, object]]:
        engines: list[dict[str, object]] = [
            {
                "id": "vllm",
                "kind": "vllm",
                "url": self.vllm_args.url,
                "model": self.vllm_args.served_model_name,
                "model_dir": str(self.model_dir),
                "max_model_len": self.vllm_args.max_model_len,
            }
        ]
        if self._small:
            engines.append(
                {
                    "id": "small",
                    "kind": "small",
                    "model": self.vllm_args.served_model_name,
                    "model_dir": str(self.model_dir),
                    "max_model_len": self.vllm_args.max_model_len,
                }
            )
        return engines

    async def start(self, vllm_python: Path) -> None:
        logs = self.home / "logs"
        p = self.ports
        vllm = Supervisor(
            "vllm",
            self.vllm_args.argv(vllm_python, self.model_dir),
            env=self.vllm_args.env(),
            health=health_check(self.vllm_args.url),
            log_path=logs / "vllm.log",
        )
        inference = Supervisor(
            "inference",
            [sys.executable, "-m", "services.inference.server"],
            cwd=REPO,
            env=self._service_env(
                SERVEMESH_INFERENCE_PORT=str(p.inference),
                SERVEMESH_INFERENCE_METRICS_PORT=str(p.inference_metrics),
                SERVEMESH_INFERENCE_ENGINES=json.dumps(self.engines()),
            ),
            health=grpc_health_check(f"127.0.0.1:{p.inference}"),
            log_path=logs / "inference.log",
        )
        gateway = Supervisor(
            "gateway",
            [sys.executable, "-m", "services.gateway.server"],
            cwd=REPO,
            env=self._service_env(
                SERVEMESH_GATEWAY_PORT=str(p.gateway),
                SERVEMESH_GATEWAY_METRICS_PORT=str(p.gateway_metrics),
                SERVEMESH_GATEWAY_INFERENCE_TARGET=f"127.0.0.1:{p.inference}",
            ),
            health=grpc_health_check(f"127.0.0.1:{p.gateway}"),
            log_path=logs / "gateway.log",
        )
        for sup in (vllm, inference, gateway):
            self._log(f"starting {sup.name} ...")
            await sup.start()
            self.supervisors.append(sup)
            self._log(f"{sup.name} is healthy (pid {sup.pid})")

    async def stop(self) -> None:
        for sup in reversed(self.supervisors):
            self._log(f"stopping {sup.name}")
            await sup.stop()
        self.supervisors.clear()


async def run_up(
    home: Path,
    ports: Ports,
    vllm_args: VllmArgs,
    small_engine: bool,
    log: Callable[[str], None],
    prepare: Callable[[Path], Path],
) -> None:
    for port, what in (
        (ports.gateway, "gateway"),
        (ports.inference, "inference"),
        (ports.vllm, "vllm"),
        (ports.gateway_metrics, "gateway metrics"),
        (ports.inference_metrics, "inference metrics"),
    ):
        _check_free(port, what)
    model_dir = prepare(home / "models")
    vllm_python = await asyncio.to_thread(ensure_venv, home / "venvs" / "vllm", log)
    mesh = Mesh(home, ports, vllm_args, model_dir, small_engine, log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        starting = asyncio.create_task(mesh.start(vllm_python))
        done, _ = await asyncio.wait({starting, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()
            log(
                f"\nservemesh is up (logs in {home / 'logs'}):\n"
                f"  gateway     127.0.0.1:{ports.gateway}  (gRPC, servemesh.gateway.v1.GatewayService)\n"
                f"  inference   127.0.0.1:{ports.inference}  (gRPC, internal)\n"
                f"  vLLM        {vllm_args.url}  (OpenAI-compatible, internal)\n"
                f"  metrics     http://127.0.0.1:{ports.gateway_metrics}/metrics  "
                f"http://127.0.0.1:{ports.inference_metrics}/metrics\n"
                f'try: servemesh generate "Write a haiku about meshes"    (Ctrl-C stops everything)'
            )
            await stop.wait()
        else:
            starting.cancel()
    finally:
        await mesh.stop()
        log("stopped")
