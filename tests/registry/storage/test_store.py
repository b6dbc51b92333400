"""The SQL store on both backends: domain objects out, versions handed out safely."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from registry import domain
from registry.db.session import Database
from registry.errors import BaseModelExists, BaseModelNotFound, BrickExists, BrickNotFound, VersionExists
from registry.storage.store import Store


def base_draft(name: str = "base") -> domain.BaseModelDraft:
    return domain.BaseModelDraft(
        name=name,
        path="/models/base",
        description="",
        architecture="LlamaForCausalLM",
        dtype="BF16",
        parameter_count=1000,
        size_bytes=2000,
        fingerprint="f" * 64,
        linear_modules={"model.layers.0.self_attn.q_proj": domain.LinearShape(32, 32)},
        config={"model_type": "llama"},
    )


def brick_draft(name: str, seed: str, **extra: Any) -> domain.BrickDraft:
    fields: dict[str, Any] = {
        "name": name,
        "base_model": "base",
        "description": "d",
        "examples": ("e",),
        "tags": ("t",),
        "sha256": hashlib.sha256(seed.encode()).hexdigest(),
        "config_sha256": hashlib.sha256(b"config").hexdigest(),
        "size_bytes": 10,
        "config_size_bytes": 5,
        "rank": 4,
        "lora_alpha": 8.0,
        "use_rslora": False,
        "target_modules": ("q_proj",),
        "modules": ("model.layers.0.self_attn.q_proj",),
        "rank_pattern": {},
        "alpha_pattern": {},
        "license": None,
        "metrics": {},
    }
    fields.update(extra)
    return domain.BrickDraft(**fields)


@pytest.fixture
def store(database_url: str) -> Any:
    db = Database.from_url(database_url)
    yield Store(db)
    db.dispose()


def test_returns_domain_objects(store: Store) -> None:
    base = store.add_base_model(base_draft(), actor="ci")
    assert isinstance(base, domain.BaseModel)
    assert base.linear_modules["model.layers.0.self_attn.q_proj"] == domain.LinearShape(32, 32, False)
    assert base.created_by == "ci"
    assert base.created_at.tzinfo is not None
    brick = store.add_brick(brick_draft("b", "1"), actor="ci")
    assert isinstance(brick, domain.Brick)
    assert (brick.ref, brick.tags, brick.created_by) == ("b@1", ("t",), "ci")
    assert store.get_brick("b") == brick


def test_every_brick_write_raises_the_brick_generation(store: Store) -> None:
    """What the serving router's brick memory is keyed on (`registry.serve.routing`)."""
    store.add_base_model(base_draft())
    seen = [store.brick_generation()]
    store.add_brick(brick_draft("b", "1"))
    seen.append(store.brick_generation())
    store.update_brick("b", 1, domain.BrickPatch(tags=("u",)))
    seen.append(store.brick_generation())
    store.delete_brick("b", 1)
    seen.append(store.brick_generation())
    assert seen == sorted(set(seen)), seen  # strictly rising
    assert store.brick_generation() == seen[-1]  # reading changes nothing


def test_a_brick_write_by_another_process_raises_the_remembered_generation(store: Store, database_url: str) -> None:
    """The generation is remembered between commits (SQLite's change marker): a write through
    another engine (another server process) must still be seen on the next read."""
    store.add_base_model(base_draft())
    before = store.brick_generation()
    assert store.brick_generation() == before
    other = Database.from_url(database_url)
    try:
        Store(other).add_brick(brick_draft("b", "1"))
        assert store.brick_generation() > before
        after = store.brick_generation()
        Store(other).delete_brick("b", 1)
        assert store.brick_generation() > after
    finally:
        other.dispose()


def test_base_model_errors(store: Store) -> None:
    store.add_base_model(base_draft())
    with pytest.raises(BaseModelExists):
        store.add_base_model(base_draft())
    with pytest.raises(BaseModelNotFound):
        store.get_base_model("other")
    with pytest.raises(BaseModelNotFound):
        store.add_brick(brick_draft("b", "1", base_model="other"))


def test_duplicate_weights_and_versions(store: Store) -> None:
    store.add_base_model(base_draft())
    store.add_brick(brick_draft("b", "1", version=3))
    with pytest.raises(BrickExists) as caught:
        store.add_brick(brick_draft("c", "1"))
    assert caught.value.extra["existing"]["name"] == "b"
    with pytest.raises(VersionExists):
        store.add_brick(brick_draft("b", "2", version=3))
    assert store.add_brick(brick_draft("b", "3")).version == 4
    with pytest.raises(BrickNotFound):
        store.get_brick("b", 1)


def test_concurrent_registrations_get_unique_gap_free_versions(store: Store) -> None:
    store.add_base_model(base_draft())

    def register(i: int) -> int:
        return store.add_brick(brick_draft("same-name", f"weights-{i}")).version

    with ThreadPoolExecutor(max_workers=8) as pool:
        versions = sorted(pool.map(register, range(16)))
    assert versions == list(range(1, 17))


def test_concurrent_identical_weights_are_stored_once(store: Store) -> None:
    store.add_base_model(base_draft())

    def register(i: int) -> str:
        try:
            return store.add_brick(brick_draft(f"name-{i}", "identical")).ref
        except BrickExists:
            return "conflict"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(register, range(8)))
    assert sum(o != "conflict" for o in outcomes) == 1
    assert store.count_bricks() == 1
    assert store.referenced_blobs() == {hashlib.sha256(b"identical").hexdigest(), hashlib.sha256(b"config").hexdigest()}
