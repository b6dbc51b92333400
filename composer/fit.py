"""Few-shot weight fitting: the per-brick weights of a linear merge that fit a few examples.

LoraHub's idea (search the merge weights on a handful of examples), done with exact gradients.
The bricks stay unmerged: every targeted linear module computes

    x -> W x + sum_i w_i * s_i * B_i (A_i x)

which is the forward of the linear merge ``W + sum_i w_i s_i B_i A_i`` (composer's ``linear``
method, full output), so the fitted weights go straight into a recipe. Only the scalars
``w_i`` are optimised (Adam, a fixed number of steps, an L1 term, weights kept in bounds);
the loss is the cross-entropy of the answer tokens given the prompt.

Nothing here knows about the registry; torch, transformers and safetensors are imported when
a fit runs.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer.adapter import map_adapter_tensors, parse_lora_config
from composer.errors import InvalidAdapter, InvalidParams

if TYPE_CHECKING:
    import torch

__all__ = ["FitResult", "LoraMixture", "examples_hash", "fit_weights"]

ProgressCallback = Callable[[float, str], None]
Example = tuple[str, str]


def examples_hash(examples: Sequence[Example]) -> str:
    """sha256 (hex) of the examples as canonical JSON: ``[{"input": ..., "output": ...}, ...]``
    in the given order, keys sorted, no whitespace, UTF-8."""
    document = [{"input": text, "output": answer} for text, answer in examples]
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class FitResult:
    """What `fit_weights` found.

    ``losses[k]`` is the objective (cross-entropy + L1) before step k; the last entry is the
    objective after the last step, so ``len(losses) == steps + 1``. ``initial_loss`` and
    ``final_loss`` are the cross-entropy alone, at the initial and the fitted weights.
    """

    weights: tuple[float, ...]
    losses: tuple[float, ...]
    initial_loss: float
    final_loss: float
    examples_hash: str
    seconds: float


class LoraMixture:
    """A base model with bricks attached unmerged, one trainable scalar weight per brick.

    ``mixture.model`` is an ordinary causal LM whose forward uses the current ``weights``;
    `loss` is the answer-only cross-entropy on examples. Built by `load`.
    """

    def __init__(self, model: Any, tokenizer: Any, weights: torch.Tensor, handles: list[Any]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.weights = weights
        self._handles = handles

    @classmethod
    def load(cls, base_dir: Path, brick_dirs: Sequence[Path], *, init: Sequence[float] | None = None) -> LoraMixture:
        """Load the base (float32) and attach the bricks' factors to the modules they target.

        Args:
            base_dir: a Hugging Face causal LM directory with its tokenizer.
            brick_dirs: PEFT LoRA adapter directories (``adapter_config.json`` and
                ``adapter_model.safetensors``).
            init: initial weights (default: uniform, ``1 / len(brick_dirs)`` each).

        Raises:
            InvalidParams: no bricks, or ``init`` of the wrong length.
            InvalidAdapter: a brick that is not a plain LoRA of linear modules of this base.
        """
        import torch
        from safetensors import safe_open

        from composer.basemodel import TRANSFORMERS_LOCK

        with TRANSFORMERS_LOCK:  # a server may run a build or a quality check while another thread imports it
            from transformers import AutoModelForCausalLM, AutoTokenizer

        if not brick_dirs:
            raise InvalidParams("fitting needs at least one brick", [])
        start = [1.0 / len(brick_dirs)] * len(brick_dirs) if init is None else [float(w) for w in init]
        if len(start) != len(brick_dirs):
            raise InvalidParams("one initial weight per brick", [f"{len(start)} weights for {len(brick_dirs)} bricks"])
        model: Any = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model.eval()
        model.requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        weights = torch.tensor(start, dtype=torch.float32, requires_grad=True)

        # module name -> [(brick index, A (r x in), B (out x r), scaling)]
        factors: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
        for index, brick in enumerate(brick_dirs):
            brick = Path(brick)
            settings = parse_lora_config(json.loads((brick / "adapter_config.json").read_text()))
            if settings.fan_in_fan_out:
                raise InvalidAdapter(f"brick {brick.name}: fan_in_fan_out adapters are not supported", [])
            if settings.target_parameters:
                # The fitting hooks wrap nn.Linear layers; fused expert parameters have none.
                raise InvalidAdapter(
                    f"brick {brick.name}: target_parameters adapters (fused MoE experts) cannot be fitted yet; "
                    "give the weights explicitly",
                    [],
                )
            with safe_open(str(brick / "adapter_model.safetensors"), framework="pt") as tensors:
                mapping = map_adapter_tensors(tensors.keys())
                for module, (a_name, b_name) in mapping.modules.items():
                    a = tensors.get_tensor(a_name).to(torch.float32)
                    b = tensors.get_tensor(b_name).to(torch.float32)
                    factors.setdefault(module, []).append((index, a, b, settings.scaling_for(module)))

        handles = []
        for module_name, entries in factors.items():
            try:
                layer = model.get_submodule(module_name)
            except AttributeError as error:
                raise InvalidAdapter(f"the base has no module {module_name!r}", []) from error
            if not isinstance(layer, torch.nn.Linear):
                raise InvalidAdapter(f"module {module_name!r} is not a linear layer", [])
            handles.append(layer.register_forward_hook(_delta_hook(entries, weights)))
        return cls(model, tokenizer, weights, handles)

    def detach(self) -> None:
        """Remove the bricks from the base model (the model is the plain base again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set_weights(self, values: Sequence[float]) -> None:
        """Overwrite the brick weights in place."""
        import torch

        with torch.no_grad():
            self.weights.copy_(torch.tensor([float(v) for v in values], dtype=torch.float32))

    def batch(self, examples: Sequence[Example], *, prompt_template: str = "{input}") -> tuple[Any, Any]:
        """Right-padded token ids and answer-only labels for ``examples``.

        The prompt is ``prompt_template.format(input=...)`` tokenized with the tokenizer's
        special tokens; the answer is tokenized without them and ended by EOS.
        """
        import torch

        rows = []
        for text, answer in examples:
            prompt = self.tokenizer(prompt_template.format(input=text))["input_ids"]
            target = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append((list(prompt), list(target)))
        width = max(len(p) + len(t) for p, t in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for row, (prompt, target) in enumerate(rows):
            ids[row, : len(prompt) + len(target)] = torch.tensor(prompt + target)
            labels[row, len(prompt) : len(prompt) + len(target)] = torch.tensor(target)
        return ids, labels

    def loss(self, ids: Any, labels: Any) -> torch.Tensor:
        """Mean cross-entropy of the labelled tokens (right padding: no mask needed, a causal
        model never attends to later positions)."""
        loss: torch.Tensor = self.model(input_ids=ids, labels=labels).loss
        return loss


def _delta_hook(entries: list[tuple[int, torch.Tensor, torch.Tensor, float]], weights: torch.Tensor) -> Any:
    """A forward hook adding ``sum_i w_i s_i B_i (A_i x)`` to a linear module's output."""
    import torch

    a_all = torch.cat([a for _, a, _, _ in entries], dim=0)  # (sum r, in)
    b_all = torch.cat([b for _, _, b, _ in entries], dim=1)  # (out, sum r)
    brick_of_rank = torch.cat([torch.full((a.shape[0],), i, dtype=torch.long) for i, a, _, _ in entries])
    scaling = torch.cat([torch.full((a.shape[0],), s, dtype=torch.float32) for _, a, _, s in entries])

    def hook(_module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        per_rank = weights[brick_of_rank] * scaling
        return output + ((inputs[0] @ a_all.T) * per_rank) @ b_all.T

    return hook


def _check_fit(examples: Sequence[Example], steps: int, batch_size: int, bounds: tuple[float, float]) -> None:
    problems = []
    if not examples:
        problems.append("at least one example is needed")
    if steps < 1:
        problems.append(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if not bounds[0] < bounds[1]:
        problems.append(f"bounds must be (low, high) with low < high, got {bounds}")
    if problems:
        raise InvalidParams("invalid fitting parameters", problems)


def _fit(
    mixture: LoraMixture,
    examples: Sequence[Example],
    *,
    steps: int,
    lr: float,
    l1: float,
    bounds: tuple[float, float],
    batch_size: int,
    seed: int,
    prompt_template: str,
    progress: ProgressCallback | None,
) -> tuple[tuple[float, ...], tuple[float, ...], float, float]:
    """The optimisation on a loaded mixture, from its current weights: (weights, objective per
    step, initial cross-entropy, final cross-entropy). Leaves the fitted weights set."""
    import torch

    weights = mixture.weights
    order = random.Random(seed)
    pairs = list(examples)
    everything = mixture.batch(pairs, prompt_template=prompt_template)

    def objective(ids: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
        cross_entropy = mixture.loss(ids, labels)
        return cross_entropy + l1 * weights.abs().mean(), cross_entropy

    with torch.no_grad():
        initial_loss = float(mixture.loss(*everything))
    optimizer = torch.optim.Adam([weights], lr=lr)
    losses: list[float] = []
    for step in range(steps):
        if len(pairs) > batch_size:
            ids, labels = mixture.batch(order.sample(pairs, batch_size), prompt_template=prompt_template)
        else:
            ids, labels = everything
        total, cross_entropy = objective(ids, labels)
        losses.append(total.detach().item())
        optimizer.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        with torch.no_grad():
            weights.clamp_(*bounds)
        if progress is not None:
            value = cross_entropy.detach().item()
            progress((step + 1) / steps, f"fitting weights: step {step + 1}/{steps}, loss {value:.4f}")
    with torch.no_grad():
        final_total, final_loss = objective(*everything)
    losses.append(float(final_total))
    return tuple(float(w) for w in weights.detach()), tuple(losses), initial_loss, float(final_loss)


def fit_weights(
    base_dir: Path | LoraMixture,
    brick_dirs: Sequence[Path],
    examples: Sequence[Example],
    *,
    steps: int = 40,
    lr: float = 0.1,
    l1: float = 0.05,
    bounds: tuple[float, float] = (-1.5, 1.5),
    init: Sequence[float] | None = None,
    batch_size: int = 32,
    seed: int = 0,
    prompt_template: str = "{input}",
    progress: ProgressCallback | None = None,
) -> FitResult:
    """Fit one weight per brick to ``examples`` by gradient descent on the unmerged bricks.

    Objective: answer-only cross-entropy + ``l1 * mean(|w|)`` (LoraHub's regulariser), Adam
    for ``steps`` steps, weights clamped to ``bounds`` after each step. With more examples
    than ``batch_size``, each step takes a mini-batch drawn with ``seed``; the result is a
    function of the inputs and ``seed`` (CPU, same thread count).

    Args:
        base_dir: the base model directory (with tokenizer), or a `LoraMixture` already
            loaded with these bricks: several fits (or a fit and another search, in a
            benchmark) then share one loaded model; its weights are reset to ``init`` first
            and left at the fitted values.
        brick_dirs: PEFT LoRA adapter directories, in recipe order (with a mixture: as many
            as it holds; they are not read again).
        examples: ``(input, output)`` pairs.
        steps, lr, l1, bounds: the optimisation.
        init: initial weights (default: uniform ``1 / n``).
        batch_size: examples per step.
        seed: mini-batch order.
        prompt_template: how an input becomes a prompt (``"{input}"`` by default).
        progress: ``progress(fraction, message)`` after every step.

    Returns:
        `FitResult` with the final weights, the objective per step and the examples' hash;
        ``seconds`` counts loading only when this call loaded the model.

    Raises:
        InvalidParams: no examples, a non-positive step count or batch size, empty bounds,
            ``init`` or ``brick_dirs`` of the wrong length for a mixture.
        InvalidAdapter: see `LoraMixture.load`.
    """
    _check_fit(examples, steps, batch_size, bounds)
    started = time.perf_counter()
    if isinstance(base_dir, LoraMixture):
        mixture, owned = base_dir, False
        count = mixture.weights.numel()
        start = [1.0 / count] * count if init is None else [float(w) for w in init]
        if len(start) != count or len(brick_dirs) != count:
            raise InvalidParams(
                "one brick and one initial weight per brick of the mixture",
                [f"{len(brick_dirs)} bricks and {len(start)} weights for a mixture of {count}"],
            )
        mixture.set_weights(start)
    else:
        mixture, owned = LoraMixture.load(base_dir, brick_dirs, init=init), True
    try:
        weights, losses, initial_loss, final_loss = _fit(
            mixture,
            examples,
            steps=steps,
            lr=lr,
            l1=l1,
            bounds=bounds,
            batch_size=batch_size,
            seed=seed,
            prompt_template=prompt_template,
            progress=progress,
        )
    finally:
        if owned:
            mixture.detach()
    return FitResult(
        weights=weights,
        losses=losses,
        initial_loss=initial_loss,
        final_loss=final_loss,
        examples_hash=examples_hash(examples),
        seconds=time.perf_counter() - started,
    )
