"""The route edits the CLI and the console share: each edits a copy, keeping the read's etag."""

from __future__ import annotations

import pytest
from servemesh.registry.v1 import registry_pb2 as rpb

from mesh.route_edits import flipped, locked_to, unlocked, weighted, with_override


def _route() -> rpb.Route:
    return rpb.Route(
        name="routes/inference",
        etag="e1",
        backends=[
            rpb.WeightedBackend(deployment="deployments/a", weight=90),
            rpb.WeightedBackend(deployment="deployments/b", weight=10),
        ],
    )


def test_flip_goes_to_the_backup_or_the_named_deployment_and_leaves_the_original_alone() -> None:
    route = _route()
    assert [(b.deployment, b.weight) for b in flipped(route).backends] == [("deployments/a", 0), ("deployments/b", 100)]
    to_c = flipped(route, "deployments/c")
    assert [(b.deployment, b.weight) for b in to_c.backends] == [
        ("deployments/a", 0),
        ("deployments/b", 0),
        ("deployments/c", 100),
    ]
    assert to_c.etag == "e1" and [b.weight for b in route.backends] == [90, 10]


def test_flip_of_a_route_with_one_backend_needs_a_target() -> None:
    route = rpb.Route(name="routes/x", backends=[rpb.WeightedBackend(deployment="deployments/a", weight=100)])
    with pytest.raises(ValueError, match="routes/x has one backend: there is no backup"):
        flipped(route)


def test_weights_lock_unlock_and_overrides() -> None:
    route = _route()
    assert [b.weight for b in weighted(route, {"deployments/a": 50, "deployments/b": 50}).backends] == [50, 50]
    locked = locked_to(route, "deployments/b")
    assert locked.locked and [(b.deployment, b.weight) for b in locked.backends] == [("deployments/b", 100)]
    assert not unlocked(locked).locked
    once = with_override(route, "x-servemesh-backend", "canary", "deployments/b")
    twice = with_override(once, "x-servemesh-backend", "canary", "deployments/a")  # same header and value: replaced
    assert [(o.value, o.deployment) for o in twice.header_overrides] == [("canary", "deployments/a")]
