"""The pure Gauss-Newton math of few-shot fitting, checked against autograd on a model whose
logits are linear in the weights (where the Gauss-Newton matrix is the exact Hessian)."""

from __future__ import annotations

import torch

from composer.gauss_newton import broyden_update, cross_entropy, damped_steps, gradient_and_curvature


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
