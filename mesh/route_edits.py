"""Changes to a route, as the CLI and the console make them: pure functions that edit a copy of
the route as it was read, so the write that follows carries that read's etag."""

from __future__ import annotations

from servemesh.registry.v1 import registry_pb2 as rpb


def flipped(route: rpb.Route, to: str = "") -> rpb.Route:
    """All traffic to `to`, or by default to the backup: the backend taking the second most now."""
    r = rpb.Route()
    r.CopyFrom(route)
    target = to
    if not target:
        ranked = sorted(r.backends, key=lambda b: b.weight, reverse=True)
        if len(ranked) < 2:
            raise ValueError(f"{r.name} has one backend: there is no backup to flip to; name the deployment")
        target = ranked[1].deployment
    names = [b.deployment for b in r.backends]
    if target not in names:
        names.append(target)
    del r.backends[:]
    r.backends.extend(rpb.WeightedBackend(deployment=n, weight=100 if n == target else 0) for n in names)
    return r


def weighted(route: rpb.Route, weights: dict[str, int]) -> rpb.Route:
    r = rpb.Route()
    r.CopyFrom(route)
    del r.backends[:]
    r.backends.extend(rpb.WeightedBackend(deployment=d, weight=w) for d, w in weights.items())
    return r


def locked_to(route: rpb.Route, deployment: str) -> rpb.Route:
    r = rpb.Route()
    r.CopyFrom(route)
    del r.backends[:]
    r.backends.append(rpb.WeightedBackend(deployment=deployment, weight=100))
    r.locked = True
    return r


def with_override(route: rpb.Route, header: str, value: str, deployment: str) -> rpb.Route:
    """Add (or replace, for the same header and value) a header override."""
    r = rpb.Route()
    r.CopyFrom(route)
    kept = [o for o in r.header_overrides if not (o.header == header and o.value == value)]
    del r.header_overrides[:]
    r.header_overrides.extend(kept)
    r.header_overrides.append(rpb.HeaderOverride(header=header, value=value, deployment=deployment))
    return r


def unlocked(route: rpb.Route) -> rpb.Route:
    r = rpb.Route()
    r.CopyFrom(route)
    r.locked = False
    return r
