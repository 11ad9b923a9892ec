"""A tiny real server for the SIGTERM test: prints "PORT <n>" on stdout, serves until SIGTERM.

Usage: python sigterm_server.py <grace_period_s>
"""

from __future__ import annotations

import asyncio
import sys

from servicer import TestServicer, service_for  # this file's directory is on sys.path

from services.common.logging import configure_logging
from services.common.server import create_server
from services.common.settings import ServiceSettings


async def main(grace_period_s: float) -> None:
    configure_logging("INFO", "sigterm-test")
    server = await create_server(ServiceSettings(grace_period_s=grace_period_s), [service_for(TestServicer())])
    await server.start()
    print(f"PORT {server.port}", flush=True)
    await server.serve_until_signal()


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1])))
