"""The supervisor with real child processes (a tiny HTTP server stands in for vLLM)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from mesh.supervisor import Supervisor
from mesh.vllm import VllmArgs, health_check
from tests.engine_fixtures import free_port


def _http_server(port: int, tmp: Path) -> list[str]:
    # serves tmp over HTTP; a file named "health" makes /health answer 200
    (tmp / "health").write_text("ok")
    return [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_restarts_a_dead_child_with_backoff_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    sup = Supervisor(
        "web",
        _http_server(port, tmp_path),
        health=health_check(f"http://127.0.0.1:{port}"),
        log_path=tmp_path / "web.log",
        backoff_initial_s=0.2,
        start_timeout_s=20,
    )
    await sup.start()
    first = sup.pid
    assert first is not None and await health_check(f"http://127.0.0.1:{port}")()
    os.kill(first, signal.SIGKILL)
    for _ in range(200):
        if sup.restarts == 1:
            break
        await asyncio.sleep(0.05)
    assert sup.restarts == 1 and sup.pid not in (None, first)
    second = sup.pid
    await sup.stop()
    assert second is not None and not _alive(second)
    assert not await health_check(f"http://127.0.0.1:{port}")()
    assert "starting web" in (tmp_path / "web.log").read_text()


async def test_a_child_that_dies_while_starting_is_a_clear_error(tmp_path: Path) -> None:
    sup = Supervisor(
        "broken",
        [sys.executable, "-c", "raise SystemExit(3)"],
        health=health_check("http://127.0.0.1:1"),
        log_path=tmp_path / "broken.log",
        start_timeout_s=20,
    )
    with pytest.raises(RuntimeError, match="exited with code 3 while starting"):
        await sup.start()


async def test_children_die_with_the_supervising_process(tmp_path: Path) -> None:
    """No orphans: SIGKILL the process that supervises, and its child goes too."""
    pidfile = tmp_path / "child.pid"
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from mesh.supervisor import Supervisor\n"
        "async def ok(): return True\n"
        "async def main():\n"
        f"    s = Supervisor('sleeper', [sys.executable, '-c', 'import time; time.sleep(600)'], health=ok,\n"
        f"                   log_path=Path({str(tmp_path / 's.log')!r}))\n"
        "    await s.start()\n"
        f"    Path({str(pidfile)!r}).write_text(str(s.pid))\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    parent = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=Path(__file__).parents[2])
    for _ in range(200):
        if pidfile.exists() and pidfile.read_text():
            break
        await asyncio.sleep(0.05)
    child = int(pidfile.read_text())
    assert _alive(child)
    parent.kill()
    await parent.wait()
    for _ in range(100):
        if not _alive(child):
            break
        await asyncio.sleep(0.05)
    assert not _alive(child)


def test_vllm_args_are_validated_before_start() -> None:
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(1024\) must be >= max_model_len \(2048\)"):
        VllmArgs(max_model_len=2048, max_num_batched_tokens=1024)
    with pytest.raises(ValueError, match=r"max_model_len \(1024\) must be >= the largest prompt\+output budget"):
        VllmArgs(max_model_len=1024, max_num_batched_tokens=4096, largest_budget_tokens=1500)
    with pytest.raises(ValueError, match="cpu_bind"):
        VllmArgs(cpu_bind="all")
    args = VllmArgs(port=8123, max_model_len=1024, max_num_batched_tokens=2048, kv_cache_gib=3)
    argv = args.argv(Path("/venv/bin/python"), Path("/models/m"))
    assert argv[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--max-model-len") + 1] == "1024" and "--enforce-eager" in argv
    assert args.env()["VLLM_CPU_KVCACHE_SPACE"] == "3"
