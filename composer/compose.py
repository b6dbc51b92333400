"""Compose bricks into a base model (``full``) or into one LoRA adapter (``adapter``).

`compose` validates the whole recipe first (`plan_composition`), builds the output in a
temporary sibling directory of ``out_dir``, fsyncs it and renames it to ``out_dir`` at the
very end: a failure or a crash never leaves a half-built ``out_dir``.

torch is imported when a composition runs, not when this module is imported.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer.basemodel import INDEX_FILE
from composer.errors import NonFiniteResult
from composer.files import HF_MODEL_FILES
from composer.neurons import NeuronOp
from composer.plan import BrickSource, CompositionPlan, Contribution, ModulePlan, OutputKind, plan_composition

if TYPE_CHECKING:
    import torch

    from composer.io import TensorFile
    from composer.lora import Factors

__all__ = ["ComposeResult", "TruncationStats", "WrittenFile", "compose"]

ProgressCallback = Callable[[float, str], None]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECORD_FILE = "brickyard.json"
CARD_FILE = "README.md"
_STREAM_SHARE = 0.97  # of the progress bar, for the weights; the rest is small files and publishing


@dataclass(frozen=True)
class WrittenFile:
    """A file of the output directory (name relative to it) and its size in bytes."""

    name: str
    size: int


@dataclass(frozen=True)
class TruncationStats:
    """Relative Frobenius error ``||delta - B @ A|| / ||delta||`` of an adapter output,
    per module and summarized (0 everywhere for an exact adapter)."""

    max_relative_error: float
    mean_relative_error: float
    per_module: Mapping[str, float] = field(default_factory=dict)

    def as_dict(self, *, per_module: bool = True) -> dict[str, Any]:
        """JSON-friendly form."""
        document: dict[str, Any] = {
            "max_relative_error": self.max_relative_error,
            "mean_relative_error": self.mean_relative_error,
        }
        if per_module:
            document["per_module"] = dict(self.per_module)
        return document


@dataclass(frozen=True)
class ComposeResult:
    """What `compose` built."""

    out_dir: Path
    output: OutputKind
    method: str
    files: tuple[WrittenFile, ...]
    seconds: float
    rank: int | None = None
    truncation: TruncationStats | None = None

    @property
    def total_bytes(self) -> int:
        """Sum of the output files' sizes."""
        return sum(f.size for f in self.files)


def compose(
    base_dir: Path,
    bricks: Sequence[BrickSource],
    out_dir: Path,
    *,
    method: str = "linear",
    params: Mapping[str, Any] | None = None,
    output: OutputKind = "full",
    rank: int | None = None,
    recipe: Mapping[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    neurons: Sequence[NeuronOp] = (),
    base_name_or_path: str | None = None,
    card_base_model: str | None = None,
) -> ComposeResult:
    """Merge ``bricks`` into the base model at ``base_dir`` and write the result to ``out_dir``.

    For brick i with weight ``w_i``, each module's delta is ``delta_i = s_i * B_i @ A_i``; the
    method combines the deltas of the bricks that target the module (a brick that does not
    target it contributes nothing).

    Args:
        base_dir: a Hugging Face model directory with safetensors weights.
        bricks: the bricks with their weights, in recipe order.
        out_dir: where to publish the result; must not exist.
        method: a registered merge method (see ``list_methods()``).
        params: the method's parameters (validated by its params model).
        output: ``"full"`` writes a model directory (base weights plus merged delta, same
            dtypes and sharding, config/tokenizer files copied); ``"adapter"`` writes one
            PEFT LoRA adapter.
        rank: adapter output only: truncate to this rank (exactly, from the factors, for
            ``linear``; by SVD of the merged delta for other methods, where it is required).
        recipe: caller's JSON stored under ``"recipe"`` in ``brickyard.json``.
        progress: ``progress(fraction, message)``, monotone, ending with 1.0.
        neurons: operations with emergent bricks' neuron sets (`composer.neurons`): ablate or
            scale neurons of the output, restrict a brick to neurons.
        base_name_or_path: ``base_model_name_or_path`` of an adapter output, where PEFT's
            ``AutoPeftModelForCausalLM`` loads the base from (a path or a Hub id); None: the
            bricks' common value, else ``base_dir``.
        card_base_model: the model card's ``base_model`` (a registered name or Hub id);
            None: as ``base_name_or_path``.

    Returns:
        `ComposeResult`.

    Raises:
        UnknownMethod, InvalidParams, InvalidBaseModel, InvalidAdapter, IncompatibleBricks:
            before any weight is read. NonFiniteResult: a merged tensor holds NaN/Inf or does
            not fit its dtype (names module and bricks). FileExistsError: ``out_dir``
            exists. OSError: disk problems, including too little free space (checked first).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        raise FileExistsError(errno.EEXIST, "the output directory already exists", str(out_dir))
    report = _Reporter(progress)
    report(0.0, "checking the recipe", force=True)
    plan = plan_composition(
        base_dir, bricks, method=method, params=params, output=output, rank=rank, recipe=recipe, neurons=neurons
    )
    plan = replace(plan, base_name_or_path=base_name_or_path, card_base_model=card_base_model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(plan, out_dir.parent)
    staging = out_dir.parent / f".{out_dir.name}.composing-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        truncation: TruncationStats | None = None
        ranks: dict[str, int] = {}
        if plan.output == "full":
            _write_full(plan, staging, report)
        else:
            truncation, ranks = _write_adapter(plan, staging, report)
        report(_STREAM_SHARE, "writing the model card", force=True)
        _write_record(plan, staging, recipe=recipe, truncation=truncation, ranks=ranks)
        files = tuple(WrittenFile(p.name, p.stat().st_size) for p in sorted(staging.iterdir()) if p.is_file())
        report(0.99, "publishing", force=True)
        from composer.io import publish_dir

        publish_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    report.finish(f"composed {len(plan.modules)} modules from {len(plan.bricks)} bricks in {seconds:.1f}s")
    return ComposeResult(
        out_dir=out_dir,
        output=plan.output,
        method=plan.method.name,
        files=files,
        seconds=seconds,
        rank=plan.rank,
        truncation=truncation,
    )


class _Reporter:
    """Makes the caller's progress callback monotone, throttled, and below 1.0 until done."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.last = 0.0
        self.last_time = -math.inf
        self.called = False

    def __call__(self, fraction: float, message: str, *, force: bool = False) -> None:
        if self.callback is None:
            return
        fraction = min(max(fraction, self.last), 0.999)
        now = time.monotonic()
        if self.called and not force and fraction - self.last < 0.005 and now - self.last_time < 0.25:
            return
        self.last, self.last_time, self.called = fraction, now, True
        self.callback(fraction, message)

    def finish(self, message: str) -> None:
        if self.callback is not None:
            self.callback(1.0, message)


def _check_free_space(plan: CompositionPlan, parent: Path) -> None:
    if plan.output == "full":
        needed = plan.base.size_bytes + sum(p.stat().st_size for p in _files_to_copy(plan.base.path))
    else:
        needed = 0
        for module in plan.modules.values():
            width = module.module.in_features + module.module.out_features
            exact = sum(c.rank for c in module.contributions)
            needed += 4 * width * (min(plan.rank, exact) if plan.rank is not None else exact)
    needed += 1024 * 1024
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise OSError(
            errno.ENOSPC, f"not enough disk space: the output needs {needed} bytes, {free} are free", str(parent)
        )


def _files_to_copy(base: Path) -> list[Path]:
    """Config, tokenizer, generation, chat-template and license files of the base: the
    regular top-level files named in `HF_MODEL_FILES` (an allow-list, never whatever else
    lies in the directory)."""
    files = []
    for name in sorted(HF_MODEL_FILES - {CARD_FILE, RECORD_FILE}):
        path = base / name
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except OSError:  # absent, or a dangling link
            continue
        if regular:
            files.append(path)
    return files


def _open_bricks(plan: CompositionPlan, stack: ExitStack) -> list[TensorFile]:
    from composer.io import TensorFile

    return [stack.enter_context(TensorFile(Path(brick.source.weights_path), brick.header)) for brick in plan.bricks]


@dataclass
class _Payload:
    # One entry per contribution, in order: LoRA factors (None for a saved copy), the DoRA
    # magnitude (or None) and the saved copy (or None).
    factors: list[Factors | None]
    stacked: tuple[torch.Tensor, torch.Tensor] | None
    keys: tuple[str, ...]
    magnitudes: list[torch.Tensor | None] = field(default_factory=list)
    copies: list[torch.Tensor | None] = field(default_factory=list)
    checks: list[torch.Tensor] = field(default_factory=list)


def _load(
    plan: CompositionPlan, module: ModulePlan, files: Sequence[TensorFile], wrappers: _WrapperCache | None = None
) -> _Payload:
    import torch

    from composer.lora import Factors, stacked_factors, tensor_key

    factors: list[Factors | None] = []
    magnitudes: list[torch.Tensor | None] = []
    copies: list[torch.Tensor | None] = []
    for c in module.contributions:
        source = files[c.brick]
        if c.a is not None and c.b is not None and c.view is not None:
            whole = wrappers.get(c) if wrappers is not None else (source.read(c.a), source.read(c.b))
            a, b = c.view.factors(*whole)
            read = Factors(a=a, b=b, scaling=c.scaling, weight=c.weight)
            factors.append(read)
        elif c.a is not None and c.b is not None:
            read = Factors(a=source.read(c.a), b=source.read(c.b), scaling=c.scaling, weight=c.weight)
            restriction = plan.neurons.restrictions.get(c.brick)
            if restriction is not None:
                from composer.neurons import restricted_factors

                read = restricted_factors(module.name, read, restriction)
            factors.append(read)
        else:
            factors.append(None)
        magnitudes.append(source.read(c.magnitude) if c.magnitude is not None else None)
        copies.append(source.read(c.copy) if c.copy is not None else None)
    checks = [files[brick].read(info) for brick, info in module.checks]
    payload = _Payload(factors, None, (), magnitudes, copies, checks)
    own = [t for f in factors if f is not None for t in (f.a, f.b)] + [t for t in magnitudes + copies if t is not None]
    if not all(_fits(t, torch.float32) for t in own):
        # Fail on the brick's own data, before any arithmetic can turn it into an
        # exception of another kind (an eigendecomposition of NaNs) or a silent mess.
        raise _non_finite(plan, module, payload, None)
    if plan.method.sums_deltas and module.low_rank:
        payload.stacked = stacked_factors([f for f in factors if f is not None]) if factors else None
        return payload
    if not plan.method.sums_deltas:
        payload.keys = tuple(
            tensor_key(*[t for t in (f.a, f.b) if f is not None], *[t for t in (m, k) if t is not None])
            if f is not None
            else tensor_key(*[t for t in (k,) if t is not None])
            for f, m, k in zip(factors, magnitudes, copies, strict=True)
        )
    return payload


class _WrapperCache:
    """A composition's ParamWrapper factors ``(lora_A, lora_B)``, read once for all the
    stored tensors that take a slice of them (every expert's gate, up and down tensor would
    read the same two tensors 3 x E times). Storage order keeps one layer's experts
    together, so a few entries suffice; merge threads share it."""

    def __init__(self, files: Sequence[TensorFile], size: int = 8) -> None:
        self.files = files
        self.size = size
        self.entries: OrderedDict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, c: Contribution) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole factors of ``c`` (a contribution with a view)."""
        assert c.a is not None and c.b is not None
        key = (c.brick, c.a.name)
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
                return hit
        value = (self.files[c.brick].read(c.a), self.files[c.brick].read(c.b))
        with self.lock:
            self.entries[key] = value
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return value


def _check_base_layers(plan: CompositionPlan, module: ModulePlan, payload: _Payload, stored: torch.Tensor) -> None:
    """PEFT saves a targeted embedding's (or head's) own weight as ``base_layer.weight``:
    it must be the base's weight, or the brick was trained on another base."""
    import torch

    from composer.errors import IncompatibleBricks

    problems = []
    for (brick, info), saved in zip(module.checks, payload.checks, strict=True):
        if not torch.equal(saved.to(stored.dtype), stored):
            diff = float((saved.to(torch.float64) - stored.to(torch.float64)).abs().max())
            problems.append(
                f"brick {plan.bricks[brick].source.name!r}: {info.name!r} differs from the base model's "
                f"{module.tensor.name!r} (largest difference {diff:.3g}): the adapter was trained on another base "
                "model (or with a changed vocabulary); register and compose on that base"
            )
    if problems:
        raise IncompatibleBricks(f"module {module.name!r} does not match the base model", problems)


def _merged_delta(
    plan: CompositionPlan, module: ModulePlan, payload: _Payload, base: torch.Tensor | None = None
) -> torch.Tensor:
    """The method's combination of the dense deltas (``out x in``, float32). ``base`` is
    the stored base weight, needed by DoRA and saved copies (their delta depends on it)."""
    from composer.lora import copy_delta, delta, dora_delta, oriented
    from composer.methods import MergeContext

    fan_in_fan_out = module.module.fan_in_fan_out
    weight = oriented(base, fan_in_fan_out) if base is not None else None
    deltas = []
    for factors, magnitude, saved in zip(payload.factors, payload.magnitudes, payload.copies, strict=True):
        if saved is not None:
            assert weight is not None
            deltas.append(copy_delta(weight, oriented(saved, fan_in_fan_out)))
        elif magnitude is not None:
            assert weight is not None and factors is not None
            deltas.append(dora_delta(weight, factors, magnitude))
        else:
            assert factors is not None
            deltas.append(delta(factors))
    context = MergeContext(module=module.name, brick_keys=payload.keys)
    weights = [c.weight for c in module.contributions]
    return plan.method.combine(deltas, weights, plan.params, context)


def _fits(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every value is finite and representable in ``dtype`` (one pass, no allocation)."""
    import torch

    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    limit = torch.finfo(dtype).max
    lo, hi = float(low), float(high)
    return math.isfinite(lo) and math.isfinite(hi) and -limit <= lo and hi <= limit


_BLOCK_ELEMENTS = 1 << 19  # rows merged at a time: 2 MB of float32 (fewer, larger blocks: 1 MB was ~10% slower)


def _merge_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


_THREADS_LOCK = threading.Lock()
_THREADS_USERS = 0
_THREADS_SAVED = 0


@contextmanager
def _torch_single_threaded() -> Iterator[None]:
    """Set torch's intra-op threads to 1 while merges run (restored when the last
    concurrent composition ends). Parallelism comes from merging several tensors at once:
    intra-op threads would compete with those workers and the I/O threads, and OpenMP's
    spinning threads collapse when the machine is oversubscribed."""
    import torch

    global _THREADS_USERS, _THREADS_SAVED
    with _THREADS_LOCK:
        if _THREADS_USERS == 0:
            _THREADS_SAVED = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_USERS += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_USERS -= 1
            if _THREADS_USERS == 0:
                torch.set_num_threads(_THREADS_SAVED)


def _add_product(tensor: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scratch: torch.Tensor) -> bool:
    """``tensor += left @ right`` computed in float32 (float64 for a float64 tensor), block of
    rows by block of rows so that conversion, product, cast back and range check of a block
    happen while it is in cache. Returns False as soon as a block holds a value that is not
    finite or does not fit ``tensor``'s dtype (the tensor is then partly updated)."""
    import torch

    rows, cols = tensor.shape
    step = max(1, _BLOCK_ELEMENTS // max(1, cols))
    in_place = tensor.dtype in (torch.float32, torch.float64)
    left = left.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    right = right.to(left.dtype)
    for start in range(0, rows, step):
        block = tensor[start : start + step]
        work = block if in_place else scratch[: block.numel()].view(block.shape).copy_(block)
        work.addmm_(left[start : start + step], right)
        if not in_place:
            # A value out of the narrower dtype's range rounds to infinity in the cast, so
            # checking the cast block (half the bytes) finds it too.
            block.copy_(work)
        if not _fits(block, tensor.dtype):
            return False
    return True


def _write_full(plan: CompositionPlan, staging: Path, report: _Reporter) -> None:
    import torch

    from composer.io import ShardJob, copy_file, stream_shards

    by_tensor = {m.tensor.name: m for m in plan.modules.values()}
    updates = plan.tensors_by_shard()
    jobs = [
        ShardJob(plan.base.path / shard, staging / shard, header, updates.get(shard, frozenset()))
        for shard, header in plan.base.shards.items()
    ]
    total = max(1, sum(job.header.file_size for job in jobs))
    local = threading.local()

    def scratch() -> torch.Tensor:
        # One small float32 block per merge thread, reused for every tensor.
        if not hasattr(local, "block"):
            local.block = torch.empty(_BLOCK_ELEMENTS + 4096, dtype=torch.float32)
        return local.block  # type: ignore[no-any-return]

    def update(info: Any, tensor: torch.Tensor, payload: _Payload) -> None:
        merge(info, tensor, payload)
        module = by_tensor[info.name]
        scales = plan.neurons.scales.get(module.key, ())
        if scales:
            from composer.emergent import scale_neurons

            # After the merge: the output is exactly the merged weight with these columns scaled.
            for index, factor in scales:
                scaled = scale_neurons(tensor, index, factor, axis="in", fan_in_fan_out=module.module.fan_in_fan_out)
                tensor.copy_(scaled)

    def merge(info: Any, tensor: torch.Tensor, payload: _Payload) -> None:
        module = by_tensor[info.name]
        if module.checks:
            _check_base_layers(plan, module, payload, tensor)
        if not module.contributions:
            return
        if payload.stacked is not None:
            b_cat, a_cat = payload.stacked
            # The base weight is out x in (in x out for Conv1D): its rows follow B (or A^T).
            left, right = (a_cat.T, b_cat.T) if module.module.fan_in_fan_out else (b_cat, a_cat)
            if not _add_product(tensor, left, right, scratch()):
                raise _non_finite(plan, module, payload, _BaseWeight(plan, module))
            return
        work_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        merged = _merged_delta(plan, module, payload, tensor).to(work_dtype)
        work = tensor.to(work_dtype).add_(merged.T if module.module.fan_in_fan_out else merged)
        if not _fits(work, tensor.dtype):
            raise _non_finite(plan, module, payload, _BaseWeight(plan, module))
        tensor.copy_(work)

    workers = _merge_workers()
    with ExitStack() as stack:
        files = _open_bricks(plan, stack)
        wrappers = _WrapperCache(files)
        if workers > 1:
            stack.enter_context(_torch_single_threaded())
        stream_shards(
            jobs,
            update,
            load=lambda info: _load(plan, by_tensor[info.name], files, wrappers),
            progress=lambda written, name: report(
                _STREAM_SHARE * written / total, f"merged {name}" if name else "copying"
            ),
            workers=workers,
        )
    for path in _files_to_copy(plan.base.path):
        if (staging / path.name).exists():
            continue
        copy_file(path, staging / path.name)
    if plan.base.sharded and not (staging / INDEX_FILE).exists():
        copy_file(plan.base.path / INDEX_FILE, staging / INDEX_FILE)


class _BaseWeight:
    """Reads a module's base weight again, for diagnosing a failed merge."""

    def __init__(self, plan: CompositionPlan, module: ModulePlan) -> None:
        self.plan = plan
        self.module = module

    def base_is_finite(self) -> bool:
        """Whether the stored base weight is all finite."""
        import torch

        from composer.io import TensorFile

        header = self.plan.base.shards[self.module.shard]
        with TensorFile(self.plan.base.path / self.module.shard, header) as source:
            weight = source.read(self.module.tensor)
        return bool(torch.isfinite(weight).all())


def _non_finite(
    plan: CompositionPlan, module: ModulePlan, payload: _Payload, base: _BaseWeight | None
) -> NonFiniteResult:
    """Name what made a module's merge non-finite: a brick's factors, a brick's delta, the
    base weight, or the combination overflowing the dtype."""
    import torch

    from composer.lora import delta

    problems = []
    for index, (contribution, factors) in enumerate(zip(module.contributions, payload.factors, strict=True)):
        label = f"brick {plan.bricks[contribution.brick].source.name!r} (weight {contribution.weight:g})"
        extra = [("lora_magnitude_vector", payload.magnitudes), ("its saved copy", payload.copies)]
        held: list[tuple[str, torch.Tensor]] = []
        for what, tensors in extra:
            tensor = tensors[index] if index < len(tensors) else None
            if tensor is not None:
                held.append((what, tensor))
        if factors is not None:
            held = [("lora_A", factors.a), ("lora_B", factors.b), *held]
        bad = [n for n, t in held if not bool(torch.isfinite(t).all())]
        if factors is None:
            if bad:
                problems.append(f"{label}: {' and '.join(bad)} hold NaN or Inf")
            continue
        if bad:
            problems.append(f"{label}: {' and '.join(bad)} hold NaN or Inf")
        elif not bool(torch.isfinite(delta(factors)).all()):
            problems.append(f"{label}: its delta s * B @ A overflows float32")
    if base is not None and not problems and not base.base_is_finite():
        problems.append("the base model's weight itself holds NaN or Inf")
    if not problems:
        names = ", ".join(repr(plan.bricks[c.brick].source.name) for c in module.contributions)
        dtype = module.tensor.dtype if plan.output == "full" else "F32"
        problems.append(f"the merged weight of bricks {names} does not fit in {dtype} (overflow)")
    return NonFiniteResult(f"merging module {module.name!r} produced NaN or Inf", problems)


@dataclass
class _AdapterPart:
    """One module of an adapter output: LoRA factors (a `LowRank`), or the module's merged
    weight carried as a ``modules_to_save`` copy, or nothing (a module only checked)."""

    low_rank: Any = None
    saved: torch.Tensor | None = None


def _adapter_module(
    plan: CompositionPlan, module: ModulePlan, files: Sequence[TensorFile], base_files: Mapping[str, TensorFile]
) -> _AdapterPart:
    """One module of an adapter output.

    Plain LoRA contributions give exact (or truncated) factors. A module that a brick saves
    whole (``modules_to_save``) stays a full copy: the base weight plus the merged delta,
    which is exact. DoRA contributions depend on the base weight and are not low-rank: their
    merged delta is stored as its truncated SVD at the requested rank (the plan requires one).
    """
    import torch

    from composer.lowrank import LowRank, truncate_product, truncated_svd

    payload = _load(plan, module, files)
    base: torch.Tensor | None = None
    if module.checks or not module.low_rank:
        base = base_files[module.shard].read(module.tensor)
    if module.checks:
        assert base is not None
        _check_base_layers(plan, module, payload, base)
    if not module.contributions:
        return _AdapterPart()
    if any(c.copy is not None for c in module.contributions):
        assert base is not None
        merged = _merged_delta(plan, module, payload, base)
        work = base.to(torch.float64 if base.dtype == torch.float64 else torch.float32)
        work.add_(merged.T if module.module.fan_in_fan_out else merged)
        if not _fits(work, base.dtype):
            raise _non_finite(plan, module, payload, None)
        return _AdapterPart(saved=work.to(base.dtype))
    if payload.stacked is not None:
        b_cat, a_cat = payload.stacked
        if plan.rank is None:
            low_rank = LowRank(b=b_cat, a=a_cat, relative_error=0.0)
        else:
            low_rank = truncate_product(b_cat, a_cat, plan.rank)
    else:
        assert plan.rank is not None  # the plan requires a rank for these methods and for DoRA
        merged = _merged_delta(plan, module, payload, base)
        if not _fits(merged, torch.float32):
            raise _non_finite(plan, module, payload, None)
        low_rank = truncated_svd(merged, plan.rank)
    finite = _fits(low_rank.a, torch.float32) and _fits(low_rank.b, torch.float32)
    if not finite or not math.isfinite(low_rank.relative_error):
        raise _non_finite(plan, module, payload, None)
    return _AdapterPart(low_rank=low_rank)


def _open_base_shards(plan: CompositionPlan, stack: ExitStack) -> dict[str, TensorFile]:
    """The base shards holding a module whose adapter output needs the base weight."""
    from composer.io import TensorFile

    shards = {m.shard for m in plan.modules.values() if m.checks or not m.low_rank}
    return {shard: stack.enter_context(TensorFile(plan.base.path / shard, plan.base.shards[shard])) for shard in shards}


def _write_adapter(plan: CompositionPlan, staging: Path, report: _Reporter) -> tuple[TruncationStats, dict[str, int]]:
    from concurrent.futures import ThreadPoolExecutor

    from composer.io import write_json, write_safetensors

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    saved: list[str] = []
    modules = list(plan.modules.values())
    workers = _merge_workers()
    with ExitStack() as stack:
        files = _open_bricks(plan, stack)
        base_files = _open_base_shards(plan, stack)
        if workers > 1:
            stack.enter_context(_torch_single_threaded())
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="composer-adapter")
        try:
            futures = [pool.submit(_adapter_module, plan, module, files, base_files) for module in modules]
            for index, (module, future) in enumerate(zip(modules, futures, strict=True)):
                part = future.result()
                prefix = f"base_model.model.{module.name}"
                if part.saved is not None:
                    # PEFT saves a modules_to_save copy under the module's own parameter names.
                    tensors[f"{prefix}.{module.parameter}"] = part.saved.contiguous()
                    if module.name not in saved:
                        saved.append(module.name)
                    errors[module.key] = 0.0
                elif part.low_rank is not None:
                    low_rank = part.low_rank
                    a_key, b_key = (
                        ("lora_embedding_A", "lora_embedding_B")
                        if module.module.embedding
                        else ("lora_A.weight", "lora_B.weight")
                    )
                    tensors[f"{prefix}.{a_key}"] = low_rank.a.contiguous()
                    tensors[f"{prefix}.{b_key}"] = low_rank.b.contiguous()
                    ranks[module.name] = low_rank.rank
                    errors[module.name] = low_rank.relative_error
                report(_STREAM_SHARE * (index + 1) / max(1, len(modules)), f"merged {module.name}")
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        parameter_ranks = _write_parameters(plan, files, tensors)
    write_safetensors(staging / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    write_json(staging / ADAPTER_CONFIG, adapter_config(plan, ranks, saved, parameter_ranks))
    errors.update(dict.fromkeys(parameter_ranks, 0.0))
    ranks = {**ranks, **parameter_ranks}
    values = list(errors.values())
    stats = TruncationStats(
        max_relative_error=max(values, default=0.0),
        mean_relative_error=sum(values) / len(values) if values else 0.0,
        per_module=errors,
    )
    return stats, ranks


def _write_parameters(
    plan: CompositionPlan, files: Sequence[TensorFile], tensors: dict[str, torch.Tensor]
) -> dict[str, int]:
    """An adapter output's ParamWrapper factors (``target_parameters``): per expert, the
    bricks' factors concatenated (``B_e = [B_1e | B_2e ...]``, ``A_e`` stacking
    ``w_i s_i A_ie``), which is exactly the weighted sum of their deltas at scaling 1, laid
    out and named as PEFT saves them. Returns each parameter's rank per expert."""
    import torch

    from composer.experts import ExpertView, adapter_module_name, fused_factors

    targeted = [p.parameter for p in plan.parameters.values()]
    ranks: dict[str, int] = {}
    for name, parameter_plan in plan.parameters.items():
        parameter = parameter_plan.parameter
        experts = parameter.experts
        per_expert = []
        wholes = [(files[c.brick].read(c.a), files[c.brick].read(c.b), c) for c in parameter_plan.contributions]  # type: ignore[arg-type]
        for expert in range(experts):
            view = ExpertView(experts, expert, 0, parameter.out_features)
            parts = [view.factors(a, b) for a, b, _ in wholes]
            a_e = torch.cat(
                [a.to(torch.float32) * (c.weight * c.scaling) for (a, _), (_, _, c) in zip(parts, wholes, strict=True)]
            )
            b_e = torch.cat([b.to(torch.float32) for _, b in parts], dim=1)
            per_expert.append((a_e, b_e))
        lora_a, lora_b = fused_factors(per_expert)
        if not (_fits(lora_a, torch.float32) and _fits(lora_b, torch.float32)):
            bricks = ", ".join(repr(plan.bricks[c.brick].source.name) for c in parameter_plan.contributions)
            raise NonFiniteResult(
                f"merging parameter {name!r} produced NaN or Inf", [f"the factors of bricks {bricks} hold NaN or Inf"]
            )
        prefix = f"base_model.model.{adapter_module_name(parameter, targeted)}"
        tensors[f"{prefix}.lora_A.weight"] = lora_a
        tensors[f"{prefix}.lora_B.weight"] = lora_b
        ranks[name] = int(lora_a.shape[0]) // experts
    return ranks


def adapter_config(
    plan: CompositionPlan,
    ranks: Mapping[str, int],
    saved: Sequence[str] = (),
    parameters: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter output: scaling 1 everywhere (``lora_alpha``
    equals the rank of every module), per-module ranks in ``rank_pattern`` with the module
    names escaped as regexes, ``target_modules`` as suffixes when they select exactly the
    merged modules, else as full names; modules carried as full copies in
    ``modules_to_save`` (full names); raw parameters (``parameters``: name -> rank per
    expert) in ``target_parameters`` (full names)."""
    parameters = parameters or {}
    counts = Counter([*ranks.values(), *parameters.values()])
    r = max(counts, key=lambda k: (counts[k], k)) if counts else 1
    rank_pattern = {re.escape(name): k for name, k in {**ranks, **parameters}.items() if k != r}
    # PEFT's Embedding layer ignores fan_in_fan_out; the linear layers decide it.
    linear = [plan.modules[name].module for name in ranks if not plan.modules[name].module.embedding]
    fan_in_fan_out = bool(linear) and all(m.fan_in_fan_out for m in linear)
    task_types = {brick.task_type for brick in plan.bricks}
    return {
        "peft_type": "LORA",
        "task_type": task_types.pop() if len(task_types) == 1 else None,
        "base_model_name_or_path": plan.output_base_name,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        # PEFT accepts no target_modules when target_parameters are given (not an empty list).
        "target_modules": _target_modules(plan, list(ranks)) if ranks or not parameters else None,
        "target_parameters": sorted(parameters) or None,
        "use_rslora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "modules_to_save": sorted(saved) or None,
    }


def _target_modules(plan: CompositionPlan, modules: Sequence[str]) -> list[str]:
    from composer.basemodel import find_mergeable_modules

    chosen = set(modules)
    suffixes = {name.rsplit(".", 1)[-1] for name in chosen}
    selected = {m for m in find_mergeable_modules(plan.base) if m.rsplit(".", 1)[-1] in suffixes}
    return sorted(suffixes) if selected == chosen else sorted(chosen)


def _write_record(
    plan: CompositionPlan,
    staging: Path,
    *,
    recipe: Mapping[str, Any] | None,
    truncation: TruncationStats | None,
    ranks: Mapping[str, int],
) -> None:
    from composer.card import composition_record, model_card
    from composer.io import write_json, write_text

    record = composition_record(plan, recipe=recipe, truncation=truncation, ranks=ranks)
    write_json(staging / RECORD_FILE, record)
    write_text(staging / CARD_FILE, model_card(plan, record))
