"""LoRA on raw parameters (PEFT's ``target_parameters``, its ``ParamWrapper``): fused
mixture-of-experts tensors and routers that are ``nn.Parameter``s, not ``nn.Linear`` modules.

PEFT 0.21 semantics (``peft/tuners/lora/layer.py``, ``ParamWrapper``), for a parameter of
shape ``(E, d1, d2)``:

* ``lora_A`` is ``(r*E, in)`` and ``lora_B`` is ``(out, r*E)``; expert ``e``'s factors are
  ``A_e = lora_A[e*r:(e+1)*r]`` (rows grouped by expert) and ``B_e = lora_B[:, e::E]`` (the
  columns interleaved: ``lora_B.reshape(out, r, E)[..., e]``), and its delta is
  ``s * B_e @ A_e``;
* transformers' default expert layout ``(E, out, in)`` (``F.linear(x, W[e])``) stores that
  delta as it is; a module marked ``is_transposed`` (GPT-OSS) stores ``(E, in, out)``, so the
  delta is transposed;
* a 2-D parameter (a router's ``weight``) is one expert: ``out x in = shape``, ``s * B @ A``;
* several targeted parameters of one module nest their wrappers in the module's parameter
  order: the first is innermost, so its tensors are saved under ``<module>.base_layer...``
  once per wrapper around it (`adapter_module_name`).

Checkpoints store the experts their own way: transformers 5 converts per-expert 2-D tensors
(Qwen-MoE ``mlp.experts.N.gate_proj/up_proj/down_proj``, Mixtral
``block_sparse_moe.experts.N.w1/w3/w2``) into fused 3-D parameters when it loads, and back when
it saves. The checkpoint's own tensor names are the truth for where a delta lands:
`find_raw_parameters` runs transformers' own key conversion over the checkpoint's names and
maps each parameter to its *sites*, the stored 2-D tensors with the expert and the rows of
the per-expert matrix each holds. Each site's delta is a plain low-rank product
(`ExpertView.factors`), so sites merge like any linear module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from composer.basemodel import BaseModelLayout, memo_by_fingerprint, meta_model

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "ExpertSite",
    "ExpertView",
    "RawParameter",
    "adapter_module_name",
    "find_raw_parameters",
    "fused_factors",
    "selects_parameter",
]


@dataclass(frozen=True)
class ExpertView:
    """Which part of a ParamWrapper's factors makes the delta of one stored tensor:
    expert ``expert`` of ``experts``, rows ``start:stop`` of that expert's matrix as the
    parameter stores it (``out`` rows, or ``in`` rows when ``transposed``)."""

    experts: int
    expert: int
    start: int
    stop: int
    transposed: bool = False

    def factors(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``(A', B')`` with ``s * B' @ A'`` the site's delta (``out x in``; transposed
        into the stored layout by the caller when ``transposed``).

        Args:
            a: the wrapper's whole ``lora_A`` (``r*E x in``).
            b: the wrapper's whole ``lora_B`` (``out x r*E``).
        """
        rank = a.shape[0] // self.experts
        a_e = a[self.expert * rank : (self.expert + 1) * rank]
        b_e = b[:, self.expert :: self.experts]
        if self.transposed:
            return a_e[:, self.start : self.stop].contiguous(), b_e.contiguous()
        return a_e.contiguous(), b_e[self.start : self.stop].contiguous()


@dataclass(frozen=True)
class ExpertSite:
    """A stored tensor that holds part of a raw parameter: checkpoint key, the part's view,
    and the stored tensor's 2-D shape."""

    key: str
    view: ExpertView
    shape: tuple[int, int]


@dataclass(frozen=True)
class RawParameter:
    """A parameter PEFT's ``target_parameters`` can adapt (``name`` = ``<module>.<parameter>``
    in the model's own naming), its shape and where the checkpoint stores it.

    ``sites`` is empty when the checkpoint's layout of it cannot take a delta here; ``problem``
    then says why.
    """

    name: str
    module: str
    parameter: str
    shape: tuple[int, ...]
    transposed: bool
    order: int
    sites: tuple[ExpertSite, ...] = ()
    problem: str | None = None

    @property
    def experts(self) -> int:
        """Number of experts (1 for a 2-D parameter)."""
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def in_features(self) -> int:
        """PEFT's ``in_features`` of the wrapper (columns of ``lora_A``)."""
        if len(self.shape) == 2:
            return self.shape[1]
        return self.shape[1] if self.transposed else self.shape[2]

    @property
    def out_features(self) -> int:
        """PEFT's ``out_features`` of the wrapper (rows of ``lora_B``)."""
        if len(self.shape) == 2:
            return self.shape[0]
        return self.shape[2] if self.transposed else self.shape[1]


def selects_parameter(targets: Sequence[str], name: str) -> bool:
    """Whether PEFT's ``target_parameters`` select parameter ``name`` (``<module>.<param>``):
    an entry equal to it or a dotted suffix of it (``peft.tuners.tuners_utils``)."""
    return name in targets or any(name.endswith("." + t) for t in targets)


def adapter_module_name(parameter: RawParameter, targeted: Sequence[RawParameter]) -> str:
    """The module name under which PEFT saves ``parameter``'s ``lora_A``/``lora_B``, given
    every targeted parameter: wrappers of one module nest in the module's parameter order,
    the first innermost, so ``.base_layer`` is repeated once per wrapper around this one."""
    later = sum(1 for p in targeted if p.module == parameter.module and p.order > parameter.order)
    return parameter.module + ".base_layer" * later


def fused_factors(per_expert: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """A ParamWrapper's ``(lora_A, lora_B)`` from each expert's ``(A_e, B_e)`` (all of one
    rank ``R``): ``lora_A`` stacks the ``A_e`` by expert, ``lora_B`` interleaves the
    ``B_e``'s columns (column ``j*E + e`` is column ``j`` of ``B_e``), as PEFT reads them."""
    import torch

    a = torch.cat([a_e for a_e, _ in per_expert], dim=0)
    b = torch.stack([b_e for _, b_e in per_expert], dim=2)  # out x R x E
    return a.contiguous(), b.reshape(b.shape[0], -1).contiguous()


_CACHE: dict[str, dict[str, RawParameter]] = {}


def find_raw_parameters(layout: BaseModelLayout) -> dict[str, RawParameter]:
    """Every 2-D or 3-D parameter of a module that is not a linear, Conv1D or embedding layer
    (fused experts, routers), by ``<module>.<parameter>``, with its checkpoint sites.

    Remembered per fingerprint, like `composer.basemodel.find_mergeable_modules`.

    Raises:
        InvalidBaseModel: when transformers does not know the architecture.
    """
    return memo_by_fingerprint(_CACHE, layout, _build)


def _build(layout: BaseModelLayout) -> dict[str, RawParameter]:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    model = meta_model(layout)
    found: dict[str, RawParameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D, nn.Embedding)) or not module_name:
            continue
        transposed = bool(getattr(module, "is_transposed", False))
        for order, (param_name, param) in enumerate(module.named_parameters(recurse=False)):
            if param.ndim not in (2, 3):
                continue
            name = f"{module_name}.{param_name}"
            found[name] = RawParameter(name, module_name, param_name, tuple(param.shape), transposed, order)
    if not found:
        return found
    sites = _checkpoint_sites(model, layout, found)
    return {name: _with_sites(raw, sites.get(name, [])) for name, raw in found.items()}


def _with_sites(raw: RawParameter, parts: list[tuple[str, int | None, int, tuple[int, ...]]]) -> RawParameter:
    """Check that the stored parts cover the parameter exactly and make their views."""
    from dataclasses import replace

    if not parts:
        return replace(raw, problem="the checkpoint does not store it under a name transformers maps to it")
    if len(raw.shape) == 2:
        [(key, _, _, shape)] = parts if len(parts) == 1 else [(None, None, None, ())]
        if key is None or tuple(shape) != raw.shape:
            return replace(raw, problem="the checkpoint stores it in a layout that does not match the model's")
        view = ExpertView(1, 0, 0, raw.shape[0])
        return replace(raw, sites=(ExpertSite(key, view, (raw.shape[0], raw.shape[1])),))
    if any(expert is None for _, expert, _, _ in parts):
        # A fused 3-D tensor in the checkpoint (GPT-OSS): not split per expert here yet.
        return replace(
            raw,
            problem="the checkpoint stores the fused 3-D tensor itself; only checkpoints with one 2-D tensor per "
            "expert (as transformers saves Mixtral and Qwen-MoE) take a target_parameters delta here",
        )
    experts, rows, cols = raw.shape
    out: list[ExpertSite] = []
    for expert in range(experts):
        start = 0
        for key, _, _, shape in sorted((p for p in parts if p[1] == expert), key=lambda p: p[2]):
            if len(shape) != 2 or shape[1] != cols:
                return replace(
                    raw, problem=f"the checkpoint's {key!r} is {list(shape)}, not a slice of {list(raw.shape)}"
                )
            view = ExpertView(experts, expert, start, start + shape[0], raw.transposed)
            out.append(ExpertSite(key, view, (int(shape[0]), int(shape[1]))))
            start += shape[0]
        if start != rows:
            return replace(
                raw, problem=f"the checkpoint's tensors of expert {expert} do not add up to {list(raw.shape)}"
            )
    return replace(raw, sites=tuple(out))


def _checkpoint_sites(
    model: Any, layout: BaseModelLayout, found: Mapping[str, RawParameter]
) -> dict[str, list[tuple[str, int | None, int, tuple[int, ...]]]]:
    """Checkpoint key -> (parameter, expert, part) through transformers' own load-time key
    conversion (renamings, then at most one converter)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
        WeightRenaming,
        apply_renamings,
        rename_source_key,
    )

    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta_state = dict.fromkeys(model.state_dict(), True)
    prefix = getattr(model, "base_model_prefix", None) or None
    sites: dict[str, list[tuple[str, int | None, int, tuple[int, ...]]]] = {}
    for key in layout.weight_map:
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if target not in found:
            continue
        shape = layout.tensor(key)[1].shape
        if pattern is None:
            sites.setdefault(target, []).append((key, None if len(shape) == 3 else 0, 0, shape))
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        kinds = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
        if kinds not in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]):
            continue  # another kind of fusion: the parameter is reported as unmapped
        part = converter.source_patterns.index(pattern)
        expert = _expert_index(apply_renamings(key, renamings), pattern)
        if expert is None:
            continue
        sites.setdefault(target, []).append((key, expert, part, shape))
    return sites


def _expert_index(key: str, pattern: str) -> int | None:
    """The expert number a converter's ``*`` stands for in ``key``."""
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    match = re.search(regex, key)
    return int(match.group(1)) if match else None
