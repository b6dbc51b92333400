"""Few-shot weight fitting on the trained test bed: it lowers the loss from uniform weights,
is deterministic, and its unmerged forward is the linear merge's forward."""

from __future__ import annotations

import hashlib

import pytest

from composer import BrickSource, compose
from composer.errors import InvalidParams
from composer.fit import LoraMixture, examples_hash, fit_weights
from composer.testbed import TestBed, format_prompt


def test_examples_hash_is_sha256_of_canonical_json() -> None:
    expected = hashlib.sha256(b'[{"input":"a=","output":"\\u00e9"}]').hexdigest()
    assert examples_hash([("a=", "\u00e9")]) != expected  # UTF-8, not ASCII escapes
    assert examples_hash([("a=", "b")]) == hashlib.sha256(b'[{"input":"a=","output":"b"}]').hexdigest()
    assert examples_hash([("x", "1"), ("y", "2")]) != examples_hash([("y", "2"), ("x", "1")])


def _mixture_examples(bed: TestBed, per_task: int = 3) -> list[tuple[str, str]]:
    names = sorted(bed.tasks)[:2]
    return [pair for name in names for pair in bed.tasks[name].eval_set[:per_task]]


@pytest.mark.slow
def test_fit_lowers_loss_from_uniform_and_is_deterministic(small_testbed: TestBed) -> None:
    bricks = [task.brick_dir for task in small_testbed.tasks.values()]
    examples = _mixture_examples(small_testbed)
    steps: list[float] = []
    first = fit_weights(
        small_testbed.base_dir,
        bricks,
        examples,
        steps=8,
        prompt_template=format_prompt("{input}"),
        progress=lambda fraction, _message: steps.append(fraction),
    )
    second = fit_weights(small_testbed.base_dir, bricks, examples, steps=8, prompt_template=format_prompt("{input}"))
    assert first.final_loss < first.initial_loss
    assert first.weights == second.weights
    assert first.losses == second.losses
    assert len(first.losses) == 9
    assert steps == [(k + 1) / 8 for k in range(8)]
    assert first.examples_hash == examples_hash(examples)


@pytest.mark.slow
def test_fit_on_a_loaded_mixture_equals_a_fit_from_the_directories(small_testbed: TestBed) -> None:
    """A benchmark or a server fits several times on one loaded model: each fit starts from
    ``init`` again, whatever the previous fit left, and finds what a fresh load finds."""
    bricks = [task.brick_dir for task in small_testbed.tasks.values()]
    examples = _mixture_examples(small_testbed)
    template = format_prompt("{input}")
    fresh = fit_weights(small_testbed.base_dir, bricks, examples, steps=6, seed=3, prompt_template=template)
    mixture = LoraMixture.load(small_testbed.base_dir, bricks)
    first = fit_weights(mixture, bricks, examples, steps=6, seed=3, prompt_template=template)
    again = fit_weights(mixture, bricks, examples, steps=6, seed=3, prompt_template=template)
    assert first.weights == fresh.weights == again.weights
    assert first.losses == fresh.losses == again.losses
    assert mixture.weights.detach().tolist() == list(first.weights)  # left at the fitted values
    with pytest.raises(InvalidParams):
        fit_weights(mixture, bricks[:1], examples, steps=2)
    mixture.detach()


@pytest.mark.slow
def test_unmerged_forward_equals_the_linear_merge(small_testbed: TestBed, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM

    tasks = list(small_testbed.tasks.values())
    weights = [0.8, -0.35, 1.3][: len(tasks)]
    sources = [
        BrickSource(t.name, t.brick_dir / "adapter_config.json", t.brick_dir / "adapter_model.safetensors", w)
        for t, w in zip(tasks, weights, strict=True)
    ]
    compose(small_testbed.base_dir, sources, tmp_path / "merged", method="linear", output="full")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    mixture = LoraMixture.load(small_testbed.base_dir, [t.brick_dir for t in tasks], init=weights)
    ids, _labels = mixture.batch(_mixture_examples(small_testbed), prompt_template=format_prompt("{input}"))
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        got = mixture.model(input_ids=ids).logits
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
        mixture.detach()
        plain = mixture.model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(small_testbed.base_dir, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(plain, base(input_ids=ids).logits)
        assert not torch.allclose(plain, expected, atol=1e-2)


def test_fit_refuses_bad_parameters(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidParams) as raised:
        fit_weights(tmp_path, [tmp_path], [], steps=0)
    assert len(raised.value.problems) == 2
