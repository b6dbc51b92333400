"""The one boundary where composer errors become registry errors.

Like httpx's ``map_httpcore_exceptions``: a table from composer's error classes to the
registry's (`COMPOSER_ERRORS`, the most specific class wins), and two context managers the
use cases wrap their composer calls in:

* `composer_errors` raises the mapped registry error: the composer's one-line message becomes
  the problem's ``detail``, its problems the ``errors`` list;
* `composer_problems` collects the problems into a list instead, for the upload check that
  reports every problem of an adapter at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from composer import ComposeError, InvalidAdapter, InvalidBaseModel, InvalidTensorFile
from registry import errors

__all__ = ["COMPOSER_ERRORS", "composer_errors", "composer_problems", "registry_error_for"]

COMPOSER_ERRORS: dict[type[ComposeError], type[errors.InvalidInput]] = {
    InvalidBaseModel: errors.InvalidBaseModel,
    InvalidAdapter: errors.InvalidAdapter,
    InvalidTensorFile: errors.InvalidAdapter,
    # Every other refusal (unknown method, invalid parameters, incompatible bricks, a
    # non-finite result) is about what a composition request asked for.
    ComposeError: errors.InvalidRecipe,
}


def registry_error_for(exc: ComposeError) -> type[errors.InvalidInput]:
    """The registry error class `COMPOSER_ERRORS` maps ``exc``'s class (or its nearest base) to."""
    for cls in type(exc).__mro__:
        if cls in COMPOSER_ERRORS:
            return COMPOSER_ERRORS[cls]
    return errors.InvalidRecipe  # unreachable: ComposeError itself is in the table


@contextmanager
def composer_errors(*, into: type[errors.InvalidInput] | None = None, field: str | None = None) -> Iterator[None]:
    """Re-raise a `composer.ComposeError` from the block as a registry error.

    Args:
        into: the registry error to raise whatever the composer's class, for a use case whose
            every refusal means one thing (a composition request: `InvalidRecipe`); by default
            the class comes from `COMPOSER_ERRORS`.
        field: the request field the problems are about: ``"density: ..."`` becomes
            ``"params.density: ..."`` for ``field="params"`` (a problem about the whole field,
            ``"params: ..."``, stays as it is).
    """
    try:
        yield
    except ComposeError as exc:
        problems = exc.problems
        if field is not None:
            problems = [p if p.startswith(f"{field}:") else f"{field}.{p}" for p in problems]
        raise (into or registry_error_for(exc))(exc.message, errors=problems) from None


@contextmanager
def composer_problems(problems: list[str], field: str) -> Iterator[None]:
    """Append the problems of a `composer.ComposeError` from the block to ``problems``, each
    as ``"<field>: <problem>"``, and carry on after the block (which stops where it failed)."""
    try:
        yield
    except ComposeError as exc:
        problems.extend(f"{field}: {p}" for p in exc.problems)
