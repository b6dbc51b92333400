"""Validation of what users send, shared by the REST API, the CLI and the Python API.

Names are ASCII by design: a brick name ends up in URLs, file names and recipes, and
unicode look-alikes ("bаse" with a Cyrillic a) would make two different bricks look the same.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from registry.errors import InvalidInput

__all__ = [
    "NAME_PATTERN",
    "BaseModelAliasIn",
    "BaseModelCreate",
    "BrickChoice",
    "BrickMetadata",
    "BrickPatchIn",
    "ComposeRequest",
    "Name",
    "NeuronChoice",
    "SearchRequest",
    "Tag",
    "parse_json_model",
    "validation_errors",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
M = TypeVar("M", bound="BaseModel")

TAG_PATTERN = r"^[a-z0-9][a-z0-9._:-]{0,63}$"


def _printable(value: str) -> str:
    """Refuse NUL and other C0 control characters except tab and newlines (PostgreSQL cannot
    store NUL in text, and no brick description needs a bell character)."""
    if any(ord(c) < 32 and c not in "\t\n\r" for c in value):
        raise ValueError("must not contain control characters (such as NUL)")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise ValueError("must be valid Unicode (no unpaired surrogates)")
    return value


Printable = AfterValidator(_printable)


def _no_dot_dot(value: str) -> str:
    if ".." in value:
        raise ValueError("must not contain '..'")
    return value


Name = Annotated[
    str,
    StringConstraints(pattern=NAME_PATTERN, max_length=100),
    AfterValidator(_no_dot_dot),
    Field(description="1-100 ASCII letters, digits, '.', '_', '-'; starts with a letter or digit; no '..'"),
]
Tag = Annotated[
    str,
    BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v),
    StringConstraints(pattern=TAG_PATTERN, max_length=64),
    AfterValidator(_no_dot_dot),
    Field(description="lower-case ASCII letters, digits, '.', '_', ':', '-' (1-64)"),
]
Description = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=8000), Printable]
Example = Annotated[str, StringConstraints(min_length=1, max_length=4000), Printable]


def _finite_metrics(value: dict[str, float]) -> dict[str, float]:
    bad = [k for k, v in value.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"metrics must be finite numbers (not NaN or Inf): {', '.join(sorted(bad))}")
    return value


MetricName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")]


# Versions are 64-bit everywhere (columns bigint since migration 0006).
MAX_VERSION = 2**63 - 1

# -- input/output pairs: few-shot fitting and quality evals ------------------------------

MAX_FIT_EXAMPLES = 64
MAX_PAIR_CHARS = 2000
PairText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PAIR_CHARS), Printable]


class IOPair(BaseModel):
    """One example of a task: an input and the output a model should give."""

    model_config = ConfigDict(extra="forbid", strict=True)

    input: PairText
    output: PairText


def _one_input_field(template: str) -> str:
    if (
        template.count("{input}") != 1
        or "{" in template.replace("{input}", "")
        or "}" in template.replace("{input}", "")
    ):
        raise ValueError("must contain '{input}' exactly once and no other braces")
    return template


PromptTemplate = Annotated[str, StringConstraints(min_length=7, max_length=500), AfterValidator(_one_input_field)]


class BrickMetadata(BaseModel):
    """The ``metadata`` of a brick registration."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    base_model: Name
    description: Description = Field(description="what the brick can do, in plain words")
    examples: list[Example] = Field(default_factory=list, max_length=64, description="example inputs")
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    version: int | None = Field(None, ge=1, le=MAX_VERSION, description="explicit version; default next free")
    license: Annotated[str, StringConstraints(min_length=1, max_length=100), Printable] | None = None
    metrics: Annotated[dict[MetricName, float], AfterValidator(_finite_metrics)] = Field(
        default_factory=dict, max_length=64
    )
    evals: list[IOPair] | None = Field(
        None, min_length=1, max_length=MAX_FIT_EXAMPLES, description="input/output pairs to measure the brick on"
    )
    eval_prompt: PromptTemplate = Field("{input}", description="how an eval input becomes the model's prompt")


class BrickPatchIn(BaseModel):
    """Fields a PATCH of a brick version may change."""

    model_config = ConfigDict(extra="forbid", strict=True)

    description: Description | None = None
    examples: list[Example] | None = Field(None, max_length=64)
    tags: list[Tag] | None = Field(None, max_length=32)


class BaseModelCreate(BaseModel):
    """Registration of a base model from a local directory on the server."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    path: Annotated[str, StringConstraints(min_length=1, max_length=4096), Printable] = Field(
        description=(
            "local Hugging Face model directory (config.json + safetensors), as seen by the server,"
            " or an s3:// prefix in the object store of the blob settings (copied to a local cache)"
        )
    )
    description: Annotated[str, StringConstraints(max_length=8000), Printable] = ""
    aliases: list[Annotated[str, StringConstraints(min_length=1, max_length=300), Printable]] = Field(
        default_factory=list,
        max_length=16,
        description="other names adapters may record as base_model_name_or_path (e.g. a Hub id)",
    )


class BaseModelAliasIn(BaseModel):
    """A name adapters may record as ``base_model_name_or_path`` for a registered base model."""

    model_config = ConfigDict(extra="forbid", strict=True)

    alias: Annotated[str, StringConstraints(min_length=1, max_length=300), Printable] = Field(
        description="e.g. a Hub id ('meta-llama/Llama-3.2-1B') or the directory name a brick was trained from"
    )


class SearchRequest(BaseModel):
    """A search for bricks by task description or example input."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4000), Printable] = Field(
        description="a task description or an example input"
    )
    base_model: Name | None = Field(None, description="only bricks of this base model")
    tags: list[Tag] = Field(default_factory=list, max_length=16, description="only bricks carrying every tag")
    k: int = Field(5, ge=1, le=100, description="how many bricks to return")
    offset: int = Field(0, ge=0, le=900, description="skip this many ranked bricks (for paging)")
    min_score: float | None = Field(None, allow_inf_nan=False, description="drop hits scoring below this")
    all_versions: bool = Field(False, description="rank every version, not only the latest of each brick")
    exact: bool = Field(False, description="exact nearest-neighbour search instead of the approximate index")
    kind: Literal["lora", "emergent"] | None = Field(None, description="only bricks of this kind")
    compatible: bool = Field(
        False,
        description="with base_model: also bricks registered for base models of the same fingerprint "
        "(they fit it too; compositions by instruction search this way)",
    )


MAX_WEIGHT = 100.0
Weight = Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)]


class BrickChoice(BaseModel):
    """A brick chosen for a composition."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    version: Annotated[int, Field(ge=1, le=MAX_VERSION)] | Name | None = Field(
        None, description="a version number or an alias (`production`); default: the latest version"
    )
    weight: Weight = Field(1.0, description=f"merge weight in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")


BRICK_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(@[1-9][0-9]{0,9})?$"


class NeuronChoice(BaseModel):
    """An emergent brick used in a composition: ``ablate`` or ``scale`` its neurons in the
    composed model, or ``restrict`` a brick of the recipe (``target``; default every brick)
    to them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    brick: Annotated[str, StringConstraints(max_length=112, pattern=BRICK_REF_PATTERN)] = Field(
        description="the emergent brick, NAME or NAME@VERSION"
    )
    op: Literal["ablate", "scale", "restrict"]
    factor: float | None = Field(None, ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False, description="scale only")
    target: Name | None = Field(None, description="restrict only: the recipe's brick to restrict (default: all)")

    @model_validator(mode="after")
    def _fits_op(self) -> NeuronChoice:
        if (self.op == "scale") != (self.factor is not None):
            raise ValueError("factor goes with op 'scale', and 'scale' needs one")
        if self.target is not None and self.op != "restrict":
            raise ValueError("target goes with op 'restrict' only")
        return self


class ComposeRequest(BaseModel):
    """A composed model: bricks chosen by name or by an instruction, merged into a base model."""

    model_config = ConfigDict(extra="forbid", strict=True)

    base_model: Name
    bricks: list[BrickChoice] | None = Field(None, min_length=1, max_length=32)
    instruction: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4000), Printable] | None
    ) = Field(None, description="pick the bricks by searching for this task")
    k: int = Field(3, ge=1, le=16, description="with an instruction: how many bricks to merge")
    weights: list[Weight] | None = Field(
        None, min_length=1, max_length=16, description="with an instruction: weights of the found bricks, in rank order"
    )
    method: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "linear"
    params: dict[str, Any] = Field(default_factory=dict, description="merge method parameters")
    output: Literal["full", "adapter"] = "full"
    rank: int | None = Field(None, ge=1, le=8192, description="adapter output: truncate to this rank")
    neurons: list[NeuronChoice] = Field(
        default_factory=list, max_length=16, description="operations with emergent bricks (ablate, scale, restrict)"
    )
    fit: FitRequest | None = Field(None, description="fit the bricks' weights to these examples (linear method)")

    @model_validator(mode="after")
    def _one_source(self) -> ComposeRequest:
        if (self.bricks is None) == (self.instruction is None):
            raise ValueError("give either bricks or an instruction, not both and not neither")
        if self.weights is not None and self.instruction is None:
            raise ValueError("weights go with an instruction; give each brick its own weight instead")
        if self.rank is not None and self.output != "adapter":
            raise ValueError("rank applies to output 'adapter' only")
        if self.fit is not None and (
            self.weights is not None or any("weight" in b.model_fields_set for b in self.bricks or [])
        ):
            raise ValueError("with fit the weights are fitted (from uniform 1/n): give no weights")
        if self.fit is not None and self.method != "linear":
            raise ValueError("fit finds the weights of a linear merge: use method 'linear'")
        return self


def validation_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """Flatten a pydantic error into ``"field.path: message"`` lines."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in error["loc"])
        where = ".".join(p for p in (prefix, location) if p)
        lines.append(f"{where}: {error['msg']}" if where else error["msg"])
    return lines


def parse_json_model(model: type[M], raw: str | bytes | dict[str, Any], *, what: str) -> M:
    """Validate ``raw`` (a JSON text or an already parsed object) as ``model``.

    Raises:
        InvalidInput: listing every problem, prefixed with ``what``.
    """
    try:
        data = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"{what} is not valid JSON", errors=[f"{what}: {exc}"]) from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{what} must be a JSON object", errors=[f"{what}: expected an object"])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(f"invalid {what}", errors=validation_errors(exc, what)) from None


# -- few-shot fitting of compositions -----------------------------------------------------


class FitRequest(BaseModel):
    """Fit the bricks' weights to a few examples before merging (Gauss-Newton on one scalar
    per brick; see `composer.fit_weights`). Starts from uniform weights ``1 / n``; only the
    bricks the examples need are fitted (the best brick alone, each brick that alone is the
    best on some example, and the next best until there are 2), the others get weight 0."""

    model_config = ConfigDict(extra="forbid", strict=True)

    examples: list[IOPair] = Field(min_length=1, max_length=MAX_FIT_EXAMPLES)
    steps: int = Field(40, ge=1, le=500, description="at most this many optimiser steps")
    l1: float = Field(0.05, ge=0.0, le=10.0, allow_inf_nan=False, description="weight of the L1 term on |w|")
    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="draws the fit's random starting points (recipes with spread > 0)"
    )
    prompt: PromptTemplate = Field("{input}", description="how an input becomes the model's prompt")


__all__ += ["MAX_FIT_EXAMPLES", "MAX_PAIR_CHARS", "FitRequest", "IOPair"]
ComposeRequest.model_rebuild()
