"""The trained test bed: the small build reaches the accuracies the module documents, read back
from the saved files, and its tokenizer is the encoding the training used."""

from __future__ import annotations

import random

import pytest

from composer.testbed import (
    BASE_MAX_ACCURACY,
    BRICK_MIN_ACCURACY,
    TASKS,
    TestBed,
    base_name,
    encode_example,
    ensure_testbed,
    exact_match,
    format_prompt,
)

pytestmark = pytest.mark.slow


def test_task_answers_follow_their_rule() -> None:
    rng = random.Random(7)
    for _ in range(50):
        text, answer = TASKS["reverse"].generate(rng)
        assert answer == "".join(reversed(text))
        text, answer = TASKS["add"].generate(rng)
        left, right = text.split("+")
        assert int(answer) == int(left) + int(right)
        text, answer = TASKS["date"].generate(rng)
        year, month, day = text.split("-")
        assert answer == f"{day}/{month}/{year}"
        text, answer = TASKS["sort_digits"].generate(rng)
        assert answer.split(",") == sorted(text.split(","))
        text, answer = TASKS["parity"].generate(rng)
        assert answer == ("odd" if int(text[-1]) in (1, 3, 5, 7, 9) else "even")


def test_small_build_reaches_documented_accuracies(small_testbed: TestBed) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert small_testbed.tasks
    for task in small_testbed.tasks.values():
        base = AutoModelForCausalLM.from_pretrained(small_testbed.base_dir)
        base_accuracy = exact_match(base, task.eval_set)
        brick_accuracy = exact_match(PeftModel.from_pretrained(base, task.brick_dir), task.eval_set)
        # measured again from the saved files, not taken from the manifest
        assert base_accuracy == task.base_accuracy, task.name
        assert brick_accuracy == task.brick_accuracy, task.name
        assert brick_accuracy >= BRICK_MIN_ACCURACY[small_testbed.variant], task.name
        assert base_accuracy <= BASE_MAX_ACCURACY, task.name


def test_eval_sets_are_distinct_inputs_of_their_task(small_testbed: TestBed) -> None:
    for task in small_testbed.tasks.values():
        inputs = [text for text, _ in task.eval_set]
        assert len(set(inputs)) == len(inputs)
        assert task.examples and task.description


def test_saved_tokenizer_gives_the_training_ids(small_testbed: TestBed) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(small_testbed.base_dir)
    for task in small_testbed.tasks.values():
        text, answer = task.eval_set[0]
        ids, prompt_length = encode_example(format_prompt(text), answer)
        prompt_ids = tokenizer(format_prompt(text))["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert prompt_ids == ids[:prompt_length]
        assert [*prompt_ids, *answer_ids, tokenizer.eos_token_id] == ids
        assert tokenizer.decode(answer_ids) == answer


def test_ensure_testbed_reuses_the_cached_build(small_testbed: TestBed) -> None:
    manifest = small_testbed.root / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = ensure_testbed(small_testbed.root.parent, seed=small_testbed.seed, variant="small")
    assert again.root == small_testbed.root
    assert manifest.stat().st_mtime_ns == before


def test_bricks_record_the_base_by_its_stable_name(small_testbed: TestBed) -> None:
    """Not the staging directory the build trained in (gone once published): the name the
    manifest gives the base, the same on every machine and cache path."""
    import json

    assert small_testbed.base_name == base_name(small_testbed.variant, small_testbed.seed)
    for task in small_testbed.tasks.values():
        config = json.loads((task.brick_dir / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == small_testbed.base_name, task.name
