"""End-to-end HTTP search latency at 1k, 10k and 100k bricks, on SQLite and PostgreSQL +
pgvector, against ``brickyard serve`` on 127.0.0.1.

Scale data is synthetic but shaped like real data: each brick copies one of the 60
Super-NaturalInstructions tasks (its definition's and 3 instance inputs' MiniLM vectors,
jittered, and its lexical vectors), so clusters and near-duplicates look as they do in the
quality benchmark. Rows are bulk-loaded (COPY on PostgreSQL); the HNSW index is built
after loading, as the migration defines it.

Queries mix held-out instance inputs and description paraphrases. Reported per
configuration: single-client p50/p95 (client-side, over HTTP), the server-side split from
the ``Server-Timing`` header (embedding the query / candidate generation / ranking), and
throughput with 8 concurrent clients.

    python bench/retrieval_latency.py                      # sqlite 1k,10k; postgresql 1k,10k,100k
    python bench/retrieval_latency.py --sizes 1000 --backends sqlite
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._registry import (
    CACHE,
    ROOT,
    live_server,
    load_tasks,
    migrated_database,
    percentile,
    scratch_home,
    tiny_base,
)

EXAMPLES_PER_BRICK = 3
JITTER = 0.08


def source_material() -> dict[str, Any]:
    """Real vectors and lexical vectors of the 60 tasks (cached in .bench/)."""
    cache = CACHE / "latency-source-v2.npz"
    tasks = load_tasks()
    if cache.exists():
        data = dict(np.load(cache, allow_pickle=True))
        return {k: (v.item() if v.dtype == object and v.shape == () else v) for k, v in data.items()}
    from registry.search.embed import shared_embedder
    from registry.search.lexical import HASH_DIM, VIEWS
    from registry.search.ranking import CorpusStats, index_brick_texts
    from registry.settings import Settings

    settings = Settings()
    embedder = shared_embedder(settings.embedding.resolved_model_path(), cache_dir=settings.embedding_cache_dir)
    desc = embedder.embed([t["definition"] for t in tasks])
    encoded = [embedder.embed_with_layer([i["input"] for i in t["instances"]]) for t in tasks]
    inputs = np.stack([vecs for vecs, _ in encoded])
    layers = np.stack([lay for _, lay in encoded])
    stats = CorpusStats.empty(desc.shape[1])
    lexical = []
    for t, task in enumerate(tasks):
        examples = [i["input"] for i in task["instances"][:EXAMPLES_PER_BRICK]]
        indexed, stats = index_brick_texts(
            task["definition"], examples, inputs[t, :EXAMPLES_PER_BRICK], layers[t, :EXAMPLES_PER_BRICK], stats
        )
        lexical.append({view: getattr(indexed, view).to_bytes() for view in VIEWS})
    result = {
        "desc": desc,
        "inputs": inputs,
        "layers": layers,
        "lexical": np.array(lexical, dtype=object),
        "df": np.stack([stats.df[v] for v in VIEWS]),
        "model": np.array(embedder.name),
    }
    assert result["df"].shape == (3, HASH_DIM)
    CACHE.mkdir(exist_ok=True)
    np.savez(cache, **result)
    return {k: (v.item() if isinstance(v, np.ndarray) and v.dtype.kind == "U" else v) for k, v in result.items()}


def queries() -> list[str]:
    tasks = load_tasks()
    held_out = [i["input"] for t in tasks for i in t["instances"][5:7]]
    described = [
        json.loads(line)["query"] for line in (ROOT / "bench/data/description_queries.jsonl").read_text().splitlines()
    ]
    mixed = [q for pair in zip(held_out, described, strict=False) for q in pair]
    return mixed


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def bulk_load(database_url: str, home: Path, n_bricks: int, console: Console) -> None:
    """Register the tiny base model through the service, then bulk-insert synthetic bricks."""
    from sqlalchemy import insert, text, update

    from registry.db.models import (
        BrickLexicalRow,
        BrickNameRow,
        BrickRow,
        BrickVectorRow,
        IndexStateRow,
        RetrievalDfRow,
        RetrievalStatsRow,
        utcnow,
    )
    from registry.search.lexical import VIEWS
    from registry.service import Registry
    from registry.settings import Settings

    source = source_material()
    model = str(source["model"])
    registry = Registry.open(Settings(home=home, database_url=database_url))
    base = registry.add_base_model({"name": "tiny", "path": str(tiny_base())})
    base_id = registry.store.base_model_id(base.name)
    db = registry.store.db
    rng = np.random.default_rng(0)
    n_tasks, dim = source["desc"].shape
    started = time.perf_counter()
    now = utcnow()
    chunk = 5000
    example_sum = np.zeros(dim, np.float64)
    layer_sum = np.zeros(dim, np.float64)
    layer_sumsq = np.zeros(dim, np.float64)
    postgres_backend = db.dialect == "postgresql"
    if postgres_backend:
        with db.engine.begin() as connection:
            connection.execute(text("DROP INDEX IF EXISTS ix_hnsw_brick_vectors_384"))
    for start in range(0, n_bricks, chunk):
        ids = np.arange(start, min(start + chunk, n_bricks))
        task = ids % n_tasks
        desc = _unit(source["desc"][task] + rng.normal(0, JITTER / np.sqrt(dim), (len(ids), dim)))
        pick = rng.integers(0, 10, (len(ids), EXAMPLES_PER_BRICK))
        examples = _unit(
            source["inputs"][task[:, None], pick]
            + rng.normal(0, JITTER / np.sqrt(dim), (len(ids), EXAMPLES_PER_BRICK, dim))
        )
        example_sum += examples.reshape(-1, dim).sum(axis=0)
        layer_vectors = source["layers"][task[:, None], pick].astype(np.float64)
        layer_sum += layer_vectors.reshape(-1, dim).sum(axis=0)
        layer_sumsq += (layer_vectors**2).reshape(-1, dim).sum(axis=0)
        bricks = [
            {
                "id": int(i) + 1,
                "name": f"b{i:06d}",
                "version": 1,
                "base_model_id": base_id,
                "description": f"synthetic brick {i} (task {t})",
                "examples": [f"example {k}" for k in range(EXAMPLES_PER_BRICK)],
                "license": None,
                "metrics": {},
                "sha256": hashlib.sha256(f"synthetic-{i}".encode()).hexdigest(),
                "config_sha256": hashlib.sha256(b"config").hexdigest(),
                "size_bytes": 1,
                "config_size_bytes": 1,
                "rank": 2,
                "lora_alpha": 4.0,
                "use_rslora": False,
                "target_modules": ["q_proj"],
                "modules": [],
                "rank_pattern": {},
                "alpha_pattern": {},
                "created_at": now,
                "updated_at": now,
                "created_by": None,
                "is_latest": True,
            }
            for i, t in zip(ids.tolist(), task.tolist(), strict=True)
        ]
        lexical = []
        for i, t in zip(ids.tolist(), task.tolist(), strict=True):
            row: dict[str, Any] = {"brick_id": i + 1}
            for view in VIEWS:
                row[f"{view}_idx"], row[f"{view}_val"] = source["lexical"][t][view]
            brick_layers = source["layers"][t, pick[i - start]].astype(np.float64)
            row["layer_sum"] = brick_layers.sum(axis=0).astype("<f8").tobytes()
            row["layer_sumsq"] = (brick_layers**2).sum(axis=0).astype("<f8").tobytes()
            lexical.append(row)
        with db.engine.begin() as connection:
            connection.execute(
                insert(BrickNameRow), [{"name": b["name"], "last_version": 1, "created_at": now} for b in bricks]
            )
            connection.execute(insert(BrickRow), bricks)
            connection.execute(insert(BrickLexicalRow), lexical)
            vector_rows = []
            for j, i in enumerate(ids.tolist()):
                vector_rows.append((i + 1, "description", 0, "d", model, dim, desc[j]))
                for k in range(EXAMPLES_PER_BRICK):
                    vector_rows.append((i + 1, "example", k, "e", model, dim, examples[j, k]))
            if postgres_backend:
                _copy_vectors(connection, vector_rows)
            else:
                keys = ("brick_id", "kind", "ordinal", "text", "model", "dim", "embedding")
                connection.execute(insert(BrickVectorRow), [dict(zip(keys, r, strict=True)) for r in vector_rows])
        console.print(f"  loaded {min(start + chunk, n_bricks):,} bricks ({time.perf_counter() - started:.0f} s)")
    with db.engine.begin() as connection:
        df = source["df"].astype(np.int64) * max(1, n_bricks // n_tasks)
        connection.execute(
            update(RetrievalStatsRow)
            .where(RetrievalStatsRow.id == 1)
            .values(
                model=model,
                dim=dim,
                n_docs=n_bricks * (1 + EXAMPLES_PER_BRICK),
                example_count=n_bricks * EXAMPLES_PER_BRICK,
                example_sum=example_sum.astype("<f8").tobytes(),
                layer_sum=layer_sum.astype("<f8").tobytes(),
                layer_sumsq=layer_sumsq.astype("<f8").tobytes(),
            )
        )
        connection.execute(
            insert(RetrievalDfRow),
            [
                {"view": view, "bucket": int(bucket), "count": int(df[k][bucket]), "generation": 0}
                for k, view in enumerate(VIEWS)
                for bucket in np.flatnonzero(df[k])
            ],
        )
        connection.execute(update(IndexStateRow).values(generation=IndexStateRow.generation + 1))
        if postgres_backend:
            connection.execute(
                text("SELECT setval(pg_get_serial_sequence('bricks', 'id'), (SELECT max(id) FROM bricks))")
            )
    if postgres_backend:
        index_started = time.perf_counter()
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("SET maintenance_work_mem = '4GB'"))
            connection.execute(text("SET max_parallel_maintenance_workers = 1"))
            connection.execute(
                text(
                    "CREATE INDEX ix_hnsw_brick_vectors_384 ON brick_vectors "
                    "USING hnsw ((embedding::vector(384)) vector_cosine_ops) WHERE dim = 384"
                )
            )
            connection.execute(text("ANALYZE"))
        console.print(f"  built the HNSW index in {time.perf_counter() - index_started:.0f} s")
    registry.close()


def _copy_vectors(connection: Any, rows: list[tuple[Any, ...]]) -> None:
    from pgvector.psycopg import register_vector

    raw = connection.connection.dbapi_connection
    register_vector(raw)
    with (
        raw.cursor() as cursor,
        cursor.copy(
            "COPY brick_vectors (brick_id, kind, ordinal, text, model, dim, embedding) FROM STDIN WITH (FORMAT BINARY)"
        ) as copy,
    ):
        copy.set_types(["int4", "varchar", "int4", "text", "varchar", "int4", "vector"])
        for row in rows:
            copy.write_row(row)


def measure(url: str, texts: list[str], *, single: int, seconds: float, clients: int) -> dict[str, Any]:
    import httpx

    with httpx.Client(base_url=url, timeout=30) as client:
        for q in texts[:5]:  # warm-up: model, snapshot, connections
            client.post("/v1/search", json={"query": q, "k": 5}).raise_for_status()
        latencies, splits = [], []
        for i in range(single):
            started = time.perf_counter()
            response = client.post("/v1/search", json={"query": texts[i % len(texts)], "k": 5})
            latencies.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            splits.append(
                {p.split(";")[0]: float(p.split("dur=")[1]) for p in response.headers["server-timing"].split(", ")}
            )
    done = 0
    concurrent: list[float] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker(offset: int) -> None:
        nonlocal done
        with httpx.Client(base_url=url, timeout=30) as client:
            i = offset
            while time.monotonic() < stop:
                started = time.perf_counter()
                client.post("/v1/search", json={"query": texts[i % len(texts)], "k": 5}).raise_for_status()
                with lock:
                    concurrent.append((time.perf_counter() - started) * 1000)
                    done += 1
                i += clients

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    return {
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "embed": percentile([s["embed"] for s in splits], 50),
        "index": percentile([s["index"] for s in splits], 50),
        "rank": percentile([s["rank"] for s in splits], 50),
        "rps": done / elapsed,
        "c_p95": percentile(concurrent, 95),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--sqlite-max", type=int, default=10_000, help="largest size run on SQLite")
    parser.add_argument("--single", type=int, default=200, help="sequential queries per configuration")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of the concurrent phase")
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    console = Console(width=150)
    texts = queries()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    for backend in args.backends.split(","):
        for size in sizes:
            if backend == "sqlite" and size > args.sqlite_max:
                continue
            console.rule(f"{backend}, {size:,} bricks")
            with scratch_home("brickyard-latency-") as home, migrated_database(backend, home) as url:
                bulk_load(url, home, size, console)
                env = {"BRICKYARD_HOME": str(home), "BRICKYARD_DATABASE_URL": url}
                with live_server(env, log=home / "server.log") as server:
                    measured = measure(server, texts, single=args.single, seconds=args.seconds, clients=args.clients)
                    results.append((backend, size, measured))
            console.print(results[-1])
    table = Table(title="HTTP search latency (k=5), single client and 8 concurrent clients")
    for column in (
        "backend",
        "bricks",
        "p50 ms",
        "p95 ms",
        "embed ms",
        "index ms",
        "rank ms",
        f"{args.clients} clients req/s",
        f"{args.clients} clients p95 ms",
    ):
        table.add_column(column, justify="right")
    for backend, size, m in results:
        table.add_row(
            backend,
            f"{size:,}",
            f"{m['p50']:.1f}",
            f"{m['p95']:.1f}",
            f"{m['embed']:.1f}",
            f"{m['index']:.1f}",
            f"{m['rank']:.1f}",
            f"{m['rps']:.0f}",
            f"{m['c_p95']:.1f}",
        )
    console.print(table)
    console.print(
        "goals: SQLite 10k p50 <= 15 ms, p95 <= 40 ms; pgvector 100k p95 <= 60 ms. "
        "embed/index/rank: server-side medians."
    )


if __name__ == "__main__":
    main()
