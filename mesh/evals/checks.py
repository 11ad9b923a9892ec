"""The expectation logic: does an answer (or a metrics page) pass a case? Pure functions, no I/O."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from mesh.evals.golden import REFERENCE, SAFETY_ENGINE, GoldenCase

#: characters of output quoted in a failure's detail
EXCERPT_CHARS = 80


def sha256_text(text: str) -> str:
    """The hex sha256 of a text's UTF-8 bytes: what `sha256` expectations compare."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Answer:
    """What a target returned for one case, whichever RPC produced it."""

    text: str
    #: "STOP" or "LENGTH"; "" when the stream ended without a final message
    finish_reason: str = ""
    #: as the target names it, e.g. "engines/small"; "safety" for a gateway safety refusal
    engine: str = ""
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: served from the gateway's response cache
    cached: bool = False
    #: RAG: passage numbers the answer cites (the gateway's `citations`), in order of first use
    citations: tuple[int, ...] = ()
    #: RAG: "CITED", "NONE", "MISSING" or "INVALID"
    citation_status: str = ""
    invalid_citations: tuple[int, ...] = ()
    #: RAG: passages the model was given
    passages: int = 0

    @property
    def sha256(self) -> str:
        return sha256_text(self.text)

    @property
    def refused(self) -> bool:
        """The gateway's safety policy answered instead of an engine."""
        return self.engine.removeprefix("engines/") == SAFETY_ENGINE


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    detail: str


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` quoted on one line, cut to `limit` characters."""
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[: limit - 1] + "…")


def check_answer(case: GoldenCase, answer: Answer, reference_sha256: str | None = None) -> Verdict:
    """Judge `answer` by the case's expectation. `reference_sha256`: the reference run's output
    hash, for `sha256: reference` (the runner skips the case when there is none)."""
    refused = " (the safety policy refused it)" if answer.refused and case.refuses is None else ""
    if case.sha256 is not None:
        verdict = check_sha256(case, answer.sha256, answer.text, reference_sha256)
        return Verdict(verdict.passed, verdict.detail + ("" if verdict.passed else refused))
    if case.contains is not None:
        text = answer.text.casefold() if case.ignore_case else answer.text
        missing = [s for s in case.contains if (s.casefold() if case.ignore_case else s) not in text]
        if not missing:
            return Verdict(True, f"contains {', '.join(map(repr, case.contains))}")
        return Verdict(False, f"missing {', '.join(map(repr, missing))} in {excerpt(answer.text)}{refused}")
    if case.cites is not None:
        cited = set(answer.citations)
        missing_numbers = [n for n in case.cites if n not in cited]
        status = answer.citation_status or "no citation status"
        found = ", ".join(f"[{n}]" for n in answer.citations) or "nothing"
        invalid = f", invalid {list(answer.invalid_citations)}" if answer.invalid_citations else ""
        if not missing_numbers:
            return Verdict(True, f"cites {found} ({status})")
        return Verdict(
            False,
            f"does not cite {', '.join(f'[{n}]' for n in missing_numbers)}: cites {found} ({status}{invalid}, "
            f"{answer.passages} passages); answer {excerpt(answer.text)}{refused}",
        )
    if case.refuses:
        if answer.refused:
            return Verdict(True, "refused by the safety policy")
        by = answer.engine or "an engine"
        return Verdict(False, f"answered by {by} instead of the safety refusal: {excerpt(answer.text)}")
    raise ValueError(f"case {case.id!r}: a {case.expectation} expectation is not judged on an answer")


def check_sha256(case: GoldenCase, output_sha256: str, output: str, reference_sha256: str | None = None) -> Verdict:
    """A `sha256` expectation: the output's hash against the case's digest, or against the
    reference run's hash for `sha256: reference`. `output` is only quoted in the detail."""
    assert case.sha256 is not None
    expected = reference_sha256 if case.sha256 == REFERENCE else case.sha256
    if expected is None:
        raise ValueError(f"case {case.id!r}: sha256 {REFERENCE} needs the reference run's output hash")
    if output_sha256 == expected:
        return Verdict(True, f"sha256 {output_sha256[:12]} as expected")
    against = "the reference run's" if case.sha256 == REFERENCE else "expected"
    return Verdict(False, f"sha256 {output_sha256[:12]} != {against} {expected[:12]}; output {excerpt(output)}")


def check_metrics(names: tuple[str, ...], exposition: str) -> Verdict:
    """Every name has at least one sample in a Prometheus text exposition. A name matches a
    sample's name or its family's (so a counter counts with or without `_total`, a histogram
    by its base name); a family declared without samples (a labelled metric never recorded)
    does not count."""
    samples: set[str] = set()
    declared: set[str] = set()
    try:
        for family in text_string_to_metric_families(exposition):
            declared.add(family.name)
            if family.samples:
                samples.add(family.name)
                samples.update(s.name for s in family.samples)
    except (ValueError, TypeError) as exc:
        return Verdict(False, f"the metrics page is not Prometheus text ({exc})")

    def base(name: str) -> str:
        return name.removesuffix("_total")

    missing = [n for n in names if n not in samples and base(n) not in samples]
    if not missing:
        return Verdict(True, f"{len(names)} metric(s) present")
    unrecorded = [n for n in missing if n in declared or base(n) in declared]
    absent = [n for n in missing if n not in unrecorded]
    parts = []
    if absent:
        parts.append(f"absent: {', '.join(absent)}")
    if unrecorded:
        parts.append(f"declared but never recorded: {', '.join(unrecorded)}")
    return Verdict(False, "; ".join(parts))
