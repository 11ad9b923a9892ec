"""Deployments and routes for the registry tests, as domain objects and as protobuf."""

from __future__ import annotations

from servemesh.registry.v1 import registry_pb2 as pb

from services.registry.resources import Deployment, Route, WeightedBackend


def deployment(dep_id: str, service: str = "inference", version: str = "stable", port: int = 8000) -> Deployment:
    return Deployment(f"deployments/{dep_id}", service, version, f"127.0.0.1:{port}", "vllm", "smollm2-135m-instruct")


def route(route_id: str, *weights: tuple[str, int], service: str = "inference", route_class: str = "") -> Route:
    backends = tuple(WeightedBackend(f"deployments/{d}", w) for d, w in weights)
    return Route(f"routes/{route_id}", service, route_class, backends)


def deployment_pb(dep_id: str, service: str = "inference", version: str = "stable", port: int = 8000) -> pb.Deployment:
    return pb.Deployment(
        name=f"deployments/{dep_id}",
        service=service,
        version=version,
        endpoint=f"127.0.0.1:{port}",
        engine="vllm",
        model_id="smollm2-135m-instruct",
    )


def route_pb(route_id: str, *weights: tuple[str, int], service: str = "inference", route_class: str = "") -> pb.Route:
    return pb.Route(
        name=f"routes/{route_id}",
        service=service,
        route_class=route_class,
        backends=[pb.WeightedBackend(deployment=f"deployments/{d}", weight=w) for d, w in weights],
    )
