"""Golden sets: fixed requests, each with one check its answer must pass.

A set is a YAML file (the seed sets live in mesh/evals/sets/, named by file stem):

    name: smoke                      # 1-63 of a-z, 0-9, '_', '-' (as AnalysisSpec.golden_set)
    description: what it covers, and what it leaves out
    thresholds: {golden: 0.9, safety: 0.95}   # least pass rate per category, in [0, 1]
    cases:
      - id: capital-of-france        # unique in the set
        category: golden             # golden | safety
        kind: generate               # generate (default) | rag (StreamRagAnswer; needs index)
        prompt: What is the capital of France?    # or messages: [{role: user, content: ...}]
        route_class: chat_short      # optional
        params: {max_tokens: 24, temperature: 0, seed: 1}
        contains: [Paris]            # the expectation: exactly one of the keys below
        ignore_case: true

Expectations:
  - `sha256`: the sha256 (hex) of the exact output text, or `reference`: equal to the output of
    the same case in a reference run (canary against stable). Needs `params.temperature: 0`.
  - `contains`: strings that must all appear in the output (`ignore_case: true` to fold case).
  - `cites`: passage numbers a RAG answer (kind rag) must cite, per the gateway's `citations`.
  - `refuses: true`: the answer must be the gateway's safety refusal. The gateway names the
    engine `safety` on a refused request (services/gateway/core.py Safety.ENGINE); the refusal
    text itself is configurable, so it is not what is checked.
  - `metrics`: Prometheus metric names that must have samples at the target's metrics URL
    (read after the set's requests ran). A counter may be named with or without `_total`.

Optional per case: `targets` (gateway, inference: the target kinds the case applies to;
default both), `skip_on` (gRPC status names meaning "not available on this target": the case
is skipped, not failed; default FAILED_PRECONDITION and UNIMPLEMENTED for rag cases, none
otherwise), `index` and `top_k` (rag cases), `description`.

Loading never half-works: `parse_set` / `load_set` raise GoldenSetError listing every problem,
each naming the case (by id and position) and the field.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: where the named sets live (`load_set("smoke")` reads sets/smoke.yaml)
SETS_DIR = Path(__file__).parent / "sets"
#: `sha256: reference`: compare with the reference run's output of the same case
REFERENCE = "reference"
#: the engine the gateway names in its response to a request its safety policy refused
SAFETY_ENGINE = "safety"
EXPECTATIONS = ("sha256", "contains", "cites", "refuses", "metrics")
#: status codes of a target that lacks what a RAG case needs (RAG off, no such RPC)
RAG_SKIP_ON = ("FAILED_PRECONDITION", "UNIMPLEMENTED")

_STATUS_NAMES = frozenset(
    {
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_ROUTE_CLASS = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class GoldenSetError(ValueError):
    """A golden set that cannot be loaded; `problems` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        listed = problems[0] if len(problems) == 1 else "\n  " + "\n  ".join(problems)
        super().__init__(f"{source}: {listed}")


class Category(StrEnum):
    GOLDEN = "golden"
    SAFETY = "safety"


class RequestKind(StrEnum):
    #: GatewayService.StreamGenerate / InferenceService.StreamGenerate
    GENERATE = "generate"
    #: GatewayService.StreamRagAnswer
    RAG = "rag"


class TargetKind(StrEnum):
    GATEWAY = "gateway"
    INFERENCE = "inference"


class Decoding(BaseModel):
    """Decoding parameters of a case; unset ones take the target's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=32768)


class GoldenCase(BaseModel):
    """One request and the check its answer must pass (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    category: Category
    kind: RequestKind = RequestKind.GENERATE
    description: str = ""
    prompt: str | None = Field(None, min_length=1, max_length=32768)
    messages: tuple[ChatMessage, ...] | None = Field(None, min_length=1, max_length=64)
    route_class: str = ""
    params: Decoding = Field(default_factory=Decoding)
    #: rag: the index of the caller's tenant to answer from
    index: str | None = Field(None, pattern=r"^[a-z][a-z0-9-]{0,62}$")
    #: rag: passages given to the model, in [1, 20]
    top_k: int | None = Field(None, ge=1, le=20)
    targets: tuple[TargetKind, ...] = Field((TargetKind.GATEWAY, TargetKind.INFERENCE), min_length=1)
    skip_on: tuple[str, ...] | None = None
    sha256: str | None = None
    contains: tuple[str, ...] | None = Field(None, min_length=1)
    ignore_case: bool = False
    cites: tuple[int, ...] | None = Field(None, min_length=1)
    refuses: bool | None = None
    metrics: tuple[str, ...] | None = Field(None, min_length=1)

    @field_validator("route_class")
    @classmethod
    def _route_class(cls, value: str) -> str:
        if value and not _ROUTE_CLASS.match(value):
            raise ValueError("1-63 characters of a-z, 0-9, '_' and '-', starting with a letter")
        return value

    @field_validator("skip_on")
    @classmethod
    def _codes(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            bad = [c for c in value if c not in _STATUS_NAMES]
            if bad:
                raise ValueError(f"{bad} are not gRPC status names (e.g. FAILED_PRECONDITION, UNIMPLEMENTED)")
        return value

    @field_validator("contains")
    @classmethod
    def _needles(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and any(not s for s in value):
            raise ValueError("strings must not be empty")
        return value

    @field_validator("cites")
    @classmethod
    def _numbers(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and any(n < 1 for n in value):
            raise ValueError("passage numbers start at 1")
        return value

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            bad = [n for n in value if not _METRIC_NAME.match(n)]
            if bad:
                raise ValueError(f"{bad} are not Prometheus metric names")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> GoldenCase:
        given = [name for name in EXPECTATIONS if getattr(self, name) is not None]
        if len(given) != 1:
            which = f"got {', '.join(given)}" if given else "got none"
            raise ValueError(f"a case has exactly one expectation among {', '.join(EXPECTATIONS)} ({which})")
        if self.ignore_case and self.contains is None:
            raise ValueError("ignore_case: only applies to a contains expectation")
        if self.refuses is False:
            raise ValueError("refuses: only `true` is an expectation (drop the key otherwise)")
        if self.sha256 is not None and self.sha256 != REFERENCE and not _HEX64.match(self.sha256):
            raise ValueError(f"sha256: a lowercase hex digest of 64 characters or {REFERENCE!r}")
        if self.sha256 is not None and self.params.temperature != 0:
            raise ValueError("sha256: an exact output needs params.temperature: 0 (greedy decoding)")
        if self.metrics is not None:
            extra = [f for f in ("prompt", "messages", "index", "top_k", "skip_on") if getattr(self, f) is not None]
            extra += ["route_class"] if self.route_class else []
            extra += ["params"] if self.params != Decoding() else []
            extra += ["kind"] if self.kind is not RequestKind.GENERATE else []
            if extra:
                raise ValueError(f"{', '.join(extra)}: a metrics case sends no request")
            return self
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt, messages: exactly one must be set")
        if self.cites is not None and self.kind is not RequestKind.RAG:
            raise ValueError("cites: only a rag case (kind: rag) has citations")
        if self.kind is RequestKind.RAG:
            if self.messages is not None:
                raise ValueError("messages: a rag case asks one question; use prompt")
            if self.prompt is not None and len(self.prompt) > 2048:
                raise ValueError("prompt: a rag question is at most 2048 characters")
            if self.index is None:
                raise ValueError("index: required for a rag case")
        else:
            extra = [f for f in ("index", "top_k") if getattr(self, f) is not None]
            if extra:
                raise ValueError(f"{', '.join(extra)}: only for rag cases (kind: rag)")
        return self

    @property
    def expectation(self) -> str:
        """Which expectation the case has: one of EXPECTATIONS."""
        return next(name for name in EXPECTATIONS if getattr(self, name) is not None)

    @property
    def skip_codes(self) -> frozenset[str]:
        """Status names that mean the target lacks what the case needs (skipped, not failed)."""
        if self.skip_on is not None:
            return frozenset(self.skip_on)
        return frozenset(RAG_SKIP_ON) if self.kind is RequestKind.RAG else frozenset()

    @property
    def sends_request(self) -> bool:
        return self.metrics is None


class GoldenSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    description: str = ""
    thresholds: dict[Category, float]
    cases: tuple[GoldenCase, ...]

    @field_validator("thresholds")
    @classmethod
    def _rates(cls, value: dict[Category, float]) -> dict[Category, float]:
        bad = {str(k): v for k, v in value.items() if not 0 <= v <= 1}
        if bad:
            raise ValueError(f"pass rates are in [0, 1]: {bad}")
        return value

    @model_validator(mode="after")
    def _ids_and_thresholds(self) -> GoldenSet:
        if not self.cases:
            raise ValueError("cases: a set has at least one case")
        seen: set[str] = set()
        dupes = [c.id for c in self.cases if c.id in seen or seen.add(c.id)]  # type: ignore[func-returns-value]
        if dupes:
            raise ValueError(f"cases: duplicate ids {sorted(set(dupes))}")
        missing = sorted({c.category.value for c in self.cases} - {k.value for k in self.thresholds})
        if missing:
            raise ValueError(f"thresholds: no threshold for categories {missing} that cases use")
        return self

    def case(self, case_id: str) -> GoldenCase | None:
        return next((c for c in self.cases if c.id == case_id), None)


# --- loading --------------------------------------------------------------------------------


def available_sets() -> list[str]:
    """Names of the sets in SETS_DIR."""
    return sorted(p.stem for p in SETS_DIR.glob("*.yaml"))


def load_set(name_or_path: str | Path) -> GoldenSet:
    """A set by name (mesh/evals/sets/<name>.yaml) or from a YAML file path."""
    text = str(name_or_path)
    path = Path(name_or_path)
    if isinstance(name_or_path, str) and "/" not in text and not text.endswith((".yaml", ".yml")):
        path = SETS_DIR / f"{text}.yaml"
        if not path.is_file():
            raise GoldenSetError(text, [f"no golden set by that name (known: {', '.join(available_sets()) or 'none'})"])
    try:
        content = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GoldenSetError(str(path), [f"cannot read it ({exc.strerror or exc})"]) from None
    return parse_set(content, str(path))


def parse_set(text: str, source: str = "<golden set>") -> GoldenSet:
    """Parse and validate a set's YAML; GoldenSetError names each bad case and field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise GoldenSetError(source, [f"not valid YAML{where}: {problem}"]) from None
    if not isinstance(data, dict):
        raise GoldenSetError(source, ["expected a mapping with name, thresholds and cases at the top level"])
    try:
        return GoldenSet.model_validate(data)
    except ValidationError as exc:
        raise GoldenSetError(source, _problems(exc, data)) from None


def _problems(exc: ValidationError, data: dict[str, Any]) -> list[str]:
    raw_cases = data.get("cases") if isinstance(data.get("cases"), list) else []
    out: list[str] = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        where = ""
        if len(loc) >= 2 and loc[0] == "cases" and isinstance(loc[1], int):
            i = loc[1]
            raw = raw_cases[i] if i < len(raw_cases) else None
            case_id = raw.get("id") if isinstance(raw, dict) else None
            where = f"case {case_id!r} (cases[{i}])" if case_id is not None else f"cases[{i}] (no id)"
            loc = loc[2:]
        field = ".".join(str(p) for p in loc if not (isinstance(p, str) and p.startswith(("function-", "tagged-"))))
        if err["type"] == "extra_forbidden":
            if where and len(loc) == 1:
                message = f"unknown field (an expectation is one of {', '.join(EXPECTATIONS)})"
            else:
                message = "unknown field"
        if err["type"] == "missing":
            message = "required"
        label = ": ".join(part for part in (where, f"field {field!r}" if field else "") if part)
        out.append(f"{label}: {message}" if label else message)
    return out
