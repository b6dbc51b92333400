"""Does a brick do its task better than its base? Loss and exact match on input/output pairs.

`score_brick` loads the base once, attaches the brick unmerged (`composer.fit.LoraMixture`,
weight 1; weight 0 is the plain base) and scores both on the same pairs:

* ``loss``: mean cross-entropy of the answer tokens (answer + EOS) given the prompt, over all
  answer tokens of all pairs;
* ``exact_match``: the fraction of pairs whose greedy continuation of the prompt is exactly
  the answer's tokens followed by EOS.

torch and transformers are imported when scoring runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BrickQuality", "PairScores", "score_brick"]

Pair = tuple[str, str]


@dataclass(frozen=True)
class PairScores:
    """Loss and exact match of one model on a set of pairs."""

    loss: float
    exact_match: float


@dataclass(frozen=True)
class BrickQuality:
    """The base and the brick scored on the same pairs."""

    base: PairScores
    brick: PairScores
    pairs: int

    @property
    def beats_base(self) -> bool:
        """The brick has a lower loss than the base and no lower exact match."""
        return self.brick.loss < self.base.loss and self.brick.exact_match >= self.base.exact_match


def score_brick(
    base_dir: Path, brick_dir: Path, pairs: Sequence[Pair], *, prompt_template: str = "{input}"
) -> BrickQuality:
    """Score the base and the base with ``brick_dir`` attached on ``pairs``.

    Args:
        base_dir: a Hugging Face causal LM directory with its tokenizer.
        brick_dir: a PEFT LoRA adapter directory.
        pairs: ``(input, output)`` pairs.
        prompt_template: how an input becomes a prompt.

    Raises:
        InvalidParams: no pairs.
        InvalidAdapter: see `composer.fit.LoraMixture.load`.
    """
    from composer.errors import InvalidParams
    from composer.fit import LoraMixture

    if not pairs:
        raise InvalidParams("scoring needs at least one pair", [])
    mixture = LoraMixture.load(base_dir, [brick_dir], init=[0.0])
    try:
        base = _score(mixture, pairs, prompt_template)
        mixture.set_weights([1.0])
        brick = _score(mixture, pairs, prompt_template)
    finally:
        mixture.detach()
    return BrickQuality(base=base, brick=brick, pairs=len(pairs))


def _score(mixture: Any, pairs: Sequence[Pair], prompt_template: str) -> PairScores:
    import torch

    tokenizer = mixture.tokenizer
    with torch.no_grad():
        loss = float(mixture.loss(*mixture.batch(pairs, prompt_template=prompt_template)))
        hits = 0
        for text, answer in pairs:
            prompt = list(tokenizer(prompt_template.format(input=text))["input_ids"])
            target = [*tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
            hits += _greedy(mixture.model, prompt, len(target), tokenizer.eos_token_id) == target
    return PairScores(loss=loss, exact_match=hits / len(pairs))


def _greedy(model: Any, prompt: list[int], steps: int, eos: int) -> list[int]:
    """``steps`` greedy tokens after ``prompt`` (stopping after EOS)."""
    import torch

    ids = torch.tensor([prompt])
    out: list[int] = []
    past = None
    for _ in range(steps):
        result = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
        past = result.past_key_values
        token = int(result.logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out
