"""Every INVALID_ARGUMENT through gRPC names its field (BadRequest) and the limit; nothing is written."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry
from servemesh.registry.v1 import registry_pb2 as pb
from servemesh.registry.v1 import registry_pb2_grpc as pb_grpc

from services.common.errors import InvalidArgument
from services.common.identity import caller_identity, parse_xfcc
from services.registry.core import decode_page_token, encode_page_token
from services.registry.server import create_registry_server
from services.registry.settings import RegistrySettings
from services.registry.validation import endpoint_problem

from .builders import deployment_pb, route_pb

pytestmark = pytest.mark.timeout(30)


class Seeded:
    """A registry with deployments of two services, one route, and a page token of each list."""

    def __init__(self, stub: pb_grpc.RegistryServiceStub) -> None:
        self.stub = stub
        self.etag = ""
        self.tokens: dict[str, str] = {}

    async def fill(self) -> None:
        for dep in (deployment_pb("inf-a"), deployment_pb("inf-b"), deployment_pb("gw", "gateway")):
            await self.stub.CreateDeployment(pb.CreateDeploymentRequest(deployment=dep, reason="seed"))
        created = await self.stub.CreateRoute(
            pb.CreateRouteRequest(route=route_pb("inference", ("inf-a", 1)), reason="seed")
        )
        self.etag = created.route.etag
        self.tokens["deployments"] = (
            await self.stub.ListDeployments(pb.ListDeploymentsRequest(page_size=1))
        ).next_page_token
        self.tokens["audit"] = (
            await self.stub.ListAuditEntries(pb.ListAuditEntriesRequest(page_size=1))
        ).next_page_token


@pytest.fixture(scope="module")
async def seeded(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Seeded]:
    settings = RegistrySettings(port=0, data_dir=tmp_path_factory.mktemp("registry"))
    server, core = await create_registry_server(settings, CollectorRegistry())
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        state = Seeded(pb_grpc.RegistryServiceStub(channel))
        await state.fill()
        yield state
    await server.stop(0)
    await core.close()


def dep(**fields: Any) -> pb.CreateDeploymentRequest:
    d = deployment_pb("new")
    for key, value in fields.items():
        setattr(d, key, value)
    return pb.CreateDeploymentRequest(deployment=d, reason="test")


def new_route(edit: Callable[[pb.Route], None] | None = None, **fields: Any) -> pb.CreateRouteRequest:
    r = route_pb("chat", ("inf-b", 10), route_class="chat_short")
    for key, value in fields.items():
        setattr(r, key, value)
    if edit is not None:
        edit(r)
    return pb.CreateRouteRequest(route=r, reason="test")


def backends(*weights: tuple[str, int]) -> Callable[[pb.Route], None]:
    def edit(r: pb.Route) -> None:
        del r.backends[:]
        for name, weight in weights:
            r.backends.add(deployment=name if "/" in name else f"deployments/{name}", weight=weight)

    return edit


def overrides(*items: tuple[str, str, str]) -> Callable[[pb.Route], None]:
    def edit(r: pb.Route) -> None:
        for header, value, target in items:
            r.header_overrides.add(header=header, value=value, deployment=f"deployments/{target}")

    return edit


def mirrors(*items: tuple[str, float]) -> Callable[[pb.Route], None]:
    def edit(r: pb.Route) -> None:
        for target, percent in items:
            r.mirrors.add(deployment=f"deployments/{target}", percent=percent)

    return edit


def timeout(seconds: int, nanos: int = 0) -> Callable[[pb.Route], None]:
    def edit(r: pb.Route) -> None:
        r.timeout.seconds, r.timeout.nanos = seconds, nanos

    return edit


def update(paths: list[str], edit: Callable[[pb.Route], None] | None = None, etag: bool = True, **fields: Any):
    def request(s: Seeded) -> pb.UpdateRouteRequest:
        r = pb.Route(**{"name": "routes/inference", "etag": s.etag if etag else "", **fields})
        if edit is not None:
            edit(r)
        return pb.UpdateRouteRequest(route=r, update_mask=field_mask_pb2.FieldMask(paths=paths), reason="test")

    return request


# (rpc, request or request factory, field, words the description must contain)
CASES: list[tuple[str, Any, str, str]] = [
    ("CreateDeployment", dep(name=""), "deployment.name", "required"),
    ("CreateDeployment", dep(name="deployments/Inf_A"), "deployment.name", "1-63"),
    ("CreateDeployment", dep(name="models/inf"), "deployment.name", "deployments/{id}"),
    ("CreateDeployment", dep(name="deployments/" + "a" * 64), "deployment.name", "1-63"),
    ("CreateDeployment", dep(service=""), "deployment.service", "required"),
    ("CreateDeployment", dep(service="Inference"), "deployment.service", "a-z"),
    ("CreateDeployment", dep(version="1.0"), "deployment.version", "a-z"),
    ("CreateDeployment", dep(endpoint=""), "deployment.endpoint", "host:port"),
    ("CreateDeployment", dep(endpoint="localhost"), "deployment.endpoint", "host:port"),
    ("CreateDeployment", dep(endpoint="localhost:0"), "deployment.endpoint", "1-65535"),
    ("CreateDeployment", dep(endpoint="localhost:65536"), "deployment.endpoint", "1-65535"),
    ("CreateDeployment", dep(endpoint="bad host:80"), "deployment.endpoint", "hostname"),
    ("CreateDeployment", dep(endpoint="[::1:80"), "deployment.endpoint", "hostname"),
    ("CreateDeployment", dep(endpoint="[fe80::zz]:80"), "deployment.endpoint", "IPv6"),
    ("CreateDeployment", dep(engine="vLLM"), "deployment.engine", "1-63"),
    ("CreateDeployment", dep(model_id="small model"), "deployment.model_id", "1-256"),
    ("CreateDeployment", dep(metrics_url="ftp://h/metrics"), "deployment.metrics_url", "http(s) URL"),
    ("CreateDeployment", dep(metrics_url="http://h/" + "m" * 600), "deployment.metrics_url", "at most 512"),
    ("CreateDeployment", pb.CreateDeploymentRequest(deployment=deployment_pb("x")), "reason", "1-500"),
    ("CreateDeployment", pb.CreateDeploymentRequest(deployment=deployment_pb("x"), reason="  "), "reason", "1-500"),
    ("CreateDeployment", pb.CreateDeploymentRequest(deployment=deployment_pb("x"), reason="r" * 501), "reason", "500"),
    ("CreateRoute", new_route(name="chat"), "route.name", "routes/{id}"),
    ("CreateRoute", new_route(service=""), "route.service", "required"),
    ("CreateRoute", new_route(route_class="Chat"), "route.route_class", "a-z"),
    ("CreateRoute", new_route(backends()), "route.backends", "1-16"),
    ("CreateRoute", new_route(backends(*[(f"d{i}", 1) for i in range(17)])), "route.backends", "1-16"),
    ("CreateRoute", new_route(backends(("inf-b", -1))), "route.backends[0].weight", "[0, 10000]"),
    ("CreateRoute", new_route(backends(("inf-b", 10001))), "route.backends[0].weight", "[0, 10000]"),
    ("CreateRoute", new_route(backends(("inf-a", 0), ("inf-b", 0))), "route.backends", "not all be zero"),
    ("CreateRoute", new_route(backends(("inf-b", 1), ("inf-b", 2))), "route.backends[1].deployment", "already"),
    ("CreateRoute", new_route(backends(("inf-b", 1), ("inf/b", 2))), "route.backends[1].deployment", "deployments/"),
    ("CreateRoute", new_route(backends(("nope", 1))), "route.backends[0].deployment", "does not exist"),
    ("CreateRoute", new_route(backends(("gw", 1))), "route.backends[0].deployment", "implements 'gateway'"),
    ("CreateRoute", new_route(overrides(("X-Canary", "1", "inf-a"))), "route.header_overrides[0].header", "1-64"),
    ("CreateRoute", new_route(overrides(("x-canary", "", "inf-a"))), "route.header_overrides[0].value", "1-256"),
    ("CreateRoute", new_route(overrides(("x-c", "a\nb", "inf-a"))), "route.header_overrides[0].value", "printable"),
    (
        "CreateRoute",
        new_route(overrides(("x-c", "1", "inf-a"), ("x-c", "1", "inf-b"))),
        "route.header_overrides[1]",
        "same header",
    ),
    ("CreateRoute", new_route(overrides(("x-c", "1", "nope"))), "route.header_overrides[0].deployment", "not exist"),
    ("CreateRoute", new_route(overrides(("x-c", "1", "gw"))), "route.header_overrides[0].deployment", "gateway"),
    (
        "CreateRoute",
        new_route(overrides(*[("x-c", str(i), "inf-a") for i in range(9)])),
        "route.header_overrides",
        "at most 8",
    ),
    ("CreateRoute", new_route(mirrors(("inf-a", 0))), "route.mirrors[0].percent", "(0, 100]"),
    ("CreateRoute", new_route(mirrors(("inf-a", 101))), "route.mirrors[0].percent", "(0, 100]"),
    ("CreateRoute", new_route(mirrors(*[("inf-a", 1)] * 2)), "route.mirrors[1].deployment", "at most once"),
    ("CreateRoute", new_route(mirrors(*[(f"d{i}", 1) for i in range(5)])), "route.mirrors", "at most 4"),
    ("CreateRoute", new_route(mirrors(("inf-b", 5))), "route.mirrors[0].deployment", "positive weight"),
    ("CreateRoute", new_route(mirrors(("gw", 5))), "route.mirrors[0].deployment", "implements 'gateway'"),
    ("CreateRoute", new_route(mirrors(("nope", 5))), "route.mirrors[0].deployment", "does not exist"),
    ("CreateRoute", new_route(timeout(0)), "route.timeout", "(0, 600s]"),
    ("CreateRoute", new_route(timeout(600, 1000)), "route.timeout", "(0, 600s]"),
    ("CreateRoute", new_route(timeout(-5)), "route.timeout", "(0, 600s]"),
    ("CreateRoute", new_route(timeout(10**17)), "route.timeout", "valid duration"),
    ("CreateRoute", pb.CreateRouteRequest(route=new_route().route, reason=""), "reason", "1-500"),
    ("UpdateRoute", update(["locked"], etag=False), "route.etag", "required"),
    ("UpdateRoute", update([]), "update_mask", "backends, header_overrides, locked, timeout"),
    ("UpdateRoute", update(["weights"]), "update_mask", "unknown path 'weights'"),
    ("UpdateRoute", update(["route_class"]), "update_mask", "immutable"),
    ("UpdateRoute", update(["locked"], service="gateway"), "route.service", "immutable"),
    ("UpdateRoute", update(["locked"], route_class="code"), "route.route_class", "immutable"),
    ("UpdateRoute", update(["backends"]), "route.backends", "1-16"),
    ("UpdateRoute", update(["backends"], backends(("inf-a", 20000))), "route.backends[0].weight", "10000"),
    ("UpdateRoute", update(["backends"], backends(("gw", 1))), "route.backends[0].deployment", "gateway"),
    ("UpdateRoute", update(["timeout"], timeout(601)), "route.timeout", "600s"),
    ("UpdateRoute", update(["mirrors"], mirrors(("inf-a", 5))), "route.mirrors[0].deployment", "positive weight"),
    ("UpdateRoute", update(["mirrors"], mirrors(("inf-b", 0.0))), "route.mirrors[0].percent", "(0, 100]"),
    (
        "UpdateRoute",
        update(["header_overrides"], overrides(("x_c", "1", "inf-a"))),
        "route.header_overrides[0].header",
        "a-z",
    ),
    ("UpdateRoute", update(["locked"], name="inference"), "route.name", "routes/{id}"),
    ("DeleteRoute", pb.DeleteRouteRequest(name="routes/inference", reason="x"), "etag", "required"),
    ("DeleteRoute", pb.DeleteRouteRequest(name="inference", etag="e", reason="x"), "name", "routes/{id}"),
    ("DeleteRoute", lambda s: pb.DeleteRouteRequest(name="routes/inference", etag=s.etag), "reason", "1-500"),
    ("DeleteDeployment", pb.DeleteDeploymentRequest(name="deployments/", reason="x"), "name", "1-63"),
    ("GetRoute", pb.GetRouteRequest(name=""), "name", "required"),
    ("GetDeployment", pb.GetDeploymentRequest(name="routes/inference"), "name", "deployments/{id}"),
    ("ListDeployments", pb.ListDeploymentsRequest(page_size=501), "page_size", "[0, 500]"),
    ("ListDeployments", pb.ListDeploymentsRequest(page_size=-1), "page_size", "[0, 500]"),
    ("ListDeployments", pb.ListDeploymentsRequest(service="Inference"), "service", "a-z"),
    ("ListDeployments", pb.ListDeploymentsRequest(page_token="not a token"), "page_token", "next_page_token"),
    (
        "ListDeployments",
        lambda s: pb.ListDeploymentsRequest(service="inference", page_token=s.tokens["deployments"]),
        "page_token",
        "same filters",
    ),
    ("ListRoutes", lambda s: pb.ListRoutesRequest(page_token=s.tokens["deployments"]), "page_token", "same filters"),
    ("ListRoutes", pb.ListRoutesRequest(page_size=1000), "page_size", "[0, 500]"),
    ("ListAuditEntries", pb.ListAuditEntriesRequest(actor="a" * 257), "actor", "256"),
    ("ListAuditEntries", pb.ListAuditEntriesRequest(resource="r" * 257), "resource", "256"),
    ("ListAuditEntries", pb.ListAuditEntriesRequest(page_token="eyJrIjoxfQ"), "page_token", "next_page_token"),
    (
        "ListAuditEntries",
        lambda s: pb.ListAuditEntriesRequest(actor="x", page_token=s.tokens["audit"]),
        "page_token",
        "same filters",
    ),
]


def _case_id(case: tuple[str, Any, str, str]) -> str:
    return f"{case[0]}-{case[2]}-{case[3]}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
async def test_invalid_argument_names_the_field_and_the_limit(seeded, case):
    method, request, field, words = case
    if callable(request):
        request = request(seeded)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(seeded.stub, method)(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    status = rpc_status.from_call(err.value)
    bad = error_details_pb2.BadRequest()
    assert status is not None and any(d.Unpack(bad) for d in status.details)
    violations = {v.field: v.description for v in bad.field_violations}
    assert field in violations, violations
    assert words in violations[field], violations[field]


async def test_bad_user_header_is_invalid_and_invalid_calls_wrote_nothing(seeded):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await seeded.stub.CreateDeployment(dep(), metadata=(("x-servemesh-user", "x" * 200),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-servemesh-user" in err.value.details()
    # after every case above: still only the seed (3 deployments + 1 route), nothing else
    entries = (await seeded.stub.ListAuditEntries(pb.ListAuditEntriesRequest())).entries
    assert [e.revision for e in entries] == [4, 3, 2, 1]
    route = (await seeded.stub.GetRoute(pb.GetRouteRequest(name="routes/inference"))).route
    assert route.etag == seeded.etag


# --- the pieces, without a server -----------------------------------------------------------


def test_parse_xfcc_quoted_values_and_several_elements():
    value = 'By=spiffe://a;Hash=1;Subject="CN=x,O=\\"y\\"; z";URI=spiffe://first,By=spiffe://b;URI=spiffe://last;DNS=h'
    elements = parse_xfcc(value)
    assert [e["URI"] for e in elements] == ["spiffe://first", "spiffe://last"]
    assert elements[0]["Subject"] == 'CN=x,O="y"; z' and elements[1]["DNS"] == "h"
    assert parse_xfcc("") == []


@pytest.mark.parametrize(
    ("metadata", "trusted", "actor"),
    [
        ([("x-forwarded-client-cert", "URI=spiffe://a,URI=spiffe://b")], True, "spiffe://b"),
        (
            [("x-forwarded-client-cert", "URI=spiffe://a"), ("x-forwarded-client-cert", "URI=spiffe://b")],
            True,
            "spiffe://b",
        ),
        ([("x-forwarded-client-cert", "URI=spiffe://a")], False, "anonymous (ipv4:10.0.0.1:5)"),
        ([("x-forwarded-client-cert", "Hash=abc")], True, "anonymous (ipv4:10.0.0.1:5)"),
        ([], True, "anonymous (ipv4:10.0.0.1:5)"),
        ([("x-servemesh-user", "ana")], False, "anonymous (ipv4:10.0.0.1:5) as ana"),
        ([("x-forwarded-client-cert", "URI=spiffe://c"), ("x-servemesh-user", "ana")], True, "spiffe://c as ana"),
    ],
)
def test_caller_identity(metadata, trusted, actor):
    assert caller_identity(metadata, "ipv4:10.0.0.1:5", trust_forwarded_identity=trusted) == actor


@pytest.mark.parametrize(
    ("endpoint", "ok"),
    [
        ("127.0.0.1:8000", True),
        ("inference.default.svc:50051", True),
        ("[::1]:443", True),
        ("localhost:65535", True),
        ("-bad:80", False),
        ("a..b:80", False),
        ("host:", False),
        (":80", False),
        ("host:８０", False),
    ],
)
def test_endpoint_rules(endpoint, ok):
    assert (endpoint_problem(endpoint) is None) == ok


def test_page_tokens_are_tied_to_their_query():
    token = encode_page_token("r3", ("routes", ""))
    assert decode_page_token(token, ("routes", ""), str) == "r3"
    for query, kind in ((("routes", "inference"), str), (("routes", ""), int)):
        with pytest.raises(InvalidArgument):
            decode_page_token(token, query, kind)
    assert decode_page_token("", ("routes", ""), str) is None
