"""Merge weights of the bricks an instruction finds (pure).

Ranking scores are not a scale: they are sums of differently weighted branches, comparable
only in order within one query (a right brick scored 8.47 and the next -1.28, which a
softmax turned into weights 1 and 7.5e-06). Cosine similarities between the instruction
and the text each brick matched are a scale: the same model, the same range, whatever the
ranking's constants. So:

* ``w_i = softmax(sim_i / T)`` over the top-``k`` hits, with temperature ``T = 0.1``:
  a brick whose text is 0.1 less similar gets 1/e of the weight of the better one;
* a brick whose weight is below ``FLOOR = 0.2`` times the best brick's weight is dropped
  (its cosine trails the best by more than ``T * ln(1 / FLOOR)``, about 0.16) and the
  rest are renormalised to sum to 1, so an unrelated brick does not dilute the merge.

Why these two numbers (measured with MiniLM on the 60 known tasks and their 120 paraphrased
requests, ``bench/data/description_queries.jsonl``): the right task's definition beats the
best definition of an unrelated cluster by a cosine gap of 0.124 / 0.196 / 0.305 (10th /
25th / 50th percentile), and a near-duplicate task of the same cluster, which would fit the
request too, trails by 0.031 / 0.207 (25th / 50th). ``T = 0.1`` gives two fitting bricks
0.12 apart a 77/23 split (with ``T = 0.05`` it was 92/8: top-1 in effect), and a floor at a
gap of 0.16 drops most unrelated bricks while keeping close near-duplicates. With 32 more,
unseen tasks in the corpus (``bench/retrieval_generalization.py``) the gap to another
cluster's best is 0.021 / 0.147 / 0.245 (10th / 25th / 50th): about a quarter of the
requests keep an unrelated brick, at under 0.2 of the best one's weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["FLOOR", "TEMPERATURE", "instruction_weights"]

TEMPERATURE = 0.1
FLOOR = 0.2


def instruction_weights(
    similarities: Sequence[float], *, temperature: float = TEMPERATURE, floor: float = FLOOR
) -> list[float]:
    """Weights for bricks with these cosine similarities to the instruction (module docstring).

    Args:
        similarities: cosine of each brick's matched text to the instruction, any order.
        temperature: softmax temperature on the cosines.
        floor: bricks below ``floor`` times the best brick's weight get weight 0.

    Returns:
        One weight per similarity, in the same order; kept ones are positive and sum to 1,
        dropped ones are 0. The best brick is always kept.
    """
    if not similarities:
        return []
    if temperature <= 0 or not 0 <= floor < 1:
        raise ValueError("temperature must be positive and floor in [0, 1)")
    best = max(similarities)
    relative = [math.exp((s - best) / temperature) for s in similarities]
    kept = [r if r >= floor else 0.0 for r in relative]
    total = sum(kept)
    return [r / total for r in kept]
