"""The pure parts of the Hub mapping: repository ids, commit ids, the adapter config
rewrite and model cards (the routes are tested with real clients in api/test_hub.py)."""

from __future__ import annotations

import hashlib
import json

import pytest

from registry.hub import (
    EntryNotFound,
    HubFile,
    RepoNotFound,
    Snapshot,
    adapter_config_for_hub,
    commit_id,
    model_card,
    parse_repo_id,
)


def test_repo_ids_name_a_namespace_and_one_name() -> None:
    assert parse_repo_id("bricks/sentiment") == ("bricks", "sentiment")
    assert parse_repo_id("compositions/" + "a" * 64) == ("compositions", "a" * 64)
    assert parse_repo_id("base-models/tiny-llama") == ("base-models", "tiny-llama")
    for bad in ("bricks", "bricks/", "models/x", "bricks/a/b", "/x"):
        with pytest.raises(RepoNotFound):
            parse_repo_id(bad)


def _file(path: str, content: bytes) -> HubFile:
    return HubFile(path, len(content), hashlib.sha256(content).hexdigest(), content=content)


def test_commit_ids_follow_content_not_order() -> None:
    a, b = _file("a.json", b"{}"), _file("b.safetensors", b"weights")
    first = commit_id("bricks/x", [a, b])
    assert len(first) == 40 and int(first, 16) >= 0
    assert commit_id("bricks/x", [b, a]) == first
    assert commit_id("bricks/x", [a, _file("b.safetensors", b"weightz")]) != first
    assert commit_id("bricks/x", [a, _file("c.safetensors", b"weights")]) != first  # a rename is a change
    assert commit_id("bricks/y", [a, b]) != first


def test_adapter_config_names_the_base_repository_and_keeps_the_rest() -> None:
    stored = json.dumps({"peft_type": "LORA", "r": 4, "base_model_name_or_path": "/srv/models/llama"}).encode()
    served = json.loads(adapter_config_for_hub(stored, "tiny-llama"))
    assert served == {"peft_type": "LORA", "r": 4, "base_model_name_or_path": "base-models/tiny-llama"}
    missing = json.loads(adapter_config_for_hub(b'{"r": 8}', "b"))
    assert missing == {"r": 8, "base_model_name_or_path": "base-models/b"}


def test_model_card_front_matter_is_yaml_the_hub_reads() -> None:
    from huggingface_hub import ModelCard

    front = {
        "library_name": "peft",
        "base_model": "base-models/tiny-llama",
        "base_model_relation": "adapter",
        "license": None,  # left out
        "tags": ["brickyard", 'quote " and: colon'],
    }
    card = ModelCard(model_card(front, "# Title\n\nText: with a colon.").decode())
    assert card.data.base_model == "base-models/tiny-llama"
    assert card.data["base_model_relation"] == "adapter"
    assert card.data.tags == ["brickyard", 'quote " and: colon']
    assert card.data.license is None
    assert card.text.strip() == "# Title\n\nText: with a colon."


def test_a_missing_file_is_entry_not_found() -> None:
    from datetime import UTC, datetime

    from registry.hub import Listing

    now = datetime.now(UTC)
    listing = Listing("bricks/x", "peft", (), {}, now, now, "")
    files = (_file("README.md", b"# x"),)
    snapshot = Snapshot(listing, commit_id("bricks/x", files), files)
    assert snapshot.file("README.md").size == 3
    with pytest.raises(EntryNotFound):
        snapshot.file("adapter_model.safetensors")
