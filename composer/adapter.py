"""PEFT LoRA adapter semantics: which configs are supported, per-module rank and scaling,
and how tensor names in ``adapter_model.safetensors`` map to base-model modules.

This mirrors PEFT 0.21 exactly where it matters for merging:

* scaling is ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``;
* ``rank_pattern``/``alpha_pattern`` keys are regexes matched as
  ``re.match(rf"(.*\\.)?({key})$", module_name)``, first matching key wins
  (``peft.utils.other.get_pattern_key``);
* ``target_modules`` as a string is a regex that must fully match the module name; as a
  list, an entry matches a module named exactly so or ending in ``"." + entry``
  (``peft.tuners.tuners_utils.check_target_module_exists``).

User-supplied patterns are evaluated with the ``regex`` package under a timeout, so a
hostile pattern cannot stall the process. Nothing here imports torch.
"""

from __future__ import annotations

import contextvars
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import regex

from composer.errors import InvalidAdapter

__all__ = [
    "AdapterTensors",
    "LoraSettings",
    "map_adapter_tensors",
    "parse_lora_config",
    "pattern_budget",
    "peft_pattern",
    "split_lora_key",
]

_REGEX_TIMEOUT_S = 0.05
_MAX_PATTERN_CHARS = 512
_MAX_PATTERNS = 4096
# rank_pattern + alpha_pattern keys: each is compiled twice (regex and re, ~1 ms) and may be
# tried against every module; a key per module of a 70B model is about 560.
_MAX_PATTERN_KEYS = 1024
_KEY_PREFIX = "base_model.model."

# Config keys whose non-default value changes the forward pass beyond ``W + s * B @ A``
# (or adds weights that are not LoRA factors). Refused, with the reason, until supported.
_UNSUPPORTED: Mapping[str, str] = {
    "use_dora": "DoRA adapters (use_dora) rescale the merged weight by a learned magnitude",
    "modules_to_save": "modules_to_save ships full copies of modules, which are not LoRA factors",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "layer_replication": "layer_replication changes the base model's layer layout",
    "trainable_token_indices": "trainable_token_indices adds embedding rows, which are not LoRA factors",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "use_qalora": "QA-LoRA adapters are not supported",
    "use_bdlora": "block-diagonal LoRA adapters are not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) changes behaviour per token and cannot be merged",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
}


def _is_unset(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


@dataclass(frozen=True)
class LoraSettings:
    """The merge-relevant part of a PEFT LoRA ``adapter_config.json``."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def rank_for(self, module: str) -> int:
        """The LoRA rank of ``module`` (``rank_pattern`` first, else ``r``)."""
        key = _pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        """The LoRA alpha of ``module`` (``alpha_pattern`` first, else ``lora_alpha``)."""
        key = _pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scaling_for(self, module: str) -> float:
        """The factor ``s`` in ``delta = s * B @ A`` for ``module``."""
        r = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether ``target_modules`` (minus ``exclude_modules``) selects ``module``."""
        if self.exclude_modules is not None and _selects(self.exclude_modules, module):
            return False
        if self.target_modules is None:
            return False
        return _selects(self.target_modules, module)


def _selects(spec: tuple[str, ...] | str, module: str) -> bool:
    if isinstance(spec, str):
        if spec == "all-linear":
            return True
        return _fullmatch(spec, module)
    return module in spec or any(module.endswith("." + t) for t in spec)


# The deadline of the current request for all its pattern matching (see `pattern_budget`).
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("pattern_deadline", default=None)


@contextmanager
def pattern_budget(seconds: float) -> Iterator[None]:
    """Bound the total time of user-pattern matching inside the block (all bricks, all
    modules, all keys): past it, matching raises `InvalidAdapter`. Each single match is
    also bounded (50 ms), and one that times out is an error, not a silent non-match,
    so that registration and composition never decide differently on a slow machine."""
    token = _DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _timeout() -> float:
    deadline = _DEADLINE.get()
    if deadline is None:
        return _REGEX_TIMEOUT_S
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise InvalidAdapter(
            "module patterns take too long",
            ["rank_pattern/alpha_pattern/target_modules: matching the patterns exceeded this request's time budget"],
        )
    return min(_REGEX_TIMEOUT_S, remaining)


def _run(match: Callable[[float], Any], pattern: str, where: str) -> Any:
    try:
        return match(_timeout())
    except TimeoutError:
        deadline = _DEADLINE.get()
        if deadline is not None and time.monotonic() >= deadline:
            _timeout()  # the request's budget ran out, not this pattern's own limit: say so
        raise InvalidAdapter(
            "module pattern too slow", [f"{where}: {_show(pattern)} takes more than {_REGEX_TIMEOUT_S} s to match"]
        ) from None
    except regex.error as exc:  # a stored pattern that predates the wrapper check
        raise InvalidAdapter("invalid module pattern", [f"{where}: {_show(pattern)} ({exc})"]) from None


def _fullmatch(pattern: str, text: str) -> bool:
    return _run(lambda t: regex.fullmatch(pattern, text, timeout=t), pattern, "target_modules") is not None


def peft_pattern(key: str) -> str:
    """The regular expression PEFT builds from a ``rank_pattern``/``alpha_pattern`` key
    (``peft.utils.other.get_pattern_key``): matched with ``re.match`` on a module name."""
    return rf"(.*\.)?({key})$"


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    for key in patterns:
        wrapped = peft_pattern(key)
        if _run(lambda t, w=wrapped: regex.match(w, module, timeout=t), key, "rank_pattern/alpha_pattern"):
            return key
    return None


def parse_lora_config(data: Any) -> LoraSettings:
    """Validate a parsed ``adapter_config.json`` and return its merge-relevant settings.

    Args:
        data: the JSON document (any type; a non-object is a problem like any other).

    Returns:
        `LoraSettings`.

    Raises:
        InvalidAdapter: listing every problem found.
    """
    if not isinstance(data, dict):
        raise InvalidAdapter("invalid adapter_config.json", ["the document is not a JSON object"])
    problems: list[str] = []
    peft_type = data.get("peft_type")
    if peft_type != "LORA":
        problems.append(f"peft_type must be 'LORA', got {_show(peft_type)}: only LoRA adapters are bricks for now")
    for key, reason in _UNSUPPORTED.items():
        if not _is_unset(data.get(key)):
            problems.append(f"{key} is set: {reason}")
    bias = data.get("bias", "none")
    if bias != "none":
        problems.append(f"bias is {_show(bias)}: adapters that train biases are not supported (need 'none')")
    r: Any = data.get("r")
    if not _is_int(r) or r < 1:
        problems.append(f"r must be a positive integer, got {_show(r)}")
    alpha: Any = data.get("lora_alpha", r if _is_int(r) else None)
    if not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        problems.append(f"lora_alpha must be a positive finite number, got {_show(alpha)}")
    use_rslora = data.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        problems.append(f"use_rslora must be true or false, got {_show(use_rslora)}")
    fan_in_fan_out = data.get("fan_in_fan_out", False)
    if not isinstance(fan_in_fan_out, bool):
        problems.append(f"fan_in_fan_out must be true or false, got {_show(fan_in_fan_out)}")
    target_modules = _module_spec(data.get("target_modules"), "target_modules", problems)
    exclude_modules = _module_spec(data.get("exclude_modules"), "exclude_modules", problems)
    rank_pattern = _pattern_map(data.get("rank_pattern"), "rank_pattern", problems, integer=True)
    alpha_pattern = _pattern_map(data.get("alpha_pattern"), "alpha_pattern", problems, integer=False)
    base = data.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        problems.append(f"base_model_name_or_path must be a string, got {_show(base)}")
        base = None
    if problems:
        raise InvalidAdapter("unsupported or invalid adapter_config.json", problems)
    return LoraSettings(
        r=int(r),
        lora_alpha=float(alpha),
        use_rslora=bool(use_rslora),
        fan_in_fan_out=bool(fan_in_fan_out),
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        rank_pattern={k: int(v) for k, v in rank_pattern.items()},
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        base_model_name_or_path=base,
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _valid_regex(pattern: str, where: str, problems: list[str], *, peft_key: bool = False) -> bool:
    """Compile ``pattern`` in the exact form it is used: a ``rank_pattern``/``alpha_pattern``
    key inside PEFT's wrapper, by both ``regex`` (here) and ``re`` (PEFT, when the adapter
    is loaded). A back-reference like ``(q)(_)\\2`` compiles alone but not wrapped."""
    if len(pattern) > _MAX_PATTERN_CHARS:
        problems.append(f"{where}: pattern longer than {_MAX_PATTERN_CHARS} characters")
        return False
    used = peft_pattern(pattern) if peft_key else pattern
    try:
        regex.compile(used)
        re.compile(used)
    except (regex.error, re.error, RecursionError, OverflowError) as exc:
        form = f" as PEFT uses it, {_show(used)}" if peft_key else ""
        problems.append(f"{where}: {_show(pattern)} is not a valid regular expression{form} ({exc})")
        return False
    return True


def _module_spec(value: Any, key: str, problems: list[str]) -> tuple[str, ...] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value if _valid_regex(value, key, problems) else None
    if isinstance(value, list) and len(value) <= _MAX_PATTERNS and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    problems.append(f"{key} must be a regex string or a list of module names")
    return None


def _pattern_map(value: Any, key: str, problems: list[str], *, integer: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{key} must be an object mapping module patterns to numbers")
        return {}
    if len(value) > _MAX_PATTERN_KEYS:
        problems.append(f"{key} has {len(value)} patterns; at most {_MAX_PATTERN_KEYS} are accepted")
        return {}
    out: dict[str, Any] = {}
    for pattern, number in value.items():
        if not _valid_regex(pattern, f"{key}[{_show(pattern)}]", problems, peft_key=True):
            continue
        valid = _is_int(number) if integer else _is_number(number)
        if not valid or not math.isfinite(number) or number <= 0:
            kind = "a positive integer" if integer else "a positive number"
            problems.append(f"{key}[{_show(pattern)}] must be {kind}, got {_show(number)}")
            continue
        out[pattern] = number
    return out


Factor = Literal["A", "B"]


def split_lora_key(key: str) -> tuple[str, Factor] | None:
    """Split a saved adapter tensor name into (module name, "A" | "B"), or None.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` gives
    ``("model.layers.0.self_attn.q_proj", "A")``. PEFT strips the adapter name on save; a
    name that still carries one (``lora_A.default.weight``) is accepted too.
    """
    name = key.removeprefix(_KEY_PREFIX)
    parts = name.split(".")
    if len(parts) < 3 or parts[-1] != "weight":
        return None
    for index in (-2, -3):
        if len(parts) + index >= 1 and parts[index] in ("lora_A", "lora_B"):
            if index == -3 and not parts[-2]:
                return None
            module = ".".join(parts[:index])
            return (module, "A" if parts[index] == "lora_A" else "B") if module else None
    return None


@dataclass(frozen=True)
class AdapterTensors:
    """Tensor names of an adapter, grouped by base-model module: ``{module: (A, B)}``."""

    modules: Mapping[str, tuple[str, str]]


def map_adapter_tensors(names: Iterable[str]) -> AdapterTensors:
    """Group adapter tensor names by module; every tensor must be a LoRA A or B factor.

    Raises:
        InvalidAdapter: for tensors that are not LoRA factors (biases, DoRA magnitudes,
            embedding LoRAs, saved modules) and for modules missing their A or B.
    """
    found: dict[str, dict[Factor, str]] = {}
    problems: list[str] = []
    for name in names:
        split = split_lora_key(name)
        if split is None:
            problems.append(
                f"tensor {name[:200]!r} is not a LoRA factor (expected '<module>.lora_A.weight' or '.lora_B.weight')"
            )
            continue
        module, factor = split
        found.setdefault(module, {})[factor] = name
    for module, factors in sorted(found.items()):
        missing = [f"lora_{f}" for f in ("A", "B") if f not in factors]
        if missing:
            problems.append(f"module {module!r} has no {' or '.join(missing)} tensor")
    if not found and not problems:
        problems.append("the weights file holds no LoRA tensors")
    if problems:
        raise InvalidAdapter("invalid adapter weights", problems[:50])
    return AdapterTensors(modules={m: (f["A"], f["B"]) for m, f in sorted(found.items())})
