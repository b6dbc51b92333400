"""The trained test bed: a small Llama-style base and one LoRA brick per task, trained on the
CPU from a seed, so that composition has skills to keep or lose.

What a build writes (``build_testbed(out_dir, seed, variant)``)::

    out_dir/base/            character-level tokenizer (HF ``PreTrainedTokenizerFast``) and a
                             LlamaForCausalLM (head_dim 64) trained to copy: it knows the prompt
                             format and the alphabet (the full one also its order), not the tasks
    out_dir/bricks/<task>/   a PEFT LoRA adapter trained on that task only (safetensors), stopped
                             early on a validation set disjoint from the eval set
    out_dir/manifest.json    tasks, user-style descriptions, example inputs, held-out eval sets,
                             measured base and brick exact match, the steps each brick took
    out_dir/build.json       the run's wall and CPU time, and the seconds of the base and of each
                             brick (apart: the other files are the same bytes for the same seed
                             and code, `file_hashes`)

A prompt is ``<s>`` + ``format_prompt(input)``; the answer follows, ended by ``</s>``. Accuracy
is exact match of the greedy answer. `ensure_testbed` caches builds under a directory keyed by
(variant, seed, code version), so tests and benchmarks build once; a build the repository ships
for that key (``composer/testbed_weights/<variant>-seed<N>/`` with ``files.sha256``, written by
`ship_testbed`) is copied and hash-checked instead of trained.

CLI: ``python -m composer.testbed build --out DIR --seed 0 [--small]``;
``python -m composer.testbed ship --seed 0 [--small]`` (``make testbed-weights``).

torch, transformers and peft are imported when a build or an evaluation runs; bricks train in up
to 2 worker processes (``$BRICKYARD_TESTBED_WORKERS``), one torch thread each, ended by the kernel
when the build's process ends (Linux). Every brick follows one plan (3e-3, batches of 64, early
stop; the full variant's from 1e-3 with rank 32); the small variant's bricks reach 0.97-1.00 at
seeds 0-2, the full variant's 0.93-1.00 at seeds 0-7 (its base trained with 2 torch threads),
in 228-323 s of wall time at seven of them and 429 s at seed 6, on 2 cores with nothing else
running (README, "The trained test bed").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    import torch

__all__ = [
    "BASE_MAX_ACCURACY",
    "BRICK_MIN_ACCURACY",
    "TASKS",
    "VARIANTS",
    "Task",
    "TestBed",
    "TestBedTask",
    "base_name",
    "build_testbed",
    "code_version",
    "encode_example",
    "ensure_testbed",
    "exact_match",
    "file_hashes",
    "format_prompt",
    "greedy_answers",
    "load_testbed",
    "read_hashes",
    "ship_testbed",
    "shipped_root",
    "write_hash_list",
]

Variant = Literal["full", "small"]
Progress = Callable[[str], None]

# The documented accuracies a build reaches (exact match on the held-out eval sets): every brick at
# least BRICK_MIN_ACCURACY[variant] (its recipe's, below) on its own task, the base at most
# BASE_MAX_ACCURACY on every task.
BASE_MAX_ACCURACY = 0.05

SEPARATOR = "="
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# Every character an input or an answer can hold; nothing else is in the vocabulary.
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,;/+-=#"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MANIFEST = "manifest.json"
BUILD_FACTS = "build.json"
HASHES = "files.sha256"
# Builds the repository ships (`ship_testbed`), used by `ensure_testbed` instead of training.
SHIPPED = Path(__file__).parent / "testbed_weights"


def base_name(variant: str, seed: int) -> str:
    """The name a build's bricks record as ``base_model_name_or_path`` (and the manifest as
    ``base_name``): stable across machines and cache paths, unlike the directory trained in."""
    return f"brickyard-testbed-{variant}-seed{seed}"


def format_prompt(text: str) -> str:
    """The prompt for an input (the tokenizer adds ``<s>`` in front)."""
    return f"{text}{SEPARATOR}"


# -- tasks -------------------------------------------------------------------------------

_LOWER = "abcdefghijklmnopqrstuvwxyz"
_UPPER = _LOWER.upper()
_POSITIVE = ("good", "great", "fun", "lovely", "superb", "nice", "happy", "best", "clean", "fast")
_NEGATIVE = ("bad", "awful", "dull", "broken", "poor", "sad", "worst", "dirty", "slow", "rude")
_NEUTRAL = ("the", "movie", "food", "room", "phone", "staff", "book", "was", "very", "and")


def _letters(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    while True:
        word = _letters(rng, _LOWER, 4, 7)
        if word != word[::-1]:
            return word, word[::-1]


def _sort_digits(rng: random.Random) -> tuple[str, str]:
    while True:
        digits = [rng.randint(0, 9) for _ in range(rng.randint(4, 6))]
        if digits != sorted(digits):
            return ",".join(map(str, digits)), ",".join(map(str, sorted(digits)))


def _caesar(rng: random.Random) -> tuple[str, str]:
    word = _letters(rng, _UPPER, 4, 7)
    return word, "".join(_UPPER[(_UPPER.index(c) + 1) % 26] for c in word)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(0, 9)
    return f"{a}+{b}", str(a + b)


def _date(rng: random.Random) -> tuple[str, str]:
    year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return f"{year}-{month:02d}-{day:02d}", f"{day:02d}/{month:02d}/{year}"


def _sentiment(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    polar = _POSITIVE if positive else _NEGATIVE
    words = [rng.choice(_NEUTRAL) for _ in range(rng.randint(1, 3))]
    for _ in range(rng.randint(1, 2)):
        words.insert(rng.randint(0, len(words)), rng.choice(polar))
    return " ".join(words), "pos" if positive else "neg"


def _count(rng: random.Random) -> tuple[str, str]:
    items = [rng.choice(_LOWER) for _ in range(rng.randint(2, 9))]
    return ";".join(items), str(len(items))


def _maximum(rng: random.Random) -> tuple[str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    return " ".join(map(str, digits)), str(max(digits))


def _parity(rng: random.Random) -> tuple[str, str]:
    number = rng.randint(100, 99999)
    return str(number), "even" if number % 2 == 0 else "odd"


def _tag(rng: random.Random) -> tuple[str, str]:
    # "#" and a word: answer is the word's first and last letter, upper-cased.
    word = _letters(rng, _LOWER, 3, 7)
    return f"#{word}", (word[0] + word[-1]).upper()


@dataclass(frozen=True)
class Task:
    """A task of the test bed: a generator of (input, answer) pairs and how a user would ask."""

    name: str
    description: str
    generate: Callable[[random.Random], tuple[str, str]]


TASKS: Mapping[str, Task] = {
    task.name: task
    for task in (
        Task("reverse", "Reverse a word: write its letters backwards.", _reverse),
        Task("sort_digits", "Sort a comma-separated list of digits from smallest to largest.", _sort_digits),
        Task("caesar", "Encrypt capital letters with a Caesar cipher: shift every letter one place on.", _caesar),
        Task("add", "Add two numbers and give the sum.", _add),
        Task("date", "Convert a date from year-month-day to day/month/year format.", _date),
        Task("sentiment", "Classify the sentiment of a short review as positive or negative.", _sentiment),
        Task("count", "Count how many items there are in a semicolon-separated list.", _count),
        Task("maximum", "Find the largest number in a list of digits.", _maximum),
        Task("parity", "Tell whether a whole number is even or odd.", _parity),
        Task("initials", "Give the first and last letter of a hashtag word in capitals.", _tag),
    )
}


@dataclass(frozen=True)
class _BrickPlan:
    """How a brick trains: at most ``max_steps`` steps of ``batch`` examples from ``lr`` (halved
    whenever validation does not improve, `_train_brick`), stopped early once its validation set
    is answered well enough."""

    max_steps: int
    batch: int
    lr: float
    rank: int = 8


@dataclass(frozen=True)
class _Recipe:
    """How large the model is and how much of everything a variant trains."""

    tasks: tuple[str, ...]
    hidden: int
    layers: int
    base_steps: int
    batch: int  # examples per base step
    eval_size: int
    brick_min_accuracy: float
    brick: _BrickPlan
    # fraction of the base's rows that are stretches of the alphabet or digits in order (`_run`)
    base_runs: float = 0.0
    # validation pairs a brick's early stop is decided on (`_train_brick`)
    validation_size: int = 64
    # torch threads the base trains with: nothing else runs until it is saved (the bricks wait
    # for it), so the full variant's takes both cores of a 2-core machine. A fixed number, not
    # the machine's: the base's bytes depend on it (and are the same from run to run with it).
    base_threads: int = 1


# Every brick of the small variant, seeds 0-5 (parity 0-11), reached 0.975-1.00 on its eval set with
# this plan, in 50-500 steps; at 1e-2 parity stayed at chance (seed 1) and sentiment peaked at 0.80
# (seed 2): see `_train_brick`.
_BRICK_PLAN = _BrickPlan(max_steps=1000, batch=64, lr=3e-3)

# Both variants keep head_dim 64 (vLLM's CPU attention supports it): hidden 256 with 4 heads,
# or 128 with 2 for the small one, which trains in a quarter of the time.
VARIANTS: Mapping[str, _Recipe] = {
    "full": _Recipe(
        # reverse and sort_digits stay out: they reorder an input of varying length, what a
        # 2-layer base trained to copy is least made for, and would cost the most steps.
        tuple(task for task in TASKS if task not in ("reverse", "sort_digits")),
        hidden=256,
        layers=2,
        base_steps=500,
        batch=48,
        eval_size=100,
        brick_min_accuracy=0.9,
        # Measured (README, "The trained test bed"). Seed 0, on a base that copies only: caesar
        # took 2,150 steps to 0.95 and add 1,150 to 0.91 (at most 0.76 and 0.88 within 1,000).
        # A quarter of the base's rows written as stretches of the alphabet or digits ("FGHIJ",
        # "3456") teach it which letter or digit comes next, the fact both tasks rest on: on such
        # a base caesar reached validation 1.00 in 300 steps, add 0.98 in 550. Its 64 validation
        # pairs passed caesar at eval 0.91 (its misses: doubled letters, rare among 64), 200 pairs
        # at eval 0.97 (650 steps). At seed 1, add learned slowly with rank 8 from 3e-3 (0.50
        # after 1,000 steps, 0.56 after 1,500); rank 32 from 1e-3 reached 0.90 at 1,100 (rank 32
        # from 3e-3 was unstable: add rose to validation 0.64, then fell to 0.00, seed 0).
        brick=replace(_BRICK_PLAN, rank=32, lr=1e-3, max_steps=1500),
        base_runs=0.25,
        validation_size=200,
        # 500 steps on a quiet 2-core machine: 128 s with one thread, about 70 with two.
        base_threads=2,
    ),
    "small": _Recipe(
        ("sentiment", "maximum", "parity"),
        hidden=128,
        layers=2,
        base_steps=300,
        batch=24,
        eval_size=40,
        brick_min_accuracy=0.9,
        brick=_BRICK_PLAN,
    ),
}
BRICK_MIN_ACCURACY: Mapping[str, float] = {name: recipe.brick_min_accuracy for name, recipe in VARIANTS.items()}
_HEAD_DIM, _MAX_POSITIONS = 64, 64
_BASE_LR, _WARMUP_STEPS = 3e-3, 20
# Early stop: every _CHECK_EVERY steps, exact match on the recipe's validation pairs (generated
# like the eval set, disjoint from it and from the training data); at _STOP_ACCURACY or more the
# brick is done. _PATIENCE checks in a row without progress halve the rate (`_train_brick`). A brick
# that never gets there keeps its best-validated weights.
_CHECK_EVERY, _STOP_ACCURACY, _PATIENCE = 50, 0.98, 4
_EXAMPLES_PER_TASK = 5


# -- vocabulary and encoding -----------------------------------------------------------------


def _vocab() -> dict[str, int]:
    tokens = [PAD, BOS, EOS, UNK, *ALPHABET]
    return {token: index for index, token in enumerate(tokens)}


_VOCAB = _vocab()


def encode_example(prompt_text: str, answer: str | None = None) -> tuple[list[int], int]:
    """Token ids of ``<s> prompt_text [answer </s>]`` and the number of prompt tokens
    (``<s>`` included). Same ids as the saved tokenizer gives; unknown characters raise."""
    ids = [_VOCAB[BOS], *(_VOCAB[c] for c in prompt_text)]
    prompt_length = len(ids)
    if answer is not None:
        ids += [*(_VOCAB[c] for c in answer), _VOCAB[EOS]]
    return ids, prompt_length


def _save_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    # A BPE without merges and without pre-tokenizer splits text into single characters.
    core = Tokenizer(models.BPE(vocab=dict(_VOCAB), merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, _VOCAB[BOS])])
    core.add_special_tokens([PAD, BOS, EOS, UNK])
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    tokenizer.model_max_length = _MAX_POSITIONS
    tokenizer.save_pretrained(out_dir)


# -- training and evaluation ---------------------------------------------------------------


def _task_rng(seed: int, task: str, purpose: str) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}/{task}/{purpose}".encode()))


def _distinct_pairs(seed: int, task: str, purpose: str, size: int, exclude: set[str]) -> list[tuple[str, str]]:
    rng, seen, pairs = _task_rng(seed, task, purpose), set(exclude), []
    for _ in range(size * 50):
        pair = TASKS[task].generate(rng)
        if pair[0] not in seen:
            seen.add(pair[0])
            pairs.append(pair)
        if len(pairs) == size:
            break
    return pairs


def _eval_set(seed: int, task: str, size: int) -> list[tuple[str, str]]:
    return _distinct_pairs(seed, task, "eval", size, set())


def _validation_set(seed: int, task: str, eval_set: Sequence[tuple[str, str]], size: int) -> list[tuple[str, str]]:
    """Pairs that decide when a brick has trained enough: none is an eval input (the eval set
    stays unseen by every choice the build makes), and none is trained on."""
    return _distinct_pairs(seed, task, "validation", size, {text for text, _ in eval_set})


def _stream(seed: int, task: str, held_out: set[str]) -> Iterator[tuple[str, str]]:
    """Endless training pairs of a task, never a held-out (eval or validation) input."""
    rng = _task_rng(seed, task, "train")
    while True:
        pair = TASKS[task].generate(rng)
        if pair[0] not in held_out:
            yield pair


def _batch(rows: Sequence[tuple[list[int], int]], *, answer_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 on padding, and on the prompt when ``answer_only``).
    Right padding needs no attention mask: a causal model never looks at later positions."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), _VOCAB[PAD], dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for row, (tokens, prompt_length) in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        start = prompt_length if answer_only else 1
        labels[row, start : len(tokens)] = torch.tensor(tokens[start:])
    return ids, labels


def _train_base(
    model: Any, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float, progress: Progress
) -> None:
    """AdamW with warm-up and cosine decay over ``steps``."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    model.train()
    for step in range(steps):
        ids, labels = next(batches)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, steps // 5) == 0:
            progress(f"  base: step {step + 1}/{steps} loss {loss.detach().item():.4f}")
    model.eval()


def _train_brick(
    model: Any,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    plan: _BrickPlan,
    validation: Sequence[tuple[str, str]],
) -> tuple[int, float]:
    """AdamW from ``plan.lr`` (after a warm-up) until the validation exact match, checked every
    _CHECK_EVERY steps, reaches _STOP_ACCURACY, or ``plan.max_steps``. After _PATIENCE checks in
    a row that do not beat the best one the rate is halved; training goes on from where it is,
    and the model ends with its best-validated weights. Returns (steps at those weights, their
    validation match).

    Why this rate (small variant, validation and eval curves every 50 steps): from 1e-2 training
    was unstable, not short of steps. Parity at seed 1 stayed at or below chance (0.00-0.59) for
    400 steps whatever the batch (24 or 64), the rank (16) or 2e-2; sentiment at seed 2 swung
    0.42 -> 0.84 -> 0.52 -> 0.88. From 3e-3 both reached 0.98 on validation in 100-150 steps, and so did every
    brick of seeds 0-5. Parity can still sit at chance for a while (seed 4: 400 steps, then 1.00
    at 500 after a halving), hence the budget of 1,000 steps.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)
    rate, stalled = plan.lr, 0
    best: tuple[float, int, list[torch.Tensor]] = (-1.0, 0, [])
    model.train()
    for step in range(plan.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = rate * min(1.0, (step + 1) / _WARMUP_STEPS)
        ids, labels = next(batches)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % _CHECK_EVERY and step + 1 != plan.max_steps:
            continue
        model.eval()
        accuracy = exact_match(model, validation)
        model.train()
        if accuracy > best[0]:
            best, stalled = (accuracy, step + 1, [p.detach().clone() for p in params]), 0
        else:
            stalled += 1
        if stalled >= _PATIENCE:
            rate, stalled = rate / 2, 0
        if best[0] >= _STOP_ACCURACY:
            break
    model.eval()
    with torch.no_grad():
        for param, kept in zip(params, best[2], strict=True):
            param.copy_(kept)
    return best[1], best[0]


def greedy_answers(model: Any, inputs: Sequence[str], *, max_new_tokens: int = 16, batch: int = 128) -> list[str]:
    """Greedy answers of a test-bed model (base, PEFT or merged) to raw task inputs.

    Prompts of one length are decoded together, so no padding is involved and the result
    does not depend on how inputs are batched.
    """
    import torch

    inverse = {index: token for token, index in _VOCAB.items()}
    by_length: dict[int, list[int]] = {}
    encoded = [encode_example(format_prompt(text))[0] for text in inputs]
    for index, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(index)
    answers = [""] * len(inputs)
    with torch.inference_mode():
        for indices in by_length.values():
            for start in range(0, len(indices), batch):
                chunk = indices[start : start + batch]
                tokens = torch.tensor([encoded[i] for i in chunk])
                done = torch.zeros(len(chunk), dtype=torch.bool)
                produced: list[torch.Tensor] = []
                for _ in range(max_new_tokens):
                    logits = model(input_ids=tokens).logits[:, -1, :]
                    token = logits.argmax(dim=-1)
                    token = torch.where(done, torch.full_like(token, _VOCAB[EOS]), token)
                    produced.append(token)
                    done |= token == _VOCAB[EOS]
                    if bool(done.all()) or tokens.shape[1] >= _MAX_POSITIONS:
                        break
                    tokens = torch.cat([tokens, token[:, None]], dim=1)
                for row, index in enumerate(chunk):
                    text = []
                    for token in (int(t[row]) for t in produced):
                        if token == _VOCAB[EOS]:
                            break
                        text.append(inverse[token] if len(inverse[token]) == 1 else "")
                    answers[index] = "".join(text)
    return answers


def exact_match(model: Any, pairs: Sequence[tuple[str, str]], *, batch: int = 128) -> float:
    """Fraction of ``(input, answer)`` pairs whose greedy answer equals ``answer`` exactly.

    Read from one forward pass of each prompt followed by its answer: greedy decoding writes
    the answer exactly when, at every answer position and at the end of it, the model's most
    likely next token is the answer's next token (then EOS), given the answer so far, which
    is then its own output so far. So no decoding loop (`greedy_answers` runs up to
    ``len(answer) + 2`` forwards of growing prompts); the validation checks of a brick's
    training spent 8-10 % of its time decoding. Rows are right-padded, which a causal model
    never reads before the answer ends.
    """
    import torch

    if not pairs:
        raise ValueError("no pairs to score")
    rows = [encode_example(format_prompt(text), answer) for text, answer in pairs]
    hits = 0
    with torch.inference_mode():
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            ids, labels = _batch(chunk, answer_only=True)
            predicted = model(input_ids=ids).logits[:, :-1].argmax(dim=-1)
            answer = labels[:, 1:] != -100
            right = (predicted == labels[:, 1:]) | ~answer
            hits += int(right.all(dim=1).sum())
    return hits / len(pairs)


# -- build ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestBedTask:
    """One task of a built test bed, as its manifest records it."""

    name: str
    description: str
    examples: tuple[str, ...]
    eval_set: tuple[tuple[str, str], ...]
    brick_dir: Path
    base_accuracy: float
    brick_accuracy: float
    brick_steps: int


@dataclass(frozen=True)
class TestBed:
    """A built test bed: base model directory, tasks with their bricks, build facts."""

    __test__ = False  # not a pytest class, despite the name

    root: Path
    base_dir: Path
    base_name: str
    variant: str
    seed: int
    code_version: str
    build_seconds: float
    tasks: Mapping[str, TestBedTask] = field(default_factory=dict)


def code_version(variant: str) -> str:
    """12 hex digits naming what a build of ``variant`` is made by: a cached or shipped build is
    reused only by the same code.

    The hash covers this module's syntax tree without docstrings (so comments and docs can change
    without retraining or re-shipping) and with only this variant's recipe from `VARIANTS` (so
    tuning the small variant leaves the shipped full build valid).
    """
    import ast

    tree = ast.parse(Path(__file__).read_text())
    kept: list[ast.stmt] = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(target, ast.Name) and target.id == "VARIANTS" for target in targets):
            continue
        kept.append(node)
    module = ast.Module(body=kept, type_ignores=[])
    for child in ast.walk(module):
        body = getattr(child, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            child.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined,index]
    source = ast.dump(module) + repr(VARIANTS[variant])
    return hashlib.sha256(source.encode()).hexdigest()[:12]


def _llama_config(recipe: _Recipe) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(_VOCAB),
        hidden_size=recipe.hidden,
        intermediate_size=2 * recipe.hidden,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.hidden // _HEAD_DIM,
        num_key_value_heads=recipe.hidden // _HEAD_DIM,
        head_dim=_HEAD_DIM,
        max_position_embeddings=_MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=_VOCAB[BOS],
        eos_token_id=_VOCAB[EOS],
        pad_token_id=_VOCAB[PAD],
    )


def _run(rng: random.Random) -> str:
    """A stretch of the alphabet, capitals or digits in their order (wrapping at the end)."""
    alphabet = rng.choice((_LOWER, _UPPER, "0123456789"))
    start, length = rng.randrange(len(alphabet)), rng.randint(4, 9)
    return "".join(alphabet[(start + offset) % len(alphabet)] for offset in range(length))


def _base_texts(seed: int, recipe: _Recipe) -> Iterator[str]:
    """What the base learns to copy, endlessly: every task's inputs (prompt format and alphabet,
    no task) and, as ``recipe.base_runs`` of the rows, stretches of the alphabet or the digits in
    order (`_run`). Never an eval input: the base copies inputs, not answers, so only eval inputs
    are kept from it."""
    held_out = {task: {text for text, _ in _eval_set(seed, task, recipe.eval_size)} for task in recipe.tasks}
    streams = {task: _stream(seed, task, held_out[task]) for task in recipe.tasks}
    every_held_out = set().union(*held_out.values())
    rng = random.Random(seed)
    while True:
        # rng.random() only with runs on: a recipe without them draws what it always drew.
        if recipe.base_runs and rng.random() < recipe.base_runs:
            text = _run(rng)
            if text not in every_held_out:
                yield text
        else:
            yield next(streams[rng.choice(recipe.tasks)])[0]


def _trained_base(seed: int, recipe: _Recipe, say: Progress) -> Any:
    """The base of a build: a LlamaForCausalLM trained to copy `_base_texts`."""
    import torch
    from transformers import LlamaForCausalLM

    def copy_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        texts = _base_texts(seed, recipe)
        while True:
            rows = [encode_example(format_prompt(text), text) for text in (next(texts) for _ in range(recipe.batch))]
            yield _batch(rows, answer_only=False)

    torch.manual_seed(seed)
    base = LlamaForCausalLM(_llama_config(recipe))
    say(f"base: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters, {recipe.base_steps} steps")
    _train_base(base, copy_batches(), recipe.base_steps, _BASE_LR, say)
    return base


def _brick_record(seed: int, variant: str, task: str, base_dir: str, brick_dir: str) -> dict[str, Any]:
    """Train, save and score one brick on the saved base; its manifest record.

    Self-contained (everything from the seed and paths), so bricks train in worker processes
    in any order and give the same bytes as in one process.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    started = time.perf_counter()
    torch.set_num_threads(1)
    recipe = VARIANTS[variant]
    plan = recipe.brick
    evals = _eval_set(seed, task, recipe.eval_size)
    validation = _validation_set(seed, task, evals, recipe.validation_size)
    stream = _stream(seed, task, {text for text, _ in [*evals, *validation]})

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            rows = [encode_example(format_prompt(t), a) for t, a in (next(stream) for _ in range(plan.batch))]
            yield _batch(rows, answer_only=True)

    torch.manual_seed(zlib.crc32(f"{seed}/{task}/lora".encode()))
    config = LoraConfig(r=plan.rank, lora_alpha=2 * plan.rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config)
    steps, validation_accuracy = _train_brick(model, batches(), plan, validation)
    # PEFT would record the staging directory the base was loaded from, a path that is gone once
    # the build is published: record the base's stable name instead. No embedding layer is
    # trained; "auto" would look the name up as a model (a Hub request, a warning offline).
    model.peft_config["default"].base_model_name_or_path = base_name(variant, seed)
    model.save_pretrained(brick_dir, save_embedding_layers=False)
    # Same bytes in every process: PEFT keeps target_modules as a set (its JSON order follows the
    # process's string hashing), and its model card names the staging directory of the base.
    config_file = Path(brick_dir) / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["target_modules"] = sorted(saved["target_modules"])
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True))
    (Path(brick_dir) / "README.md").unlink(missing_ok=True)
    examples_rng = _task_rng(seed, task, "examples")
    return {
        "name": task,
        "description": TASKS[task].description,
        "examples": [TASKS[task].generate(examples_rng)[0] for _ in range(_EXAMPLES_PER_TASK)],
        "brick": f"bricks/{task}",
        "eval": [list(pair) for pair in evals],
        "base_accuracy": exact_match(LlamaForCausalLM.from_pretrained(base_dir), evals),
        "brick_accuracy": exact_match(model, evals),
        "brick_steps": steps,
        "validation_accuracy": validation_accuracy,
        "seconds": round(time.perf_counter() - started, 1),  # moved to build.json by build_testbed
    }


def _workers() -> int:
    # Bricks are independent once the base is saved: one process each, one thread each (on a
    # shared 2-core machine two threads in one process made a step 13x slower, 3.9 s vs 0.30 s
    # at load 10, by waiting on each other; processes do not wait on each other).
    configured = os.environ.get("BRICKYARD_TESTBED_WORKERS")
    return max(1, int(configured)) if configured else max(1, min(2, os.cpu_count() or 1))


def _train_bricks(
    seed: int, variant: str, base_dir: Path, bricks_dir: Path, workers: int, say: Progress
) -> list[dict[str, Any]]:
    tasks = VARIANTS[variant].tasks
    jobs = [(seed, variant, task, str(base_dir), str(bricks_dir / task)) for task in tasks]

    def report(record: dict[str, Any]) -> dict[str, Any]:
        say(
            f"brick {record['name']}: {record['brick_steps']} steps, base {record['base_accuracy']:.2f}"
            f" brick {record['brick_accuracy']:.2f} (validation {record['validation_accuracy']:.2f}),"
            f" {record['seconds']:.0f} s"
        )
        return record

    if workers == 1 or len(jobs) == 1:
        return [report(_brick_record(*job)) for job in jobs]
    with _brick_pool(min(workers, len(jobs))) as pool:
        futures = [pool.submit(_brick_record, *job) for job in jobs]
        return [report(future.result()) for future in futures]


def _brick_pool(workers: int) -> ProcessPoolExecutor:
    """The worker processes bricks train in, each ended by the kernel when this process ends."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a forked child would inherit this process's torch thread pools and locks.
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_end_with_parent, initargs=(os.getpid(),)
    )


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _end_with_parent(parent: int) -> None:
    """Initializer of a brick worker: SIGKILL it when its parent, the build's process, ends.

    A build killed mid-way (a test's timeout, the OOM killer, ``kill``) otherwise left its
    workers training bricks for minutes into a staging directory nobody would publish, on
    the cores the next build needs. Linux only (``PR_SET_PDEATHSIG``), as for the
    composition workers of the registry.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the kernel was told to watch it
        os._exit(1)


def build_testbed(
    out_dir: Path,
    *,
    seed: int = 0,
    variant: Variant = "full",
    progress: Progress | None = None,
    workers: int | None = None,
) -> TestBed:
    """Train the test bed into ``out_dir`` (must not exist; published by a rename at the end).

    Args:
        out_dir: where to write ``base/``, ``bricks/<task>/``, ``manifest.json`` and ``build.json``.
        seed: fixes data, initialisation and training order: the same bytes for the same seed,
            code and machine, whatever ``workers`` is (`file_hashes` lists them).
        variant: ``"full"`` (all tasks) or ``"small"`` (three tasks, a smaller model, for tests).
        progress: called with one line of text per stage.
        workers: processes training bricks at once (default ``$BRICKYARD_TESTBED_WORKERS``, else
            up to 2); each uses one torch thread.

    Returns:
        The loaded `TestBed`.
    """
    import resource

    import torch

    say = progress or (lambda _line: None)
    recipe = VARIANTS[variant]
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    version = code_version(variant)  # of the code that trains, should the file change meanwhile
    started, cpu_started = time.perf_counter(), time.process_time()
    children_started = resource.getrusage(resource.RUSAGE_CHILDREN)
    staging = out_dir.parent / f".{out_dir.name}.building-{uuid.uuid4().hex[:12]}"
    (staging / "bricks").mkdir(parents=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(recipe.base_threads)
        base = _trained_base(seed, recipe, say)
        torch.set_num_threads(1)  # see _workers
        base_dir = staging / "base"
        base.save_pretrained(base_dir)
        _save_tokenizer(base_dir)
        base_seconds = time.perf_counter() - started
        chosen = workers if workers is not None else _workers()
        records = _train_bricks(seed, variant, base_dir, staging / "bricks", chosen, say)
        brick_seconds = {record["name"]: record.pop("seconds") for record in records}
        manifest = {
            "variant": variant,
            "seed": seed,
            "code_version": version,
            "base": "base",
            "base_name": base_name(variant, seed),
            "prompt_format": format_prompt("{input}"),
            "thresholds": {"brick_min_accuracy": BRICK_MIN_ACCURACY[variant], "base_max_accuracy": BASE_MAX_ACCURACY},
            "tasks": records,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        children_cpu = (children.ru_utime + children.ru_stime) - (children_started.ru_utime + children_started.ru_stime)
        # Timings differ from run to run: kept apart from the files a build reproduces.
        facts = {
            "build_seconds": round(time.perf_counter() - started, 1),
            # CPU time of this process and its workers: what the build costs free cores.
            "build_cpu_seconds": round(time.process_time() - cpu_started + children_cpu, 1),
            "workers": chosen,
            "torch_threads": 1,  # of each brick's worker
            "base_threads": recipe.base_threads,
            # the phases: the base (trained in this process), each brick in its worker
            "base_seconds": round(base_seconds, 1),
            "brick_seconds": brick_seconds,
        }
        (staging / BUILD_FACTS).write_text(json.dumps(facts, indent=1) + "\n")
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return load_testbed(out_dir)


def load_testbed(root: Path) -> TestBed:
    """Read a built test bed's manifest (and its build facts, when present)."""
    root = Path(root)
    manifest = json.loads((root / MANIFEST).read_text())
    facts_file = root / BUILD_FACTS
    facts = json.loads(facts_file.read_text()) if facts_file.is_file() else {}
    tasks = {
        record["name"]: TestBedTask(
            name=record["name"],
            description=record["description"],
            examples=tuple(record["examples"]),
            eval_set=tuple((text, answer) for text, answer in record["eval"]),
            brick_dir=root / record["brick"],
            base_accuracy=record["base_accuracy"],
            brick_accuracy=record["brick_accuracy"],
            brick_steps=record.get("brick_steps", 0),  # builds before early stopping lack it
        )
        for record in manifest["tasks"]
    }
    return TestBed(
        root=root,
        base_dir=root / manifest["base"],
        base_name=manifest["base_name"],
        variant=manifest["variant"],
        seed=manifest["seed"],
        code_version=manifest["code_version"],
        build_seconds=facts.get("build_seconds", manifest.get("build_seconds", 0.0)),  # older builds
        tasks=tasks,
    )


# -- shipped builds ------------------------------------------------------------------------


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file of a build (relative POSIX path -> hex), except the run's timings
    (``build.json``) and the hash list itself: what a rebuild with the same seed reproduces."""
    root = Path(root)
    hashes = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and relative not in (BUILD_FACTS, HASHES):
            hashes[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def read_hashes(root: Path) -> dict[str, str]:
    """The hash list shipped with a build (``files.sha256``, the format of ``sha256sum``)."""
    hashes = {}
    for line in (Path(root) / HASHES).read_text().splitlines():
        digest, relative = line.split("  ", 1)
        hashes[relative] = digest
    return hashes


def shipped_root(variant: str, seed: int) -> Path:
    """Where the repository ships the build of (variant, seed), if it ships one."""
    return SHIPPED / f"{variant}-seed{seed}"


def _install_shipped(shipped: Path, root: Path) -> TestBed:
    """Copy a shipped build into the cache, refusing it when a file is not the one its hash list names."""
    staging = root.parent / f".{root.name}.copying-{uuid.uuid4().hex[:12]}"
    try:
        shutil.copytree(shipped, staging)
        expected, found = read_hashes(staging), file_hashes(staging)
        if found != expected:
            wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
            raise ValueError(f"the shipped test bed {shipped} does not match its {HASHES}: {', '.join(wrong)}")
        staging.rename(root)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if (root / MANIFEST).is_file():  # another process installed it first
            return load_testbed(root)
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_testbed(root)


def ensure_testbed(
    cache_dir: Path, *, seed: int = 0, variant: Variant = "full", progress: Progress | None = None
) -> TestBed:
    """The cached test bed for (variant, seed, code version) under ``cache_dir``: the cached copy,
    else the build the repository ships for this code version (copied, hashes checked), else a
    new build."""
    root = Path(cache_dir) / f"testbed-{variant}-seed{seed}-{code_version(variant)}"
    if (root / MANIFEST).is_file():
        return load_testbed(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    shipped = shipped_root(variant, seed)
    if (shipped / MANIFEST).is_file() and load_testbed(shipped).code_version == code_version(variant):
        (progress or (lambda _line: None))(f"test bed: the shipped build {shipped.name}")
        return _install_shipped(shipped, root)
    try:
        return build_testbed(root, seed=seed, variant=variant, progress=progress)
    except FileExistsError:
        # Another process published the same build first.
        return load_testbed(root)


def write_hash_list(root: Path) -> None:
    """Write ``files.sha256`` (the format of ``sha256sum``) for the build at ``root``."""
    lines = [f"{digest}  {relative}\n" for relative, digest in file_hashes(root).items()]
    (Path(root) / HASHES).write_text("".join(lines))


def ship_testbed(*, seed: int = 0, variant: Variant = "full", progress: Progress | None = None) -> TestBed:
    """Build (variant, seed) and put it, with its hash list, where `ensure_testbed` finds it
    (``composer/testbed_weights/<variant>-seed<N>/``), replacing the build shipped before."""
    target = shipped_root(variant, seed)
    target.parent.mkdir(exist_ok=True)
    fresh = target.parent / f".{target.name}.new-{uuid.uuid4().hex[:12]}"
    build_testbed(fresh, seed=seed, variant=variant, progress=progress)
    write_hash_list(fresh)
    if target.exists():
        shutil.rmtree(target)
    fresh.rename(target)
    return load_testbed(target)


def _table(bed: TestBed) -> str:
    lines = [f"{'task':<12} {'base':>6} {'brick':>6} {'steps':>6}"]
    lines += [
        f"{t.name:<12} {t.base_accuracy:>6.2f} {t.brick_accuracy:>6.2f} {t.brick_steps:>6}" for t in bed.tasks.values()
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m composer.testbed build --out DIR [--seed N] [--small]`` or
    ``python -m composer.testbed ship [--seed N] [--small]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m composer.testbed", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="train the test bed into a new directory")
    build.add_argument("--out", type=Path, required=True)
    ship = commands.add_parser("ship", help="train the test bed into composer/testbed_weights/ with its hash list")
    for command in (build, ship):
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--small", action="store_true", help="the small variant used by the tests")
    args = parser.parse_args(argv)
    variant: Variant = "small" if args.small else "full"
    if args.command == "ship":
        bed = ship_testbed(seed=args.seed, variant=variant, progress=print)
    else:
        bed = build_testbed(args.out, seed=args.seed, variant=variant, progress=print)
    facts = json.loads((bed.root / BUILD_FACTS).read_text())
    print(_table(bed))
    print(f"built in {facts['build_seconds']:.1f} s ({facts['build_cpu_seconds']:.1f} s of CPU) -> {bed.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
