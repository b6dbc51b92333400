"""Emergent bricks: functional neuron partitions of a base model's feed-forward layers.

A *neuron* is one coordinate of an FFN's intermediate activation: for SwiGLU (Llama, Mistral,
Qwen) ``act(gate_proj(x)) * up_proj(x)``, the input of ``down_proj``; for GPT-2, the input of
``mlp.c_proj``. Neuron ``i`` of a layer writes to the residual stream through column ``i`` of
``down_proj`` (row ``i`` of a GPT-2 ``Conv1D`` weight).

* `statistics`: stream probe texts through a model with hooks, keep bounded per-neuron counts.
* `selection`: pure functions picking each function's neurons from those counts (LAPE, AP).
* `verification`: ablate neuron sets with hooks and measure held-out loss against random sets.
* `ops`: exact tensor operations for compositions (ablate/scale neurons, restrict a LoRA).
* `neuron_file`: a neuron set as a small safetensors file with metadata.

Importing this package imports torch (like `composer.methods.ops`), never transformers and
never the registry: callers pass a loaded ``torch.nn.Module`` and token ids.
"""

from composer.emergent.neuron_file import NeuronFile, load_neuron_set, save_neuron_set
from composer.emergent.ops import (
    ablate_neurons,
    neuron_axis,
    restrict_delta,
    restrict_lora,
    scale_neurons,
)
from composer.emergent.selection import (
    SELECTION_METHODS,
    NeuronSet,
    SelectionMethod,
    average_precision,
    select_average_precision,
    select_lape,
    select_neurons,
)
from composer.emergent.statistics import (
    NeuronStatistics,
    ProbeBatch,
    collect_statistics,
    ffn_output_projections,
)
from composer.emergent.verification import (
    VerificationTable,
    ablated,
    mean_loss,
    random_like,
    verify_neuron_sets,
)

__all__ = [
    "SELECTION_METHODS",
    "NeuronFile",
    "NeuronSet",
    "NeuronStatistics",
    "ProbeBatch",
    "SelectionMethod",
    "VerificationTable",
    "ablate_neurons",
    "ablated",
    "average_precision",
    "collect_statistics",
    "ffn_output_projections",
    "load_neuron_set",
    "mean_loss",
    "neuron_axis",
    "random_like",
    "restrict_delta",
    "restrict_lora",
    "save_neuron_set",
    "scale_neurons",
    "select_average_precision",
    "select_lape",
    "select_neurons",
    "verify_neuron_sets",
]
