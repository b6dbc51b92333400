"""Schema fuzzing: schemathesis against the OpenAPI schema the running app serves.

The app runs in-process (ASGI) on a registry seeded with real data: the tiny Llama base
model ``tiny-llama``; bricks ``sentiment`` (versions 1 and 2), ``translate`` (1) and
``doomed`` (1 and 2); two built compositions (a full model and an adapter); read, write
and revocable API tokens. Every operation of ``GET /openapi.json`` then gets, in order:

* schemathesis' coverage phase (boundary values, missing and mistyped parameters,
  undeclared methods), positive and negative: with generated path parameters, aimed at a
  seeded resource, and with a seeded prefix of the path and the rest generated;
* one explicit request per seeded resource (every known name x version x file or
  composition x file), the same with one path parameter replaced by a hostile string (NUL,
  non-ASCII, 300 characters, slashes, dots), and valid bodies (a brick upload, a base
  model, a composition, a search, a patch, a token) with one text field at a time replaced
  by a hostile string (NUL, a lone surrogate, emoji, 8000 characters, blanks);
* ``--examples`` Hypothesis cases, positive and negative, many aimed at existing resources
  (seeded names, versions, composition ids and files, merge methods and their parameters,
  paging cursors and mangled ones, corrupted adapter files, Range headers on downloads),
  sent with an admin, write or read token, no token or a broken ``Authorization`` header.

DELETE operations run last so that the seeded resources exist for everything else.
Redirects are not followed (a 307 is an answer of the operation that gave it).

Every response goes through schemathesis' default checks but ``positive_data_acceptance``:
``not_a_server_error`` (no 5xx; an exception escaping the app counts, with its traceback),
``status_code_conformance``, ``content_type_conformance``, ``response_headers_conformance``,
``response_schema_conformance``, ``negative_data_rejection`` (a schema-violating request
must get a 4xx), ``missing_required_header``, ``unsupported_method`` and
``allow_header_conformance`` (on the coverage phase's OPTIONS and undeclared-method probes);
plus ``problem_details``: every 4xx/5xx is ``application/problem+json``, valid against the
``Problem`` schema, with the response's own status (the schema attaches ``Problem`` to
``application/json`` only, so schemathesis alone never validates error bodies).
``positive_data_acceptance`` is off: the service validates more than the schema can say
(the JSON inside the multipart ``metadata`` field, the adapter files, names that must
exist), so schema-valid requests are legitimately refused with 4xx.

Failures are collected, not raised: one finding per (operation, check, kind of failure),
with the first request that showed it as a curl command (the token is filtered out; the
finding names the kind of credentials sent) and the failure, or the traceback's frames in
registry/ and composer/. ``tests/registry/api/test_fuzz.py`` runs this with a small budget
inside ``make test``; this script prints a table of operations x (requests, status classes,
failures by check) and exits with 1 if anything failed.

    python bench/fuzz.py [--examples N] [--backend sqlite|postgresql] [--operation TEXT] [--seed N] [-v]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._registry import postgres, random_adapter, scratch_home, tiny_base

BASE_URL = "http://testserver"
BASE_MODEL = "tiny-llama"
# A second registration of the same directory that nothing references: it can be removed.
SPARE_BASE_MODEL = "tiny-llama-spare"
ALIASES = ["fuzz-alias", "org/fuzz-alias"]
# name -> (description, number of versions)
BRICKS = {
    "sentiment": ("Classify the sentiment of a product review.", 2),
    "translate": ("Translate customer emails from Romanian to English.", 1),
    "doomed": ("Summarize a news article in one sentence.", 2),
}
# Credentials a request is sent with; admin most often so that most requests get past authorization.
AUTH_KINDS = ("admin", "admin", "admin", "admin", "write", "read", "none", "malformed", "unknown")
# Strings that break code rather than validation: NUL (PostgreSQL text, os.stat), non-ASCII,
# over-long file names (ENAMETOOLONG), deep paths, separators and dots.
HOSTILE = ("a\x00b", "\u00e9t\u00e9", "a" * 300, "a/" * 150, "a/../b", "%2F", " ", "..")
# The same for text fields of bodies: NUL, a lone surrogate, non-BMP, at the length limit, blank.
BODY_HOSTILE = ("a\x00b", "x\udc80", "\u00e9t\u00e9 \U0001f600", "a" * 8000, " \t\n ")
RANGES = (
    "bytes=0-9",
    "bytes=-16",
    "bytes=5-",
    "bytes=0-0,4-8",
    "bytes=10-5",
    "bytes=99999999-",
    "bytes=a-b",
    "bytes=",
    "items=0-1",
    "bytes=0-1,,2-3",
)
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "problem_details",
    "allow_header_conformance",
    "unsupported_method",
)


# -- seeding ------------------------------------------------------------------------------


@dataclass
class Seeded:
    """What the registry holds before fuzzing: the values requests are aimed at."""

    base_path: Path
    headers: dict[str, dict[str, str]]
    base_models: list[str]
    bricks: dict[str, list[int]]
    compositions: list[str]
    composition_files: list[str]
    revocable_tokens: list[str]
    methods: dict[str, dict[str, Any]]
    adapters: list[tuple[bytes, bytes]]
    cursors: list[str]
    cancelled: list[str] = field(default_factory=list)  # a cancelled composition (cancel answers 200 again)


def _ok(response: Any, *statuses: int) -> Any:
    request = response.request
    assert response.status_code in statuses, f"{request.method} {request.url}: {response.status_code} {response.text}"
    return response.json()


_CANCELLED = {"base_model": BASE_MODEL, "output": "adapter"}


def seed(client: Any, base_path: Path, admin_token: str, *, timeout_s: float = 120.0) -> Seeded:
    """Fill the registry behind ``client`` (an HTTP client sending ``admin_token``) over the API."""
    _ok(client.post("/v1/base-models", json={"name": BASE_MODEL, "path": str(base_path), "aliases": ALIASES}), 201)
    _ok(client.post("/v1/base-models", json={"name": SPARE_BASE_MODEL, "path": str(base_path)}), 201)
    adapters = [random_adapter(9000 + i) for i in range(6)]
    bricks: dict[str, list[int]] = {}
    numbered = iter(adapters)
    for name, (description, versions) in BRICKS.items():
        for _ in range(versions):
            config, weights = next(numbered)
            metadata = {
                "name": name,
                "base_model": BASE_MODEL,
                "description": description,
                "examples": [f"an example input for {name}"],
                "tags": ["fuzz", name],
            }
            files = {"adapter_config": ("adapter_config.json", config), "adapter_weights": ("w.safetensors", weights)}
            brick = _ok(client.post("/v1/bricks", data={"metadata": json.dumps(metadata)}, files=files), 201)
            bricks.setdefault(name, []).append(brick["version"])
    compositions = []
    for request in (
        {"base_model": BASE_MODEL, "bricks": [{"name": "sentiment", "weight": 0.7}, {"name": "translate"}]},
        {"base_model": BASE_MODEL, "bricks": [{"name": "doomed", "version": 1}], "output": "adapter", "rank": 2},
    ):
        compositions.append(_ok(client.post("/v1/compositions", json=request), 200, 202)["id"])
    deadline = time.monotonic() + timeout_s
    for composition_id in compositions:
        while (status := _ok(client.get(f"/v1/compositions/{composition_id}"), 200))["status"] != "ready":
            assert status["status"] != "failed" and time.monotonic() < deadline, status
            time.sleep(0.05)
    cancelled = []
    for weight in (0.5, 0.25, 0.125):  # cancelled right after the request: queued or running still
        queued = _ok(
            client.post("/v1/compositions", json={**_CANCELLED, "bricks": [{"name": "translate", "weight": weight}]}),
            200,
            202,
        )
        if client.post(f"/v1/compositions/{queued['id']}/cancel").status_code == 200:
            cancelled.append(queued["id"])
            break
    files = sorted(
        {f["path"] for c in compositions for f in _ok(client.get(f"/v1/compositions/{c}/files"), 200)},
        key=lambda p: (p.count("/"), p),
    )
    secrets = {
        scope: _ok(client.post("/v1/tokens", json={"name": f"fuzz-{scope}", "scope": scope}), 201)["token"]
        for scope in ("read", "write")
    }
    revocable = [f"fuzz-victim-{i}" for i in range(3)]
    for name in revocable:
        _ok(client.post("/v1/tokens", json={"name": name, "scope": "read"}), 201)
    methods = {m["name"]: m["params"] for m in _ok(client.get("/v1/merge-methods"), 200)}
    cursors = [
        cursor
        for url in (
            "/v1/bricks?limit=1",
            "/v1/bricks?limit=2&all_versions=true",
            "/v1/bricks/sentiment/versions?limit=1",
        )
        if (cursor := _ok(client.get(url), 200)["next_cursor"])
    ]
    return Seeded(
        base_path=base_path,
        headers={
            "admin": {"Authorization": f"Bearer {admin_token}"},
            "write": {"Authorization": f"Bearer {secrets['write']}"},
            "read": {"Authorization": f"Bearer {secrets['read']}"},
            "none": {},
            "malformed": {"Authorization": f"Token {admin_token}"},
            "unknown": {"Authorization": "Bearer by_not-a-real-token"},
        },
        base_models=[BASE_MODEL, SPARE_BASE_MODEL],
        bricks=bricks,
        compositions=compositions,
        composition_files=files,
        revocable_tokens=revocable,
        methods=methods,
        adapters=adapters,
        cursors=cursors,
        cancelled=cancelled,
    )


def _hostile_variants(body: dict[str, Any], fields: Iterable[str]) -> Iterator[dict[str, Any]]:
    """``body`` with one field at a time replaced by each `BODY_HOSTILE` value (in a list for list fields)."""
    for name in fields:
        for value in BODY_HOSTILE:
            yield {**body, name: [value] if isinstance(body.get(name), list) else value}


# -- results ------------------------------------------------------------------------------


@dataclass
class Finding:
    """One distinct failure: the first request that showed it."""

    operation: str
    check: str
    title: str
    status: int | None
    auth: str
    request: str
    detail: str
    count: int = 1

    def render(self, limit: int = 3000) -> str:
        request = self.request if len(self.request) <= limit // 2 else self.request[: limit // 2] + " [...]"
        # The end of a traceback is what matters.
        detail = self.detail if len(self.detail) <= limit else "[...] " + self.detail[-limit:]
        return (
            f"[{self.check}] {self.operation}: {self.title} (status {self.status}, sent {self.count}x; "
            f"credentials: {self.auth})\n  request: {request}\n  {detail.strip()}".replace("\n", "\n  ")
        )


@dataclass
class OperationReport:
    """Requests sent to one operation, their status codes and the distinct failures found."""

    operation: str
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    findings: dict[tuple[str, ...], Finding] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, key: tuple[str, ...], finding: Finding) -> None:
        self.failures[finding.check] += 1
        if key in self.findings:
            self.findings[key].count += 1
        else:
            self.findings[key] = finding

    def status_classes(self) -> dict[str, int]:
        classes: Counter[str] = Counter()
        for status, n in self.statuses.items():
            classes[f"{status // 100}xx"] += n
        return dict(classes)

    def render(self) -> str:
        classes = ", ".join(f"{k}: {v}" for k, v in sorted(self.status_classes().items()))
        lines = [f"{self.operation}: {self.cases} requests ({classes}), {len(self.findings)} distinct failures"]
        lines += [f.render() for f in self.findings.values()]
        return "\n\n".join(lines)


# -- the fuzzer ---------------------------------------------------------------------------


def _check_name(failure: Any) -> str:
    checks = getattr(failure, "checks", ())
    if checks:
        return str(checks[0])
    title = str(getattr(failure, "title", ""))
    return title.split("`")[1] if title.count("`") >= 2 else title


def _summary(exc: BaseException) -> str:
    """The frames of an exception's traceback in this project's code, and the exception."""
    root = Path(__file__).resolve().parents[1]
    ours = tuple(str(root / package) + "/" for package in ("registry", "composer"))
    lines = ["Traceback (frames in registry/ and composer/ only):"]
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.startswith(ours):
            where = f"{Path(frame.filename).relative_to(root)}:{frame.lineno} in {frame.name}"
            lines.append(f"  {where}: {(frame.line or '').strip()}")
    lines += [line.rstrip()[:800] for line in traceback.format_exception_only(exc)]
    return "\n".join(lines)


def _project_frame(exc: BaseException) -> str:
    """file:line of the innermost frame in this project's code (where the bug most likely is)."""
    root = Path(__file__).resolve().parents[1]
    ours = tuple(str(root / package) + "/" for package in ("registry", "composer"))
    frames = traceback.extract_tb(exc.__traceback__)
    frame = next((f for f in reversed(frames) if f.filename.startswith(ours)), frames[-1] if frames else None)
    return f"{Path(frame.filename).relative_to(root)}:{frame.lineno}" if frame is not None else "?"


class Fuzzer:
    """Sends schemathesis cases to ``app`` in-process and checks every response.

    Args:
        app: the ASGI application (its lifespan must already be running, e.g. inside a
            ``TestClient`` block: the compositions it accepts are built by its workers).
        openapi: the schema the app serves at ``/openapi.json``.
        seeded: the seeded data requests are aimed at (see `seed`).
        examples: Hypothesis cases per operation (on top of the coverage and explicit cases).
        seed: Hypothesis seed; ``None``: derandomized (the same cases every run).
        thorough: run the positive coverage cases on seeded resources too (each valid PATCH
            re-embeds a brick: ~0.1-0.5 s); otherwise only the negative ones.
    """

    def __init__(
        self,
        app: Any,
        openapi: dict[str, Any],
        seeded: Seeded,
        *,
        examples: int,
        seed: int | None = None,
        thorough: bool = True,
    ) -> None:
        import jsonschema_rs
        import schemathesis
        from schemathesis.python import asgi
        from schemathesis.specs.openapi.checks import positive_data_acceptance

        self.openapi = openapi
        self.schema = schemathesis.openapi.from_dict(openapi)
        self.session = asgi.get_client(app)
        self.seeded = seeded
        self.examples = examples
        self.seed = seed
        self.thorough = thorough
        self.excluded_checks = [positive_data_acceptance]
        self.problem_validator = jsonschema_rs.validator_for(openapi["components"]["schemas"]["Problem"])

    def close(self) -> None:
        self.session.close()

    # -- operations --

    def operations(self, contains: str = "") -> list[Any]:
        """Every operation of the schema; deletions last (names, bricks, compositions, then tokens)."""
        operations = [result.ok() for result in self.schema.get_all_operations()]
        order = {
            "DELETE /v1/composition-names": 1,  # before the compositions they name
            "DELETE /v1/bricks": 1,
            "DELETE /v1/compositions": 2,
            "DELETE /v1/tokens": 3,
        }
        operations = [op for op in operations if contains.lower() in op.label.lower()]
        return sorted(operations, key=lambda op: order.get(op.label.split("/{")[0], 0))

    def run(self, operation: Any) -> OperationReport:
        """Fuzz one operation."""
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis import seed as hypothesis_seed
        from hypothesis import strategies as st
        from hypothesis.errors import HypothesisWarning

        report = OperationReport(operation.label)
        started = time.perf_counter()
        for case in self.coverage_cases(operation):
            self.execute(case, "admin", report)
        for case in self.explicit_cases(operation):
            self.execute(case, "admin", report)

        ranged = operation.label.startswith("GET ") and "/files/{" in operation.label
        extra = st.sampled_from(RANGES).map(lambda r: {"Range": r}) if ranged else st.just({})

        @settings(
            max_examples=self.examples,
            derandomize=self.seed is None,
            database=None,
            deadline=None,
            phases=(Phase.explicit, Phase.generate),
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
        )
        @given(case=self.strategy(operation), auth=st.sampled_from(AUTH_KINDS), extra=st.one_of(st.just({}), extra))
        def fuzz(case: Any, auth: str, extra: dict[str, str]) -> None:
            self.execute(case, auth, report, extra)

        if self.seed is not None:
            fuzz = hypothesis_seed(self.seed)(fuzz)
        with warnings.catch_warnings():
            # A rejected draw (schemathesis filters some) makes Hypothesis render the strategy,
            # tens of kB here; it warns about that, and pytest turns warnings into errors.
            warnings.filterwarnings("ignore", "Generating overly large repr", HypothesisWarning)
            fuzz()
        report.seconds = time.perf_counter() - started
        return report

    # -- sending and checking --

    def execute(self, case: Any, auth: str, report: OperationReport, extra: dict[str, str] | None = None) -> None:
        """Send ``case`` with the credentials ``auth`` (and ``extra`` headers); record what failed."""
        from schemathesis.core.failures import FailureGroup

        headers = {**self.seeded.headers[auth], **(extra or {})}
        report.cases += 1
        status = None
        try:
            # Redirects are not followed: a 3xx is an answer of this operation, checked as such.
            response = case.call(session=self.session, base_url=BASE_URL, headers=headers, allow_redirects=False)
            status = response.status_code
            report.statuses[status] += 1
            self._remember(case, response)
            case.validate_response(
                response,
                headers=headers,
                additional_checks=[self.problem_details],
                excluded_checks=self.excluded_checks,
                transport_kwargs={
                    "session": self.session,
                    "base_url": BASE_URL,
                    "headers": headers,
                    "allow_redirects": False,
                },
            )
        except FailureGroup as group:
            for failure in group.exceptions:
                check = _check_name(failure)
                key = (check, failure.title, str(getattr(failure, "_unique_key", "")))
                report.add(
                    key,
                    Finding(
                        report.operation, check, failure.title, status, auth, self._curl(case, headers), str(failure)
                    ),
                )
        except Exception as exc:  # noqa: BLE001 - an exception escaping the app is a server error
            report.statuses[500] += 1
            title = f"unhandled {type(exc).__name__} at {_project_frame(exc)}"
            finding = Finding(
                report.operation, "not_a_server_error", title, 500, auth, self._curl(case, headers), _summary(exc)
            )
            report.add(("not_a_server_error", title), finding)

    def _curl(self, case: Any, headers: dict[str, str]) -> str:
        try:
            return str(case.as_curl_command(headers=headers, base_url=BASE_URL))
        except Exception as exc:  # noqa: BLE001 - a repro that cannot be rendered must not hide the failure
            return f"<no curl: {exc}> {case!r}"

    def _remember(self, case: Any, response: Any) -> None:
        """Compositions created while fuzzing become targets of the composition GETs."""
        if case.operation.label == "POST /v1/compositions" and response.status_code in (200, 202):
            composition_id = response.json().get("id")
            if composition_id and composition_id not in self.seeded.compositions:
                self.seeded.compositions.append(composition_id)

    def problem_details(self, ctx: Any, response: Any, case: Any) -> bool | None:
        """Every error is an RFC 9457 problem: problem+json, valid ``Problem``, the response's status."""
        if response.status_code < 400:
            return None
        content_type = ";".join(response.headers.get("content-type", [""])).split(";")[0].strip()
        assert content_type == "application/problem+json", (
            f"{response.status_code} answered with Content-Type {content_type!r}, not application/problem+json"
        )
        try:
            body = json.loads(response.content)
        except ValueError as exc:
            raise AssertionError(f"problem body is not JSON: {exc}: {response.content[:300]!r}") from None
        errors = [
            f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in self.problem_validator.iter_errors(body)
        ]
        assert not errors, "problem body violates the Problem schema: " + "; ".join(errors)
        assert body["status"] == response.status_code, (
            f"problem status {body['status']} differs from the response status {response.status_code}"
        )
        return None

    # -- what to send --

    def path_values(self, operation: Any, name: str) -> list[Any]:
        """Values of path parameter ``name`` that hit seeded resources (and one that misses)."""
        seeded = self.seeded
        if name == "name":
            if operation.path.startswith("/v1/base-models"):
                return [*seeded.base_models, "no-such-model"]
            if operation.path.startswith("/v1/tokens"):
                return [*seeded.revocable_tokens, "no-such-token"]
            if operation.path.startswith("/v1/composition-names"):
                return ["fuzz-name", "no-such-name"]
            return [*seeded.bricks, "no-such-brick"]
        if name == "alias":  # a base model's aliases, or a brick version's (cli)
            if operation.path.startswith("/v1/bricks"):
                return ["production", "no-such-alias"]
            return [*ALIASES, "no-such-alias"]
        if name == "version":
            return sorted({v for versions in seeded.bricks.values() for v in versions} | {99})
        if name == "filename":
            return ["adapter_config.json", "adapter_model.safetensors", "README.md"]
        if name == "composition_id":
            # The seeded (built) ones, the last few requested while fuzzing, a cancelled one.
            return [*seeded.compositions[:2], *seeded.compositions[2:][-3:], *seeded.cancelled, "0" * 64]
        if name == "path":
            return [*seeded.composition_files, "missing.bin", "../brickyard.json", "a/../config.json"]
        return []

    def path_combinations(self, operation: Any) -> list[dict[str, Any]]:
        """Every combination of the seeded values of the path parameters."""
        names = self.path_names(operation)
        if not names:
            return []
        values = [self.path_values(operation, n) for n in names]
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]

    def hostile_combinations(self, operation: Any) -> list[dict[str, Any]]:
        """The first seeded combination with one string parameter replaced by a `HOSTILE` value."""
        combinations = self.path_combinations(operation)
        if not combinations:
            return []
        strings = [n for n in self.path_names(operation) if n not in ("version", "composition_id")]
        return [{**combinations[0], name: value} for name in strings for value in HOSTILE]

    def path_prefixes(self, operation: Any) -> list[dict[str, Any]]:
        """The first seeded combination with the last 0, 1, 2... parameters left out (to be generated)."""
        combinations = self.path_combinations(operation)
        if not combinations:
            return []
        names = self.path_names(operation)
        return [{n: combinations[0][n] for n in names[:i]} for i in range(len(names), 0, -1)]

    @staticmethod
    def path_names(operation: Any) -> list[str]:
        return [p.name for p in operation.iter_parameters() if p.location.value == "path"]

    def coverage_cases(self, operation: Any) -> Iterator[Any]:
        """schemathesis' coverage phase (positive and negative), plain and on a seeded resource."""
        from schemathesis import GenerationMode
        from schemathesis.generation.drivers import CoverageGenerator
        from schemathesis.generation.feedback import FeedbackSources
        from schemathesis.generation.overrides import Override

        prefixes = self.path_prefixes(operation)
        overrides = [Override()] + [Override(path_parameters=p) for p in prefixes]
        for n, override in enumerate(overrides):
            for case in CoverageGenerator(
                operation=operation,
                generation_modes=list(GenerationMode),
                generation_config=self.schema.config.generation_for(operation=operation, phase="coverage"),
                auth_storage=None,
                override=override,
                feedback=FeedbackSources(),
            ):
                # A negative case whose invalid path parameter the override replaced is valid:
                # schemathesis would still expect it refused.
                data = case.meta.phase.data if case.meta is not None else None
                location = getattr(data, "parameter_location", None)
                if location is not None and location.value == "path" and data.parameter in override.path_parameters:
                    continue
                # With some path parameters left to generate, only their cases are new.
                if n > 1 and (location is None or location.value != "path"):
                    continue
                if n == 1 and not self.thorough and case.meta.generation.mode.is_positive:
                    continue
                yield case

    def explicit_cases(self, operation: Any) -> Iterator[Any]:
        """One request per seeded resource, and the valid requests of each operation."""
        for combo in self.path_combinations(operation) + self.hostile_combinations(operation):
            body = {"description": "patched while fuzzing"} if operation.method.upper() == "PATCH" else None
            yield self._case(operation, path_parameters=combo, body=body)
        seeded = self.seeded
        label = operation.label
        if label.startswith("GET ") and "/files/{" in label:
            for http_range in RANGES:
                combo = self.path_combinations(operation)[0]
                yield operation.Case(path_parameters=combo, headers={"Range": http_range})
        if label == "GET /v1/bricks":
            for query in (
                {"base_model": BASE_MODEL, "tag": "fuzz", "all_versions": True, "limit": 1},
                *({"cursor": c, "limit": 1} for c in seeded.cursors),
            ):
                yield self._case(operation, query=query)
        elif label == "GET /v1/bricks/{name}/versions":
            for c in seeded.cursors:
                yield self._case(operation, path_parameters={"name": "sentiment"}, query={"cursor": c, "limit": 1})
        elif label == "POST /v1/base-models":
            body = {"name": "tiny-llama-again", "path": str(seeded.base_path), "description": "d", "aliases": ["a"]}
            yield self._case(operation, body=body)
            yield self._case(operation, body={**body, "name": BASE_MODEL})
            for i, variant in enumerate(_hostile_variants(body, ("name", "path", "description", "aliases"))):
                yield self._case(operation, body={"name": f"hostile-{i}", **variant})
        elif label == "POST /v1/base-models/{name}/aliases":
            for combo in self.path_combinations(operation):
                yield self._case(operation, path_parameters=combo, body={"alias": "org/fuzz-added"})
            for variant in _hostile_variants({"alias": "a"}, ("alias",)):
                yield self._case(operation, path_parameters={"name": BASE_MODEL}, body=variant)
        elif label == "POST /v1/bricks":
            config, weights = random_adapter(777)
            meta = {"name": "sentiment", "base_model": BASE_MODEL, "description": "sentiment, third version"}
            yield self._brick_case(operation, meta, config, weights)
            yield self._brick_case(operation, meta, config, weights)  # the same files again
            meta = {**meta, "name": "hostile", "examples": ["e"], "tags": ["t"], "license": "mit"}
            fields = ("name", "base_model", "description", "examples", "tags", "license")
            for i, variant in enumerate(_hostile_variants(meta, fields)):
                config, weights = random_adapter(800 + i)
                yield self._brick_case(operation, variant, config, weights)
        elif label == "PATCH /v1/bricks/{name}/versions/{version}":
            body = {"description": "d", "examples": ["e"], "tags": ["t"]}
            for variant in _hostile_variants(body, tuple(body)):
                yield self._case(operation, path_parameters={"name": "sentiment", "version": 1}, body=variant)
        elif label == "POST /v1/search":
            body = {"query": "is this review positive?", "base_model": BASE_MODEL, "tags": ["fuzz"], "k": 3}
            yield self._case(operation, body=body)
            yield self._case(operation, body={"query": "translate", "all_versions": True})
            for variant in _hostile_variants(body, ("query", "base_model", "tags")):
                yield self._case(operation, body=variant)
        elif label == "PUT /v1/composition-names/{name}":
            yield self._case(
                operation, path_parameters={"name": "fuzz-name"}, body={"composition": seeded.compositions[0]}
            )
        elif label == "PUT /v1/bricks/{name}/aliases/{alias}":
            yield self._case(
                operation, path_parameters={"name": "sentiment", "alias": "production"}, body={"version": 1}
            )
        elif label == "POST /v1/compositions":
            bricks = [{"name": "sentiment", "weight": 0.7}, {"name": "translate"}]
            yield self._case(operation, body={"base_model": BASE_MODEL, "bricks": bricks})  # built: 200
            body = {"base_model": BASE_MODEL, "instruction": "review sentiment", "k": 2, "method": "linear"}
            yield self._case(operation, body=body)
            for variant in _hostile_variants(body, ("base_model", "instruction", "method")):
                yield self._case(operation, body=variant)
        elif label == "POST /v1/base-models/{name}/emergent":
            texts = [f"probe text number {i}" for i in range(4)]
            probes = [
                {"name": "fuzz-digits", "description": "numbers", "texts": [f"{i} {i * 7}" for i in range(4)]},
                {"name": "fuzz-words", "description": "words", "texts": texts},
            ]
            body = {"probes": probes, "method": "average_precision", "held_out": 0.5}
            yield self._case(operation, path_parameters={"name": BASE_MODEL}, body=body)
            for variant in _hostile_variants(body, ("method",)):
                yield self._case(operation, path_parameters={"name": BASE_MODEL}, body=variant)
        elif label == "POST /v1/tokens":
            yield self._case(operation, body={"name": "fuzz-created", "scope": "read"})
            yield self._case(operation, body={"name": "fuzz-created", "scope": "read"})
            for variant in _hostile_variants({"name": "t"}, ("name",)):
                yield self._case(operation, body=variant)

    def _case(self, operation: Any, **kwargs: Any) -> Any:
        if kwargs.get("body") is None:
            kwargs.pop("body", None)
        else:
            kwargs["media_type"] = "application/json"
        return operation.Case(**kwargs)

    def _brick_case(self, operation: Any, metadata: Any, config: bytes, weights: bytes) -> Any:
        text = metadata if isinstance(metadata, str) else json.dumps(metadata)
        body = {"metadata": text, "adapter_config": config, "adapter_weights": weights}
        return operation.Case(body=body, media_type="multipart/form-data")

    def strategy(self, operation: Any) -> Any:
        """Generated cases (positive and negative), the same aimed at seeded resources, and
        hand-written strategies for the bodies the schema cannot describe well."""
        from hypothesis import strategies as st
        from schemathesis import GenerationMode

        has_other_parameters = any(p.location.value != "path" for p in operation.iter_parameters()) or (
            operation.body is not None and len(operation.body) > 0
        )
        parts = [operation.as_strategy(mode) for mode in GenerationMode]
        combinations = self.path_combinations(operation) + self.hostile_combinations(operation)
        if combinations:
            modes = list(GenerationMode) if has_other_parameters else [GenerationMode.POSITIVE]
            for mode in modes:
                parts.append(st.one_of([operation.as_strategy(mode, path_parameters=c) for c in combinations]))
            # Seeded resources, the last path parameters generated.
            partial = [p for p in self.path_prefixes(operation) if len(p) < len(combinations[0])]
            parts += [operation.as_strategy(mode, path_parameters=p) for p in partial for mode in GenerationMode]
        parts += self.seeded_strategies(operation)
        return st.one_of(parts)

    def seeded_strategies(self, operation: Any) -> list[Any]:
        from hypothesis import strategies as st

        seeded = self.seeded
        label = operation.label
        names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z")
        bricks = st.sampled_from([*seeded.bricks, "no-such-brick"])
        text = st.one_of(st.text(max_size=40), st.sampled_from(HOSTILE + BODY_HOSTILE))
        tags = st.lists(st.sampled_from(["fuzz", "sentiment", "Fuzz", " fuzz ", "a..b", "x" * 65, ""]), max_size=3)

        def cases(bodies: Any, **kwargs: Any) -> Any:
            return bodies.map(lambda body: self._case(operation, body=body, **kwargs))

        if label == "POST /v1/base-models":
            path = st.sampled_from(
                [str(seeded.base_path), str(seeded.base_path / "config.json"), str(seeded.base_path.parent), "/nope"]
            )
            body = st.fixed_dictionaries(
                {"name": st.one_of(st.sampled_from(seeded.base_models), names), "path": path},
                optional={"description": text, "aliases": st.lists(text, max_size=3)},
            )
            return [cases(body)]
        if label == "POST /v1/bricks":
            return [self._brick_strategy(operation, names, bricks, text, tags)]
        if label == "POST /v1/base-models/{name}/aliases":
            body = st.fixed_dictionaries({"alias": st.one_of(text, st.sampled_from([*ALIASES, "org/another"]))})
            paths = st.sampled_from(self.path_combinations(operation))
            return [st.tuples(paths, body).map(lambda pb: self._case(operation, path_parameters=pb[0], body=pb[1]))]
        if label == "POST /v1/search":
            body = st.fixed_dictionaries(
                {"query": st.one_of(text, st.sampled_from(["review sentiment", "translate an email"]))},
                optional={
                    "base_model": st.sampled_from([BASE_MODEL, "other-model"]),
                    "tags": tags,
                    "k": st.integers(1, 100),
                    "offset": st.integers(0, 900),
                    "min_score": st.floats(allow_nan=False, allow_infinity=False),
                    "all_versions": st.booleans(),
                    "exact": st.booleans(),
                },
            )
            return [cases(body)]
        if label == "POST /v1/compositions":
            return [cases(self._composition_bodies(bricks, text))]
        if label == "PATCH /v1/bricks/{name}/versions/{version}":
            body = st.fixed_dictionaries(
                {}, optional={"description": text, "examples": st.lists(text, max_size=3), "tags": tags}
            )
            paths = st.sampled_from(self.path_combinations(operation))
            return [st.tuples(paths, body).map(lambda pb: self._case(operation, path_parameters=pb[0], body=pb[1]))]
        if label in ("GET /v1/bricks", "GET /v1/bricks/{name}/versions"):
            cursor = st.sampled_from(seeded.cursors or ["x"]).flatmap(
                lambda c: st.sampled_from([c, c[:-1], c[1:], c + "=", c[::-1], c.upper(), "!" + c, *HOSTILE])
            )
            query = st.fixed_dictionaries(
                {},
                optional={
                    "cursor": cursor,
                    "limit": st.integers(1, 500),
                    "tag": st.sampled_from(["fuzz", "sentiment", "none", *HOSTILE]),
                    "base_model": st.sampled_from([BASE_MODEL, "other", *HOSTILE]),
                    "all_versions": st.booleans(),
                },
            )
            if label == "GET /v1/bricks":
                return [query.map(lambda q: self._case(operation, query=q))]
            query = query.map(lambda q: {k: v for k, v in q.items() if k in ("cursor", "limit")})
            return [
                st.tuples(bricks, query).map(
                    lambda nq: self._case(operation, path_parameters={"name": nq[0]}, query=nq[1])
                )
            ]
        if label == "POST /v1/tokens":
            body = st.fixed_dictionaries(
                {"name": st.one_of(names, st.sampled_from(["fuzz-read", "fuzz-victim-0"]))},
                optional={"scope": st.sampled_from(["read", "write", "admin"])},
            )
            return [cases(body)]
        return []

    def _composition_bodies(self, bricks: Any, text: Any) -> Any:
        from hypothesis import strategies as st

        seeded = self.seeded
        weights = st.one_of(st.floats(-100, 100), st.sampled_from([0.0, -0.0, 1e-300, 100.0, -100.0]))
        choice = st.fixed_dictionaries(
            {"name": bricks},
            optional={"version": st.sampled_from([None, 1, 2, 3]), "weight": weights},
        )
        method = st.sampled_from([*seeded.methods, "no-such-method"])

        def params(method_name: str) -> Any:
            properties = seeded.methods.get(method_name, {}).get("properties", {})
            value = st.one_of(
                st.floats(allow_nan=False, allow_infinity=False),
                st.sampled_from([0, 1, 0.5, 1e-9, -1, 2, 2**63, "total", "frequency", "x", None, True, [], {}]),
            )
            keys = [*properties, "unknown_param"]
            return st.dictionaries(st.sampled_from(keys), value, max_size=3)

        def body(draw: Any) -> dict[str, Any]:
            chosen = draw(method)
            result: dict[str, Any] = {
                "base_model": draw(st.sampled_from([BASE_MODEL, BASE_MODEL, "other-model"])),
                "method": chosen,
            }
            if draw(st.booleans()):
                result["bricks"] = draw(st.lists(choice, min_size=1, max_size=3))
            else:
                result["instruction"] = draw(st.one_of(text, st.sampled_from(["review sentiment", "translate"])))
                if draw(st.booleans()):
                    result["k"] = draw(st.integers(1, 16))
                if draw(st.booleans()):
                    result["weights"] = draw(st.lists(weights, min_size=1, max_size=4))
            if draw(st.booleans()):
                result["params"] = draw(params(chosen))
            if draw(st.booleans()):
                result["output"] = "adapter"
                if draw(st.booleans()):
                    result["rank"] = draw(st.sampled_from([1, 2, 3, 64, 8192]))
            return result

        return st.composite(body)()

    def _brick_strategy(self, operation: Any, names: Any, bricks: Any, text: Any, tags: Any) -> Any:
        from hypothesis import strategies as st

        seeded = self.seeded
        metadata = st.fixed_dictionaries(
            {
                "name": st.one_of(bricks, names),
                "base_model": st.sampled_from([BASE_MODEL, BASE_MODEL, "other-model"]),
                "description": st.one_of(text, st.just("sentiment of reviews")),
            },
            optional={
                "examples": st.lists(text, max_size=3),
                "tags": tags,
                "version": st.sampled_from([1, 2, 3, 50, 0, 2**31]),
                "license": st.sampled_from(["mit", "", "x" * 101]),
                "metrics": st.dictionaries(
                    st.sampled_from(["acc", "f1", "", "bad key"]), st.floats(allow_nan=False), max_size=2
                ),
                "unexpected": st.just(1),
            },
        )
        metadata_text = st.one_of(
            metadata.map(json.dumps),
            st.sampled_from(["", "{", "[]", "null", '"x"', "1e999", "[" * 10000, json.dumps({"name": "x"})]),
        )

        def corrupt(pair: tuple[bytes, bytes], how: str) -> tuple[bytes, bytes]:
            config, weights = pair
            if how == "truncated":
                return config, weights[: len(weights) // 2]
            if how == "header-only":
                return config, weights[:8]
            if how == "bad-header-size":
                return config, (2**62).to_bytes(8, "little") + weights[8:]
            if how == "config-not-json":
                return b"{not json", weights
            if how == "config-rank":
                return json.dumps({**json.loads(config), "r": 7}).encode(), weights
            if how == "config-list":
                return b"[]", weights
            return config, weights

        files = st.tuples(
            st.sampled_from(seeded.adapters),
            st.sampled_from(
                [
                    "ok",
                    "ok",
                    "truncated",
                    "header-only",
                    "bad-header-size",
                    "config-not-json",
                    "config-rank",
                    "config-list",
                ]
            ),
        ).map(lambda pair_how: corrupt(*pair_how))
        return st.tuples(metadata_text, files).map(lambda mf: self._brick_case(operation, mf[0], mf[1][0], mf[1][1]))


# -- reporting ----------------------------------------------------------------------------


def summary_table(reports: Iterable[OperationReport]) -> Any:
    """A rich table: operations x (requests, status classes, failures by check)."""
    from rich.table import Table

    reports = list(reports)
    checks = [c for c in CHECKS if any(r.failures[c] for r in reports)]
    checks += sorted({c for r in reports for c in r.failures} - set(checks))
    table = Table(title="schema fuzzing: requests and failures (distinct failures in parentheses)")
    table.add_column("operation")
    for column in ("requests", "2xx", "4xx", "5xx", "s"):
        table.add_column(column, justify="right")
    for check in checks:
        table.add_column(check, justify="right")
    for r in reports:
        classes = r.status_classes()
        distinct = Counter(f.check for f in r.findings.values())
        table.add_row(
            r.operation,
            str(r.cases),
            str(classes.get("2xx", 0)),
            str(classes.get("4xx", 0)),
            str(classes.get("5xx", 0)),
            f"{r.seconds:.1f}",
            *(f"{r.failures[c]} ({distinct[c]})" if r.failures[c] else "" for c in checks),
        )
    return table


def fuzz_app(
    client: Any,
    base_path: Path,
    admin_token: str,
    *,
    examples: int,
    contains: str = "",
    seed_value: int | None = None,
    thorough: bool = True,
    on_report: Callable[[OperationReport], None] | None = None,
) -> list[OperationReport]:
    """Seed the registry behind ``client`` (a started ``TestClient``) and fuzz every operation."""
    seeded = seed(client, base_path, admin_token)
    openapi = _ok(client.get("/openapi.json"), 200)
    fuzzer = Fuzzer(client.app, openapi, seeded, examples=examples, seed=seed_value, thorough=thorough)
    reports = []
    try:
        for operation in fuzzer.operations(contains):
            report = fuzzer.run(operation)
            reports.append(report)
            if on_report is not None:
                on_report(report)
    finally:
        fuzzer.close()
    return reports


# -- hostile families (issue 15): requests aimed at the server's file system and CPU -----


def _hostile_base_dirs(base_path: Path, scratch: Path, secret: Path) -> dict[str, Path]:
    """Copies of the base model made hostile, one way each (in ``scratch``, inside the roots)."""
    import os
    import shutil

    def copy(name: str) -> Path:
        target = scratch / name
        shutil.copytree(base_path, target, symlinks=True)
        return target

    dirs = {}
    d = copy("tokenizer-to-secret")
    (d / "tokenizer.json").unlink(missing_ok=True)
    (d / "tokenizer.json").symlink_to(secret)
    dirs["symlink to a server secret"] = d
    d = copy("config-to-etc")
    (d / "config.json").unlink()
    (d / "config.json").symlink_to("/etc/passwd")
    dirs["config.json -> /etc/passwd"] = d
    d = copy("fifo-config")
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    dirs["FIFO config.json"] = d
    d = copy("dev-zero-config")
    (d / "config.json").unlink()
    (d / "config.json").symlink_to("/dev/zero")
    dirs["config.json -> /dev/zero"] = d
    d = copy("huge-config")
    with open(d / "config.json", "r+b") as handle:
        handle.truncate(1 << 30)  # sparse
    dirs["1 GiB sparse config.json"] = d
    d = copy("bin-only")
    for weights in d.glob("*.safetensors*"):
        weights.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02")
    dirs["pickle weights only"] = d
    return dirs


HOSTILE_PATTERNS: dict[str, dict[str, Any]] = {
    "back-reference in rank_pattern": {"rank_pattern": {r"(q)(_)\2": 2}},
    "back-reference in alpha_pattern": {"alpha_pattern": {r"(q)(_)\2": 4}},
    "catastrophic alpha_pattern": {"alpha_pattern": {r"(\w|[a-z_.0-9]|.)*\d\d\d\d": 4}},
    "4096 fuzzy keys": {"alpha_pattern": {rf"(\w|\w)*\d\d{i}X": 4 for i in range(4096)}},
    "1024 + 1024 keys": {
        "rank_pattern": {rf"(\w|\w)*\d\d{i}X": 2 for i in range(1024)},
        "alpha_pattern": {rf"(\w|\w)*\d\d{i}Y": 4 for i in range(1024)},
    },
    "unbalanced group": {"rank_pattern": {"(q_proj": 2}},
}
HOSTILE_VERSIONS = (2**31 - 1, 2**31, 2**62, 2**63 - 1)


def probe_hostile_families(
    client: Any, base_path: Path, scratch: Path, secret: Path, *, slow_s: float = 20.0
) -> OperationReport:
    """Send the hostile families of issue 15 through ``client`` (admin token): base models
    from hostile directories, adapter configs with hostile patterns, versions past 2^31,
    HEAD on file routes. A finding is any 5xx, any 2xx where a refusal is due, or an answer
    slower than ``slow_s``. ``secret``: a file of the server's own data (its admin token)."""
    report = OperationReport("hostile families")
    started = time.perf_counter()
    secret_text = secret.read_text().strip() if secret.is_file() else None

    def check(kind: str, response: Any, elapsed: float, *, ok: tuple[int, ...]) -> None:
        report.cases += 1
        report.statuses[response.status_code] += 1
        problem = None
        if response.status_code >= 500:
            problem = "server error"
        elif response.status_code not in ok:
            problem = f"status {response.status_code}, expected one of {ok}"
        elif elapsed > slow_s:
            problem = f"answered after {elapsed:.1f} s"
        if problem is not None:
            finding = Finding(
                report.operation,
                "hostile",
                f"{kind}: {problem}",
                response.status_code,
                "admin",
                kind,
                response.text[:1000],
            )
            report.add((kind, problem), finding)

    for kind, directory in _hostile_base_dirs(base_path, scratch, secret).items():
        t = time.perf_counter()
        response = client.post("/v1/base-models", json={"name": f"hostile-{report.cases}", "path": str(directory)})
        check(f"base model: {kind}", response, time.perf_counter() - t, ok=(422,))
        if (secret_text and secret_text in response.text) or "pytorch_model.bin" in response.text:
            report.add(
                (kind, "disclosure"),
                Finding(report.operation, "hostile", f"{kind}: discloses", None, "admin", kind, response.text[:1000]),
            )
    for kind, path in {"outside the roots": "/etc", "missing": str(scratch / "absent")}.items():
        t = time.perf_counter()
        response = client.post("/v1/base-models", json={"name": "hostile-path", "path": path})
        check(f"base model path {kind}", response, time.perf_counter() - t, ok=(422,))
    config, weights = random_adapter(4242)
    base_config = json.loads(config)
    for kind, extra in HOSTILE_PATTERNS.items():
        t = time.perf_counter()
        response = client.post(
            "/v1/bricks",
            data={"metadata": json.dumps({"name": "hostile-pattern", "base_model": BASE_MODEL, "description": kind})},
            files={
                "adapter_config": ("adapter_config.json", json.dumps({**base_config, **extra}).encode()),
                "adapter_weights": ("adapter_model.safetensors", weights),
            },
        )
        # Keys that are each cheap but many may finish within the request's pattern budget on a
        # fast machine (201) or run past it (422): either way the request must end promptly.
        ok = (201, 422) if kind == "1024 + 1024 keys" else (422,)
        check(f"pattern: {kind}", response, time.perf_counter() - t, ok=ok)
    for i, version in enumerate(HOSTILE_VERSIONS):
        config_v, weights_v = random_adapter(5000 + i)
        meta = {"name": "hostile-version", "base_model": BASE_MODEL, "description": "big version", "version": version}
        t = time.perf_counter()
        response = client.post(
            "/v1/bricks",
            data={"metadata": json.dumps(meta)},
            files={"adapter_config": ("a.json", config_v), "adapter_weights": ("w.safetensors", weights_v)},
        )
        check(f"version {version}", response, time.perf_counter() - t, ok=(201,))
        if response.status_code == 201:
            for method in ("GET", "HEAD"):
                t = time.perf_counter()
                got = client.request(method, f"/v1/bricks/hostile-version/versions/{version}/files/adapter_config.json")
                check(f"{method} version {version}", got, time.perf_counter() - t, ok=(200,))
    report.seconds = time.perf_counter() - started
    return report


def run(database_url: str | None, args: argparse.Namespace) -> int:
    """Fuzz a registry in a scratch home; the exit code: 1 when something was found."""
    with scratch_home("brickyard-fuzz-") as home:
        return _run_in(home, database_url, args)


def _run_in(home: Path, database_url: str | None, args: argparse.Namespace) -> int:
    from fastapi.testclient import TestClient
    from rich.console import Console

    from registry.api import create_app
    from registry.service import Registry
    from registry.settings import ComposeSettings, Settings

    console = Console(width=200)
    # Unhandled errors are findings (with their tracebacks); the app's own log of them is noise here.
    logging.getLogger("brickyard.api").disabled = True
    settings = Settings(home=home, database_url=database_url, compose=ComposeSettings(isolation="thread"))
    registry = Registry.open(settings)
    token, _ = registry.tokens.create("fuzz-admin", "admin", actor="bench")
    started = time.perf_counter()
    try:
        with TestClient(create_app(registry=registry), raise_server_exceptions=False) as client:
            client.headers["Authorization"] = f"Bearer {token}"

            def progress(report: OperationReport) -> None:
                console.print(
                    f"{report.operation:<60} {report.cases:>6} requests {report.seconds:6.1f} s "
                    f"{len(report.findings)} distinct failures"
                )

            reports = fuzz_app(
                client,
                tiny_base(),
                token,
                examples=args.examples,
                contains=args.operation,
                seed_value=args.seed,
                on_report=progress,
            )
            if not args.operation:
                scratch = Path(home) / "models" / "hostile"  # inside the default roots (home/models)
                scratch.mkdir(parents=True)
                token_file = settings.admin_token_file
                token_file.write_text(token + "\n")
                reports.append(probe_hostile_families(client, tiny_base(), scratch, token_file))
                progress(reports[-1])
    finally:
        registry.close()
    console.print(summary_table(reports))
    findings = [f for r in reports for f in r.findings.values()]
    if args.verbose:
        for finding in findings:
            console.print(finding.render(), markup=False, highlight=False)
    else:
        for finding in findings:
            console.print(
                f"[{finding.check}] {finding.operation}: {finding.title} (status {finding.status})",
                markup=False,
                highlight=False,
            )
    backend = "postgresql" if database_url else "sqlite"
    console.print(
        f"{sum(r.cases for r in reports)} requests to {len(reports)} operations on {backend} in "
        f"{time.perf_counter() - started:.0f} s: {len(findings)} distinct failures"
        + ("" if args.verbose or not findings else " (-v for requests and tracebacks)")
    )
    return 1 if findings else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300, help="Hypothesis cases per operation (default 300)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--operation", default="", help="only operations whose 'METHOD /path' contains this")
    parser.add_argument("--seed", type=int, default=None, help="Hypothesis seed (default: derandomized)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each failure's request and traceback")
    args = parser.parse_args()
    if args.backend == "postgresql":
        with postgres() as url:
            from registry.db.migrate import upgrade
            from registry.db.session import make_engine

            engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
            upgrade(engine)
            engine.dispose()
            code = run(url, args)
    else:
        code = run(None, args)
    sys.exit(code)


if __name__ == "__main__":
    main()
