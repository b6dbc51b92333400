"""A neuron set as a small safetensors file: one int64 tensor per layer plus string metadata.

Tensors are named ``layers.<N>`` (sorted, unique indices); metadata holds the format
version, the function, the method and its parameters (JSON), and the probe sets' hashes
(JSON), so a stored emergent brick says how it was found.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from composer.emergent.selection import NeuronSet
from composer.errors import InvalidTensorFile

__all__ = ["FORMAT", "NeuronFile", "load_neuron_set", "save_neuron_set"]

FORMAT = "brickyard.neuron-set.v1"
_PREFIX = "layers."


@dataclass(frozen=True)
class NeuronFile:
    """A neuron set with how it was found."""

    neurons: NeuronSet
    function: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    probe_hashes: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Total number of neurons."""
        return sum(int(i.numel()) for i in self.neurons.values())


def save_neuron_set(path: Path, entry: NeuronFile) -> Path:
    """Write ``entry`` to ``path`` (indices sorted and de-duplicated).

    Args:
        path: the file to write.
        entry: the neuron set and its provenance.

    Returns:
        ``path``.
    """
    tensors = {
        f"{_PREFIX}{layer}": torch.unique(index.to(torch.int64).reshape(-1)).contiguous()
        for layer, index in sorted(entry.neurons.items())
    }
    metadata = {
        "format": FORMAT,
        "function": entry.function,
        "method": entry.method,
        "params": json.dumps(entry.params, sort_keys=True),
        "probe_hashes": json.dumps(entry.probe_hashes, sort_keys=True),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_neuron_set(path: Path) -> NeuronFile:
    """Read a file written by `save_neuron_set`.

    Raises:
        InvalidTensorFile: not such a file (wrong format, names, dtypes or metadata).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata: Mapping[str, str] = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise InvalidTensorFile(f"cannot read neuron set {path.name}", [str(error)]) from None
    problems = []
    if metadata.get("format") != FORMAT:
        problems.append(f"format is {metadata.get('format')!r}, expected {FORMAT!r}")
    neurons: NeuronSet = {}
    for name, tensor in tensors.items():
        layer = name.removeprefix(_PREFIX)
        if not name.startswith(_PREFIX) or not layer.isdigit():
            problems.append(f"unexpected tensor {name!r}")
        elif tensor.dtype != torch.int64 or tensor.dim() != 1:
            problems.append(f"{name}: expected 1-D int64, got {tensor.dtype} {tuple(tensor.shape)}")
        else:
            neurons[int(layer)] = tensor
    try:
        params = json.loads(metadata.get("params", "{}"))
        probe_hashes = json.loads(metadata.get("probe_hashes", "{}"))
    except json.JSONDecodeError as error:
        problems.append(f"metadata is not JSON: {error}")
        params, probe_hashes = {}, {}
    if problems:
        raise InvalidTensorFile(f"not a neuron set: {path.name}", problems)
    return NeuronFile(
        neurons=dict(sorted(neurons.items())),
        function=metadata.get("function", ""),
        method=metadata.get("method", ""),
        params=params,
        probe_hashes=probe_hashes,
    )
