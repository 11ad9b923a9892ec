"""Follows the registry's WatchRoutes stream and feeds every new routing state to the cache.

While the registry is unreachable the cache keeps the last state, so Envoys keep their
configuration; the follower reconnects with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from servemesh.registry.v1 import registry_pb2, registry_pb2_grpc

from mesh.xds.snapshot import SnapshotCache

_log = logging.getLogger(__name__)


async def follow_registry(
    channel: Callable[[], grpc.aio.Channel],
    cache: SnapshotCache,
    *,
    initial_backoff: float = 0.2,
    max_backoff: float = 5.0,
) -> None:
    """Run until cancelled. `channel` makes a fresh channel for each connection attempt."""
    backoff = initial_backoff
    while True:
        chan: grpc.aio.Channel | None = None
        try:
            chan = channel()
            stub = registry_pb2_grpc.RegistryServiceStub(chan)
            async for state in stub.WatchRoutes(registry_pb2.WatchRoutesRequest()):
                backoff = initial_backoff
                if state.revision != cache.revision or not cache.ready:
                    _log.info("registry revision %d: %d routes", state.revision, len(state.routes))
                    await cache.set_state(state, state.revision)
            _log.warning("registry ended the route watch; reconnecting")
        except grpc.aio.AioRpcError as exc:
            _log.warning("registry watch failed (%s: %s); retrying in %.1fs", exc.code().name, exc.details(), backoff)
        except Exception:  # e.g. certificates mid-rotation: never let the follower die
            _log.exception("registry watch failed; retrying in %.1fs", backoff)
        finally:
            if chan is not None:
                await chan.close()
        await asyncio.sleep(backoff)
        backoff = min(max_backoff, backoff * 2)
