"""The pure Gauss-Newton math of few-shot fitting, checked against autograd on a model whose
logits are linear in the weights (where the Gauss-Newton matrix is the exact Hessian)."""

from __future__ import annotations

import torch

from composer.gauss_newton import (
    broyden_update,
    cross_entropy,
    damped_steps,
    example_losses,
    forecast_decrease,
    gradient_and_curvature,
    needed_bricks,
    union_start,
)


def _linear_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, 11, generator=generator, dtype=torch.float64)
    jacobian = torch.randn(3, 7, 11, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 11, (7,), generator=generator)
    return logits, jacobian, targets


def _loss_at(logits: torch.Tensor, jacobian: torch.Tensor, targets: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda step: torch.nn.functional.cross_entropy(logits + torch.einsum("k,knv->nv", step, jacobian), targets)


def test_cross_entropy_is_the_mean_over_answer_tokens_per_point() -> None:
    logits, jacobian, targets = _linear_problem()
    stacked = torch.stack([logits, logits + jacobian[0]])
    got = cross_entropy(stacked, targets)
    expected = [torch.nn.functional.cross_entropy(x, targets) for x in stacked]
    assert got.shape == (2,)
    assert torch.allclose(got, torch.stack(expected))


def test_gradient_and_curvature_equal_autograd_for_linear_logits() -> None:
    logits, jacobian, targets = _linear_problem()
    loss = _loss_at(logits, jacobian, targets)
    zero = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    (expected_gradient,) = torch.autograd.grad(loss(zero), zero)
    expected_hessian = torch.autograd.functional.hessian(loss, torch.zeros(3, dtype=torch.float64))
    gradient, curvature = gradient_and_curvature(logits, jacobian, targets)
    assert torch.allclose(gradient, expected_gradient)
    assert torch.allclose(curvature, expected_hessian)
    assert torch.equal(curvature, curvature.T)


def test_the_undamped_step_minimises_the_quadratic_model_and_damping_shortens_it() -> None:
    logits, jacobian, targets = _linear_problem(1)
    gradient, curvature = gradient_and_curvature(logits, jacobian, targets)
    steps = damped_steps(gradient, curvature, [0.0, 1.0, 100.0])
    assert steps.shape == (3, 3)
    # The model's gradient vanishes at the full step.
    assert torch.allclose(gradient + curvature @ steps[0], torch.zeros(3, dtype=torch.float64), atol=1e-6)
    norms = steps.norm(dim=1)
    assert norms[0] > norms[1] > norms[2] > 0
    # Every step goes downhill, and the full step lowers the true loss on this convex problem.
    assert all(float(gradient @ step) < 0 for step in steps)
    loss = _loss_at(logits, jacobian, targets)
    assert loss(steps[0]) < loss(torch.zeros(3, dtype=torch.float64))


def test_a_singular_curvature_still_gives_a_finite_step() -> None:
    gradient = torch.tensor([0.5, 0.0], dtype=torch.float64)
    curvature = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    steps = damped_steps(gradient, curvature, [0.0])
    assert torch.isfinite(steps).all()
    assert torch.allclose(steps[0], torch.tensor([-0.5, 0.0], dtype=torch.float64))


def test_broyden_update_matches_the_observed_change_and_nothing_else() -> None:
    _logits, jacobian, _targets = _linear_problem(2)
    step = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    change = torch.randn(7, 11, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    updated = broyden_update(jacobian, step, change)
    assert torch.allclose(torch.einsum("k,knv->nv", step, updated), change)
    orthogonal = torch.tensor([0.2, 0.3, 0.0], dtype=torch.float64)
    assert abs(float(orthogonal @ step)) < 1e-12
    assert torch.allclose(
        torch.einsum("k,knv->nv", orthogonal, updated), torch.einsum("k,knv->nv", orthogonal, jacobian)
    )
    assert broyden_update(jacobian, torch.zeros(3, dtype=torch.float64), change) is jacobian


def test_forecast_is_the_decrease_of_the_second_order_expansion() -> None:
    # For linear logits the Gauss-Newton matrix is the exact Hessian, so the forecast equals
    # the true decrease up to third-order terms: the error shrinks like the step cubed.
    logits, jacobian, targets = _linear_problem(3)
    loss = _loss_at(logits, jacobian, targets)
    gradient, curvature = gradient_and_curvature(logits, jacobian, targets)
    direction = torch.tensor([0.4, -0.3, 0.2], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    errors = []
    for size in (1e-1, 1e-2):
        step = size * direction
        actual = float(loss(zero) - loss(step))
        errors.append(abs(forecast_decrease(gradient, curvature, step) - actual))
    assert errors[1] < errors[0] / 100
    full = damped_steps(gradient, curvature, [0.0])[0]
    assert forecast_decrease(gradient, curvature, full) > 0


def _examples_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 examples of 2, 1 and 3 answer tokens; 3 points; 5 tokens in the vocabulary."""
    generator = torch.Generator().manual_seed(7)
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    targets = torch.randint(0, 5, (6,), generator=generator)
    return torch.randn(3, 6, 5, generator=generator, dtype=torch.float64), targets, rows


def test_example_losses_are_each_examples_mean_cross_entropy() -> None:
    logits, targets, rows = _examples_problem()
    got = example_losses(logits, targets, rows, 3)
    assert got.shape == (3, 3)
    for point in range(3):
        for example in range(3):
            mine = rows == example
            expected = torch.nn.functional.cross_entropy(logits[point][mine], targets[mine])
            assert abs(float(got[point, example] - expected)) < 1e-12


def _alone_logits(best_brick_of_example: list[int], targets: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits of 3 bricks alone: on each example, its chosen brick puts 4 on the answer tokens,
    the others 1, everything else 0."""
    logits = torch.zeros(3, rows.numel(), 5, dtype=torch.float64)
    for token, (row, target) in enumerate(zip(rows.tolist(), targets.tolist(), strict=True)):
        for brick in range(3):
            logits[brick, token, target] = 4.0 if brick == best_brick_of_example[row] else 1.0
    return logits


def test_union_start_weighs_equally_the_bricks_the_examples_need() -> None:
    _logits, targets, rows = _examples_problem()
    start = union_start(_alone_logits([2, 0, 2], targets, rows), targets, rows, 3)
    assert start is not None
    assert start.tolist() == [0.5, 0.0, 0.5]
    every = union_start(_alone_logits([0, 1, 2], targets, rows), targets, rows, 3)
    assert every is not None and torch.allclose(every, torch.full((3,), 1 / 3, dtype=torch.float64))
    # One brick best on every example: no mixture start (that brick alone is already a start).
    assert union_start(_alone_logits([1, 1, 1], targets, rows), targets, rows, 3) is None


def _alone_by_example(values: list[list[float]], rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logits of bricks alone: brick k puts ``values[k][example]`` on the answer tokens of that
    example, 0 everywhere else (a higher value, a lower loss)."""
    logits = torch.zeros(len(values), rows.numel(), 5, dtype=torch.float64)
    for token, (row, target) in enumerate(zip(rows.tolist(), targets.tolist(), strict=True)):
        for brick, by_example in enumerate(values):
            logits[brick, token, target] = by_example[row]
    return logits


def test_needed_bricks_are_the_best_alone_those_best_on_an_example_then_the_next_best() -> None:
    _logits, targets, rows = _examples_problem()
    # Brick 3 is second best on every example and so the best over all of them (4 on every
    # answer token; brick 2 has 0 on the first example's two tokens), though the best on none;
    # brick 0 is the best on example 0, brick 2 on examples 1 and 2.
    mixture = _alone_by_example([[6, 0, 0], [1, 1, 1], [0, 6, 6], [4, 4, 4]], rows, targets)
    assert needed_bricks(mixture, targets, rows, 3, limit=2) == [0, 2, 3]
    assert needed_bricks(mixture, targets, rows, 3, limit=4) == [0, 1, 2, 3]
    # One task: brick 1 is the best everywhere; then the next best by loss (brick 0, then 3).
    single = _alone_by_example([[3, 3, 3], [6, 6, 6], [1, 1, 1], [2, 2, 2]], rows, targets)
    assert needed_bricks(single, targets, rows, 3, limit=1) == [1]
    assert needed_bricks(single, targets, rows, 3, limit=2) == [0, 1]
    assert needed_bricks(single, targets, rows, 3, limit=3) == [0, 1, 3]
