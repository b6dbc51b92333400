"""Few-shot fitting of a composition's weights: the recipe's ``fit`` section and the build step.

A request with ``fit`` names its examples and the optimisation (steps, L1, seed, prompt); all
of it goes into the recipe, examples included, with their sha256 (`composer.examples_hash`),
so the composition id names exactly what is built: the fit is deterministic for its inputs
(CPU, one seed), and its result is part of the built recipe (``brickyard.json``: each brick's
fitted ``weight``, and ``fit.weights``, ``fit.initial_loss``, ``fit.final_loss``). The bricks
start from uniform weights ``1 / n`` (LoraHub's start), which is what the recipe records
before the build.

The fit runs in the build job (`fit_recipe`), before the merge, reporting progress like a
build; the composer does the math (`composer.fit_weights`). New recipes name the optimiser
(``method``: Gauss-Newton, with its ``tolerance`` and ``spread``); a recipe written before
that field existed has none and is fitted with Adam, as it was then, so it builds the same;
one that names ``"gauss-newton"`` (the Broyden-updated fit, before ``"gauss-newton-exact"``)
is fitted by that method, with its recorded settings; one that names ``"gauss-newton-exact"``
without ``narrow_to`` (written before the fit was narrowed to the bricks its examples need)
fits every brick, as it did then.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from registry.errors import InvalidRecipe
from registry.inputs import FitRequest

__all__ = [
    "FIT_FRACTION",
    "LEARNING_RATE",
    "METHOD",
    "NARROW_TO",
    "SPREAD",
    "TOLERANCE",
    "fit_recipe",
    "fit_section",
    "require_tokenizer",
]

# The fit's share of a build's progress bar; the merge takes the rest.
FIT_FRACTION = 0.5
# Adam's step on the weights (composer's default): fixed, so that it is part of the recipe schema.
# Only recipes without ``method`` (written before Gauss-Newton) use it.
LEARNING_RATE = 0.1
# The optimiser of new recipes and its settings (composer's defaults), fixed for the same reason.
METHOD = "gauss-newton-exact"
TOLERANCE = 1e-2
SPREAD = 0
NARROW_TO = 2
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def fit_section(fit: FitRequest) -> dict[str, Any]:
    """The recipe's ``fit`` section for a request: examples, their sha256 and the optimisation."""
    from composer import examples_hash

    pairs = [(e.input, e.output) for e in fit.examples]
    return {
        "examples": [{"input": text, "output": answer} for text, answer in pairs],
        "examples_sha256": examples_hash(pairs),
        "steps": fit.steps,
        "l1": float(fit.l1),
        "lr": LEARNING_RATE,
        "method": METHOD,
        "tolerance": TOLERANCE,
        "spread": SPREAD,
        "narrow_to": NARROW_TO,
        "seed": fit.seed,
        "prompt": fit.prompt,
    }


def require_tokenizer(files: Collection[str], base_name: str, where: str) -> None:
    """Fitting reads text: refuse (before queuing) a base model without a tokenizer.

    Args:
        files: names of the files at the top of the base model (`registry.storage.s3_bases.base_model_files`:
            a directory's entries, or one listing of an ``s3://`` prefix, nothing downloaded).
        base_name: the base model's name, for the message.
        where: its path or URL, for the message.

    Raises:
        InvalidRecipe: none of the tokenizer files is there.
    """
    if not any(name in files for name in _TOKENIZER_FILES):
        raise InvalidRecipe(
            f"base model {base_name!r} has no tokenizer, so examples cannot be read",
            errors=[f"fit: {where} holds none of {', '.join(_TOKENIZER_FILES)}"],
        )


def fit_recipe(
    recipe: dict[str, Any],
    base_path: Path,
    brick_files: Sequence[tuple[Path, Path]],
    progress: Callable[[float, str], None],
    *,
    scratch: Path,
) -> dict[str, Any]:
    """Fit the weights of ``recipe``'s bricks; return the recipe to build (fitted weights in).

    Args:
        recipe: a recipe with a ``fit`` section (see `fit_section`).
        base_path: the base model directory.
        brick_files: (config, weights) paths of each brick, in recipe order.
        progress: the build's progress callback; the fit reports fractions up to `FIT_FRACTION`.
        scratch: a directory for the bricks' adapter directories (links to the blobs).

    Returns:
        A copy of ``recipe`` whose bricks carry the fitted weights and whose ``fit`` section
        holds ``weights``, ``initial_loss`` (at the uniform start) and ``final_loss``.
    """
    from composer import fit_weights

    fit = recipe["fit"]
    directories = []
    for index, (config, weights) in enumerate(brick_files):
        # The composer reads PEFT adapter directories; the blobs are content-addressed files.
        directory = Path(tempfile.mkdtemp(prefix=f"brick{index}-", dir=scratch))
        os.symlink(config, directory / "adapter_config.json")
        os.symlink(weights, directory / "adapter_model.safetensors")
        directories.append(directory)
    result = fit_weights(
        base_path,
        directories,
        [(e["input"], e["output"]) for e in fit["examples"]],
        steps=fit["steps"],
        lr=fit["lr"],
        l1=fit["l1"],
        # Recipes from before the field were fitted with Adam: they must rebuild the same.
        method=fit.get("method", "adam"),
        tolerance=fit.get("tolerance", TOLERANCE),
        spread=fit.get("spread", SPREAD),
        # Recipes from before narrowing fitted every brick.
        narrow_to=fit.get("narrow_to"),
        init=[brick["weight"] for brick in recipe["bricks"]],
        seed=fit["seed"],
        prompt_template=fit["prompt"],
        progress=lambda fraction, message: progress(FIT_FRACTION * fraction, message),
    )
    fitted = dict(recipe)
    fitted["bricks"] = [{**brick, "weight": w} for brick, w in zip(recipe["bricks"], result.weights, strict=True)]
    fitted["fit"] = {
        **fit,
        "weights": list(result.weights),
        "initial_loss": result.initial_loss,
        "final_loss": result.final_loss,
        "seconds": round(result.seconds, 3),
    }
    return fitted
