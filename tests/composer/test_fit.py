"""Few-shot weight fitting on the trained test bed: it lowers the loss from uniform weights,
is deterministic, its unmerged forward is the linear merge's forward, and scoring several
weight vectors in one pass equals scoring them one at a time."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

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
def test_gauss_newton_fit_lowers_loss_from_uniform_and_is_deterministic(small_testbed: TestBed) -> None:
    import torch

    bricks = [task.brick_dir for task in small_testbed.tasks.values()]
    examples = _mixture_examples(small_testbed)
    template = format_prompt("{input}")
    mixture = LoraMixture.load(small_testbed.base_dir, bricks)
    fractions: list[float] = []
    first = fit_weights(
        mixture, bricks, examples, steps=8, prompt_template=template, progress=lambda f, _m: fractions.append(f)
    )
    second = fit_weights(mixture, bricks, examples, steps=8, prompt_template=template)
    other_seed = fit_weights(mixture, bricks, examples, steps=8, seed=1, prompt_template=template)
    assert first.final_loss < first.initial_loss
    assert first.weights == second.weights
    assert first.losses == second.losses
    assert 2 <= len(first.losses) <= 10  # at init, at the best start, then one per step
    # Only improvements are taken: after the starting points, the objective never rises.
    assert all(later <= earlier for earlier, later in zip(first.losses[1:], first.losses[2:], strict=False))
    assert first.losses[-1] < first.losses[0]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert first.examples_hash == examples_hash(examples)
    assert all(-1.5 <= w <= 1.5 for w in first.weights + other_seed.weights)
    # The fit's own scoring (batched copies) agrees with the model's loss at the fitted weights,
    # and the L1 term is LoraHub's (0.05 * mean |w|).
    mixture.set_weights(first.weights)
    ids, labels = mixture.batch(examples, prompt_template=template)
    with torch.no_grad():
        direct = float(mixture.loss(ids, labels))
    assert first.final_loss == pytest.approx(direct, abs=1e-5)
    assert first.losses[-1] == pytest.approx(direct + 0.05 * sum(abs(w) for w in first.weights) / 3, abs=1e-5)
    mixture.detach()


def _plain_answer_logits(mixture: LoraMixture, point: Any, ids: Any, labels: Any) -> Any:
    """The answer logits of the mixture's plain forward (its own weights set to ``point``), in
    the order `LoraMixture.answer_logits` gives them."""
    import torch

    mixture.set_weights(point.tolist())
    with torch.no_grad():
        return mixture.model(input_ids=ids).logits[:, :-1][labels[:, 1:] != -100]


@pytest.mark.slow
def test_batched_weight_vectors_equal_one_forward_each(small_testbed: TestBed) -> None:
    import torch

    bricks = [task.brick_dir for task in small_testbed.tasks.values()]
    mixture = LoraMixture.load(small_testbed.base_dir, bricks)
    examples = _mixture_examples(small_testbed)
    ids, labels = mixture.batch(examples, prompt_template=format_prompt("{input}"))
    points = torch.tensor([[0.2, -0.7, 1.1], [1.0, 0.0, 0.0], [-1.5, 0.4, 0.3]])
    together = mixture.answer_logits(points, ids, labels, max_rows=2 * ids.shape[0])  # two chunks
    targets = mixture.answer_targets(labels)
    assert together.shape[:2] == (3, int((labels != -100).sum()))
    for point, logits in zip(points, together, strict=True):
        alone = _plain_answer_logits(mixture, point, ids, labels)
        with torch.no_grad():
            loss = float(mixture.loss(ids, labels))
        assert torch.allclose(logits, alone, atol=1e-5)
        assert torch.nn.functional.cross_entropy(logits, targets).item() == pytest.approx(loss, abs=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-2)
    mixture.detach()


@pytest.mark.slow
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_answer_logits_compute_no_padding_and_nothing_after_the_last_answer(
    small_testbed: TestBed, packed: bool
) -> None:
    """Padding (and each example's final token, which predicts nothing) never reaches the
    model, packed (the test bed's Llama) or padded, and the answer logits stay those of a plain
    padded forward."""
    import torch

    bricks = [task.brick_dir for task in small_testbed.tasks.values()]
    mixture = LoraMixture.load(small_testbed.base_dir, bricks)
    assert mixture.packed  # the test bed's model masks packed examples apart
    mixture.packed = packed
    ids, labels = mixture.batch(_mixture_examples(small_testbed), prompt_template=format_prompt("{input}"))
    pad = torch.full((ids.shape[0], 4), int(ids[0, -1]), dtype=ids.dtype)
    padded_ids, padded_labels = torch.cat([ids, pad], dim=1), torch.cat([labels, torch.full_like(pad, -100)], dim=1)
    shapes: list[tuple[int, int]] = []
    handle = mixture.model.register_forward_pre_hook(
        lambda _m, _args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    points = torch.tensor([[0.3, 0.9, -0.4], [1.0, 0.0, 0.0]])
    cut = mixture.answer_logits(points, padded_ids, padded_labels)
    handle.remove()
    # The logits at column c predict the token at c + 1: a row whose last label is at column c
    # needs columns 0 .. c - 1.
    needed = [max(c for c, label in enumerate(row.tolist()) if label != -100) for row in labels]
    assert shapes == ([(2, sum(needed))] if packed else [(2 * len(needed), max(needed))])
    for point, logits in zip(points, cut, strict=True):
        assert torch.allclose(logits, _plain_answer_logits(mixture, point, padded_ids, padded_labels), atol=1e-5)
    mixture.detach()


def test_bricks_alone_computed_one_brick_per_copy_give_the_plain_forwards_logits(
    llama_base,
    loras,  # type: ignore[no-untyped-def]
) -> None:
    """Bricks of different ranks and targets (rank 4 everywhere; rank 8 on q and k only; a rank
    pattern up to 8): scored alone (their own pass, each copy computing only its brick) and
    together with other points, the logits equal the plain forward at each point's weights."""
    import torch

    bricks = [loras["r4"], loras["r8"], loras["pattern"]]
    mixture = LoraMixture.load(llama_base, bricks)
    mixture.packed = False  # the plain forward below is the padded batch
    ids, labels = mixture.batch([("abc", "de"), ("fghij", "k")])
    points = torch.cat(
        [torch.eye(3) * torch.tensor([0.7, -1.2, 1.5]), torch.tensor([[0.3, 0.9, -0.4], [0.0, 0.0, 0.0]])]
    )
    got = mixture.answer_logits(points, ids, labels)
    for point, logits in zip(points, got, strict=True):
        assert torch.allclose(logits, _plain_answer_logits(mixture, point, ids, labels), atol=1e-5)
    mixture.detach()


@pytest.mark.slow
def test_a_brick_at_zero_in_every_point_is_not_computed(small_testbed: TestBed, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A brick whose factors are NaN poisons any forward that computes it, even at weight 0
    (0 x NaN is NaN): the logits of points that leave it at 0 are finite and equal those of a
    mixture loaded without it; a point that uses it gives NaN."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    first, *others = [task.brick_dir for task in small_testbed.tasks.values()]
    poisoned = tmp_path / "poisoned"
    shutil.copytree(first, poisoned)
    tensors = load_file(str(poisoned / "adapter_model.safetensors"))
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, str(poisoned / "adapter_model.safetensors")
    )
    mixture = LoraMixture.load(small_testbed.base_dir, [poisoned, *others])
    without = LoraMixture.load(small_testbed.base_dir, others)
    ids, labels = mixture.batch(_mixture_examples(small_testbed), prompt_template=format_prompt("{input}"))
    points = torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.2, -1.0]])
    logits = mixture.answer_logits(points, ids, labels)
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, without.answer_logits(points[:, 1:], ids, labels), atol=1e-5)
    assert torch.isnan(mixture.answer_logits(torch.tensor([[0.1, 1.0, 0.5]]), ids, labels)).any()
    mixture.detach()
    without.detach()


@pytest.mark.slow
def test_a_model_that_ignores_positions_is_not_packed(small_testbed: TestBed) -> None:
    """Packing is used only where it gives the padded logits: a model that does not restart
    positions (here, one that drops ``position_ids``) attends across examples and is refused."""
    from composer.fit import _packs_examples

    mixture = LoraMixture.load(small_testbed.base_dir, [task.brick_dir for task in small_testbed.tasks.values()])
    model = mixture.model

    class _Unpositioned:
        def get_output_embeddings(self):  # type: ignore[no-untyped-def]
            return model.get_output_embeddings()

        def __call__(self, *, input_ids, position_ids=None, use_cache):  # type: ignore[no-untyped-def]
            return model(input_ids=input_ids, use_cache=use_cache)

    assert _packs_examples(model)
    assert not _packs_examples(_Unpositioned())
    mixture.detach()


@pytest.mark.slow
def test_gauss_newton_tokenizes_the_examples_once(small_testbed: TestBed) -> None:
    bricks = [task.brick_dir for task in small_testbed.tasks.values()]
    mixture = LoraMixture.load(small_testbed.base_dir, bricks)
    calls: list[int] = []
    batch = mixture.batch

    def counted(examples, *, prompt_template):  # type: ignore[no-untyped-def]
        calls.append(len(examples))
        return batch(examples, prompt_template=prompt_template)

    mixture.batch = counted  # type: ignore[method-assign]
    fit_weights(mixture, bricks, _mixture_examples(small_testbed), prompt_template=format_prompt("{input}"))
    assert calls == [6]
    mixture.detach()


@pytest.mark.slow
def test_adam_fit_lowers_loss_from_uniform_and_is_deterministic(small_testbed: TestBed) -> None:
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
        method="adam",
    )
    second = fit_weights(
        small_testbed.base_dir, bricks, examples, steps=8, prompt_template=format_prompt("{input}"), method="adam"
    )
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
    with pytest.raises(InvalidParams) as raised:
        fit_weights(tmp_path, [tmp_path], [("a", "b")], method="newton", tolerance=-1.0, spread=-1)  # type: ignore[arg-type]
    assert len(raised.value.problems) == 3


@pytest.mark.slow
def test_gauss_newton_too_big_for_memory_is_adam(small_testbed: TestBed, monkeypatch: pytest.MonkeyPatch) -> None:
    import composer.fit

    bricks = [task.brick_dir for task in small_testbed.tasks.values()]
    examples = _mixture_examples(small_testbed)
    template = format_prompt("{input}")
    mixture = LoraMixture.load(small_testbed.base_dir, bricks)
    adam = fit_weights(mixture, bricks, examples, steps=3, prompt_template=template, method="adam")
    newton = fit_weights(mixture, bricks, examples, steps=3, prompt_template=template)
    monkeypatch.setattr(composer.fit, "_GAUSS_NEWTON_MAX_ELEMENTS", 1000)
    limited = fit_weights(mixture, bricks, examples, steps=3, prompt_template=template)
    assert limited.weights == adam.weights and limited.losses == adam.losses
    assert newton.weights != adam.weights
    mixture.detach()


class _LinearMixture:
    """A stand-in for `LoraMixture` whose answer logits are linear in the weights (``z + J w``):
    the cross-entropy is then convex, so its minimum can be found independently. The forward
    passes numbered in ``sabotaged`` score their first point far worse than it is, the way a
    step that overshoots is scored (a rejected step). Every scored point is recorded (``scored``,
    one tensor per pass)."""

    def __init__(self, sabotaged: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        import torch

        generator = torch.Generator().manual_seed(11)
        self.base = torch.randn(9, 6, generator=generator, dtype=torch.float64)
        self.jacobian = 0.5 * torch.randn(3, 9, 6, generator=generator, dtype=torch.float64)
        self.targets = torch.randint(0, 6, (9,), generator=generator)
        self.rows = torch.arange(3).repeat_interleave(3)
        self.weights = torch.zeros(3)
        self.sabotaged, self.passes = set(sabotaged), 0
        self.scored: list[torch.Tensor] = []

    def batch(self, examples, *, prompt_template):  # type: ignore[no-untyped-def]
        import torch

        return torch.zeros(3, 1), None

    def answer_targets(self, _labels):  # type: ignore[no-untyped-def]
        return self.targets

    def answer_rows(self, _labels):  # type: ignore[no-untyped-def]
        return self.rows

    def answer_logits(self, points, _ids, _labels):  # type: ignore[no-untyped-def]
        import torch

        self.scored.append(points.double().clone())
        logits = self.base + torch.einsum("rk,knv->rnv", points.double(), self.jacobian)
        if self.passes in self.sabotaged:
            logits[0, torch.arange(9), self.targets] -= 50.0
        self.passes += 1
        return logits.float()

    def set_weights(self, values):  # type: ignore[no-untyped-def]
        import torch

        self.weights = torch.tensor(values)

    def loss(self, weights):  # type: ignore[no-untyped-def]
        import torch

        logits = self.base + torch.einsum("k,knv->nv", weights, self.jacobian)
        return torch.nn.functional.cross_entropy(logits, self.targets)


def _minimum(mixture: _LinearMixture, fitted: int = 3):  # type: ignore[no-untyped-def]
    """The convex problem's minimum over the first ``fitted`` weights (the others at 0) by
    L-BFGS on autograd, independent of the fit: those weights."""
    import torch

    weights = torch.zeros(fitted, dtype=torch.float64, requires_grad=True)
    rest = torch.zeros(mixture.jacobian.shape[0] - fitted, dtype=torch.float64)
    optimizer = torch.optim.LBFGS([weights], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():  # type: ignore[no-untyped-def]
        optimizer.zero_grad()
        value = mixture.loss(torch.cat([weights, rest]))
        value.backward()
        return value

    optimizer.step(closure)
    return weights.detach()


def _exact_fit(  # type: ignore[no-untyped-def]
    mixture: _LinearMixture,
    *,
    steps: int = 40,
    l1: float = 0.0,
    tolerance: float = 1e-9,
    narrow_to: int | None = None,
):
    """`_gauss_newton_exact` on a stand-in, within bounds (-5, 5) that hold its minimum."""
    from composer.fit import _gauss_newton_exact

    return _gauss_newton_exact(
        mixture,  # type: ignore[arg-type]
        mixture.batch([("x", "y")] * 3, prompt_template="{input}"),
        steps=steps,
        l1=l1,
        bounds=(-5.0, 5.0),
        tolerance=tolerance,
        seed=0,
        spread=0,
        narrow_to=narrow_to,
        progress=None,
    )


@pytest.mark.parametrize("sabotaged", [set(), {2, 3, 4}], ids=["plain", "three-rejected-steps"])
def test_exact_gauss_newton_reaches_the_minimum_and_rejected_steps_do_not_stop_it(
    sabotaged: set[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The former fit stopped after two rejected steps in a row, and on a small gain, while the
    gradient was still large; this one stops only when the exact model forecasts nothing left
    (the relative stop off, so that only ``tolerance`` decides)."""
    import torch

    monkeypatch.setattr("composer.fit._RELATIVE_STOP", 0.0)

    mixture = _LinearMixture(sabotaged)
    best = _minimum(_LinearMixture())
    assert float(best.abs().max()) < 5.0  # inside the bounds below: the unconstrained minimum
    weights, losses, initial, final = _exact_fit(mixture)
    reference = _LinearMixture()
    assert final == pytest.approx(float(reference.loss(best)), abs=1e-5)
    assert torch.allclose(torch.tensor(weights, dtype=torch.float64), best, atol=1e-3)
    point = torch.tensor(weights, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(reference.loss(point), point)
    assert float(gradient.norm()) < 1e-3
    assert final < initial
    unchanged = sum(later == earlier for earlier, later in itertools.pairwise(losses[1:]))
    # Every sabotaged pass after the starting ones was a rejected step the fit went on from.
    assert unchanged == len({p for p in sabotaged if p >= 2})


def test_exact_gauss_newton_stops_when_the_forecast_is_a_small_part_of_the_objective(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a tolerance that never stops it, the relative stop still ends the fit: in fewer
    steps than the fit to the minimum, at an objective near the minimum's."""
    _weights, relative_losses, _initial, relative_final = _exact_fit(_LinearMixture())
    monkeypatch.setattr("composer.fit._RELATIVE_STOP", 0.0)
    _weights, full_losses, _initial, full_final = _exact_fit(_LinearMixture())
    minimum = float(_LinearMixture().loss(_minimum(_LinearMixture())))
    assert full_final == pytest.approx(minimum, abs=1e-5)
    assert len(relative_losses) < len(full_losses)
    assert minimum <= relative_final <= 1.1 * minimum
    assert relative_final > full_final  # it did stop short of the minimum


class _TwoSkillMixture(_LinearMixture):
    """Three bricks, each raising its own example's answer and lowering the others': alone each
    does one example of three, all at 1 they cancel out, so the mixture's union start (each at
    1/3) is the best starting point; it starts from weights that do every example badly."""

    def __init__(self) -> None:
        import torch

        super().__init__()
        self.base = torch.zeros(9, 6, dtype=torch.float64)
        own = self.rows[None, :] == torch.arange(3)[:, None]  # (brick, token)
        self.jacobian = torch.zeros(3, 9, 6, dtype=torch.float64)
        self.jacobian[:, torch.arange(9), self.targets] = torch.where(own, 4.0, -1.5).double()
        self.weights = -torch.ones(3)


def test_exact_gauss_newton_takes_a_mixtures_first_step_at_the_mixture_damping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From the union start, the first step scored is the Levenberg-Marquardt step at damping
    0.3 (relative to H's mean eigenvalue), not at the damping 1 every other fit starts from
    (the relative stop off: this start is near enough to its minimum to stop there)."""
    import torch

    from composer.gauss_newton import damped_steps, gradient_and_curvature

    monkeypatch.setattr("composer.fit._RELATIVE_STOP", 0.0)
    mixture = _TwoSkillMixture()
    l1 = 1.0
    _exact_fit(mixture, steps=1, l1=l1, tolerance=0.0)
    union = torch.full((3,), 1 / 3, dtype=torch.float64)
    # Passes: the starting points, the union start with its probes, then the first step.
    assert torch.allclose(mixture.scored[1][0], union)
    logits = mixture.base + torch.einsum("k,knv->nv", union, mixture.jacobian)
    gradient, curvature = gradient_and_curvature(logits, mixture.jacobian, mixture.targets)
    gradient = gradient + l1 / 3 * torch.sign(union)
    expected, at_one = union + damped_steps(gradient, curvature, [0.3, 1.0])
    first_step = mixture.scored[2][0]
    assert torch.allclose(first_step, expected, atol=1e-3)
    assert float((first_step - at_one).abs().max()) > 1e-2


class _ManyBricksMixture(_LinearMixture):
    """Four bricks, linear logits: brick 0 raises every answer token by 1.5, brick 1 by 1, and
    bricks 2 and 3 only add noise (as much as each of the others), so alone brick 0 is the best
    on every example and brick 1 the next best: narrowed to 2, the fit is over bricks 0 and 1
    (whose minimum is inside the bounds)."""

    def __init__(self) -> None:
        import torch

        super().__init__()
        generator = torch.Generator().manual_seed(4)
        self.jacobian = torch.randn(4, 9, 6, generator=generator, dtype=torch.float64)
        self.jacobian[0, torch.arange(9), self.targets] += 1.5
        self.jacobian[1, torch.arange(9), self.targets] += 1.0
        self.weights = torch.full((4,), 0.25)


def test_a_narrowed_fit_moves_only_the_needed_bricks_and_reaches_their_minimum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the first forward (which scores every brick alone), every point has bricks 2 and 3
    at 0, each step scores 3 points (the candidate and 2 probes, not 5), and the fit ends at the
    minimum over bricks 0 and 1 (found by L-BFGS on that plane, independently of the fit)."""
    import torch

    monkeypatch.setattr("composer.fit._RELATIVE_STOP", 0.0)
    mixture = _ManyBricksMixture()
    weights, _losses, _initial, final = _exact_fit(mixture, narrow_to=2)
    first, probes, *steps = mixture.scored
    assert first.shape[0] == 1 + 4  # the start and each brick alone (all at 1 could not be a start)
    assert probes.shape[0] == 2  # the derivative at brick 0 alone, in bricks 0 and 1
    assert steps and all(points.shape[0] == 3 for points in steps)
    assert all(bool((points[:, 2:] == 0).all()) for points in [probes, *steps])
    assert weights[2:] == (0.0, 0.0)

    plane = _minimum(mixture, fitted=2)
    assert torch.allclose(torch.tensor(weights[:2], dtype=torch.float64), plane, atol=1e-3)
    assert final == pytest.approx(
        float(mixture.loss(torch.cat([plane, torch.zeros(2, dtype=torch.float64)]))), abs=1e-5
    )
