"""Read a Hugging Face base model directory without reading its weights.

`read_base_model` parses ``config.json``, the shard index (``model.safetensors.index.json``)
or the single ``model.safetensors``, and every shard's header. `find_linear_modules` names
the linear modules (and their shapes) by building the architecture on PyTorch's ``meta``
device, which allocates nothing, so it costs the same for 1B or 70B parameters.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from composer.errors import InvalidBaseModel, InvalidTensorFile
from composer.files import read_bounded
from composer.header import DEFAULT_MAX_HEADER_BYTES, FLOAT_DTYPES, SafetensorsHeader, TensorInfo, read_header

__all__ = [
    "TRANSFORMERS_LOCK",
    "BaseModelLayout",
    "LinearModule",
    "find_linear_modules",
    "find_mergeable_modules",
    "read_base_model",
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version"})
# config.json is a few KiB and an index a few MiB even for the largest models; a bound keeps a
# huge (or endless) file from being read into memory.
MAX_JSON_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class LinearModule:
    """A module of the base model a LoRA can merge into. ``fan_in_fan_out`` marks a weight
    stored ``in x out`` instead of ``out x in``: GPT-2 style Conv1D, and embeddings, which
    PEFT adapts as ``vocab -> hidden`` maps (``in_features`` is the vocabulary,
    ``embedding`` is set). ``stored_name`` is the weight's name in the checkpoint when it is
    not ``<name>.weight`` (a checkpoint saved without the model's ``base_model_prefix``)."""

    name: str
    out_features: int
    in_features: int
    fan_in_fan_out: bool = False
    embedding: bool = False
    stored_name: str | None = None

    @property
    def weight_name(self) -> str:
        """Name of the module's weight tensor in the checkpoint (the checkpoint's own key)."""
        return self.stored_name or f"{self.name}.weight"


@dataclass(frozen=True)
class BaseModelLayout:
    """A base model directory: its config and the validated header of every shard."""

    path: Path
    config: Mapping[str, Any]
    shards: Mapping[str, SafetensorsHeader]
    weight_map: Mapping[str, str]

    @property
    def architecture(self) -> str:
        """First entry of ``architectures`` in the config, else its ``model_type``."""
        archs = self.config.get("architectures")
        if isinstance(archs, list) and archs and isinstance(archs[0], str):
            return archs[0]
        return str(self.config.get("model_type", "unknown"))

    @property
    def sharded(self) -> bool:
        """Whether the weights are split over an index and several files."""
        return (self.path / INDEX_FILE).exists()

    def tensors(self) -> Iterator[tuple[str, TensorInfo]]:
        """Every (shard file, tensor), shard by shard in data order."""
        for file, header in self.shards.items():
            for info in header:
                yield file, info

    def tensor(self, name: str) -> tuple[str, TensorInfo]:
        """The shard file and header entry of tensor ``name``."""
        file = self.weight_map[name]
        return file, self.shards[file].tensors[name]

    @property
    def dtype(self) -> str:
        """The safetensors dtype holding most floating-point parameters (e.g. ``BF16``)."""
        counts: Counter[str] = Counter()
        for _, info in self.tensors():
            if info.dtype in FLOAT_DTYPES:
                counts[info.dtype] += info.numel
        return counts.most_common(1)[0][0] if counts else "F32"

    @property
    def parameter_count(self) -> int:
        """Number of stored parameters (tied weights stored once count once)."""
        return sum(info.numel for _, info in self.tensors())

    @property
    def size_bytes(self) -> int:
        """Total size of the weight files."""
        return sum(header.file_size for header in self.shards.values())

    def fingerprint(self) -> str:
        """sha256 over the canonical config and every tensor's name, dtype and shape.

        Independent of sharding, file order and tensor values: it identifies what a LoRA
        must be compatible with, not one particular set of weights.
        """
        config = {k: v for k, v in self.config.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
        tensors = sorted((info.name, info.dtype, list(info.shape)) for _, info in self.tensors())
        canonical = json.dumps({"config": config, "tensors": tensors}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def read_base_model(path: Path, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> BaseModelLayout:
    """Read config, index and shard headers of a local Hugging Face model directory.

    Args:
        path: the model directory.
        max_header_bytes: bound on every shard's header size.

    Returns:
        `BaseModelLayout`.

    Raises:
        InvalidBaseModel: listing every problem (missing files, bad JSON, bad headers,
            index entries pointing at missing tensors).
    """
    path = Path(path)
    if not path.is_dir():
        raise InvalidBaseModel(f"{path} is not a directory", [f"no directory at {path}"])
    problems: list[str] = []
    config = _read_json(path / "config.json", problems)
    files: list[str] = []
    index_weight_map: dict[str, str] = {}
    if (path / INDEX_FILE).exists():
        index = _read_json(path / INDEX_FILE, problems)
        raw_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(raw_map, dict) or not all(isinstance(v, str) for v in raw_map.values()):
            problems.append(f"{INDEX_FILE} has no valid weight_map")
        else:
            index_weight_map = dict(raw_map)
            files = sorted(set(raw_map.values()))
            for file in files:
                if "/" in file or "\\" in file or file.startswith("."):
                    problems.append(f"{INDEX_FILE} names a shard outside the directory: {file!r}")
    elif (path / SINGLE_FILE).exists():
        files = [SINGLE_FILE]
    else:
        # Names of other files are not listed: the message must not describe arbitrary directories.
        problems.append(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (only safetensors weights are read; convert .bin files)"
        )
    if problems:
        raise InvalidBaseModel(f"cannot read base model at {path}", problems)
    shards: dict[str, SafetensorsHeader] = {}
    for file in files:
        try:
            shards[file] = read_header(path / file, max_header_bytes=max_header_bytes)
        except FileNotFoundError:
            problems.append(f"shard {file} is missing")
        except OSError as exc:
            problems.append(f"shard {file} cannot be read ({exc.strerror or exc})")
        except InvalidTensorFile as exc:
            problems.extend(f"{file}: {p}" for p in exc.problems)
    weight_map: dict[str, str] = {}
    for file, header in shards.items():
        for name in header.tensors:
            if name in weight_map:
                problems.append(f"tensor {name!r} is stored twice ({weight_map[name]} and {file})")
            weight_map[name] = file
    for name, file in index_weight_map.items():
        if file in shards and weight_map.get(name) != file:
            problems.append(f"{INDEX_FILE} places {name!r} in {file}, which does not hold it")
    if problems:
        raise InvalidBaseModel(f"cannot read base model at {path}", problems[:50])
    return BaseModelLayout(path=path, config=config, shards=shards, weight_map=weight_map)


def _read_json(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        data = json.loads(read_bounded(path, MAX_JSON_BYTES).decode("utf-8"))
    except FileNotFoundError:
        problems.append(f"{path.name} is missing")
        return {}
    except OSError as exc:  # a FIFO, a device, a directory, larger than the bound
        problems.append(f"{path.name} cannot be read ({exc.strerror or exc})")
        return {}
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        problems.append(f"{path.name} is not valid JSON ({exc})")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path.name} is not a JSON object")
        return {}
    return data


V = TypeVar("V")
_LINEAR_CACHE: dict[str, dict[str, LinearModule]] = {}
# transformers' lazy module fails ("has no attribute 'AutoConfig'") when several threads
# import from it at once: code that may be a process's first user of transformers holds this
# lock (building a linear-module map here, loading an embedding model in the registry).
TRANSFORMERS_LOCK = threading.RLock()
_CACHE_LIMIT = 64  # architectures remembered per map (oldest forgotten first)


def memo_by_fingerprint(
    cache: dict[str, dict[str, V]], layout: BaseModelLayout, build: Callable[[BaseModelLayout], dict[str, V]]
) -> dict[str, V]:
    """``build(layout)`` remembered in ``cache`` by the layout's fingerprint (built once under
    `TRANSFORMERS_LOCK`, at most 64 architectures kept); a copy the caller may change."""
    key = layout.fingerprint()
    cached = cache.get(key)
    if cached is None:
        with TRANSFORMERS_LOCK:
            cached = cache.get(key)
            if cached is None:
                cached = build(layout)
                if len(cache) >= _CACHE_LIMIT:
                    cache.pop(next(iter(cache)))
                cache[key] = cached
    return dict(cached)


def find_linear_modules(layout: BaseModelLayout) -> dict[str, LinearModule]:
    """Every linear and Conv1D module whose weight is stored in the checkpoint, by module
    name (see `find_mergeable_modules`, which adds the embeddings)."""
    return {name: m for name, m in find_mergeable_modules(layout).items() if not m.embedding}


def find_mergeable_modules(layout: BaseModelLayout) -> dict[str, LinearModule]:
    """Every linear, Conv1D and embedding module whose weight is stored in the checkpoint,
    by module name (the name PEFT uses: the model's own, with ``base_model_prefix``).

    Results are remembered per fingerprint (config and every tensor's name, dtype and
    shape determine the answer), so planning many compositions on one base builds its
    architecture on the meta device once.

    The architecture is instantiated on the ``meta`` device from the config (no weights
    are read or allocated) to learn which modules are ``nn.Linear`` or transformers'
    ``Conv1D`` or ``nn.Embedding``; each is looked up in the checkpoint's header under its
    own name or, for checkpoints saved from the bare model (GPT-2 ``h.0...``, OPT
    ``decoder...``), without the ``base_model_prefix``. Linear modules whose
    weight is not stored (a ``lm_head`` tied to the embeddings) are left out: merging a
    delta into them would silently change the tied tensor too.

    Raises:
        InvalidBaseModel: when transformers does not know the architecture.
    """
    return memo_by_fingerprint(_LINEAR_CACHE, layout, _build_linear_modules)


def meta_model(layout: BaseModelLayout) -> Any:
    """The base's architecture built from its config on PyTorch's ``meta`` device (no
    weights read or allocated). Callers that may be a process's first user of transformers
    hold `TRANSFORMERS_LOCK`.

    Raises:
        InvalidBaseModel: when transformers does not know the architecture.
    """
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.for_model(**dict(layout.config))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidBaseModel(
            "unsupported base model config", [f"transformers cannot read config.json: {exc}"]
        ) from None
    model_class = getattr(transformers, layout.architecture, None)
    try:
        with torch.device("meta"):
            if isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel):
                model = model_class(config)
            else:
                model = transformers.AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    except Exception as exc:  # noqa: BLE001 - any failure means the architecture is unusable here
        raise InvalidBaseModel(
            "unsupported architecture",
            [f"transformers cannot build {layout.architecture!r} from config.json: {type(exc).__name__}: {exc}"],
        ) from None
    return model


def _build_linear_modules(layout: BaseModelLayout) -> dict[str, LinearModule]:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    model = meta_model(layout)
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    modules: dict[str, LinearModule] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out_features, in_features = module.out_features, module.in_features
            info = LinearModule(name, out_features, in_features)
            expected: tuple[int, ...] = (out_features, in_features)
        elif isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            info = LinearModule(name, int(out_features), int(in_features), fan_in_fan_out=True)
            expected = (int(in_features), int(out_features))
        elif isinstance(module, nn.Embedding):
            vocab, hidden = module.weight.shape
            info = LinearModule(name, int(hidden), int(vocab), fan_in_fan_out=True, embedding=True)
            expected = (int(vocab), int(hidden))
        else:
            continue
        stored = _stored_weight_name(name, prefix, layout)
        if stored is None or layout.shards[layout.weight_map[stored]].tensors[stored].shape != expected:
            continue
        if stored != info.weight_name:
            info = replace(info, stored_name=stored)
        modules[name] = info
    return modules


def _stored_weight_name(module: str, prefix: str, layout: BaseModelLayout) -> str | None:
    """The checkpoint key of ``module``'s weight: its own name, else the name without the
    model's ``base_model_prefix`` (how a bare ``GPT2Model``/``OPTModel`` is saved)."""
    for candidate in (f"{module}.weight", f"{module.removeprefix(prefix)}.weight" if prefix else None):
        if candidate is not None and candidate in layout.weight_map:
            return candidate
    return None
