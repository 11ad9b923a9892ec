"""Golden evaluations in rollout analysis: each window, the rollout's golden set runs against the
canary and the stable deployment at once (mesh.evals.run_pair), straight at their endpoints, and
the window compares their pass rates. The canary's `sha256: reference` cases are judged against
what stable wrote in the same window."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
from servemesh.registry.v1 import registry_pb2 as rpb

from mesh.controller.analysis import Golden
from mesh.evals.golden import GoldenSetError, load_set
from mesh.evals.runner import CaseStatus, deployment_target, run_pair

#: endpoint, service -> a channel to that deployment (mTLS as the controller in the mesh)
ChannelFactory = Callable[[str, str], grpc.aio.Channel]


class GoldenRunner:
    def __init__(self, channel: ChannelFactory, *, api_key_file: Path | None = None, timeout_s: float = 30.0) -> None:
        self._channel = channel
        self._api_key_file = api_key_file
        self._timeout_s = timeout_s

    def _metadata(self, deployment: rpb.Deployment) -> tuple[tuple[str, str], ...]:
        if deployment.service != "gateway" or self._api_key_file is None:
            return ()
        return (("authorization", f"Bearer {self._api_key_file.read_text().strip()}"),)

    async def __call__(self, r: rpb.Rollout, canary: rpb.Deployment, stable: rpb.Deployment) -> Golden:
        try:
            golden_set = load_set(r.analysis.golden_set)
        except (GoldenSetError, FileNotFoundError, ValueError) as exc:
            return Golden(None, None, f"golden set {r.analysis.golden_set!r}: {exc}")
        async with (
            self._channel(canary.endpoint, canary.service) as cch,
            self._channel(stable.endpoint, stable.service) as sch,
        ):
            c, s = await run_pair(
                golden_set,
                deployment_target(canary, cch, metadata=self._metadata(canary)),
                deployment_target(stable, sch, metadata=self._metadata(stable)),
                concurrency=1,
                timeout_s=self._timeout_s,
            )
        failed = [case.id for case in c.cases if case.status == CaseStatus.FAILED]
        detail = f"; canary failed {', '.join(failed)}" if failed else ""
        return Golden(c.pass_rate, s.pass_rate, detail)
