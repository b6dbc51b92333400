"""Retrieval quality on 60 real tasks (Super-NaturalInstructions), Brickyard vs the plain
baseline, measured in the same run.

Each task becomes a brick: description = the task definition, examples = its first 5
instance inputs. Queries:

* A, held-out inputs: the other 5 instance inputs of every task (300 queries);
* B, description-style: our own paraphrases of the definitions (bench/data/description_queries.jsonl,
  two per task, written before any tuning).

Reported: top-1, top-3 and cluster-level top-1 (the top brick is in the true task's
near-duplicate cluster). The baseline is one vector per brick, the mean MiniLM embedding of
definition + examples, ranked by cosine. Brickyard is queried through its REST API.

    python bench/retrieval_quality.py [--backend sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._registry import (
    ROOT,
    load_tasks,
    migrated_database,
    random_adapter,
    scratch_home,
    task_brick_form,
    tiny_base,
)

GOALS = {"A top-1": 0.70, "A top-3": 0.90, "B top-1": 0.85}


def metrics(ranked: list[list[str]], truth: list[str], cluster: dict[str, str]) -> dict[str, float]:
    top1 = np.mean([r[:1] == [t] for r, t in zip(ranked, truth, strict=True)])
    top3 = np.mean([t in r[:3] for r, t in zip(ranked, truth, strict=True)])
    cluster1 = np.mean([bool(r) and cluster[r[0]] == cluster[t] for r, t in zip(ranked, truth, strict=True)])
    return {"top-1": float(top1), "top-3": float(top3), "cluster top-1": float(cluster1)}


def run(database_url: str | None, home: Path, console: Console) -> None:
    from fastapi.testclient import TestClient

    from registry.api import create_app
    from registry.service import Registry
    from registry.settings import Settings

    tasks = load_tasks()
    cluster = {t["task_id"]: t["cluster"] for t in tasks}
    queries_b = [json.loads(line) for line in (ROOT / "bench/data/description_queries.jsonl").read_text().splitlines()]
    queries_a = [(t["task_id"], inst["input"]) for t in tasks for inst in t["instances"][5:10]]

    registry = Registry.open(Settings(home=home, database_url=database_url))
    token, _ = registry.tokens.create("bench", "admin", actor="bench")
    name_of: dict[str, str] = {}
    with TestClient(create_app(registry=registry), headers={"Authorization": f"Bearer {token}"}) as client:
        assert client.post("/v1/base-models", json={"name": "tiny", "path": str(tiny_base())}).status_code == 201
        started = time.perf_counter()
        for i, task in enumerate(tasks):
            name = f"t{i:02d}-{task['task_id'][:60]}".replace("_", "-")
            name_of[name] = task["task_id"]
            config, weights = random_adapter(i)
            response = client.post("/v1/bricks", **task_brick_form(name, "tiny", task, 5, config, weights))
            assert response.status_code == 201, response.text
        console.print(f"registered {len(tasks)} bricks in {time.perf_counter() - started:.1f} s")

        def brickyard(query: str) -> list[str]:
            response = client.post("/v1/search", json={"query": query, "k": 3, "exact": True})
            assert response.status_code == 200, response.text
            return [name_of[h["brick"]["name"]] for h in response.json()["hits"]]

        started = time.perf_counter()
        ours_a = [brickyard(q) for _, q in queries_a]
        ours_b = [brickyard(q["query"]) for q in queries_b]
        console.print(f"ran {len(ours_a) + len(ours_b)} searches in {time.perf_counter() - started:.1f} s")

    # Baseline, same embedding model, same run: one mean vector per brick.
    embedder = registry.embedder
    centroids = []
    for task in tasks:
        vectors = embedder.embed([task["definition"], *[inst["input"] for inst in task["instances"][:5]]])
        mean = vectors.mean(axis=0)
        centroids.append(mean / np.linalg.norm(mean))
    matrix = np.stack(centroids)
    ids = [t["task_id"] for t in tasks]

    def baseline(queries: list[str]) -> list[list[str]]:
        sims = embedder.embed(queries) @ matrix.T
        return [[ids[j] for j in np.argsort(-row, kind="stable")[:3]] for row in sims]

    base_a = baseline([q for _, q in queries_a])
    base_b = baseline([q["query"] for q in queries_b])
    registry.close()

    truth_a = [t for t, _ in queries_a]
    truth_b = [q["task_id"] for q in queries_b]
    rows = {
        "baseline (mean vector, cosine)": (metrics(base_a, truth_a, cluster), metrics(base_b, truth_b, cluster)),
        "Brickyard /v1/search": (metrics(ours_a, truth_a, cluster), metrics(ours_b, truth_b, cluster)),
    }
    backend = "postgresql" if database_url and database_url.startswith("postgres") else "sqlite"
    title = f"retrieval quality, {len(tasks)} tasks ({backend}, embeddings {embedder.name})"
    table = Table(title=title)
    for column in ("method", "A top-1", "A top-3", "A cluster top-1", "B top-1", "B top-3", "B cluster top-1"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for label, (a, b) in rows.items():
        table.add_row(label, *[f"{a[m]:.3f}" for m in a], *[f"{b[m]:.3f}" for m in b])
    ours = rows["Brickyard /v1/search"]
    table.add_row(
        "goal",
        f">= {GOALS['A top-1']:.2f}",
        f">= {GOALS['A top-3']:.2f}",
        "",
        f">= {GOALS['B top-1']:.2f}",
        "",
        "",
    )
    console.print(table)
    console.print(f"A = {len(queries_a)} held-out instance inputs; B = {len(queries_b)} description paraphrases")
    gain = ours[0]["top-1"] / max(rows["baseline (mean vector, cosine)"][0]["top-1"], 1e-9)
    console.print(f"A top-1 vs baseline: x{gain:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    console = Console(width=140)
    with scratch_home("brickyard-quality-") as home, migrated_database(args.backend, home) as url:
        run(url, home, console)


if __name__ == "__main__":
    main()
