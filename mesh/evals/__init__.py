"""Golden evaluations: fixed requests whose answers must pass checks, run against a gateway or
an inference deployment (canary against stable). Format: golden.py; running: runner.py."""

from mesh.evals.golden import GoldenCase, GoldenSet, GoldenSetError, available_sets, load_set, parse_set
from mesh.evals.runner import (
    CaseResult,
    CaseStatus,
    CategoryResult,
    EvalReport,
    GatewayTarget,
    InferenceTarget,
    Target,
    deployment_target,
    run_pair,
    run_set,
    with_reference,
)

__all__ = [
    "CaseResult",
    "CaseStatus",
    "CategoryResult",
    "EvalReport",
    "GatewayTarget",
    "GoldenCase",
    "GoldenSet",
    "GoldenSetError",
    "InferenceTarget",
    "Target",
    "available_sets",
    "deployment_target",
    "load_set",
    "parse_set",
    "run_pair",
    "run_set",
    "with_reference",
]
