"""Supervise a child process the way an orchestrator would: start it, wait until it is
healthy, restart it with exponential backoff when it dies, stop it cleanly.

Children run in their own session (so stopping takes their helpers with them) and get
SIGKILL from the kernel if the supervising process dies (PR_SET_PDEATHSIG, set by
util-linux's `setpriv` just before it execs the child), so `servemesh up` never leaves
orphans, even when it is killed itself. No Python runs between fork and exec: gRPC's
fork handlers kill such children now and then in a process that uses gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_DIE_WITH_PARENT = ("setpriv", "--pdeathsig", "KILL", "--")


HealthCheck = Callable[[], Awaitable[bool]]


class Supervisor:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        health: HealthCheck,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        start_timeout_s: float = 180.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        stop_timeout_s: float = 15.0,
    ) -> None:
        self.name = name
        self._argv = list(argv)
        self._health = health
        self._log_path = log_path
        self._env = dict(env) if env is not None else None
        self._cwd = cwd
        self._start_timeout = start_timeout_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._stop_timeout = stop_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0
        self._healthy = asyncio.Event()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    async def start(self) -> None:
        """Start the child and wait until it is healthy (raise if it is not in time)."""
        await self._spawn()
        await self._wait_healthy()
        self._healthy.set()
        self._watch = asyncio.create_task(self._watch_forever(), name=f"supervise-{self.name}")

    async def wait_healthy(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._healthy.wait(), timeout)

    async def _spawn(self) -> None:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {self.name}\n".encode())
            out.flush()
            self._proc = await asyncio.create_subprocess_exec(
                *_DIE_WITH_PARENT,
                *self._argv,
                stdout=out,
                stderr=out,
                stdin=asyncio.subprocess.DEVNULL,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
            )
        log.info("started %s (pid %s)", self.name, self._proc.pid)

    async def _wait_healthy(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self._proc.returncode} while starting; see {self._log_path}"
                )
            if await self._health():
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"{self.name} was not healthy within {self._start_timeout:.0f} s; see {self._log_path}")

    async def _watch_forever(self) -> None:
        delay = self._backoff[0]
        while not self._stopping:
            assert self._proc is not None
            started = time.monotonic()
            code = await self._proc.wait()
            if self._stopping:
                return
            self._healthy.clear()
            if time.monotonic() - started > 60:
                delay = self._backoff[0]  # it ran fine for a while: start the backoff over
            log.warning("%s exited with code %s; restarting in %.1f s", self.name, code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff[1])
            if self._stopping:
                return
            try:
                await self._spawn()
                await self._wait_healthy()
                self.restarts += 1  # counted before anyone waiting for health wakes up
                self._healthy.set()
                log.info("%s is healthy again (restart %d)", self.name, self.restarts)
            except (RuntimeError, TimeoutError) as exc:
                log.error("%s", exc)
                await self._kill_group(signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM the child's process group, wait, then SIGKILL whatever is left."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._proc is None or self._proc.returncode is not None:
            return
        await self._kill_group(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), self._stop_timeout)
        except TimeoutError:
            log.warning("%s did not stop within %.0f s; killing it", self.name, self._stop_timeout)
            await self._kill_group(signal.SIGKILL)
            await self._proc.wait()
        # helpers the child left behind in its group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    async def _kill_group(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)
