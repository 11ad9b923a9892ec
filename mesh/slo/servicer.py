"""SloService: protobuf <-> the evaluator's domain objects, nothing else.

A route_class filter that is not a route class id is INVALID_ARGUMENT naming the field: the
evaluator raises it and the server interceptor maps it. Register on a server with
`slo_service_pb2_grpc.add_SloServiceServicer_to_server(SloServicer(evaluator), server)`, or
as `Service(SERVICE_NAME, SloServicer(evaluator), add_SloServiceServicer_to_server)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from servemesh.mesh.v1 import slo_service_pb2 as pb
from servemesh.mesh.v1 import slo_service_pb2_grpc as pb_grpc

from mesh.slo.config import Slo, SloKind
from mesh.slo.evaluator import SloEvaluator, SloStatus, State, WindowBurn

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SloService"].full_name

_KINDS = {
    SloKind.TTFT: pb.Slo.KIND_TTFT,
    SloKind.SERVER_ERRORS: pb.Slo.KIND_SERVER_ERRORS,
    SloKind.TIMEOUTS: pb.Slo.KIND_TIMEOUTS,
}
_STATES = {
    State.NO_DATA: pb.SloStatus.STATE_NO_DATA,
    State.OK: pb.SloStatus.STATE_OK,
    State.WARNING: pb.SloStatus.STATE_WARNING,
    State.BREACHED: pb.SloStatus.STATE_BREACHED,
}


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def slo_message(slo: Slo) -> pb.Slo:
    return pb.Slo(
        name=slo.name,
        route_class=slo.route_class,
        kind=_KINDS[slo.kind],
        objective=slo.objective,
        threshold=_duration(slo.threshold_s) if slo.threshold_s is not None else None,
        runbook=slo.runbook,
    )


def burn_message(burn: WindowBurn) -> pb.BurnRate:
    return pb.BurnRate(
        window=_duration(burn.window),
        requests=burn.requests,
        bad_fraction=burn.bad_fraction,
        burn_rate=burn.burn_rate,
        complete=burn.complete,
    )


def status_message(status: SloStatus) -> pb.SloStatus:
    return pb.SloStatus(
        slo=slo_message(status.slo),
        state=_STATES[status.state],
        value=status.value if status.value is not None else 0.0,
        burn_rates=[burn_message(b) for b in status.burn_rates],
        breach_start_time=_timestamp(status.breach_start) if status.breach_start is not None else None,
    )


class SloServicer(pb_grpc.SloServiceServicer):
    """`clock`: seconds since the epoch, the `now` statuses are judged at."""

    def __init__(self, evaluator: SloEvaluator, *, clock: Callable[[], float] = time.time) -> None:
        self._evaluator = evaluator
        self._clock = clock

    async def ListSloStatuses(
        self, request: pb.ListSloStatusesRequest, context_: grpc.aio.ServicerContext
    ) -> pb.ListSloStatusesResponse:
        statuses = self._evaluator.statuses(self._clock(), route_class=request.route_class)
        scraped = self._evaluator.last_scrape_time
        return pb.ListSloStatusesResponse(
            statuses=[status_message(s) for s in statuses],
            scrape_time=_timestamp(scraped) if scraped is not None else None,
        )
