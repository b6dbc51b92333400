"""Schema fuzzing with schemathesis against ``GET /openapi.json`` of the app, on a registry
seeded with real data (a base model, bricks with versions, built compositions, tokens): no
5xx, no unhandled exception, no answer outside the schema (status code, content type,
headers, body), no schema-invalid request accepted, every error a valid problem+json.

The fuzzer is ``bench/fuzz.py``, which also runs longer (``python bench/fuzz.py --examples
300 [--backend postgresql]``). Here it runs derandomized with a small budget on both
backends (PostgreSQL refuses strings SQLite stores, so some failures are its own): per
operation, schemathesis' coverage cases, one request per seeded resource and ``EXAMPLES``
Hypothesis cases. One subtest per operation lists the distinct failures of that operation,
each with its request (as curl) and the failed check or the traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.fuzz import fuzz_app

EXAMPLES = 25


@pytest.mark.slow
def test_fuzzed_requests_get_answers_that_conform_to_the_schema(
    client: Any, admin_token: str, llama_base: Path, subtests: pytest.Subtests
) -> None:
    reports = fuzz_app(client, llama_base, admin_token, examples=EXAMPLES, thorough=False)
    paths = client.get("/openapi.json").json()["paths"]
    assert {r.operation for r in reports} == {f"{m.upper()} {p}" for p, methods in paths.items() for m in methods}
    for report in reports:
        with subtests.test(msg=report.operation):
            if report.findings:
                pytest.fail(report.render(), pytrace=False)
    # The seeded data is reachable: every operation answered 2xx at least once.
    unreached = [r.operation for r in reports if not r.status_classes().get("2xx")]
    assert not unreached, f"never answered 2xx: {unreached}"
