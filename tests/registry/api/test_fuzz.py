"""Schema fuzzing with schemathesis against ``GET /openapi.json`` of the app, seeded with
real data: no 5xx, no unhandled exception, no response outside the schema (status, content
type, headers, body), no schema-invalid request accepted, every error a valid problem+json.

The fuzzer lives in ``bench/fuzz.py`` (which runs it longer: ``python bench/fuzz.py
--examples 300``); here it runs with a small, derandomized budget: schemathesis' coverage
cases, one request per seeded resource and ``EXAMPLES`` Hypothesis cases per operation.
SQLite only: the database code is shared with PostgreSQL, which the other API tests cover,
and ``python bench/fuzz.py --backend postgresql`` fuzzes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.fuzz import fuzz_app

EXAMPLES = 25


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"])
def test_fuzzed_requests_get_answers_that_conform_to_the_schema(
    client: Any, admin_token: str, llama_base: Path, subtests: pytest.Subtests
) -> None:
    reports = fuzz_app(client, llama_base, admin_token, examples=EXAMPLES)
    assert len(reports) == len(client.get("/openapi.json").json()["paths"]) + 4  # 4 paths have 2 or 3 methods
    for report in reports:
        with subtests.test(msg=report.operation):
            assert not report.findings, report.render()
    # The seeded data is reachable: every operation answered 2xx at least once.
    unreached = [r.operation for r in reports if not r.status_classes().get("2xx")]
    assert not unreached, f"never answered 2xx: {unreached}"
