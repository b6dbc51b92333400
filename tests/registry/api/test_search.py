"""Search over HTTP with the real MiniLM model, on both backends: ranking for descriptions
and raw inputs, filters, min_score, paging, versions, PATCH, DELETE, parity, reindex."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from registry.db.models import BrickVectorRow, RetrievalStatsRow
from tests.conftest import brick_metadata, random_adapter, register_base, upload

CAPABILITIES = {
    "sentiment": (
        "Classify the sentiment of a product review as positive or negative.",
        ["I love this blender, it crushes ice in seconds!", "Broke after a week. Total waste of money."],
    ),
    "translate-ro-en": (
        "Translate customer emails from Romanian to English.",
        ["Bună ziua, comanda mea nu a ajuns încă.", "Vă rog să îmi trimiteți factura."],
    ),
    "sql": (
        "Write a SQL query that answers a question about a database table.",
        ["How many employees earn more than 50000 in the sales department?", "List the top 5 customers by revenue."],
    ),
    "summarize": (
        "Summarize a news article in one short sentence.",
        ["The city council voted on Tuesday to expand the bike lane network by 40 km over the next three years ..."],
    ),
    "math": (
        "Solve grade-school math word problems step by step.",
        ["Tom has 3 apples and buys 5 more. How many apples does he have?", "A train travels 60 km in 1.5 hours."],
    ),
}


def register_catalog(client: Any, *, tags: dict[str, list[str]] | None = None, base: str = "tiny-llama") -> None:
    for seed, (name, (description, examples)) in enumerate(CAPABILITIES.items()):
        config, weights = random_adapter(1000 + seed + (500 if base != "tiny-llama" else 0))
        meta = brick_metadata(
            name, base_model=base, description=description, examples=examples, tags=(tags or {}).get(name, [])
        )
        response = upload(client, metadata=meta, config=config, weights=weights)
        assert response.status_code == 201, response.text


def search(client: Any, query: str, **options: Any) -> list[dict[str, Any]]:
    response = client.post("/v1/search", json={"query": query, **options})
    assert response.status_code == 200, response.text
    assert {t.split(";")[0] for t in response.headers["server-timing"].split(", ")} == {"embed", "index", "rank"}
    return response.json()["hits"]


@pytest.fixture
def catalog(client: Any, llama_base: Path) -> Any:
    register_base(client, llama_base)
    register_catalog(client)
    return client


@pytest.mark.parametrize(
    ("query", "expected", "matched"),
    [
        ("is this customer review happy or unhappy?", "sentiment", "description"),
        ("convert Romanian messages into English", "translate-ro-en", "description"),
        ("generate database queries from natural language questions", "sql", "description"),
        ("Am primit produsul deteriorat, doresc o rambursare.", "translate-ro-en", "example"),
        ("The headphones sound amazing and the battery lasts forever.", "sentiment", "example"),
        ("Sara had 12 marbles and gave 4 to her brother. How many are left?", "math", "example"),
    ],
)
def test_right_brick_ranks_first(catalog: Any, query: str, expected: str, matched: str) -> None:
    hits = search(catalog, query, k=5)
    assert hits[0]["brick"]["name"] == expected, [(h["brick"]["name"], h["score"]) for h in hits]
    assert hits[0]["matched"] == matched
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    if matched == "example":
        assert hits[0]["text"] in CAPABILITIES[expected][1]
    else:
        assert hits[0]["text"] == CAPABILITIES[expected][0]


def test_k_offset_and_one_hit_per_brick(catalog: Any) -> None:
    everything = search(catalog, "a language task", k=100)
    names = [h["brick"]["name"] for h in everything]
    assert sorted(names) == sorted(CAPABILITIES)  # each brick exactly once, though it has several vectors
    assert [h["brick"]["name"] for h in search(catalog, "a language task", k=2)] == names[:2]
    assert [h["brick"]["name"] for h in search(catalog, "a language task", k=2, offset=2)] == names[2:4]


def test_filters_apply_before_ranking(catalog: Any, llama_base_single: Path) -> None:
    register_base(catalog, llama_base_single, name="other-llama")
    config, weights = random_adapter(77)
    meta = brick_metadata(
        "other-sentiment", base_model="other-llama", description="Classify the sentiment of a product review."
    )
    assert upload(catalog, metadata=meta, config=config, weights=weights).status_code == 201
    catalog.patch("/v1/bricks/sql/versions/1", json={"tags": ["code"]})
    catalog.patch("/v1/bricks/math/versions/1", json={"tags": ["code", "reasoning"]})

    query = "classify review sentiment"
    top = search(catalog, query, k=1)[0]["brick"]
    assert top["name"] in {"sentiment", "other-sentiment"}
    only_other = search(catalog, query, base_model="other-llama", k=5)
    assert [h["brick"]["name"] for h in only_other] == ["other-sentiment"]
    tiny = search(catalog, query, base_model="tiny-llama", k=5)
    assert len(tiny) == 5 and "other-sentiment" not in [h["brick"]["name"] for h in tiny]
    # a filter far from the query still yields k hits: the filter is not applied after a top-k cut
    coded = search(catalog, query, tags=["code"], k=5)
    assert sorted(h["brick"]["name"] for h in coded) == ["math", "sql"]
    assert [h["brick"]["name"] for h in search(catalog, query, tags=["code", "reasoning"])] == ["math"]
    assert search(catalog, query, tags=["nothing-has-this"]) == []
    missing = catalog.post("/v1/search", json={"query": query, "base_model": "nope"})
    assert missing.status_code == 404


def test_min_score(catalog: Any) -> None:
    hits = search(catalog, "classify review sentiment", k=5)
    threshold = (hits[0]["score"] + hits[1]["score"]) / 2
    kept = search(catalog, "classify review sentiment", k=5, min_score=threshold)
    assert [h["brick"]["name"] for h in kept] == [hits[0]["brick"]["name"]]


def test_latest_version_by_default(catalog: Any) -> None:
    config, weights = random_adapter(99)
    meta = brick_metadata("sentiment", description="Detect sarcasm in tweets.", examples=["Oh great, Monday again."])
    assert upload(catalog, metadata=meta, config=config, weights=weights).json()["version"] == 2
    hits = search(catalog, "classify the sentiment of a product review", k=5)
    versions = {(h["brick"]["name"], h["brick"]["version"]) for h in hits}
    assert ("sentiment", 1) not in versions and ("sentiment", 2) in versions
    every = search(catalog, "classify the sentiment of a product review", k=10, all_versions=True)
    assert (every[0]["brick"]["name"], every[0]["brick"]["version"]) == ("sentiment", 1)
    assert ("sentiment", 2) in {(h["brick"]["name"], h["brick"]["version"]) for h in every}


def test_patch_re_embeds(catalog: Any) -> None:
    query = "identify the language a sentence is written in"
    assert search(catalog, query, k=1)[0]["brick"]["name"] != "summarize"
    response = catalog.patch(
        "/v1/bricks/summarize/versions/1",
        json={"description": "Identify which language a sentence is written in.", "examples": ["Das ist gut."]},
    )
    assert response.status_code == 200
    top = search(catalog, query, k=1)[0]
    assert top["brick"]["name"] == "summarize"
    assert top["text"] == "Identify which language a sentence is written in."


def test_delete_removes_vectors(catalog: Any, registry: Any) -> None:
    def counts() -> tuple[int, int]:
        with registry.store.db.session() as session:
            vectors = session.scalar(select(func.count()).select_from(BrickVectorRow))
            examples = session.scalar(select(RetrievalStatsRow.example_count))
        return vectors, examples

    vectors, examples = counts()
    assert vectors == 5 + sum(len(e) for _, e in CAPABILITIES.values())
    assert catalog.delete("/v1/bricks/math/versions/1").status_code == 200
    assert counts() == (vectors - 3, examples - 2)
    assert "math" not in [h["brick"]["name"] for h in search(catalog, "solve a math word problem", k=10)]


def test_a_write_by_another_process_is_seen_by_the_next_search(catalog: Any, settings: Any) -> None:
    from fastapi.testclient import TestClient

    from registry.api.app import create_app
    from registry.service import Registry

    assert search(catalog, "Translate customer emails from Romanian to English.", k=1)[0]["brick"]["name"] == (
        "translate-ro-en"
    )
    other = Registry.open(settings)  # its own connections, as a second server process would have
    try:
        token, _ = other.tokens.create("other-admin", "admin", actor="tests")
        with TestClient(create_app(registry=other), headers={"Authorization": f"Bearer {token}"}) as second:
            meta = brick_metadata(
                "translate-ro-en-v2",
                description="Translate customer emails from Romanian to English, keeping the tone.",
                examples=["Bună ziua, aș dori să schimb adresa de livrare."],
            )
            config, weights = random_adapter(4242)
            assert upload(second, metadata=meta, config=config, weights=weights).status_code == 201
            assert second.delete("/v1/bricks/translate-ro-en/versions/1").status_code == 200
    finally:
        other.close()
    names = [h["brick"]["name"] for h in search(catalog, "Translate customer emails from Romanian to English.", k=5)]
    assert names[0] == "translate-ro-en-v2"
    assert "translate-ro-en" not in names


def test_document_frequencies_follow_every_write(catalog: Any, registry: Any) -> None:
    import numpy as np

    from registry.db.models import RetrievalDfRow
    from registry.search.lexical import count_documents

    def stored() -> dict[tuple[str, int], int]:
        with registry.store.db.session() as session:
            rows = session.execute(select(RetrievalDfRow.view, RetrievalDfRow.bucket, RetrievalDfRow.count)).all()
        return {(view, bucket): count for view, bucket, count in rows if count}  # zeros are kept for mirrors

    def recounted() -> dict[tuple[str, int], int]:
        texts = [t for _, description, examples in registry.store.all_brick_texts() for t in (description, *examples)]
        expected = {}
        for view, idx in count_documents(texts).items():
            buckets, counts = np.unique(idx, return_counts=True)
            expected.update({(view, int(b)): int(c) for b, c in zip(buckets, counts, strict=True)})
        return expected

    assert len(stored()) > 100
    assert stored() == recounted()
    mirrored = registry.index.doc_freqs(-1)
    assert {(v, int(b)): int(mirrored[v][b]) for v in mirrored for b in np.flatnonzero(mirrored[v])} == stored()
    assert catalog.delete("/v1/bricks/math/versions/1").status_code == 200
    assert stored() == recounted()
    patched = {"description": "Identify which language a sentence is written in.", "examples": ["Das ist gut."]}
    assert catalog.patch("/v1/bricks/summarize/versions/1", json=patched).status_code == 200
    assert stored() == recounted()
    registry.reindex()
    assert stored() == recounted()
    with registry.store.db.session() as session:
        from registry.search.index_rows import read_generation

        mirrored = registry.index.doc_freqs(read_generation(session))
    assert {(v, int(b)): int(mirrored[v][b]) for v in mirrored for b in np.flatnonzero(mirrored[v])} == stored()


BAD_SEARCHES = [
    {"query": ""},
    {"query": "   "},
    {"query": "x" * 4001},
    {"query": "x", "k": 0},
    {"query": "x", "k": 101},
    {"query": "x", "offset": -1},
    {"query": "x", "min_score": "nan"},
    {"query": "x", "extra": 1},
    {},
    {"query": "x", "tags": ["Bad Tag!"]},
]


@pytest.mark.parametrize("body", BAD_SEARCHES)
def test_bad_search_requests_are_422(client: Any, body: dict[str, Any]) -> None:
    response = client.post("/v1/search", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"


def test_search_on_an_empty_registry(client: Any) -> None:
    assert search(client, "anything at all") == []


def test_exact_and_index_agree_on_small_data(catalog: Any) -> None:
    for query in ("classify review sentiment", "Tom has 4 pears and eats one."):
        approximate = [h["brick"]["name"] for h in search(catalog, query, k=5)]
        exact = [h["brick"]["name"] for h in search(catalog, query, k=5, exact=True)]
        assert approximate == exact


def test_reindex_after_a_model_change(catalog: Any, registry: Any, settings: Any, tmp_path: Path) -> None:
    from registry.service import Registry

    changed = tmp_path / "minilm-copy"
    shutil.copytree(settings.embedding.resolved_model_path(), changed)
    (changed / "README.md").write_text("a retrained model would differ; any change gives a new identity\n")
    moved = settings.model_copy(update={"embedding": settings.embedding.model_copy(update={"model_path": changed})})
    other = Registry.open(moved)
    try:
        assert other.embedder.name != registry.embedder.name
        from registry.errors import ServiceUnavailable

        with pytest.raises(ServiceUnavailable) as caught:
            other.search({"query": "classify review sentiment"})
        assert "brickyard reindex" in str(caught.value)
        with pytest.raises(ServiceUnavailable):
            config, weights = random_adapter(4242)
            other.register_brick(brick_metadata("late"), config, io.BytesIO(weights))
        seen: list[tuple[int, int]] = []
        assert other.reindex(lambda done, total: seen.append((done, total))) == 5
        assert seen[-1] == (5, 5)
        hits = other.search({"query": "classify review sentiment"}).hits
        assert hits[0].brick.name == "sentiment"
        with other.store.db.session() as session:
            models = set(session.scalars(select(BrickVectorRow.model)))
        assert models == {other.embedder.name}
    finally:
        other.close()


def test_both_backends_rank_identically_on_exact_search(
    request: pytest.FixtureRequest, llama_base: Path, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from registry.api import create_app
    from registry.service import Registry
    from registry.settings import Settings
    from tests.conftest import _admin, _pg_url

    sqlite_db = tmp_path / "parity.db"
    shutil.copy(request.getfixturevalue("sqlite_template"), sqlite_db)
    server, template = request.getfixturevalue("pg_server_url"), request.getfixturevalue("pg_template")
    _admin(server, f"CREATE DATABASE parity TEMPLATE {template}")
    rankings = []
    try:
        for name, url in (("sqlite", f"sqlite:///{sqlite_db}"), ("postgresql", _pg_url(server, "parity"))):
            registry = Registry.open(Settings(home=tmp_path / name, database_url=url))
            token, _ = registry.tokens.create("admin", "admin", actor="tests")
            try:
                with TestClient(create_app(registry=registry), headers={"Authorization": f"Bearer {token}"}) as client:
                    register_base(client, llama_base)
                    register_catalog(client, tags={"sql": ["code"], "math": ["code"]})
                    per_query = []
                    for query in ("classify review sentiment", "Tom has 4 pears and eats one.", "a coding task"):
                        for options in ({}, {"tags": ["code"]}):
                            hits = search(client, query, k=5, exact=True, **options)
                            per_query.append([(h["brick"]["name"], round(h["score"], 4)) for h in hits])
                    rankings.append(per_query)
            finally:
                registry.close()
    finally:
        _admin(server, "DROP DATABASE IF EXISTS parity WITH (FORCE)")
    assert rankings[0] == rankings[1]
