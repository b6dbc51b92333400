"""What a merge method is: a name, a one-line description, a pydantic model of its
parameters, and a pure function that combines per-brick deltas of one module.

Nothing here imports torch; tensors appear only in annotations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from composer.errors import InvalidParams

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "Combine",
    "MergeContext",
    "MergeMethod",
    "MethodParams",
    "density_field",
    "seed_field",
    "sign_method_field",
]


class MethodParams(BaseModel):
    """Base of every params model: immutable, strict types, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def density_field(description: str) -> Any:
    """A ``density`` field in (0, 1], default 0.5."""
    return Field(0.5, gt=0.0, le=1.0, description=description)


def sign_method_field() -> Any:
    """A ``majority_sign_method`` field: ``total`` (default) or ``frequency``."""
    return Field(
        "total",
        description="How TIES elects each entry's sign: 'total' = sign of the sum of the trimmed deltas, "
        "'frequency' = the sign held by more bricks.",
    )


def seed_field() -> Any:
    """A ``seed`` field: a non-negative 63-bit integer, default 0."""
    return Field(
        0,
        ge=0,
        le=2**63 - 1,
        description="Seed of the random drop masks; the same recipe and seed give the same model.",
    )


SignMethod = Literal["total", "frequency"]


@dataclass(frozen=True)
class MergeContext:
    """Where a combination happens: the module's name and, per delta, a key identifying the
    brick's content on that module (a digest of its factors). Seeded methods derive their
    random streams from ``(seed, module, key)``: the result then depends neither on the
    order of the bricks nor on the order in which modules are processed, and the same brick
    given twice gets the same random choices (so weights ``[1, -1]`` cancel)."""

    module: str
    brick_keys: tuple[str, ...] = ()


# combine(deltas, weights, params, context) -> merged delta; deltas are float32 and have
# the module's (out, in) shape.
Combine = Callable[["Sequence[Tensor]", Sequence[float], Any, MergeContext], "Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``sums_deltas`` marks methods whose result is exactly ``sum_i w_i * delta_i``: the
    composer then combines LoRA factors (concatenation) instead of dense deltas, which is
    exact and much cheaper. Every other method needs each brick's dense delta per module.
    """

    name: str
    description: str
    params_model: type[MethodParams]
    combine: Combine
    sums_deltas: bool = False

    def validate_params(self, params: Mapping[str, Any] | None) -> MethodParams:
        """Validate user parameters (None means all defaults).

        Raises:
            InvalidParams: listing every invalid or unknown field.
        """
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise InvalidParams(f"invalid parameters for merge method {self.name!r}", ["params must be an object"])
        try:
            return self.params_model.model_validate(dict(params))
        except ValidationError as exc:
            problems = []
            for error in exc.errors():
                where = ".".join(str(part) for part in error["loc"]) or "params"
                problems.append(f"{where}: {error['msg']}")
            raise InvalidParams(f"invalid parameters for merge method {self.name!r}", problems) from None

    def params_schema(self) -> dict[str, Any]:
        """JSON schema of the parameters (with defaults and descriptions)."""
        return self.params_model.model_json_schema()
