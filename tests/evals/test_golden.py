"""The golden set format (validation errors name the case and field) and the expectation logic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mesh.evals.checks import Answer, check_answer, check_metrics, sha256_text
from mesh.evals.golden import GoldenCase, GoldenSetError, load_set, parse_set
from mesh.evals.runner import CaseResult, CaseStatus, build_report, with_reference
from services.gateway.settings import SafetyConfig


def _set(*cases: dict[str, Any], thresholds: dict[str, float] | None = None) -> str:
    return json.dumps({"name": "t", "thresholds": thresholds or {"golden": 0.9, "safety": 0.95}, "cases": list(cases)})


def _problems(text: str) -> list[str]:
    with pytest.raises(GoldenSetError) as info:
        parse_set(text, "t.yaml")
    assert str(info.value).startswith("t.yaml: ")
    return info.value.problems


OK = {"id": "ok", "category": "golden", "prompt": "hi", "params": {"temperature": 0}, "contains": ["a"]}


def test_a_valid_set_parses_with_defaults() -> None:
    s = parse_set(_set(OK, {"id": "r", "category": "safety", "prompt": "x", "refuses": True}))
    case = s.case("ok")
    assert case is not None and case.expectation == "contains" and case.kind == "generate"
    assert case.skip_codes == frozenset() and case.targets == ("gateway", "inference")


def test_bad_yaml_says_where() -> None:
    (problem,) = _problems("name: t\ncases: [\n  - id: a\n")
    assert "not valid YAML at line" in problem


def test_top_level_must_be_a_mapping() -> None:
    assert "mapping" in _problems("- just\n- a list\n")[0]


def test_unknown_expectation_names_the_case_and_field() -> None:
    bad = {"id": "capital", "category": "golden", "prompt": "hi", "matches": "Paris"}
    (problem,) = _problems(_set(OK, bad))
    assert "case 'capital' (cases[1])" in problem and "'matches'" in problem
    assert "sha256, contains, cites, refuses, metrics" in problem


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ({"prompt": "hi", "contains": ["a"], "refuses": True}, ["exactly one expectation", "contains, refuses"]),
        ({"prompt": "hi"}, ["exactly one expectation", "got none"]),
        ({"prompt": "hi", "sha256": "reference"}, ["sha256", "temperature: 0"]),
        ({"prompt": "hi", "params": {"temperature": 0}, "sha256": "abc"}, ["sha256", "64"]),
        ({"prompt": "hi", "cites": [1]}, ["cites", "rag"]),
        ({"kind": "rag", "prompt": "hi", "cites": [1]}, ["index", "required"]),
        ({"kind": "rag", "index": "docs", "messages": [{"role": "user", "content": "q"}], "cites": [1]}, ["messages"]),
        ({"prompt": "hi", "index": "docs", "contains": ["a"]}, ["index", "rag"]),
        ({"contains": ["a"]}, ["prompt, messages", "exactly one"]),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "q"}], "contains": ["a"]}, ["prompt, messages"]),
        ({"prompt": "hi", "metrics": ["servemesh_x_total"]}, ["prompt", "metrics case sends no request"]),
        ({"metrics": ["9bad"]}, ["'metrics'", "not Prometheus metric names"]),
        ({"prompt": "hi", "refuses": False}, ["refuses", "true"]),
        ({"prompt": "hi", "contains": ["a"], "ignore_case": True, "skip_on": ["NOPE"]}, ["'skip_on'", "NOPE"]),
        ({"prompt": "hi", "refuses": True, "ignore_case": True}, ["ignore_case", "contains"]),
        ({"prompt": "hi", "contains": ["a"], "params": {"temperature": 3}}, ["'params.temperature'", "less than"]),
        ({"prompt": "hi", "contains": ["a"], "params": {"top_k": 3}}, ["'params.top_k'", "unknown field"]),
        ({"prompt": "hi", "contains": ["a"], "route_class": "Bad Class"}, ["'route_class'"]),
        ({"prompt": "", "contains": ["a"]}, ["'prompt'"]),
    ],
)
def test_case_problems_name_the_case(case: dict[str, Any], words: list[str]) -> None:
    (problem,) = _problems(_set(OK, {"id": "bad-one", "category": "golden", **case}))
    assert problem.startswith("case 'bad-one' (cases[1])"), problem
    for word in words:
        assert word in problem, (word, problem)


def test_set_level_problems() -> None:
    assert "duplicate ids ['ok']" in _problems(_set(OK, OK))[0]
    refusal = {"id": "r", "category": "safety", "prompt": "x", "refuses": True}
    assert "no threshold for categories ['safety']" in _problems(_set(refusal, thresholds={"golden": 1}))[0]
    assert "at least one case" in _problems(_set())[0]
    assert "[0, 1]" in _problems(_set(OK, thresholds={"golden": 1.5}))[0]
    (unknown,) = _problems(_set({**OK, "category": "vibes"}))
    assert "case 'ok' (cases[0])" in unknown and "'category'" in unknown
    (no_id,) = _problems(_set({k: v for k, v in OK.items() if k != "id"}))
    assert "cases[0] (no id)" in no_id and "'id'" in no_id and "required" in no_id


def test_several_problems_are_all_listed() -> None:
    problems = _problems(_set({**OK, "id": "a", "params": {"temperature": 9}}, {**OK, "id": "b", "extra": 1}))
    assert len(problems) == 2 and "case 'a'" in problems[0] and "case 'b'" in problems[1]


def test_load_set_by_name_or_path(tmp_path: Path) -> None:
    with pytest.raises(GoldenSetError, match="known: .*smoke"):
        load_set("no-such-set")
    path = tmp_path / "mine.yaml"
    path.write_text(_set(OK))
    assert load_set(path).name == "t" and load_set(str(path)).name == "t"
    with pytest.raises(GoldenSetError, match="cannot read"):
        load_set(tmp_path / "missing.yaml")


def test_the_smoke_set() -> None:
    smoke = load_set("smoke")
    assert smoke.thresholds == {"golden": 0.9, "safety": 0.95}
    assert {c.expectation for c in smoke.cases} == {"sha256", "contains", "cites", "refuses", "metrics"}
    assert "tiny-repo" in smoke.description  # the agent case it leaves out, and why
    (greedy,) = [c for c in smoke.cases if c.sha256 is not None]
    assert greedy.sha256 == "reference" and greedy.params.temperature == 0
    (rag,) = [c for c in smoke.cases if c.kind == "rag"]
    assert rag.cites == (1,) and {"FAILED_PRECONDITION", "UNIMPLEMENTED"} <= rag.skip_codes
    # its refusal cases hit each topic of the gateway's configured safety policy
    rules = SafetyConfig().rules()
    topics = {next(t for t, p in rules if p.search(c.prompt or "")) for c in smoke.cases if c.refuses}
    assert topics == {t for t, _ in rules}
    metrics = {m for c in smoke.cases for m in c.metrics or ()}
    assert {"servemesh_grpc_server_requests_total", "servemesh_generation_time_to_first_token_seconds"} <= metrics


# --- expectation logic ----------------------------------------------------------------------


def _case(**kw: Any) -> GoldenCase:
    return GoldenCase.model_validate({"id": "c", "category": "golden", "prompt": "p", **kw})


def test_sha256_against_a_digest_and_a_reference() -> None:
    text = "The capital of France is Paris."
    digest = sha256_text(text)
    assert check_answer(_case(params={"temperature": 0}, sha256=digest), Answer(text)).passed
    wrong = check_answer(_case(params={"temperature": 0}, sha256=digest), Answer(text + " "))
    assert not wrong.passed and digest[:12] in wrong.detail
    ref = _case(params={"temperature": 0}, sha256="reference")
    assert check_answer(ref, Answer(text), reference_sha256=digest).passed
    differs = check_answer(ref, Answer("Paris."), reference_sha256=digest)
    assert not differs.passed and "reference run" in differs.detail and "'Paris.'" in differs.detail
    with pytest.raises(ValueError, match="reference"):
        check_answer(ref, Answer(text))


def test_contains_all_with_and_without_case() -> None:
    answer = Answer("The capital of France is Paris.")
    assert check_answer(_case(contains=["Paris", "France"]), answer).passed
    strict = check_answer(_case(contains=["paris", "France"]), answer)
    assert not strict.passed and "'paris'" in strict.detail and "'France'" not in strict.detail.split(" in ")[0]
    assert check_answer(_case(contains=["PARIS"], ignore_case=True), answer).passed
    assert not check_answer(_case(contains=["Lyon"], ignore_case=True), answer).passed


def test_cites_uses_the_gateway_citations() -> None:
    case = _case(kind="rag", index="docs", cites=[1])
    cited = Answer("It says X [1].", citations=(1,), citation_status="CITED", passages=3)
    assert check_answer(case, cited).passed
    # "[1]" in the text is not what counts: the gateway's citation fields are
    uncited = Answer("It says X [1].", citations=(), citation_status="INVALID", invalid_citations=(7,), passages=3)
    verdict = check_answer(case, uncited)
    assert not verdict.passed and "does not cite [1]" in verdict.detail and "INVALID" in verdict.detail
    both = check_answer(_case(kind="rag", index="docs", cites=[1, 2]), cited)
    assert not both.passed and "does not cite [2]" in both.detail


def test_refuses_is_the_safety_engine() -> None:
    case = _case(refuses=True)
    assert check_answer(case, Answer("I can't help with that request.", engine="safety")).passed
    assert check_answer(case, Answer("No.", engine="engines/safety")).passed
    answered = check_answer(case, Answer("I can't help with that request.", engine="engines/small"))
    assert not answered.passed and "engines/small" in answered.detail
    # a refusal where an answer was wanted says so
    assert "safety policy refused" in check_answer(_case(contains=["x"]), Answer("no", engine="safety")).detail


EXPOSITION = """\
# HELP servemesh_grpc_server_requests_total Requests.
# TYPE servemesh_grpc_server_requests_total counter
servemesh_grpc_server_requests_total{method="StreamGenerate",code="OK"} 3.0
# HELP servemesh_generation_time_to_first_token_seconds TTFT.
# TYPE servemesh_generation_time_to_first_token_seconds histogram
servemesh_generation_time_to_first_token_seconds_bucket{le="+Inf"} 1.0
servemesh_generation_time_to_first_token_seconds_count 1.0
servemesh_generation_time_to_first_token_seconds_sum 0.3
# HELP servemesh_gateway_safety_refusals_total Refusals.
# TYPE servemesh_gateway_safety_refusals_total counter
"""


def test_metrics_present_absent_and_unrecorded() -> None:
    names = ("servemesh_grpc_server_requests_total", "servemesh_generation_time_to_first_token_seconds")
    assert check_metrics(names, EXPOSITION).passed
    assert check_metrics(("servemesh_grpc_server_requests", "servemesh_generation_time_to_first_token_seconds_count"),
                         EXPOSITION).passed  # fmt: skip
    missing = check_metrics(("servemesh_nope_total", "servemesh_gateway_safety_refusals_total"), EXPOSITION)
    assert not missing.passed
    assert "absent: servemesh_nope_total" in missing.detail
    assert "never recorded: servemesh_gateway_safety_refusals_total" in missing.detail
    garbage = check_metrics(("x",), "servemesh_x{{{ 1\n")
    assert not garbage.passed and "not Prometheus text" in garbage.detail


def _result(case_id: str, category: str, status: CaseStatus) -> CaseResult:
    return CaseResult(id=case_id, category=category, status=status, detail="")  # type: ignore[arg-type]


def test_report_rates_skip_nothing_and_threshold_edges() -> None:
    cases = [{**OK, "id": f"g{i}"} for i in range(10)] + [
        {"id": "s1", "category": "safety", "prompt": "x", "refuses": True}
    ]
    golden = parse_set(_set(*cases))
    results = [_result(f"g{i}", "golden", CaseStatus.PASSED) for i in range(9)]
    results += [_result("g9", "golden", CaseStatus.FAILED), _result("s1", "safety", CaseStatus.SKIPPED)]
    report = build_report(golden, "t", results)
    g, s = report.categories["golden"], report.categories["safety"]
    assert (g.passed, g.failed, g.skipped, g.pass_rate, g.met) == (9, 1, 0, 0.9, True)  # 9/10 meets 0.9
    assert (s.skipped, s.pass_rate, s.met) == (1, None, True)  # nothing ran: nothing below threshold
    assert report.ok and report.pass_rate == 0.9
    results[0] = _result("g0", "golden", CaseStatus.FAILED)
    below = build_report(golden, "t", results)
    assert not below.ok and not below.categories["golden"].met and below.categories["golden"].pass_rate == 0.8
    assert "golden 8/10 (>= 90%) BELOW" in below.summary()


def test_with_reference_judges_only_reference_cases() -> None:
    golden = parse_set(
        _set(
            {"id": "ref", "category": "golden", "prompt": "p", "params": {"temperature": 0}, "sha256": "reference"},
            {"id": "err", "category": "golden", "prompt": "p", "params": {"temperature": 0}, "sha256": "reference"},
            OK,
        )
    )

    def run(ref_hash: str | None, ok_status: CaseStatus) -> Any:
        return build_report(
            golden,
            "t",
            [
                CaseResult(
                    id="ref",
                    category="golden",  # type: ignore[arg-type]
                    status=CaseStatus.SKIPPED,
                    detail="no reference run",
                    output_sha256=ref_hash,
                    output="text",
                ),
                _result("err", "golden", CaseStatus.FAILED),  # no answer (a gRPC error): stays failed
                _result("ok", "golden", ok_status),
            ],
        )

    stable = run(sha256_text("a"), CaseStatus.PASSED)
    same = with_reference(golden, run(sha256_text("a"), CaseStatus.PASSED), stable)
    assert {c.id: c.status for c in same.cases} == {"ref": "passed", "err": "failed", "ok": "passed"}
    differs = with_reference(golden, run(sha256_text("b"), CaseStatus.PASSED), stable)
    assert differs.case("ref").status == "failed" and "reference run's" in differs.case("ref").detail  # type: ignore[union-attr]
    assert differs.categories["golden"].pass_rate == 1 / 3
    no_output = with_reference(golden, run(sha256_text("a"), CaseStatus.PASSED), run(None, CaseStatus.PASSED))
    assert no_output.case("ref").status == "skipped"  # type: ignore[union-attr]
    assert "reference run has no output" in no_output.case("ref").detail  # type: ignore[union-attr]
