"""Build the second development set of the retrieval benchmarks from Super-NaturalInstructions
task files (github.com/allenai/natural-instructions, ``tasks/taskNNN_*.json``).

The task files are not part of the repository: fetch the ones listed in
``bench/data/dev_queries.jsonl`` (any clone or download of the upstream repository will do;
the JSON may be trimmed to its ``Definition`` and first ``Instances``) into a directory, then

    python bench/build_dev_set.py DIR [--out ../shared-extra/natural_instructions_dev60.jsonl]

The fresh set of ``bench/retrieval_cues.py`` (16 tasks whose queries were written after every
ranking idea there was designed) is built the same way from the tasks named in
``bench/data/dev_b_queries.jsonl`` (first 10 instances; ids numbered by position):

    python bench/build_dev_set.py DIR --queries bench/data/dev_b_queries.jsonl \
        --out ../shared-extra/natural_instructions_dev_b16.jsonl

Each task becomes one line in the format of ``../shared/eval/natural_instructions_60.jsonl``:
``task_id``, ``source_path``, ``source_commit``, ``definition``, ``category``, ``cluster`` (from
the queries file: near-duplicate groups, shared with the known 60 where the task is of the
same kind), and the first 10 ``instances`` (``id``, ``input`` cut at 500 characters,
``input_truncated``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ROOT / "bench" / "data" / "dev_queries.jsonl"
DEFAULT_OUT = ROOT.parent / "shared-extra" / "natural_instructions_dev60.jsonl"
MAX_INPUT_CHARS = 500
INSTANCES = 10


def task_record(path: Path, cluster: str) -> dict[str, Any]:
    """One benchmark line from an upstream task file."""
    raw = json.loads(path.read_text())
    definition = raw["Definition"]
    definition = " ".join(definition) if isinstance(definition, list) else str(definition)
    instances = []
    for i, instance in enumerate(raw["Instances"][:INSTANCES]):
        text = str(instance["input"])
        instances.append(
            {
                "id": instance.get("id", f"{path.stem.split('_')[0]}-{i}"),
                "input": text[:MAX_INPUT_CHARS],
                "input_truncated": len(text) > MAX_INPUT_CHARS,
            }
        )
    categories = raw.get("Categories") or [""]
    return {
        "task_id": path.stem,
        "source": "allenai/natural-instructions",
        "source_path": raw.get("Source_path", f"tasks/{path.name}"),
        "source_commit": raw.get("Source_commit"),
        "definition": definition,
        "category": categories[0],
        "cluster": cluster,
        "instances": instances,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks_dir", type=Path, help="directory of upstream task JSON files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--queries", type=Path, default=QUERIES, help="the queries file naming the tasks")
    args = parser.parse_args()
    clusters = {}
    for line in args.queries.read_text().splitlines():
        query = json.loads(line)
        clusters[query["task_id"]] = query["cluster"]
    missing = [t for t in clusters if not (args.tasks_dir / f"{t}.json").exists()]
    if missing:
        sys.exit(f"{len(missing)} task files missing from {args.tasks_dir}: {', '.join(missing)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as out:
        for task_id, cluster in clusters.items():
            out.write(json.dumps(task_record(args.tasks_dir / f"{task_id}.json", cluster), ensure_ascii=False) + "\n")
    print(f"wrote {len(clusters)} tasks to {args.out}")


if __name__ == "__main__":
    main()
