"""The trained test bed: a small Llama-style base and one LoRA brick per task, trained on the
CPU from a seed, so that composition has skills to keep or lose.

What a build writes (``build_testbed(out_dir, seed, variant)``)::

    out_dir/base/            character-level tokenizer (HF ``PreTrainedTokenizerFast``) and a
                             LlamaForCausalLM (head_dim 64) trained to copy: it knows the prompt
                             format and the alphabet, not the tasks
    out_dir/bricks/<task>/   a PEFT LoRA adapter trained on that task only (safetensors)
    out_dir/manifest.json    tasks, user-style descriptions, example inputs, held-out eval sets,
                             measured base and brick exact match, build time

A prompt is ``<s>`` + ``format_prompt(input)``; the answer follows, ended by ``</s>``. Accuracy
is exact match of the greedy answer. `ensure_testbed` caches builds under a directory keyed by
(variant, seed, code version), so tests and benchmarks build once.

CLI: ``python -m composer.testbed build --out DIR --seed 0 [--small]``.

torch, transformers and peft are imported when a build or an evaluation runs.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
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
    "format_prompt",
    "greedy_answers",
    "load_testbed",
]

Variant = Literal["full", "small"]
Progress = Callable[[str], None]

# The documented accuracies a build reaches (exact match on the held-out eval sets): every brick at
# least BRICK_MIN_ACCURACY[variant] on its own task, the base at most BASE_MAX_ACCURACY on every
# task. The small variant (a quarter of the model, a few hundred steps, for tests) is held to less.
BRICK_MIN_ACCURACY: Mapping[str, float] = {"full": 0.9, "small": 0.8}
BASE_MAX_ACCURACY = 0.05

SEPARATOR = "="
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# Every character an input or an answer can hold; nothing else is in the vocabulary.
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,;/+-=#"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MANIFEST = "manifest.json"


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
class _Recipe:
    """How large the model is and how much of everything a variant trains."""

    tasks: tuple[str, ...]
    hidden: int
    layers: int
    base_steps: int
    brick_steps: int
    batch: int
    eval_size: int


# Both variants keep head_dim 64 (vLLM's CPU attention supports it): hidden 256 with 4 heads,
# or 128 with 2 for the small one, which trains in a quarter of the time.
VARIANTS: Mapping[str, _Recipe] = {
    "full": _Recipe(tuple(TASKS), hidden=256, layers=2, base_steps=500, brick_steps=300, batch=48, eval_size=100),
    "small": _Recipe(
        ("sentiment", "maximum", "parity"),
        hidden=128,
        layers=2,
        base_steps=300,
        brick_steps=400,
        batch=24,
        eval_size=40,
    ),
}
_HEAD_DIM, _MAX_POSITIONS = 64, 64
_LORA_RANK, _LORA_ALPHA = 8, 16
_BASE_LR, _BRICK_LR = 3e-3, 1e-2
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


def _eval_set(seed: int, task: str, size: int) -> list[tuple[str, str]]:
    rng, seen, pairs = _task_rng(seed, task, "eval"), set(), []
    for _ in range(size * 50):
        pair = TASKS[task].generate(rng)
        if pair[0] not in seen:
            seen.add(pair[0])
            pairs.append(pair)
        if len(pairs) == size:
            break
    return pairs


def _stream(seed: int, task: str, held_out: set[str]) -> Iterator[tuple[str, str]]:
    """Endless training pairs of a task, never an eval input."""
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


def _train(
    model: Any,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float,
    label: str,
    progress: Progress,
) -> float:
    """AdamW with warm-up and cosine decay; returns the mean loss of the last tenth of steps."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    model.train()
    tail: list[float] = []
    for step in range(steps):
        ids, labels = next(batches)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        value = loss.detach().item()
        if step >= steps - max(1, steps // 10):
            tail.append(value)
        if (step + 1) % max(1, steps // 5) == 0:
            progress(f"  {label}: step {step + 1}/{steps} loss {value:.4f}")
    model.eval()
    return sum(tail) / len(tail)


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


def exact_match(model: Any, pairs: Sequence[tuple[str, str]]) -> float:
    """Fraction of ``(input, answer)`` pairs whose greedy answer equals ``answer`` exactly."""
    if not pairs:
        raise ValueError("no pairs to score")
    answers = greedy_answers(model, [text for text, _ in pairs], max_new_tokens=max(len(a) for _, a in pairs) + 2)
    return sum(got == want for got, (_, want) in zip(answers, pairs, strict=True)) / len(pairs)


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


def code_version() -> str:
    """12 hex digits of this module's source: a cached build is reused only by the same code."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


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


def build_testbed(
    out_dir: Path, *, seed: int = 0, variant: Variant = "full", progress: Progress | None = None
) -> TestBed:
    """Train the test bed into ``out_dir`` (must not exist; published by a rename at the end).

    Args:
        out_dir: where to write ``base/``, ``bricks/<task>/`` and ``manifest.json``.
        seed: fixes data, initialisation and training order (same machine, same result).
        variant: ``"full"`` (all tasks) or ``"small"`` (three tasks, fewer steps, for tests).
        progress: called with one line of text per stage.

    Returns:
        The loaded `TestBed`.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    say = progress or (lambda _line: None)
    recipe = VARIANTS[variant]
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    started, cpu_started = time.perf_counter(), time.process_time()
    staging = out_dir.parent / f".{out_dir.name}.building-{uuid.uuid4().hex[:12]}"
    (staging / "bricks").mkdir(parents=True)
    threads = torch.get_num_threads()
    # One thread: the matrices are small, and on a shared 2-core machine two threads made a
    # training step 13x slower (3.9 s vs 0.30 s at load 10) by waiting on each other.
    torch.set_num_threads(int(os.environ.get("BRICKYARD_TESTBED_THREADS", "1")))
    try:
        evals = {task: _eval_set(seed, task, recipe.eval_size) for task in recipe.tasks}
        held_out = {task: {text for text, _ in pairs} for task, pairs in evals.items()}
        streams = {task: _stream(seed, task, held_out[task]) for task in recipe.tasks}

        def copy_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            # The base learns to copy every task's inputs: prompt format and alphabet, no task.
            rng = random.Random(seed)
            while True:
                rows = []
                for _ in range(recipe.batch):
                    text, _answer = next(streams[rng.choice(recipe.tasks)])
                    rows.append(encode_example(format_prompt(text), text))
                yield _batch(rows, answer_only=False)

        torch.manual_seed(seed)
        base = LlamaForCausalLM(_llama_config(recipe))
        say(f"base: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters, {recipe.base_steps} steps")
        _train(base, copy_batches(), recipe.base_steps, _BASE_LR, "base", say)
        base_dir = staging / "base"
        base.save_pretrained(base_dir)
        _save_tokenizer(base_dir)

        records = []
        for task in recipe.tasks:

            def task_batches(name: str = task) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                while True:
                    rows = [
                        encode_example(format_prompt(t), a)
                        for t, a in (next(streams[name]) for _ in range(recipe.batch))
                    ]
                    yield _batch(rows, answer_only=True)

            torch.manual_seed(zlib.crc32(f"{seed}/{task}/lora".encode()))
            config = LoraConfig(
                r=_LORA_RANK, lora_alpha=_LORA_ALPHA, lora_dropout=0.0, target_modules=list(LORA_TARGETS)
            )
            model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config)
            say(f"brick {task}: {recipe.brick_steps} steps")
            _train(model, task_batches(), recipe.brick_steps, _BRICK_LR, task, say)
            brick_dir = staging / "bricks" / task
            # PEFT would record the staging directory the base was loaded from, a path that is
            # gone once the build is published: record the base's stable name instead.
            # No embedding layer is trained; "auto" would look the name up as a model (a Hub
            # request, a warning offline) to compare vocabularies.
            model.peft_config["default"].base_model_name_or_path = base_name(variant, seed)
            model.save_pretrained(str(brick_dir), save_embedding_layers=False)
            brick_accuracy = exact_match(model, evals[task])
            base_accuracy = exact_match(base, evals[task])
            say(f"  {task}: base {base_accuracy:.2f} brick {brick_accuracy:.2f}")
            examples = [
                text
                for text, _ in (
                    TASKS[task].generate(_task_rng(seed, task, "examples")) for _ in range(_EXAMPLES_PER_TASK)
                )
            ]
            records.append(
                {
                    "name": task,
                    "description": TASKS[task].description,
                    "examples": examples,
                    "brick": f"bricks/{task}",
                    "eval": [list(pair) for pair in evals[task]],
                    "base_accuracy": base_accuracy,
                    "brick_accuracy": brick_accuracy,
                }
            )
        manifest = {
            "variant": variant,
            "seed": seed,
            "code_version": code_version(),
            "base": "base",
            "base_name": base_name(variant, seed),
            "prompt_format": format_prompt("{input}"),
            "thresholds": {"brick_min_accuracy": BRICK_MIN_ACCURACY[variant], "base_max_accuracy": BASE_MAX_ACCURACY},
            "build_seconds": round(time.perf_counter() - started, 1),
            # CPU time of this process: on a loaded machine, what the build costs a free core.
            "build_cpu_seconds": round(time.process_time() - cpu_started, 1),
            "torch_threads": torch.get_num_threads(),
            "tasks": records,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    return load_testbed(out_dir)


def load_testbed(root: Path) -> TestBed:
    """Read a built test bed's manifest."""
    root = Path(root)
    manifest = json.loads((root / MANIFEST).read_text())
    tasks = {
        record["name"]: TestBedTask(
            name=record["name"],
            description=record["description"],
            examples=tuple(record["examples"]),
            eval_set=tuple((text, answer) for text, answer in record["eval"]),
            brick_dir=root / record["brick"],
            base_accuracy=record["base_accuracy"],
            brick_accuracy=record["brick_accuracy"],
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
        build_seconds=manifest["build_seconds"],
        tasks=tasks,
    )


def ensure_testbed(
    cache_dir: Path, *, seed: int = 0, variant: Variant = "full", progress: Progress | None = None
) -> TestBed:
    """The cached test bed for (variant, seed, code version) under ``cache_dir``, built if missing."""
    root = Path(cache_dir) / f"testbed-{variant}-seed{seed}-{code_version()}"
    if (root / MANIFEST).is_file():
        return load_testbed(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        return build_testbed(root, seed=seed, variant=variant, progress=progress)
    except FileExistsError:
        # Another process published the same build first.
        return load_testbed(root)


def _table(bed: TestBed) -> str:
    lines = [f"{'task':<12} {'base':>6} {'brick':>6}"]
    lines += [f"{t.name:<12} {t.base_accuracy:>6.2f} {t.brick_accuracy:>6.2f}" for t in bed.tasks.values()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m composer.testbed build --out DIR [--seed N] [--small]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m composer.testbed", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="train the test bed into a new directory")
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--small", action="store_true", help="the small variant used by the tests")
    args = parser.parse_args(argv)
    bed = build_testbed(args.out, seed=args.seed, variant="small" if args.small else "full", progress=print)
    print(_table(bed))
    print(f"built in {bed.build_seconds:.1f} s -> {bed.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
