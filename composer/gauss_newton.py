"""The pure math of few-shot weight fitting: Gauss-Newton steps of a cross-entropy in a few weights.

The model is linearised in the weights: the answer logits at ``w + d`` are ``z + J d`` (``z``
the logits at ``w``, ``J`` their derivative in each weight). Cross-entropy is convex in the
logits, so its curvature in ``d`` is the Gauss-Newton matrix ``J^T (diag p - p p^T) J``
(positive semi-definite, no second derivative of the network needed). With K weights (a
handful of bricks) every quantity here is a K-vector or a K x K matrix: the steps cost nothing
next to one forward pass of the model, which `composer.fit` spends on the logits.

No model and no I/O here: tensors in, tensors out (float64 for the K x K algebra).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "broyden_update",
    "cross_entropy",
    "damped_steps",
    "example_losses",
    "forecast_decrease",
    "gradient_and_curvature",
    "needed_bricks",
    "union_start",
]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens, one value per leading index.

    Args:
        logits: ``(..., n, V)`` logits of the ``n`` answer tokens.
        targets: ``(n,)`` the answer tokens.
    """
    return _token_losses(logits, targets).mean(dim=-1)


def _token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(..., n)`` cross-entropy of each answer token (float64)."""
    import torch

    logits = logits.double()
    picked = logits.gather(-1, targets.expand(*logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(logits, dim=-1) - picked


def gradient_and_curvature(
    logits: torch.Tensor, jacobian: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient and Gauss-Newton matrix of the mean cross-entropy in the weights.

    Args:
        logits: ``(n, V)`` answer logits at the current weights.
        jacobian: ``(K, n, V)`` derivative of those logits in each of the K weights.
        targets: ``(n,)`` the answer tokens.

    Returns:
        ``(g, H)``: ``(K,)`` and ``(K, K)``, float64; ``H`` is symmetric positive semi-definite.
    """
    import torch

    p = torch.softmax(logits.double(), dim=-1)
    jac = jacobian.double()
    n = logits.shape[0]
    residual = p.clone()
    residual[torch.arange(n), targets] -= 1.0
    gradient = torch.einsum("knv,nv->k", jac, residual) / n
    mean_direction = torch.einsum("knv,nv->kn", jac, p)  # J_t^T p_t per token
    curvature = torch.einsum("knv,nv,lnv->kl", jac, p, jac) / n - mean_direction @ mean_direction.T / n
    return gradient, (curvature + curvature.T) / 2


def damped_steps(gradient: torch.Tensor, curvature: torch.Tensor, dampings: Sequence[float]) -> torch.Tensor:
    """Levenberg-Marquardt steps ``-(H + lambda s I)^-1 g`` for each damping ``lambda``.

    ``s`` is the mean eigenvalue of ``H`` (its trace / K), so the dampings are relative: 0 is the
    full Gauss-Newton step, large values shrink it towards the (scaled) gradient step.

    Returns:
        ``(len(dampings), K)`` float64.
    """
    import torch

    k = gradient.shape[0]
    scale = float(torch.trace(curvature)) / k
    scale = scale if scale > 0 else 1.0
    eye = torch.eye(k, dtype=torch.float64)
    # A floor of 1e-9 s keeps a singular H (a brick that changes no answer token) solvable.
    return torch.stack(
        [-torch.linalg.solve(curvature + max(damping, 1e-9) * scale * eye, gradient) for damping in dampings]
    )


def broyden_update(jacobian: torch.Tensor, step: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """Broyden's rank-one secant update of the logits' derivative after a scored step.

    The updated ``J'`` maps ``step`` onto the observed ``change`` of the logits exactly and
    agrees with ``J`` on every direction orthogonal to ``step``.

    Args:
        jacobian: ``(K, n, V)``.
        step: ``(K,)`` the weights moved by.
        change: ``(n, V)`` the logits changed by.

    Returns:
        ``(K, n, V)``; ``jacobian`` itself when the step is (numerically) zero.
    """
    import torch

    norm = float(step @ step)
    if norm < 1e-12:
        return jacobian
    miss = change - torch.einsum("k,knv->nv", step, jacobian)
    return jacobian + step[:, None, None] * miss[None] / norm


def forecast_decrease(gradient: torch.Tensor, curvature: torch.Tensor, step: torch.Tensor) -> float:
    """How much the Gauss-Newton model ``g.d + d.H d / 2`` says ``step`` lowers the objective
    (positive: a decrease)."""
    return -float(gradient @ step + 0.5 * step @ curvature @ step)


def example_losses(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, examples: int) -> torch.Tensor:
    """Mean cross-entropy of each example's answer tokens, per point.

    Args:
        logits: ``(R, n, V)`` answer logits at R weight vectors.
        targets: ``(n,)`` the answer tokens.
        rows: ``(n,)`` the example each answer token belongs to (``0 .. examples - 1``).
        examples: how many examples.

    Returns:
        ``(R, examples)`` float64.
    """
    import torch

    per_token = _token_losses(logits, targets)  # (R, n)
    sums = torch.zeros(logits.shape[0], examples, dtype=torch.float64).index_add_(1, rows, per_token)
    return sums / torch.bincount(rows, minlength=examples).clamp(min=1)


def union_start(alone: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, examples: int) -> torch.Tensor | None:
    """A mixture's starting point: every brick that, alone at weight 1, is the best of the
    bricks on at least one example, each at weight ``1 / m`` (m such bricks), the others at 0.

    The single-task analogue is "the task's brick alone at 1"; for examples of two tasks,
    the two bricks each do half of them, and at 1 each they interfere (on the tuning beds,
    seeds 3-4: 1.12 and 1.18 at weight 1 each vs 0.19 and 0.41 at 1/2 each, where the best
    single brick scored 0.66 and greedy descent from it stayed in a worse basin at 0.52).

    Args:
        alone: ``(K, n, V)`` answer logits with brick k alone at weight 1 (row k).
        targets, rows, examples: as in `example_losses`.

    Returns:
        ``(K,)`` float64, or None when one brick is the best on every example (its own
        point, already scored, is then the start).
    """
    import torch

    best = example_losses(alone, targets, rows, examples).argmin(dim=0)
    chosen = torch.unique(best)
    if chosen.numel() < 2:
        return None
    start = torch.zeros(alone.shape[0], dtype=torch.float64)
    start[chosen] = 1.0 / chosen.numel()
    return start


def needed_bricks(
    alone: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, examples: int, limit: int
) -> list[int]:
    """The bricks a fit needs, read from each brick alone: the best brick alone (lowest
    cross-entropy over every answer token), every brick that is the best of the bricks on at
    least one example (the bricks of `union_start`), then the others by their cross-entropy,
    best first, while fewer than ``limit`` are chosen.

    With many candidate bricks most do nothing for the examples; fitting only these makes
    each step score ``len(result) + 1`` copies of the examples instead of ``K + 1``.

    Args:
        alone: ``(K, n, V)`` answer logits with brick k alone at weight 1 (row k).
        targets, rows, examples: as in `example_losses`.
        limit: how many bricks to choose at least (fewer when there are fewer than ``limit``;
            more when more bricks are each the best on some example).

    Returns:
        Indices of the chosen bricks, ascending.
    """
    ranking = cross_entropy(alone, targets).argsort(stable=True).tolist()
    chosen = {ranking[0], *example_losses(alone, targets, rows, examples).argmin(dim=0).tolist()}
    for brick in ranking:
        if len(chosen) >= limit:
            break
        chosen.add(brick)
    return sorted(chosen)
