"""The demo's second half: bricks that have learned something, composed and compared.

Builds (once, cached) the small trained test bed (`composer.testbed`: a character-level Llama
that knows the prompt format, and one LoRA brick per task), registers its base and bricks with
their eval pairs (so the workers measure their quality), then for each task composes a model
from the task's description alone (instruction, k=1: search picks the brick) and prints, side
by side, what the base and the composed model answer on a few held-out inputs, with the
exact match of both over the task's eval set.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["show_skills", "testbed_cache"]

SHOWN_INPUTS = 3
EVAL_PAIRS = 16


def testbed_cache(workdir: Path) -> Path:
    """Where the demo keeps the test bed: ``$BRICKYARD_TESTBED_CACHE``, else the demo's workdir."""
    configured = os.environ.get("BRICKYARD_TESTBED_CACHE")
    return Path(configured) if configured else workdir / "cache"


def show_skills(client: Any, workdir: Path, console: Console) -> dict[str, tuple[float, float]]:
    """Register the test bed, compose per task, print base vs composed answers.

    Returns:
        task -> (base exact match, composed exact match) on the task's eval set.
    """
    import torch

    from composer import TRANSFORMERS_LOCK

    with TRANSFORMERS_LOCK:  # the server's workers in this process may be importing it too
        from transformers import AutoModelForCausalLM

    from composer.testbed import ensure_testbed, exact_match, greedy_answers
    from registry.errors import BaseModelExists, BrickExists

    cache = testbed_cache(workdir)
    started = time.monotonic()

    def progress(line: str) -> None:
        if ": step " not in line or " step 1/" in line:  # one line per stage, not per step
            console.print(f"  {line.strip()}")

    bed = ensure_testbed(cache, seed=0, variant="small", progress=progress)
    console.print(f"test bed (small variant, seed 0) in {bed.root} ({time.monotonic() - started:.0f} s)")
    # The bricks record the base's stable name (`composer.testbed.base_name`) as
    # base_model_name_or_path: registered under that name, the base needs no alias.
    base = bed.base_name
    try:
        client.add_base_model(base, str(bed.base_dir), description="the trained test bed's base model")
        console.print(f"POST /v1/base-models -> {base}")
    except BaseModelExists:
        console.print(f"{base} is already registered")
    for task in bed.tasks.values():
        metadata = {
            "name": f"tb-{task.name}",
            "base_model": base,
            "description": task.description,
            "examples": list(task.examples),
            "tags": ["testbed"],
            "evals": [{"input": i, "output": o} for i, o in task.eval_set[:EVAL_PAIRS]],
            "eval_prompt": "{input}=",
        }
        try:
            brick = client.register_brick(task.brick_dir, metadata)
            console.print(f"POST /v1/bricks -> {brick.name}@{brick.version} (quality check {brick.quality_status})")
        except BrickExists as exc:
            console.print(f"tb-{task.name}: {exc.detail}")

    base_model: Any = AutoModelForCausalLM.from_pretrained(bed.base_dir, dtype=torch.float32)
    scores: dict[str, tuple[float, float]] = {}
    table = Table("task", "input", "expected", "base", "composed")
    for task in bed.tasks.values():
        request = {"base_model": base, "instruction": task.description, "k": 1}
        composition = client.wait_composition(client.compose(request).id)
        if composition.status != "ready":
            raise RuntimeError(f"composition for {task.name} failed: {composition.error}")
        picked = ", ".join(f"{b['name']}@{b['version']}" for b in composition.recipe["bricks"])
        target = workdir / "composed" / composition.id[:16]
        if target.exists():
            shutil.rmtree(target)
        client.download_composition(composition.id, target)
        composed: Any = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        shown = [text for text, _ in task.eval_set[:SHOWN_INPUTS]]
        base_answers = greedy_answers(base_model, shown)
        composed_answers = greedy_answers(composed, shown)
        for (text, expected), got_base, got_composed in zip(
            task.eval_set[:SHOWN_INPUTS], base_answers, composed_answers, strict=True
        ):
            table.add_row(task.name, text, expected, got_base, got_composed)
        scores[task.name] = (exact_match(base_model, task.eval_set), exact_match(composed, task.eval_set))
        base_score, composed_score = scores[task.name]
        console.print(
            f"{task.name}: {task.description!r} -> composed from {picked}; exact match on "
            f"{len(task.eval_set)} held-out inputs: base {base_score:.2f}, composed {composed_score:.2f}"
        )
    console.print(table)
    for brick in client.list_bricks(base_model=base).items:
        console.print(f"quality of {brick.name}@{brick.version}: {brick.quality_status} {brick.quality or ''}")
    return scores
