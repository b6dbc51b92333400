"""Benchmark: emergent-neuron discovery cost and the quality of the neurons it finds.

Measured in the same run:

* **cost**: `composer.emergent.collect_statistics` over every probe token against the floor,
  the same backbone forward passes with a no-op pre-hook on each FFN output projection (and a
  plain forward with no hook, for reference). Each contender runs in a fresh process (one
  warm-up pass, then ``--repeat`` timed passes, median reported) so its peak RSS (VmHWM)
  is its own; reported as seconds per 1k probe tokens and peak MB.
* **specificity** per selection method (``lape``, ``average_precision``): neurons are found
  on one half of each function's probe texts; on the other half, ablating a function's set
  raises its own loss by X% and the others' by Y% on average; specificity = X / Y. The same
  for a random set of the same per-layer sizes (seeded), for comparison.
* **overlap** between functions' sets: shared neurons against the number expected by chance
  for sets of those per-layer sizes drawn independently (``sum_l |S_l| * |T_l| / I``).

Without ``--model`` a small Llama (hidden 128, 2 layers) is trained for ``--train-steps`` on
three synthetic tasks with different input forms (counting in one token range, repeating a
random phrase in a second, alternating two tokens in a third), so the numbers reflect
specialised neurons; the model and probes are cached under ``.bench/emergent``. With
``--model DIR`` (a transformers causal LM, e.g. the trained test bed), give probe sets as
``--probe NAME=FILE`` (one text per line; even lines find, odd lines verify).

On the trained test bed (`composer.testbed`, #22 item 5): ``--testbed DIR`` writes one probe
file per task (``--texts`` prompts ``input=`` of that task, inputs drawn from the task's
generator with the test bed's seed, none of its held-out eval inputs) under
``.bench/emergent/testbed-probes/`` and runs on ``DIR/base`` with them; the printed per-task
table is the paper's table in miniature (own-task loss increase vs the other tasks' and vs
random neurons).

    python bench/emergent.py                                  # about a minute
    python bench/emergent.py --model DIR --probe code=code.txt --probe prose=prose.txt
    python bench/emergent.py --testbed ~/.brickyard/cache/testbed-full-seed0-<version>
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench" / "emergent"
VOCAB = 512
TASK_RANGES = {"count": (8, 168), "repeat": (168, 336), "alternate": (336, 504)}
METHODS = ("lape", "average_precision")


# -- fixtures -----------------------------------------------------------------------------


def _task_text(task: str, length: int, generator: Any) -> list[int]:
    """One synthetic text: its own token range, its own structure."""
    import torch

    low, high = TASK_RANGES[task]
    span = high - low
    if task == "count":  # x, x+1, x+2, ... (wrapping in the range)
        start = int(torch.randint(0, span, (1,), generator=generator))
        return [low + (start + i) % span for i in range(length)]
    if task == "repeat":  # a random 6-token phrase, repeated
        phrase = (low + torch.randint(0, span, (6,), generator=generator)).tolist()
        return [phrase[i % 6] for i in range(length)]
    pair = (low + torch.randint(0, span, (2,), generator=generator)).tolist()  # a b a b ...
    return [pair[i % 2] for i in range(length)]


def _synthetic_probes(texts: int, length: int, seed: int) -> dict[str, list[list[int]]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {task: [_task_text(task, length, generator) for _ in range(texts)] for task in TASK_RANGES}


def _train_default_model(out: Path, steps: int, seed: int) -> None:
    """A small Llama trained on the three synthetic tasks (mixed batches)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)  # the machine is shared; one thread is also the steadiest
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    for step in range(steps):
        rows = [_task_text(task, 32, generator) for task in TASK_RANGES for _ in range(8)]
        ids = torch.tensor(rows)
        loss = model(input_ids=ids, labels=ids).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  train step {step}: loss {loss.item():.3f}", flush=True)
    print(f"  trained {steps} steps in {time.perf_counter() - start:.1f} s", flush=True)
    model.save_pretrained(out)


def _tokenised_probes(model_dir: Path, specs: list[str], max_length: int) -> dict[str, list[list[int]]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    probes = {}
    for spec in specs:
        name, _, file = spec.partition("=")
        lines = [line for line in Path(file).read_text().splitlines() if line.strip()]
        probes[name] = [tokenizer(line, truncation=True, max_length=max_length)["input_ids"] for line in lines]
    return probes


def write_testbed_probes(testbed: Path, out: Path, texts: int) -> list[str]:
    """One probe file per task of a built test bed: ``texts`` distinct prompts of the task
    (not its eval inputs), one per line. Returns the ``NAME=FILE`` specs."""
    import random

    from composer.testbed import TASKS, format_prompt, load_testbed

    bed = load_testbed(testbed)
    out.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, task in bed.tasks.items():
        rng = random.Random(f"{bed.seed}/{name}/probes")
        seen = {text for text, _ in task.eval_set}
        lines: list[str] = []
        for _ in range(texts * 100):
            text, _answer = TASKS[name].generate(rng)
            if text not in seen:
                seen.add(text)
                lines.append(format_prompt(text))
            if len(lines) == texts:
                break
        file = out / f"{name}.txt"
        file.write_text("\n".join(lines) + "\n")
        specs.append(f"{name}={file}")
    return specs


def _batches(texts: list[list[int]], batch_size: int) -> list[tuple[Any, Any]]:
    """Right-padded (ids, mask) batches."""
    import torch

    out = []
    for start in range(0, len(texts), batch_size):
        rows = texts[start : start + batch_size]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        out.append((ids, mask))
    return out


def _load_model(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# -- cost (child processes) ------------------------------------------------------------------


def _peak_rss() -> int:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024 if match else 0


def _child(contender: str, model_dir: Path, probes_file: Path, repeat: int, batch_size: int) -> dict[str, Any]:
    import torch

    from composer.emergent import collect_statistics, ffn_output_projections
    from composer.emergent.statistics import backbone

    torch.set_num_threads(1)
    model = _load_model(model_dir)
    probes = {k: _batches(v, batch_size) for k, v in json.loads(probes_file.read_text()).items()}
    tokens = sum(int(mask.sum()) for batches in probes.values() for _, mask in batches)

    def floor(hook: bool) -> None:
        handles = (
            [m.register_forward_pre_hook(lambda _m, _i: None) for m in ffn_output_projections(model).values()]
            if hook
            else []
        )
        try:
            with torch.inference_mode():
                for batches in probes.values():
                    for ids, mask in batches:
                        backbone(model)(input_ids=ids, attention_mask=mask.long())
        finally:
            for handle in handles:
                handle.remove()

    runs = {
        "no-hook": lambda: floor(False),
        "noop-hook": lambda: floor(True),
        "statistics": lambda: collect_statistics(model, probes),
    }
    if contender == "interleaved":
        return _interleaved(runs, repeat, tokens)
    run = runs[contender]
    run()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    result: dict[str, Any] = {"contender": contender, "tokens": tokens, "times": times, "peak_rss": _peak_rss()}
    if contender == "statistics":
        result["statistics_bytes"] = collect_statistics(model, probes).nbytes()
    return result


def _interleaved(runs: dict[str, Any], rounds: int, tokens: int) -> dict[str, Any]:
    """All contenders in one process, one pass each per round in rotating order: the
    per-round ratio to the floor cancels the shared host's drifts, which separate processes
    minutes apart do not."""
    names = list(runs)
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % 3 :] + names[: round_ % 3]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    ratios = [s / f for s, f in zip(times["statistics"], times["noop-hook"], strict=True)]
    return {"contender": "interleaved", "tokens": tokens, "times": times, "ratio_to_floor": ratios}


def _cost(model_dir: Path, probes_file: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each contender in ``--rounds`` fresh processes, the order rotating each round so a
    change of the shared host's speed does not land on one contender."""
    contenders = ["no-hook", "noop-hook", "statistics"]
    results: dict[str, dict[str, Any]] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for round_ in range(args.rounds):
        for contender in contenders[round_ % 3 :] + contenders[: round_ % 3]:
            command = [sys.executable, __file__, "--child", contender, "--model", str(model_dir)]
            command += ["--probes-file", str(probes_file), "--repeat", str(args.repeat)]
            command += ["--batch-size", str(args.batch_size)]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if contender in results:
                results[contender]["times"] += row["times"]
                results[contender]["peak_rss"] = max(results[contender]["peak_rss"], row["peak_rss"])
            else:
                results[contender] = row
    command = [sys.executable, __file__, "--child", "interleaved", "--model", str(model_dir)]
    command += ["--probes-file", str(probes_file), "--repeat", str(args.interleaved_rounds)]
    command += ["--batch-size", str(args.batch_size)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return [results[c] for c in contenders] + [json.loads(out.stdout.strip().splitlines()[-1])]


def _wide_random_model(out: Path, seed: int) -> Path:
    """A random Llama with wider FFNs (hidden 512, 1408 neurons, 4 layers), for cost only."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


# -- quality ----------------------------------------------------------------------------------


def _overlap(sets: dict[str, dict[int, Any]], width: int) -> list[dict[str, Any]]:
    names = list(sets)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = sum(len(set(sets[a][k].tolist()) & set(sets[b][k].tolist())) for k in sets[a])
            chance = sum(sets[a][k].numel() * sets[b][k].numel() / width for k in sets[a])
            rows.append({"pair": f"{a}/{b}", "shared": shared, "chance": round(chance, 2)})
    return rows


def _quality(model_dir: Path, probes: dict[str, list[list[int]]], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from composer.emergent import collect_statistics, select_neurons, verify_neuron_sets

    torch.set_num_threads(1)
    model = _load_model(model_dir)
    find = {k: _batches(v[0::2], args.batch_size) for k, v in probes.items()}
    held_out = {k: _batches(v[1::2], args.batch_size) for k, v in probes.items()}
    stats = collect_statistics(model, find)
    out: dict[str, Any] = {}
    for method in METHODS:
        sets, params = select_neurons(stats, method)
        table = verify_neuron_sets(model, held_out, sets, seed=args.seed)
        increase = table.relative_increase()
        per_function = {}
        for function in sets:
            random_row = increase[f"random:{function}"]
            others = [v for f, v in random_row.items() if f != function]
            per_function[function] = {
                "neurons": table.sizes[function],
                "own_increase": increase[function][function],
                "mean_other_increase": sum(increase[function][f] for f in sets if f != function) / (len(sets) - 1),
                "specificity": table.specificity(function) if len(sets) > 1 else None,
                "random_own_increase": random_row[function],
                "random_mean_other_increase": sum(others) / len(others) if others else None,
            }
        out[method] = {
            "params": params,
            "functions": per_function,
            "overlap": _overlap(sets, stats.width),
            "table": table.to_dict(),
        }
    return out


def _print_report(costs: dict[str, list[dict[str, Any]]], quality: dict[str, Any]) -> None:
    for model, cost in costs.items():
        print(f"\n## Discovery cost on {model} (fresh processes: median of timed passes; peak RSS = max VmHWM)")
        print(f"{'contender':<12} {'s / 1k tokens':>14} {'peak RSS MB':>12}")
        for row in cost[:3]:
            per_k = statistics.median(row["times"]) / (row["tokens"] / 1000)
            print(f"{row['contender']:<12} {per_k:>14.4f} {row['peak_rss'] / 2**20:>12.1f}")
        ratios = cost[3]["ratio_to_floor"]
        print(
            f"same process, {len(ratios)} interleaved rounds: statistics / no-op-hook floor median "
            f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)"
        )
        floor = statistics.median(cost[1]["times"])
        print(
            f"statistics / no-op-hook floor: {statistics.median(cost[2]['times']) / floor:.2f}x time, "
            f"+{(cost[2]['peak_rss'] - cost[1]['peak_rss']) / 2**20:.1f} MB peak; statistics tensors "
            f"{cost[2]['statistics_bytes'] / 2**10:.0f} KiB; {cost[2]['tokens']} tokens"
        )
    for method, result in quality.items():
        print(f"\n## {method} {result['params']}")
        header = ("function", "neurons", "own %", "others %", "spec.", "rand own %", "rand oth %")
        print("{:<12} {:>7} {:>8} {:>9} {:>7} {:>11} {:>11}".format(*header))
        for function, row in result["functions"].items():
            spec = row["specificity"]
            print(
                f"{function:<12} {row['neurons']:>7} {100 * row['own_increase']:>8.1f} "
                f"{100 * row['mean_other_increase']:>9.1f} {spec if spec is None else round(spec, 2)!s:>7} "
                f"{100 * row['random_own_increase']:>11.1f} {100 * (row['random_mean_other_increase'] or 0):>11.1f}"
            )
        print("overlap: " + ", ".join(f"{r['pair']} {r['shared']} (chance {r['chance']})" for r in result["overlap"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a transformers causal LM directory (default: train a small one)")
    parser.add_argument("--probe", action="append", default=[], help="NAME=FILE, one text per line (with --model)")
    parser.add_argument("--testbed", type=Path, help="a built test bed: its base, probes written from its tasks")
    parser.add_argument("--texts", type=int, default=64, help="synthetic texts per function (default model)")
    parser.add_argument("--length", type=int, default=64, help="tokens per synthetic text")
    parser.add_argument("--max-length", type=int, default=256, help="truncate tokenised probe texts")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per process")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per contender")
    parser.add_argument("--no-wide", action="store_true", help="skip the cost run on a wider random model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interleaved-rounds", type=int, default=6, help="rounds of the same-process comparison")
    parser.add_argument(
        "--child", choices=("statistics", "noop-hook", "no-hook", "interleaved"), help=argparse.SUPPRESS
    )
    parser.add_argument("--probes-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    if args.child:
        print(json.dumps(_child(args.child, args.model, args.probes_file, args.repeat, args.batch_size)))
        return

    CACHE.mkdir(parents=True, exist_ok=True)
    if args.testbed is not None:
        args.model = args.testbed / "base"
        args.probe = write_testbed_probes(args.testbed, CACHE / "testbed-probes", args.texts)
        args.no_wide = True
    if args.model is None:
        model_dir = CACHE / f"llama-trained-{args.train_steps}-{args.seed}"
        if not (model_dir / "config.json").exists():
            print(f"training the default model -> {model_dir}", flush=True)
            _train_default_model(model_dir, args.train_steps, args.seed)
        probes = _synthetic_probes(args.texts, args.length, args.seed + 100)
    else:
        if not args.probe:
            parser.error("--model needs at least two --probe NAME=FILE")
        model_dir = args.model
        probes = _tokenised_probes(model_dir, args.probe, args.max_length)
    probes_file = CACHE / "probes.json"
    probes_file.write_text(json.dumps(probes))

    costs = {str(model_dir.name): _cost(model_dir, probes_file, args)}
    if args.model is None and not args.no_wide:
        wide = _wide_random_model(CACHE / "llama-wide-random", args.seed)
        costs[wide.name] = _cost(wide, probes_file, args)
    quality = _quality(model_dir, probes, args)
    _print_report(costs, quality)
    (CACHE / "result.json").write_text(json.dumps({"cost": costs, "quality": quality}, indent=1))
    print(f"\nfull result: {CACHE / 'result.json'}")


if __name__ == "__main__":
    main()
