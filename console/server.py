"""The console's process: `python -m console.server` (started by `servemesh up`).

Builds the pages (console.pages) over one sampler and one backend, guards them against
cross-site requests (console.security), and serves them with NiceGUI on `port`.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path

from fastapi.responses import PlainTextResponse
from nicegui import app, ui

from console.auth import Authenticator
from console.backend import Backend
from console.history import Sampler
from console.pages import Console, register
from console.security import CrossSiteGuard
from console.settings import CONFIG_DIR, ConsoleSettings
from mesh.state import MeshState
from services.common.logging import configure_logging
from services.common.settings import SettingsError, load_settings

_log = logging.getLogger(__name__)


def session_key(path: Path) -> str:
    """The cookie-signing secret kept in `path` (0600), made on first start."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def build(settings: ConsoleSettings, backend: Backend | None = None) -> Console:
    """Register the pages, the health check and the guard on NiceGUI's app; returns what they share.

    Call ui.run (or the test's user simulation) after it.
    """
    home = settings.home
    backend = backend or Backend(lambda: MeshState.read(home))
    sampler = Sampler(backend, refresh_s=settings.refresh_s, history_s=settings.history_s)
    console = Console(
        backend,
        sampler,
        Authenticator(settings.users_path, max_failed=settings.max_failed_logins, lockout_s=settings.lockout_s),
        settings.session_ttl_s,
        settings.refresh_s,
    )
    register(console)

    @app.get("/health")
    def health() -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    app.add_middleware(CrossSiteGuard)
    app.on_startup(sampler.start)
    app.on_shutdown(sampler.stop)
    app.on_shutdown(backend.close)
    return console


def session_options(settings: ConsoleSettings) -> dict[str, object]:
    """The session cookie: SameSite=Strict (never sent on cross-site requests), gone after the TTL."""
    return {"same_site": "strict", "max_age": int(settings.session_ttl_s)}


def main() -> None:
    try:
        settings = load_settings(ConsoleSettings, config_dir=CONFIG_DIR)
    except SettingsError as exc:
        sys.exit(f"error: {exc}")
    configure_logging(settings.log_level, "console")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    build(settings)
    _log.info("console on http://%s:%d (users in %s)", settings.host, settings.port, settings.users_path)
    ui.run(
        host=settings.host,
        port=settings.port,
        title="servemesh console",
        storage_secret=session_key(settings.session_key_path),
        session_middleware_kwargs=session_options(settings),
        reload=False,
        show=False,
        show_welcome_message=False,
        uvicorn_logging_level="warning",
        favicon="🛰",
    )


if __name__ in {"__main__", "__mp_main__"}:
    main()
