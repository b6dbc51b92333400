"""Few-shot weight fitting: the per-brick weights of a linear merge that fit a few examples.

LoraHub's idea (search the merge weights on a handful of examples), done with exact gradients.
The bricks stay unmerged: every targeted linear module computes

    x -> W x + sum_i w_i * s_i * B_i (A_i x)

which is the forward of the linear merge ``W + sum_i w_i s_i B_i A_i`` (composer's ``linear``
method, full output), so the fitted weights go straight into a recipe. Only the scalars
``w_i`` are optimised (an L1 term, weights kept in bounds); the loss is the cross-entropy of
the answer tokens given the prompt. The default optimiser is Gauss-Newton
(`composer.gauss_newton`): with a handful of weights, a few forward passes, each scoring
several weight vectors at once (`LoraMixture.answer_logits`), reach the minimum that Adam
approaches in tens of forward and backward passes.

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
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from composer.adapter import map_adapter_tensors, parse_lora_config
from composer.errors import InvalidAdapter, InvalidParams

if TYPE_CHECKING:
    import torch

__all__ = ["FIT_METHODS", "NARROW_TO", "FitResult", "LoraMixture", "examples_hash", "fit_weights"]

ProgressCallback = Callable[[float, str], None]
FitMethod = Literal["gauss-newton-exact", "gauss-newton", "adam"]
FIT_METHODS: tuple[str, ...] = ("gauss-newton-exact", "gauss-newton", "adam")
Example = tuple[str, str]
# How many bricks the default fit keeps at least (`fit_weights`' ``narrow_to``): the bricks
# the examples need, then the best alone, up to this many. Chosen on the full test bed
# (8 candidate bricks), seeds 0-2: see bench/compose_quality.py.
NARROW_TO = 2


def examples_hash(examples: Sequence[Example]) -> str:
    """sha256 (hex) of the examples as canonical JSON: ``[{"input": ..., "output": ...}, ...]``
    in the given order, keys sorted, no whitespace, UTF-8."""
    document = [{"input": text, "output": answer} for text, answer in examples]
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class FitResult:
    """What `fit_weights` found.

    ``losses`` is the objective (cross-entropy + L1) along the fit. Adam: before each step,
    then after the last (``steps + 1`` values). Gauss-Newton: at ``init``, at the best
    starting point, then after each step taken (fewer when it converges). ``initial_loss`` and
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
    `loss` is the answer-only cross-entropy on examples; `packed` says how `answer_logits`
    lays out its copies. Built by `load`.
    """

    def __init__(self, model: Any, tokenizer: Any, weights: torch.Tensor, handles: list[Any], state: _Points) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.weights = weights
        self._handles = handles
        self._state = state

    @cached_property
    def packed(self) -> bool:
        """Whether `answer_logits` packs the examples into one row per copy: the model masks
        packed sequences apart (`_packs_examples`, checked on first use, so a mixture that only
        scores with `loss`, as the quality check's, runs no check)."""
        return _packs_examples(self.model)

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
        state = _Points(weights)

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
            handles.append(layer.register_forward_hook(_delta_hook(entries, state)))
        return cls(model, tokenizer, weights, handles, state)

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
        loss: torch.Tensor = self.model(input_ids=ids, labels=labels, use_cache=False).loss
        return loss

    def answer_logits(self, points: torch.Tensor, ids: Any, labels: Any, *, max_rows: int = 128) -> torch.Tensor:
        """The logits of the answer tokens at several weight vectors, without gradients.

        One forward pass evaluates every point: the batch is repeated once per point and each
        copy's bricks use that point's weights (chunks of at most ``max_rows`` examples). With
        ``packed``, a copy is one row of the examples end to end (no padding computed), else
        the padded batch; either way without the columns after the last answer token. On a
        small model much of a pass is fixed cost (small test bed, one thread: about 2 ms a
        pass plus 1.3 ms a copy of 5 examples), so R points cost far less than R passes. A
        brick at weight 0 in every point of a chunk is not computed at all, and when each point
        has at most one brick not at 0 (bricks alone), each copy computes only its own.

        Args:
            points: ``(R, K)`` weight vectors (K = number of bricks).
            ids, labels: from `batch` (right-padded; labels -100 outside the answers).

        Returns:
            ``(R, n, V)`` float32: the logits that predict each of the ``n`` answer tokens
            (``labels[labels != -100]`` in row-major order), per point.
        """
        import torch

        targets = labels[:, 1:]
        rows, positions = torch.nonzero(targets != -100, as_tuple=True)
        # A causal model's logits at a position ignore every later one: the columns after the
        # last that predicts an answer token (at least the final token) are dropped unread.
        needed = [int(positions[rows == row].max()) + 1 for row in range(ids.shape[0])]
        if self.packed:
            # Each copy is one row of the examples end to end, positions restarting at 0 per
            # example (the model masks attention between them): no padding is computed, a
            # quarter of a copy for a mixture of long and short answers.
            inputs = torch.cat([ids[row, :width] for row, width in enumerate(needed)])[None]
            position_ids = torch.cat([torch.arange(width) for width in needed])[None]
            starts = torch.tensor([0, *needed[:-1]]).cumsum(0)
            columns, copy_rows = starts[rows] + positions, 1
        else:
            inputs, position_ids = ids[:, : max(needed)], None
            columns, copy_rows = positions, ids.shape[0]
        per_chunk = max(1, max_rows // ids.shape[0])
        # Points with at most one brick not at 0 (bricks alone) go in passes of their own, where
        # each copy computes only its brick, when there are _ALONE_PASS or more of them; the
        # others after them; the logits come back in the order of ``points``.
        alone = points.ne(0).sum(dim=1) <= 1
        if int(alone.sum()) < _ALONE_PASS:
            alone = torch.zeros_like(alone)
        order = torch.cat([torch.nonzero(alone).flatten(), torch.nonzero(~alone).flatten()])
        groups = [order[: int(alone.sum())], order[int(alone.sum()) :]]
        chunks = []
        with torch.inference_mode():
            for group, start in [(g, i) for g in groups for i in range(0, g.numel(), per_chunk)]:
                chunk = points[group[start : start + per_chunk]].to(torch.float32)
                self._state.points = chunk
                nonzero = chunk.ne(0)
                used = torch.nonzero(nonzero.any(dim=0)).flatten()
                self._state.used = None if used.numel() == chunk.shape[1] else tuple(used.tolist())
                if group is groups[0]:  # a pass of bricks alone
                    self._state.single = nonzero.float().argmax(dim=1)
                extra = {} if position_ids is None else {"position_ids": position_ids.expand(chunk.shape[0], -1)}
                try:
                    logits = self.model(input_ids=inputs.repeat(chunk.shape[0], 1), use_cache=False, **extra).logits
                finally:
                    self._state.points, self._state.used, self._state.single = None, None, None
                logits = logits.unflatten(0, (chunk.shape[0], copy_rows))
                chunks.append((logits[:, 0, columns] if self.packed else logits[:, rows, columns]).float())
        return torch.cat(chunks)[torch.argsort(order)]

    @staticmethod
    def answer_targets(labels: Any) -> torch.Tensor:
        """The answer tokens that `answer_logits` predicts, in the same order."""
        targets: torch.Tensor = labels[:, 1:][labels[:, 1:] != -100]
        return targets

    @staticmethod
    def answer_rows(labels: Any) -> torch.Tensor:
        """The example (row of the batch) of each answer token, in `answer_targets`' order."""
        import torch

        rows: torch.Tensor = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)[0]
        return rows


# A pass of its own for bricks alone pays from this many (full test bed, 8 bricks of rank 32,
# with one other point: 1 alone 13.3 ms split vs 12.4 in one pass, 3 alone 19.3 vs 20.4,
# 8 alone 32.9 vs 43.3).
_ALONE_PASS = 3


def _packs_examples(model: Any) -> bool:
    """Whether ``model`` gives two sequences packed into one row (positions restarting at 0)
    the logits it gives them apart, i.e. it masks attention between them (Llama-style models of
    recent transformers do); checked on two short made-up sequences, without the bricks."""
    import torch

    vocabulary = int(model.get_output_embeddings().weight.shape[0])
    first, second = torch.arange(1, 6) % vocabulary, torch.arange(7, 10) % vocabulary
    try:
        with torch.inference_mode():
            apart = [model(input_ids=ids[None], use_cache=False).logits[0] for ids in (first, second)]
            positions = torch.cat([torch.arange(5), torch.arange(3)])[None]
            packed = model(input_ids=torch.cat([first, second])[None], position_ids=positions, use_cache=False).logits[
                0
            ]
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return False
    return bool(torch.allclose(packed, torch.cat(apart), atol=1e-4))


class _Points:
    """The weights the hooks read: the mixture's own vector, or, while `answer_logits` runs,
    one row of weights per copy of the batch."""

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights
        self.points: torch.Tensor | None = None
        # The bricks at a weight other than 0 in some row of ``points`` (None: all of them);
        # the hooks compute nothing for the others.
        self.used: tuple[int, ...] | None = None
        # When every row of ``points`` has at most one weight other than 0: that brick per row
        # (any brick where the row is all 0), so that each copy computes only its own brick.
        self.single: torch.Tensor | None = None


def _delta_hook(entries: list[tuple[int, torch.Tensor, torch.Tensor, float]], state: _Points) -> Any:
    """A forward hook adding ``sum_i w_i s_i B_i (A_i x)`` to a linear module's output.

    All bricks of the module in one pair of matmuls: A stacked to ``(sum r, in)``, B to
    ``(out, sum r)``, the middle scaled by each brick's weight times its LoRA scaling.
    """
    import torch

    a_all = torch.cat([a for _, a, _, _ in entries], dim=0)  # (sum r, in)
    b_all = torch.cat([b for _, _, b, _ in entries], dim=1)  # (out, sum r)
    brick_of_rank = torch.cat([torch.full((a.shape[0],), i, dtype=torch.long) for i, a, _, _ in entries])
    scaling = torch.cat([torch.full((a.shape[0],), s, dtype=torch.float32) for _, a, _, s in entries])

    b_all_t = b_all.T.contiguous()  # (sum r, out)
    slots: list[torch.Tensor] = []

    def slotted() -> list[torch.Tensor]:
        """Each brick's A^T and B^T padded to the largest rank, one slot per brick of the
        mixture (zeros for a brick that does not target this module), and each brick's
        scaling: for copies that use one brick each. Built on first use."""
        if not slots:
            bricks = state.weights.numel()
            widest = max(a.shape[0] for _, a, _, _ in entries)
            a_slots = torch.zeros(bricks, a_all.shape[1], widest)
            b_slots = torch.zeros(bricks, widest, b_all.shape[0])
            scaling_of_brick = torch.zeros(bricks)
            for index, a, b, s in entries:
                a_slots[index, :, : a.shape[0]] = a.T
                b_slots[index, : a.shape[0]] = b.T
                scaling_of_brick[index] = s
            slots.extend([a_slots, b_slots, scaling_of_brick])
        return slots

    # The factors of the bricks in use (`_Points.used`), kept for the last few sets asked for:
    # a fit narrowed to a few bricks asks for the same set at every step.
    subsets: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def factors(used: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if used is None:
            return a_all, b_all_t, brick_of_rank, scaling
        if used not in subsets:
            if len(subsets) >= 4:
                subsets.clear()
            keep = torch.isin(brick_of_rank, torch.tensor(used, dtype=torch.long))
            subsets[used] = (a_all[keep], b_all_t[keep], brick_of_rank[keep], scaling[keep])
        return subsets[used]

    def hook(_module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        points = state.points
        if points is None:
            middle = (inputs[0] @ a_all.T) * (state.weights[brick_of_rank] * scaling)
            return output + middle @ b_all.T
        # Copy c of the batch (rows c*n .. c*n+n-1) uses the weights points[c]: folded into a
        # copy of B^T (sum r x out, small), so that one batched GEMM scales, projects and adds
        # (scaling the (rows, sum r) middle and adding separately cost 4-5 % of a fit).
        # Rows are copy-major whether the input is (batch, seq, in) or flattened to (tokens, in).
        copies = points.shape[0]
        flat_input = inputs[0].reshape(copies, -1, inputs[0].shape[-1])
        flat_output = output.reshape(copies, -1, output.shape[-1])
        single = state.single
        if single is not None:
            # One brick per copy (each brick alone): its own factors only, 1/K of the work.
            a_slots, b_slots, scaling_of_brick = slotted()
            weight = points.gather(1, single[:, None])[:, 0] * scaling_of_brick[single]
            middle = torch.bmm(flat_input, a_slots[single])  # (copies, tokens, widest)
            per_copy = weight[:, None, None] * b_slots[single]  # (copies, widest, out)
            return torch.baddbmm(flat_output, middle, per_copy).view(output.shape)
        a_used, b_used_t, bricks_used, scaling_used = factors(state.used)
        if bricks_used.numel() == 0:  # no brick of this module is in use
            return output
        middle = flat_input @ a_used.T
        per_copy = (points[:, bricks_used] * scaling_used)[:, :, None] * b_used_t  # (copies, sum r, out)
        return torch.baddbmm(flat_output, middle, per_copy).view(output.shape)

    return hook


def _check_fit(
    examples: Sequence[Example],
    steps: int,
    batch_size: int,
    bounds: tuple[float, float],
    method: str,
    tolerance: float,
    spread: int,
    narrow_to: int | None,
) -> None:
    problems = []
    if not tolerance >= 0:
        problems.append(f"tolerance must be >= 0, got {tolerance}")
    if spread < 0:
        problems.append(f"spread must be >= 0, got {spread}")
    if narrow_to is not None and narrow_to < 1:
        problems.append(f"narrow_to must be >= 1 or None, got {narrow_to}")
    if method not in FIT_METHODS:
        problems.append(f"method must be one of {', '.join(FIT_METHODS)}, got {method!r}")
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


def _adam(
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
    """Adam on a loaded mixture, from its current weights: (weights, objective per step,
    initial cross-entropy, final cross-entropy). Leaves the fitted weights set."""
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


# Forward-difference step of the logits' derivative in each weight: small next to the weights'
# range (+-1.5), large next to float32 rounding of the logits (relative 1e-7).
_PROBE = 1e-2
# Gauss-Newton holds the answer logits of every starting point and their derivative in each
# weight: (starting points + K) x answer tokens x vocabulary floats. Above this many (about
# 1 GB in float64) the fit uses Adam instead, which holds one batch's activations.
_GAUSS_NEWTON_MAX_ELEMENTS = 128 * 1024 * 1024
# Levenberg-Marquardt dampings tried together at each step (relative to H's mean eigenvalue),
# one batched forward for all three: the full step, and two shorter ones.
_DAMPINGS = (0.0, 0.3, 3.0)
# The exact method's first damping (relative, as above). From a mixture's union start the
# damping of 1 took many short steps, each one accepted (the 8-step fits of the tuning beds:
# the objective fell by 0.02-0.14 per step); 0.3 there took fewer, as accurate (seeds 0 and 3-7).
_FIRST_DAMPING = 1.0
_MIXTURE_FIRST_DAMPING = 0.3
# The exact method also stops when its step forecasts less than this fraction of the objective:
# on the tuning beds the steps after that point lowered the objective on the 5 examples, but
# not the held-out errors (mixtures 0.535 vs 0.521 exact match with it, 2.3 vs 3.7 steps).
_RELATIVE_STOP = 0.05


def _starts(
    start: torch.Tensor, bounds: tuple[float, float], seed: int, spread: int, *, all_at_one: bool = True
) -> torch.Tensor:
    """Points scored together before the descent: the given start, each brick alone at weight 1,
    all bricks at 1 (unless not ``all_at_one``), and ``spread`` scrambled Sobol points (drawn
    with ``seed``) in the central 60 % of ``bounds``, everything clamped to ``bounds``.

    A brick trained for the task does it at weight 1, so for one task one of the structured
    points is usually in the basin of the fit; a mixture's best weights are often elsewhere
    (an unrelated brick at a negative weight cancels interference), and the Sobol points look
    there, the way LoraHub's gradient-free search does, but all in one forward pass.
    Rows ``1 .. K`` are the bricks alone (`_gauss_newton_exact` reads them).
    """
    import torch

    count = start.numel()
    low, high = bounds
    structured = [start[None], torch.eye(count, dtype=start.dtype)]
    if all_at_one:
        structured.append(torch.ones(1, count, dtype=start.dtype))
    if spread == 0:  # SobolEngine cannot draw zero points
        return torch.cat(structured).clamp(low, high)
    engine = torch.quasirandom.SobolEngine(count, scramble=True, seed=seed)  # type: ignore[no-untyped-call]
    sobol = engine.draw(spread, dtype=torch.float64)
    spread_points = 0.6 * (low + (high - low) * sobol)
    return torch.cat([*structured, spread_points]).clamp(low, high)


def _penalised(points: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, l1: float) -> torch.Tensor:
    """LoraHub's objective at each point: the answers' mean cross-entropy plus ``l1 * mean(|w|)``."""
    from composer.gauss_newton import cross_entropy

    return cross_entropy(logits, targets) + l1 * points.abs().mean(dim=-1)


def _probes(point: torch.Tensor, high: float, active: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The points around ``point`` whose logits give the derivative by forward differences,
    one per weight (or per weight of ``active``), and their step sizes: inward at the upper
    bound, so that no probe leaves the box."""
    import torch

    sizes = torch.where(point + _PROBE > high, -_PROBE, _PROBE)
    around = point + torch.diag(sizes)
    return (around, sizes) if active is None else (around[active], sizes[active])


def _derivative(
    mixture: LoraMixture,
    batch: tuple[Any, Any],
    point: torch.Tensor,
    logits: torch.Tensor,
    high: float,
    active: list[int] | None = None,
) -> torch.Tensor:
    """``(K, n, V)`` derivative of the answer logits in each weight (or in each of ``active``)
    at ``point`` (whose logits are ``logits``), by forward differences: its probes (`_probes`)
    in one forward."""
    ids, labels = batch
    around, sizes = _probes(point, high, active)
    return (mixture.answer_logits(around, ids, labels).double() - logits) / sizes[:, None, None]


def _scored_starts(
    mixture: LoraMixture,
    batch: tuple[Any, Any],
    l1: float,
    bounds: tuple[float, float],
    seed: int,
    spread: int,
    *,
    all_at_one: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The starting points of a Gauss-Newton fit (`_starts`, row 0 the mixture's own weights),
    scored in one forward: ``(points, their answer logits in float64, their objective)``."""
    import torch

    ids, labels = batch
    starts = _starts(mixture.weights.detach().to(torch.float64), bounds, seed, spread, all_at_one=all_at_one)
    scored = mixture.answer_logits(starts, ids, labels).double()
    return starts, scored, _penalised(starts, scored, mixture.answer_targets(labels), l1)


def _fitted(
    mixture: LoraMixture, weights: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor
) -> tuple[tuple[float, ...], float]:
    """Set the fitted ``weights`` on the mixture: (those weights as floats, their cross-entropy)."""
    import torch

    from composer.gauss_newton import cross_entropy

    mixture.set_weights(weights.tolist())
    return tuple(float(w) for w in weights.to(torch.float32)), float(cross_entropy(logits, targets))


def _gauss_newton_broyden(
    mixture: LoraMixture,
    batch: tuple[Any, Any],
    *,
    steps: int,
    l1: float,
    bounds: tuple[float, float],
    tolerance: float,
    seed: int,
    spread: int,
    progress: ProgressCallback | None,
) -> tuple[tuple[float, ...], tuple[float, ...], float, float]:
    """The ``"gauss-newton"`` fit of recipes written before ``"gauss-newton-exact"`` (kept so
    that they rebuild the same weights): Levenberg-Marquardt with a Broyden-updated derivative.

    On mixtures it stopped early (tuning beds, seeds 3-4, and seed 0's sentiment+maximum at
    1.42 where Adam reached 0.19): after a few steps its derivative was 50-85 % off the exact
    one (relative norm), so its steps gained little and the small gain stopped it while the
    exact gradient was 4 times what it believed; and its greedy start (the best scored point)
    was often a single brick whose basin holds a worse minimum.

    First the start and a few structured points (`_starts`) are scored in one forward pass and
    the best is kept. Then the answer logits' derivative in each weight by forward differences
    (K copies of the batch in one pass); each step takes the K x K Gauss-Newton model of the
    cross-entropy plus the L1 term's slope, scores three damped steps (clamped to ``bounds``)
    exactly in one pass, keeps the best if it lowers the objective, and updates the derivative
    with Broyden's secant formula from what it just scored (no new probes). Stops after
    ``steps`` steps, when the model forecasts or a step gains less than ``tolerance``, or
    after two steps in a row that found nothing better. Returns what `_adam` returns.
    """
    import torch

    from composer.gauss_newton import (
        broyden_update,
        cross_entropy,
        damped_steps,
        forecast_decrease,
        gradient_and_curvature,
    )

    ids, labels = batch
    targets = mixture.answer_targets(labels)
    low, high = bounds
    count = mixture.weights.numel()
    starts, scored, values = _scored_starts(mixture, batch, l1, bounds, seed, spread)
    initial_loss = float(cross_entropy(scored[0], targets))
    losses = [float(values[0])]
    best = int(torch.argmin(values))
    weights, logits, current = starts[best], scored[best], float(values[best])
    losses.append(current)
    jacobian = _derivative(mixture, batch, weights, logits, high)
    damping, rejected = 1.0, 0
    for step in range(steps):
        gradient, curvature = gradient_and_curvature(logits, jacobian, targets)
        gradient = gradient + l1 / count * torch.sign(weights)
        moves = damped_steps(gradient, curvature, [d * damping for d in _DAMPINGS])
        # The model's own forecast for its best (undamped) step: below the tolerance, the fit
        # has converged and scoring the candidates would only confirm it.
        forecast = forecast_decrease(gradient, curvature, moves[0])
        if forecast < tolerance:
            if progress is not None:
                progress(1.0, f"fitting weights: converged after {step} steps, objective {current:.4f}")
            break
        candidates = (weights + moves).clamp(low, high)
        scored = mixture.answer_logits(candidates, ids, labels).double()
        values = _penalised(candidates, scored, targets, l1)
        for candidate, candidate_logits in zip(candidates, scored, strict=True):
            jacobian = broyden_update(jacobian, candidate - weights, candidate_logits - logits)
        best = int(torch.argmin(values))
        gain = current - float(values[best])
        if gain > 0:
            weights, logits, current = candidates[best], scored[best], float(values[best])
            damping, rejected = max(damping * (0.3 if best == 0 else 1.0), 1e-3), 0
        else:
            # No candidate helped: the model is trusted over too wide a range.
            damping, rejected = damping * 10.0, rejected + 1
        losses.append(current)
        if progress is not None:
            progress((step + 1) / steps, f"fitting weights: step {step + 1}/{steps}, objective {current:.4f}")
        if 0 < gain < tolerance or rejected == 2:
            if progress is not None and step + 1 < steps:
                progress(1.0, f"fitting weights: converged after {step + 1} steps, objective {current:.4f}")
            break
    fitted, final_loss = _fitted(mixture, weights, logits, targets)
    return fitted, tuple(losses), initial_loss, final_loss


def _gauss_newton_exact(
    mixture: LoraMixture,
    batch: tuple[Any, Any],
    *,
    steps: int,
    l1: float,
    bounds: tuple[float, float],
    tolerance: float,
    seed: int,
    spread: int,
    narrow_to: int | None,
    progress: ProgressCallback | None,
) -> tuple[tuple[float, ...], tuple[float, ...], float, float]:
    """Levenberg-Marquardt with the exact Gauss-Newton model at every point, from the mixture's
    current weights (the default fit). Returns what `_adam` returns.

    1. One forward scores the start, each brick alone, all bricks at 1 (unless narrowing can
       leave a brick out, which that point never does) and ``spread`` Sobol points (`_starts`).
    2. With ``narrow_to``, only the bricks the examples need (`needed_bricks`: each brick that
       is the best alone on some example, then the best by mean loss, up to ``narrow_to``)
       are fitted; the others stay at 0 and are not computed. The best scored point among
       those with the other bricks at 0 is kept (all points without narrowing).
    3. If different bricks are the best alone on different examples (a mixture), their
       `union_start` is scored together with the probes of its derivative in one forward,
       and taken when it beats the best of step 2 (else one forward probes that point).
    4. Each step scores one damped candidate together with the probes around it (one forward
       of M + 1 copies, M fitted bricks), so an accepted point comes with its exact
       derivative; the damping starts at `_FIRST_DAMPING` (`_MIXTURE_FIRST_DAMPING` from the
       union start), follows the ratio of gain to forecast, and grows tenfold on a rejected step.
    Stops after ``steps`` steps, or when the step it would take forecasts a gain below
    ``tolerance`` or below `_RELATIVE_STOP` times the objective (with the exact model, about
    ``g (H + lambda s I)^-1 g / 2``: a norm of the gradient), but never right after a rejected
    step, whose tenfold damping shrinks the forecast without saying anything about the
    gradient. (Forecasting the undamped step instead kept single tasks stepping for 0.015 in
    7 steps on the tuning beds: half the speed, the same accuracy.)
    """
    import torch

    from composer.gauss_newton import (
        cross_entropy,
        damped_steps,
        forecast_decrease,
        gradient_and_curvature,
        needed_bricks,
        union_start,
    )

    ids, labels = batch
    targets = mixture.answer_targets(labels)
    rows = mixture.answer_rows(labels)
    low, high = bounds
    count = mixture.weights.numel()

    # All bricks at 1 can be a start only when no brick can be left out.
    all_at_one = narrow_to is None or count <= narrow_to
    starts, scored, values = _scored_starts(mixture, batch, l1, bounds, seed, spread, all_at_one=all_at_one)
    initial_loss = float(cross_entropy(scored[0], targets))
    losses = [float(values[0])]
    alone = scored[1 : count + 1]
    needed = range(count) if narrow_to is None else needed_bricks(alone, targets, rows, ids.shape[0], narrow_to)
    active = list(needed)
    others = [brick for brick in range(count) if brick not in active]
    # Only points with the bricks left out at 0 can be starts of the narrowed fit.
    allowed = starts[:, others].eq(0).all(dim=1)
    best = int(torch.argmin(values.masked_fill(~allowed, float("inf"))))
    weights, logits, current = starts[best], scored[best], float(values[best])

    def scored_with_derivative(point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        around, sizes = _probes(point, high, active)
        scored = mixture.answer_logits(torch.cat([point[None], around]), ids, labels).double()
        return scored[0], (scored[1:] - scored[0]) / sizes[:, None, None]

    jacobian: torch.Tensor | None = None
    first_damping = _FIRST_DAMPING
    union = union_start(alone, targets, rows, ids.shape[0])
    if union is not None:
        union = union.clamp(low, high)
        union_logits, union_jacobian = scored_with_derivative(union)
        union_value = float(_penalised(union[None], union_logits[None], targets, l1)[0])
        if union_value < current:
            weights, logits, current, jacobian = union, union_logits, union_value, union_jacobian
            first_damping = _MIXTURE_FIRST_DAMPING
    if jacobian is None:
        jacobian = _derivative(mixture, batch, weights, logits, high, active)
    losses.append(current)
    damping, rejected = first_damping, False
    for step in range(steps):
        gradient, curvature = gradient_and_curvature(logits, jacobian, targets)
        gradient = gradient + l1 / count * torch.sign(weights[active])
        damped = weights.clone()
        damped[active] += damped_steps(gradient, curvature, [damping])[0]
        damped = damped.clamp(low, high)
        forecast = forecast_decrease(gradient, curvature, (damped - weights)[active])
        if forecast < max(tolerance, _RELATIVE_STOP * current) and not rejected:
            if progress is not None:
                progress(1.0, f"fitting weights: converged after {step} steps, objective {current:.4f}")
            break
        damped_logits, damped_jacobian = scored_with_derivative(damped)
        value = float(_penalised(damped[None], damped_logits[None], targets, l1)[0])
        gain = current - value
        if gain > 0:
            weights, logits, current, jacobian = damped, damped_logits, value, damped_jacobian
            # The usual trust-region rule: widen when the model forecast the gain well.
            ratio = gain / forecast if forecast > 0 else 0.0
            damping = max(damping / 3 if ratio > 0.75 else damping * 3 if ratio < 0.25 else damping, 1e-3)
            rejected = False
        else:
            damping, rejected = damping * 10.0, True
        losses.append(current)
        if progress is not None:
            progress((step + 1) / steps, f"fitting weights: step {step + 1}/{steps}, objective {current:.4f}")
    fitted, final_loss = _fitted(mixture, weights, logits, targets)
    return fitted, tuple(losses), initial_loss, final_loss


def _too_big_for_gauss_newton(mixture: LoraMixture, labels: Any, spread: int) -> bool:
    """Whether Gauss-Newton's logits would exceed `_GAUSS_NEWTON_MAX_ELEMENTS` (a large
    vocabulary times many answer tokens); a function of the inputs, so still deterministic."""
    answer_tokens = int((labels != -100).sum())
    count = mixture.weights.numel()
    vocabulary = int(mixture.model.get_output_embeddings().weight.shape[0])
    return (2 * count + 2 + spread) * answer_tokens * vocabulary > _GAUSS_NEWTON_MAX_ELEMENTS


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
    method: FitMethod = "gauss-newton-exact",
    tolerance: float = 1e-2,
    spread: int = 0,
    narrow_to: int | None = NARROW_TO,
) -> FitResult:
    """Fit one weight per brick to ``examples`` on the unmerged bricks.

    Objective: answer-only cross-entropy + ``l1 * mean(|w|)`` (LoraHub's regulariser), weights
    kept in ``bounds``. The result is a function of the inputs (and ``seed``) on the CPU with
    the same thread count.

    ``method="gauss-newton-exact"`` (default): at most ``steps`` Levenberg-Marquardt steps on
    all the examples, each from the exact K x K Gauss-Newton model of the cross-entropy (logit
    derivatives by forward differences at every point), from the best of a few structured
    starting points and, for a mixture, the bricks each example needs (`_gauss_newton_exact`);
    with ``narrow_to`` only the bricks the examples need are fitted (the others stay at 0);
    it stops when its next step forecasts a gain below ``tolerance`` or below 5 % of the
    objective (`_RELATIVE_STOP`), and needs a few
    forward passes where Adam needs tens of forward and backward passes.
    ``method="gauss-newton"``: the former default, which updated the derivative with Broyden's
    formula and stopped on a small gain (`_gauss_newton_broyden`; kept so that recipes naming
    it rebuild the same weights; its recipes set ``spread=4``).
    When its logits would not fit in memory (`_GAUSS_NEWTON_MAX_ELEMENTS`: a large vocabulary
    times many answer tokens), the fit is Adam's, as if ``method="adam"``.
    ``method="adam"``: Adam (``lr``) for exactly ``steps`` steps, weights clamped after each;
    with more examples than ``batch_size`` each step takes a mini-batch drawn with ``seed``
    (the method of recipes written before Gauss-Newton, kept so that they rebuild the same).

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
        batch_size: examples per step (Adam).
        spread: Sobol starting points scored with the structured ones (Gauss-Newton; `_starts`;
            0 by default: on the tuning beds they changed no result of the exact method and
            cost 4 copies of the batch in its first forward).
        narrow_to: (exact Gauss-Newton) fit only the bricks that are, alone, the best on some
            example, and the best alone by mean loss while fewer than ``narrow_to`` are chosen
            (`composer.gauss_newton.needed_bricks`); the others keep weight 0. Each step then
            scores M + 1 copies of the examples (M bricks chosen) instead of K + 1. None fits
            every brick (recipes written before narrowing). Default `NARROW_TO`.
        seed: the Sobol starting points (Gauss-Newton); the mini-batch order (Adam).
        prompt_template: how an input becomes a prompt (``"{input}"`` by default).
        progress: ``progress(fraction, message)`` after every step (and 1.0 on convergence).
        method: ``"gauss-newton-exact"``, ``"gauss-newton"`` or ``"adam"``.
        tolerance: Gauss-Newton stops when its next step forecasts (exact method, which also
            stops below `_RELATIVE_STOP` times the objective) or a step gains (Broyden method) less.

    Returns:
        `FitResult` with the final weights, the objective per step (Gauss-Newton: at
        ``init``, at the best starting point, then after each step: up to ``steps + 2``
        values, fewer when it converges) and the examples' hash;
        ``seconds`` counts loading only when this call loaded the model.

    Raises:
        InvalidParams: no examples, a non-positive step count or batch size, empty bounds,
            an unknown method, a negative tolerance or spread, ``narrow_to`` below 1,
            ``init`` or ``brick_dirs`` of
            the wrong length for a mixture.
        InvalidAdapter: see `LoraMixture.load`.
    """
    _check_fit(examples, steps, batch_size, bounds, method, tolerance, spread, narrow_to)
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
        # Tokenized once here for Gauss-Newton (a fit of a few passes spent 4 % of its time on it).
        batch = None if method == "adam" else mixture.batch(examples, prompt_template=prompt_template)
        if batch is None or _too_big_for_gauss_newton(mixture, batch[1], spread):
            weights, losses, initial_loss, final_loss = _adam(
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
        else:
            descent = (
                partial(_gauss_newton_exact, narrow_to=narrow_to)
                if method == "gauss-newton-exact"
                else _gauss_newton_broyden
            )
            weights, losses, initial_loss, final_loss = descent(
                mixture,
                batch,
                steps=steps,
                l1=l1,
                bounds=bounds,
                tolerance=tolerance,
                seed=seed,
                spread=spread,
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
