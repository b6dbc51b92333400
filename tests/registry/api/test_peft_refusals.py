"""Over HTTP, every adapter the registry still refuses gets one line saying what it is, why
it cannot be merged and what to do, before anything is stored; what the composer would
refuse at compose time (DoRA without magnitudes, a resized vocabulary, a tied head's copy)
is refused at registration; a saved ``base_layer.weight`` that differs from the base fails
its composition naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.composer.helpers import PREFIX
from tests.composer.zoo import ARCHS, make_adapter, make_base
from tests.conftest import brick_metadata, register_base, stored_blobs, upload, wait_ready

WEIGHTS_FILE = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refusals-http")
    llama = make_base(ARCHS["llama"], root / "llama")
    return {
        "llama": llama,
        "gpt2": make_base(ARCHS["gpt2"], root / "gpt2"),
        "plain": make_adapter(llama, root / "plain", seed=1, r=2, lora_alpha=4, target_modules=["q_proj"]),
        "dora": make_adapter(
            llama, root / "dora", seed=2, r=2, lora_alpha=4, use_dora=True, target_modules="all-linear"
        ),
        "saved": make_adapter(
            llama, root / "saved", seed=3, r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]
        ),
        "embedding": make_adapter(
            llama, root / "embedding", seed=4, r=2, lora_alpha=4, target_modules=["embed_tokens"]
        ),
    }


@pytest.fixture
def llama_client(client: Any, zoo: dict[str, Path]) -> Any:
    register_base(client, zoo["llama"], name="tiny-llama")
    return client


def _edited(source: Path, target: Path, *, config: dict[str, Any] | None = None, tensors: Any = None) -> Path:
    """A copy of adapter ``source`` with config keys changed and/or its tensors rewritten."""
    shutil.copytree(source, target)
    if config is not None:
        data = json.loads((source / "adapter_config.json").read_text()) | config
        (target / "adapter_config.json").write_text(json.dumps(data))
    if tensors is not None:
        save_file(tensors(load_file(str(source / WEIGHTS_FILE))), str(target / WEIGHTS_FILE))
    return target


def _refusal(client: Any, adapter: Path, base_model: str = "tiny-llama") -> list[str]:
    before = stored_blobs(client.app.state.registry.settings.home)
    response = upload(client, adapter, metadata=brick_metadata("refused", base_model=base_model))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert stored_blobs(client.app.state.registry.settings.home) == before  # nothing half-written
    errors: list[str] = response.json()["errors"]
    return errors


@pytest.mark.parametrize(
    ("changes", "what", "advice"),
    [
        ({"peft_type": "LOHA"}, "a LoHa adapter", "merge_and_unload"),
        ({"peft_type": "LOKR"}, "a LoKr adapter", "merge_and_unload"),
        ({"peft_type": "IA3"}, "rescales activations", "merge_and_unload"),
        ({"peft_type": "PROMPT_TUNING"}, "virtual tokens", "use it unmerged with PEFT"),
        ({"bias": "all"}, "trains the base model's biases", "retrain with bias='none'"),
        ({"lora_bias": True}, "trained bias", "retrain with lora_bias=False"),
        (
            {"target_parameters": ["mlp.experts.gate_up_proj"]},
            "select no parameter of the base model",
            "target_modules",
        ),
        ({"trainable_token_indices": [1, 2]}, "single embedding rows", "modules_to_save"),
        ({"alora_invocation_tokens": [5]}, "per token", "unmerged"),
        ({"layer_replication": [[0, 2]]}, "layer layout", "merge_and_unload"),
    ],
)
def test_each_refused_adapter_kind_is_one_line_saying_what_why_and_what_to_do(
    llama_client: Any, zoo: dict[str, Path], tmp_path: Path, changes: dict[str, Any], what: str, advice: str
) -> None:
    adapter = _edited(zoo["plain"], tmp_path / "refused", config=changes)
    (problem,) = _refusal(llama_client, adapter)
    assert what in problem and advice in problem, problem


def test_dora_without_magnitudes_is_refused_at_registration_in_one_line(
    llama_client: Any, zoo: dict[str, Path], tmp_path: Path
) -> None:
    adapter = _edited(
        zoo["dora"], tmp_path / "no-magnitudes", tensors=lambda t: {k: v for k, v in t.items() if "magnitude" not in k}
    )
    (problem,) = _refusal(llama_client, adapter)
    assert problem.startswith("adapter_weights: ") and "no lora_magnitude_vector for 14 of its modules" in problem


def test_a_magnitude_with_use_dora_off_and_a_wrong_magnitude_shape_are_named(
    llama_client: Any, zoo: dict[str, Path], tmp_path: Path
) -> None:
    off = _edited(zoo["dora"], tmp_path / "off", config={"use_dora": False})
    (problem,) = _refusal(llama_client, off)
    assert "magnitude vectors for 14 modules" in problem and "use_dora is not set" in problem

    def shorten(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        name = next(k for k in tensors if "layers.0.self_attn.q_proj.lora_magnitude_vector" in k)
        return tensors | {name: tensors[name][:10]}

    (problem,) = _refusal(llama_client, _edited(zoo["dora"], tmp_path / "short", tensors=shorten))
    assert "layers.0.self_attn.q_proj" in problem and "expected a float vector of 64" in problem


def test_a_resized_vocabulary_is_refused_at_registration_saying_so(
    llama_client: Any, zoo: dict[str, Path], tmp_path: Path
) -> None:
    def grow(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        head = tensors[f"{PREFIX}lm_head.weight"]
        return tensors | {f"{PREFIX}lm_head.weight": torch.cat([head, head[:2]])}

    (problem,) = _refusal(llama_client, _edited(zoo["saved"], tmp_path / "resized", tensors=grow))
    assert "lm_head" in problem and "vocabulary was resized" in problem and "130 rows, the base 128" in problem


def test_a_saved_copy_of_a_tied_head_is_refused_at_registration(
    client: Any, zoo: dict[str, Path], tmp_path: Path
) -> None:
    register_base(client, zoo["gpt2"], name="tiny-gpt2")
    adapter = tmp_path / "head"
    adapter.mkdir()
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 2,
        "target_modules": ["c_attn"],
        "modules_to_save": ["lm_head"],
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    save_file({f"{PREFIX}lm_head.weight": torch.zeros(128, 64)}, str(adapter / WEIGHTS_FILE))
    (problem,) = _refusal(client, adapter, base_model="tiny-gpt2")
    assert "tied to the embeddings" in problem and "tie_word_embeddings=false" in problem


def test_embedding_lora_and_saved_copies_register_with_their_modules(llama_client: Any, zoo: dict[str, Path]) -> None:
    embedding = upload(llama_client, zoo["embedding"], metadata=brick_metadata("emb"))
    assert embedding.status_code == 201, embedding.text
    assert embedding.json()["target_modules"] == ["embed_tokens"] and embedding.json()["module_count"] == 1
    saved = upload(llama_client, zoo["saved"], metadata=brick_metadata("saved"))
    assert saved.status_code == 201, saved.text
    # q_proj of 2 layers and the saved lm_head
    assert saved.json()["target_modules"] == ["lm_head", "q_proj"] and saved.json()["module_count"] == 3


def test_a_differing_saved_base_layer_weight_fails_the_composition_naming_it(
    llama_client: Any, zoo: dict[str, Path], tmp_path: Path
) -> None:
    def nudge(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        name = f"{PREFIX}model.embed_tokens.base_layer.weight"
        changed = tensors[name].clone()
        changed[3, 5] += 1.0
        return tensors | {name: changed}

    adapter = _edited(zoo["embedding"], tmp_path / "other-base", tensors=nudge)
    assert upload(llama_client, adapter, metadata=brick_metadata("other-base")).status_code == 201
    request = {"base_model": "tiny-llama", "bricks": [{"name": "other-base"}]}
    response = llama_client.post("/v1/compositions", json=request)
    assert response.status_code == 202, response.text
    done = wait_ready(llama_client, response.json()["id"])
    assert done["status"] == "failed"
    assert "base_layer.weight" in done["error"] and "differs from the base model" in done["error"]
