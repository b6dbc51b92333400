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

# Config keys whose non-default value changes the forward pass beyond what a brick can carry
# (a per-module delta of a stored weight). Refused with what the setting is, why it cannot
# be merged, and what to do instead: one line per adapter, whatever its number of modules.
_UNSUPPORTED: Mapping[str, str] = {
    "layer_replication": "it changes the base model's layer layout, which a merged delta cannot express; merge it "
    "with PEFT's merge_and_unload and register the result as a base model",
    "trainable_token_indices": "it trains single embedding rows (PEFT's TrainableTokens), not a LoRA update; save "
    "the embedding with modules_to_save instead, or merge with PEFT and register the result as a base model",
    "lora_bias": "lora_B carries a trained bias, which is not part of s * B @ A; retrain with lora_bias=False",
    "use_qalora": "QA-LoRA pools the input groupwise, so its update is not s * B @ A on the full weight; merge it "
    "with PEFT and register the result as a base model",
    "use_bdlora": "block-diagonal LoRA shards its factors per device; retrain without it or merge it with PEFT",
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies only after its invocation tokens, so it changes "
    "behaviour per token and cannot be merged into weights; serve it unmerged with PEFT",
    "megatron_config": "Megatron-parallel LoRA layers are sharded across devices; save a consolidated adapter "
    "with PEFT and register that",
}

# peft_type values of adapters that are not LoRA: what they are, and why they are no brick.
_OTHER_PEFT_TYPES: Mapping[str, str] = {
    "LOHA": "a LoHa adapter (Hadamard product of two low-rank products): its update is not s * B @ A",
    "LOKR": "a LoKr adapter (Kronecker product of factors): its update is not s * B @ A",
    "IA3": "an IA3 adapter: it rescales activations by learned vectors instead of adding a low-rank update",
    "ADALORA": "an AdaLoRA adapter (P diag(E) Q with a rank mask per module): its factors are not LoRA's A and B",
    "PROMPT_TUNING": "a prompt-tuning adapter: it adds learned virtual tokens to the input and changes no weight",
    "PREFIX_TUNING": "a prefix-tuning adapter: it adds learned keys and values to attention and changes no weight",
    "P_TUNING": "a P-tuning adapter: it adds virtual tokens from a prompt encoder and changes no weight",
    "MULTITASK_PROMPT_TUNING": "a multitask prompt-tuning adapter: it adds virtual tokens and changes no weight",
}
_OTHER_ADVICE = (
    "only LoRA adapters (peft_type 'LORA', with or without DoRA) are bricks; merge it into the base with "
    "PEFT's merge_and_unload and register the result as a base model, or retrain it as a LoRA"
)
_PROMPT_ADVICE = "there is no weight to merge; use it unmerged with PEFT, or train a LoRA instead"


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
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    # PEFT's ParamWrapper targets (`composer.experts`): parameter names or dotted suffixes.
    target_parameters: tuple[str, ...] = ()

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

        def match(timeout: float, wrapped: str = wrapped) -> Any:
            return regex.match(wrapped, module, timeout=timeout)

        if _run(match, key, "rank_pattern/alpha_pattern"):
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
        what = _OTHER_PEFT_TYPES.get(peft_type) if isinstance(peft_type, str) else None
        if what is None:
            problems.append(f"peft_type is {_show(peft_type)}, not 'LORA': {_OTHER_ADVICE}")
        else:
            advice = _PROMPT_ADVICE if "changes no weight" in what else _OTHER_ADVICE
            problems.append(f"peft_type is {peft_type!r}: {what}, so it cannot be merged as a brick; {advice}")
        # The rest of a non-LoRA config means something else: one line says all there is to say.
        raise InvalidAdapter("unsupported or invalid adapter_config.json", problems)
    for key, reason in _UNSUPPORTED.items():
        if not _is_unset(data.get(key)):
            problems.append(f"{key} is set: {reason}")
    bias = data.get("bias", "none")
    if bias != "none":
        problems.append(
            f"bias is {_show(bias)}: the adapter also trains the base model's biases, which a brick does not carry "
            "(only weight updates are merged); retrain with bias='none', or merge it with PEFT's merge_and_unload "
            "and register the result as a base model"
        )
    use_dora = data.get("use_dora", False)
    if not isinstance(use_dora, bool):
        problems.append(f"use_dora must be true or false, got {_show(use_dora)}")
    modules_to_save = data.get("modules_to_save") or []
    if not isinstance(modules_to_save, list) or not all(isinstance(m, str) and m for m in modules_to_save):
        problems.append("modules_to_save must be a list of module names")
        modules_to_save = []
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
    target_parameters = data.get("target_parameters") or []
    if (
        not isinstance(target_parameters, list)
        or len(target_parameters) > _MAX_PATTERNS
        or not all(isinstance(t, str) and t for t in target_parameters)
    ):
        problems.append("target_parameters must be a list of parameter names")
        target_parameters = []
    elif target_parameters and (use_dora is True or fan_in_fan_out is True):
        # PEFT's ParamWrapper refuses both itself, so no such adapter can have been trained.
        problems.append("target_parameters cannot be combined with use_dora or fan_in_fan_out (PEFT refuses both)")
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
        use_dora=bool(use_dora),
        modules_to_save=tuple(modules_to_save),
        target_parameters=tuple(target_parameters),
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

_MAGNITUDE = "lora_magnitude_vector"


def split_lora_key(key: str) -> tuple[str, Factor] | None:
    """Split a saved adapter tensor name into (module name, "A" | "B"), or None.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` gives
    ``("model.layers.0.self_attn.q_proj", "A")``; an embedding LoRA's
    ``...embed_tokens.lora_embedding_A`` gives ``("model.embed_tokens", "A")``. PEFT strips
    the adapter name on save; a name that still carries one (``lora_A.default.weight``,
    ``lora_embedding_A.default``) is accepted too.
    """
    name = key.removeprefix(_KEY_PREFIX)
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        module = ".".join(parts[:-1])
        return module, "A" if parts[-1].endswith("A") else "B"
    if len(parts) >= 3 and parts[-2] in ("lora_embedding_A", "lora_embedding_B") and parts[-1]:
        module = ".".join(parts[:-2])
        return module, "A" if parts[-2].endswith("A") else "B"
    if len(parts) < 3 or parts[-1] != "weight":
        return None
    for index in (-2, -3):
        if len(parts) + index >= 1 and parts[index] in ("lora_A", "lora_B"):
            if index == -3 and not parts[-2]:
                return None
            module = ".".join(parts[:index])
            return (module, "A" if parts[index] == "lora_A" else "B") if module else None
    return None


def _split_magnitude(key: str) -> str | None:
    """The module of a DoRA magnitude vector (``<module>.lora_magnitude_vector``, optionally
    followed by the adapter name and/or ``.weight``), or None."""
    parts = key.removeprefix(_KEY_PREFIX).split(".")
    if _MAGNITUDE not in parts[1:]:
        return None
    index = parts.index(_MAGNITUDE, 1)
    rest = parts[index + 1 :]
    if len(rest) > 2 or (rest and rest[-1] != "weight" and len(rest) == 2):
        return None
    return ".".join(parts[:index])


@dataclass(frozen=True)
class AdapterTensors:
    """Tensor names of an adapter, grouped by base-model module.

    * ``modules``: LoRA factor pairs ``{module: (A, B)}`` (linear and embedding LoRA);
    * ``magnitudes``: DoRA magnitude vectors ``{module: name}``;
    * ``copies``: full copies of a module's weight (``modules_to_save``, or an embedding
      saved by PEFT's ``save_embedding_layers``) ``{module: name}``;
    * ``base_layers``: a targeted module's own base weight (``<module>.base_layer.weight``,
      which PEFT saves with ``save_embedding_layers``) ``{module: name}``;
    * ``bias_copies``: the bias of a saved module copy ``{module: name}``.
    """

    modules: Mapping[str, tuple[str, str]]
    magnitudes: Mapping[str, str] = field(default_factory=dict)
    copies: Mapping[str, str] = field(default_factory=dict)
    base_layers: Mapping[str, str] = field(default_factory=dict)
    bias_copies: Mapping[str, str] = field(default_factory=dict)


def map_adapter_tensors(names: Iterable[str]) -> AdapterTensors:
    """Group adapter tensor names by module and kind (see `AdapterTensors`).

    Raises:
        InvalidAdapter: for tensors of no known kind (biases, other PEFT methods' tensors),
            modules missing their A or B, and magnitudes without factors.
    """
    found: dict[str, dict[Factor, str]] = {}
    magnitudes: dict[str, str] = {}
    copies: dict[str, str] = {}
    base_layers: dict[str, str] = {}
    bias_copies: dict[str, str] = {}
    problems: list[str] = []
    for name in names:
        split = split_lora_key(name)
        if split is not None:
            module, factor = split
            found.setdefault(module, {})[factor] = name
            continue
        magnitude = _split_magnitude(name)
        if magnitude is not None:
            magnitudes[magnitude] = name
            continue
        stripped = name.removeprefix(_KEY_PREFIX)
        if stripped.endswith(".base_layer.weight"):
            base_layers[stripped.removesuffix(".base_layer.weight")] = name
        elif stripped.endswith(".weight") and len(stripped) > len(".weight") and "lora_" not in stripped:
            copies[stripped.removesuffix(".weight")] = name
        elif stripped.endswith(".bias") and len(stripped) > len(".bias") and "lora_" not in stripped:
            bias_copies[stripped.removesuffix(".bias")] = name
        else:
            problems.append(
                f"tensor {name[:200]!r} is not a LoRA tensor (expected '<module>.lora_A.weight', '.lora_B.weight', "
                "'.lora_embedding_A/B', '.lora_magnitude_vector' or a saved module's '.weight')"
            )
    for module, factors in sorted(found.items()):
        embedding = any("lora_embedding_" in n for n in factors.values())
        missing = [f"lora_{'embedding_' if embedding else ''}{f}" for f in ("A", "B") if f not in factors]
        if missing:
            problems.append(f"module {module!r} has no {' or '.join(missing)} tensor")
    for module in sorted(bias_copies):
        if module not in copies:
            problems.append(f"module {module!r} has a saved bias but no saved weight (not a modules_to_save copy)")
    for module in sorted(magnitudes):
        if module not in found:
            problems.append(f"module {module!r} has a DoRA magnitude vector but no lora_A/lora_B factors")
    if not found and not copies and not problems:
        problems.append("the weights file holds no LoRA tensors")
    if problems:
        raise InvalidAdapter("invalid adapter weights", problems[:50])
    return AdapterTensors(
        modules={m: (f["A"], f["B"]) for m, f in sorted(found.items())},
        magnitudes=dict(sorted(magnitudes.items())),
        copies=dict(sorted(copies.items())),
        base_layers=dict(sorted(base_layers.items())),
        bias_copies=dict(sorted(bias_copies.items())),
    )
