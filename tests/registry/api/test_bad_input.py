"""Every validation rule of brick registration, sent over HTTP: the status, the problem
body, and that nothing (no row, no blob, no staging file) was left behind."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from registry.db.models import BrickLexicalRow, BrickNameRow, BrickRow, BrickVectorRow
from tests.conftest import brick_metadata, register_base, stored_blobs, upload

PROBLEM = "application/problem+json"


def raw_safetensors(
    tensors: dict[str, tuple[str, list[int], bytes]], *, header_extra: dict[str, Any] | None = None
) -> bytes:
    """Build a safetensors file by hand (name -> (dtype, shape, bytes)), offsets in order."""
    header: dict[str, Any] = {}
    data = b""
    for name, (dtype, shape, payload) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    header.update(header_extra or {})
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def f32(*shape: int, value: float = 0.1) -> bytes:
    return np.full(shape, value, dtype="<f4").tobytes()


KEY = "base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{f}.weight"


def good_tensors(r: int = 4) -> dict[str, tuple[str, list[int], bytes]]:
    """A valid r-rank LoRA on q_proj (32x32) of both layers."""
    tensors = {}
    for layer in (0, 1):
        tensors[KEY.format(layer=layer, proj="q_proj", f="A")] = ("F32", [r, 32], f32(r, 32))
        tensors[KEY.format(layer=layer, proj="q_proj", f="B")] = ("F32", [32, r], f32(32, r))
    return tensors


def lora_config(**overrides: Any) -> bytes:
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj"],
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    config.update(overrides)
    return json.dumps(config).encode()


def assert_nothing_stored(registry: Any) -> None:
    with registry.store.db.session() as session:
        assert session.scalar(select(func.count()).select_from(BrickRow)) == 0
        assert session.scalar(select(func.count()).select_from(BrickNameRow)) == 0
        assert session.scalar(select(func.count()).select_from(BrickVectorRow)) == 0
        assert session.scalar(select(func.count()).select_from(BrickLexicalRow)) == 0
    assert stored_blobs(registry.settings.home) == []


def assert_problem(response: Any, status: int, code: str, *needles: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    assert body["type"].endswith("/" + code)
    assert body["title"] and body["detail"]
    text = " ".join([body["detail"], *body["errors"]])
    for needle in needles:
        assert needle in text, (needle, body)
    return body


@pytest.fixture
def ready(client: Any, llama_base: Path) -> Any:
    register_base(client, llama_base)
    return client


# -- not safetensors -------------------------------------------------------------------


def test_pickle_weights_are_415_with_conversion_hint(ready: Any, registry: Any) -> None:
    pickle_bytes = b"\x80\x02}q\x00(X\x05\x00\x00\x00lora_q\x01cnumpy\n"
    response = upload(ready, config=lora_config(), weights=pickle_bytes)
    assert_problem(response, 415, "unsupported-media-type", "pickle", "safetensors.torch.save_file")
    assert_nothing_stored(registry)


def test_torch_zip_checkpoint_renamed_safetensors_is_415(ready: Any, registry: Any) -> None:
    response = upload(ready, config=lora_config(), weights=b"PK\x03\x04" + b"\x00" * 100)
    assert_problem(response, 415, "unsupported-media-type", "zip", "safetensors")
    assert_nothing_stored(registry)


def test_empty_files_are_422(ready: Any, registry: Any) -> None:
    assert_problem(upload(ready, config=lora_config(), weights=b""), 422, "invalid-adapter", "the file is empty")
    assert_problem(
        upload(ready, config=b"", weights=raw_safetensors(good_tensors())), 422, "invalid-adapter", "not valid JSON"
    )
    both = assert_problem(upload(ready, config=b"", weights=b""), 422, "invalid-adapter", "empty", "not valid JSON")
    assert len(both["errors"]) == 2
    assert_nothing_stored(registry)


# -- malformed safetensors -------------------------------------------------------------


def _with_header(header: bytes, data: bytes = b"", claimed: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if claimed is None else claimed) + header + data


@pytest.mark.parametrize(
    ("weights", "needle"),
    [
        (_with_header(b'{"a": 1}', claimed=10_000), "the file has only"),
        (_with_header(b"this is not json" + b" " * 8), "not valid JSON"),
        (_with_header(b"[1, 2, 3]"), "not a JSON object"),
        (struct.pack("<Q", 100 * 1024 * 1024) + b"{}", "more than the limit"),
        (b"abc", "fewer than the 8-byte header length"),
    ],
    ids=["header-longer-than-file", "header-not-json", "header-not-object", "100MB-header-claim", "truncated"],
)
def test_malformed_headers_are_422(ready: Any, registry: Any, weights: bytes, needle: str) -> None:
    assert_problem(upload(ready, config=lora_config(), weights=weights), 422, "invalid-adapter", needle)
    assert_nothing_stored(registry)


def test_overlapping_and_out_of_range_offsets_are_422(ready: Any, registry: Any) -> None:
    a = KEY.format(layer=0, proj="q_proj", f="A")
    b = KEY.format(layer=0, proj="q_proj", f="B")
    data = f32(4, 32) + f32(32, 4)
    overlapping = {
        a: {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]},
        b: {"dtype": "F32", "shape": [32, 4], "data_offsets": [256, 768]},
    }
    response = upload(ready, config=lora_config(), weights=_with_header(json.dumps(overlapping).encode(), data))
    assert_problem(response, 422, "invalid-adapter", "overlaps the previous tensor")
    beyond = {
        a: {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]},
        b: {"dtype": "F32", "shape": [32, 4], "data_offsets": [512, 1024]},
    }
    response = upload(ready, config=lora_config(), weights=_with_header(json.dumps(beyond).encode(), data[:600]))
    assert_problem(response, 422, "invalid-adapter", "beyond the")
    assert_nothing_stored(registry)


def test_dtype_shape_not_matching_byte_length_is_422(ready: Any, registry: Any) -> None:
    a = KEY.format(layer=0, proj="q_proj", f="A")
    header = {a: {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 100]}}
    response = upload(ready, config=lora_config(), weights=_with_header(json.dumps(header).encode(), b"\x00" * 100))
    assert_problem(response, 422, "invalid-adapter", "needs 512 bytes but its offsets span 100")
    assert_nothing_stored(registry)


# -- unsupported configs ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (lora_config(peft_type="LOHA"), "peft_type is 'LOHA': a LoHa adapter"),
        (json.dumps({"r": 4, "lora_alpha": 8}).encode(), "not 'LORA'"),
        (lora_config(peft_type="IA3"), "an IA3 adapter"),
        (lora_config(target_parameters=["mlp.experts.gate_up_proj"]), "target_parameters"),
        (lora_config(bias="all"), "bias"),
        (lora_config(r=0), "r must be a positive integer"),
        (lora_config(r=-4), "r must be a positive integer"),
        (lora_config(lora_alpha="eight"), "lora_alpha"),
        (b"{not json", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'"just a string"', "not a JSON object"),
        (lora_config(target_modules="nothing_matches_this"), "matches no linear module"),
        (lora_config(target_modules="(unclosed"), "not a valid regular expression"),
        (lora_config(base_model_name_or_path="meta-llama/Llama-3-8B"), "base_model_name_or_path"),
    ],
    ids=[
        "loha", "no-peft-type", "ia3", "target-parameters", "bias", "r-zero", "r-negative", "alpha-string",
        "not-json", "deeply-nested", "not-object", "regex-matches-nothing", "bad-regex", "other-base",
    ],
)  # fmt: skip
def test_unsupported_or_invalid_configs_are_422(ready: Any, registry: Any, config: bytes, needle: str) -> None:
    response = upload(ready, config=config, weights=raw_safetensors(good_tensors()))
    assert_problem(response, 422, "invalid-adapter", needle)
    assert_nothing_stored(registry)


def test_base_model_alias_accepts_a_hub_name(client: Any, registry: Any, llama_base: Path) -> None:
    register_base(client, llama_base, aliases=["meta-llama/Llama-3-8B"])
    config = lora_config(base_model_name_or_path="meta-llama/Llama-3-8B")
    assert upload(client, config=config, weights=raw_safetensors(good_tensors())).status_code == 201


# -- weights that do not fit the base model --------------------------------------------


def test_non_linear_targets_are_refused(ready: Any, registry: Any) -> None:
    tensors = good_tensors()
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = ("F32", [4, 384], f32(4, 384))
    tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = ("F32", [32, 4], f32(32, 4))
    tensors["base_model.model.model.norm.lora_A.weight"] = ("F32", [4, 32], f32(4, 32))
    tensors["base_model.model.model.norm.lora_B.weight"] = ("F32", [32, 4], f32(32, 4))
    config = lora_config(target_modules=["q_proj", "norm", "embed_tokens"])
    response = upload(ready, config=config, weights=raw_safetensors(tensors))
    body = assert_problem(
        response,
        422,
        "invalid-adapter",
        "module 'model.norm': the base model's module is not a linear layer (nor an embedding)",
    )
    assert len(body["errors"]) == 1  # the embedding LoRA is accepted
    assert_nothing_stored(registry)


def test_shape_mismatches_are_listed_per_module(ready: Any, registry: Any) -> None:
    tensors = good_tensors()
    tensors[KEY.format(layer=0, proj="q_proj", f="A")] = ("F32", [4, 31], f32(4, 31))
    tensors[KEY.format(layer=1, proj="q_proj", f="B")] = ("F32", [16, 4], f32(16, 4))
    body = assert_problem(
        upload(ready, config=lora_config(), weights=raw_safetensors(tensors)),
        422,
        "invalid-adapter",
        "layers.0.self_attn.q_proj': lora_A [4, 31] and lora_B [32, 4] do not fit 32x32 at rank 4 "
        "(expected lora_A [4, 32], lora_B [32, 4])",
        "layers.1.self_attn.q_proj': lora_A [4, 32] and lora_B [16, 4] do not fit 32x32 at rank 4",
    )
    assert len(body["errors"]) == 2
    assert_nothing_stored(registry)


def test_rank_pattern_is_honoured_in_shape_checks(ready: Any, registry: Any) -> None:
    # rank_pattern says layer 1 has rank 8, but the weights are rank 4 everywhere
    config = lora_config(rank_pattern={r"layers\.1\.self_attn\.q_proj": 8})
    response = upload(ready, config=config, weights=raw_safetensors(good_tensors()))
    assert_problem(
        response,
        422,
        "invalid-adapter",
        "layers.1.self_attn.q_proj': lora_A [4, 32] and lora_B [32, 4] do not fit 32x32 at rank 8 "
        "(expected lora_A [8, 32], lora_B [32, 8])",
    )
    assert_nothing_stored(registry)
    # and weights that do follow the pattern are accepted
    tensors = good_tensors()
    tensors[KEY.format(layer=1, proj="q_proj", f="A")] = ("F32", [8, 32], f32(8, 32))
    tensors[KEY.format(layer=1, proj="q_proj", f="B")] = ("F32", [32, 8], f32(32, 8))
    assert upload(ready, config=config, weights=raw_safetensors(tensors)).status_code == 201


def test_missing_factor_and_integer_dtype_are_refused(ready: Any, registry: Any) -> None:
    tensors = good_tensors()
    del tensors[KEY.format(layer=1, proj="q_proj", f="B")]
    assert_problem(
        upload(ready, config=lora_config(), weights=raw_safetensors(tensors)), 422, "invalid-adapter", "no lora_B"
    )
    tensors = good_tensors()
    tensors[KEY.format(layer=0, proj="q_proj", f="A")] = ("I32", [4, 32], np.zeros((4, 32), "<i4").tobytes())
    assert_problem(
        upload(ready, config=lora_config(), weights=raw_safetensors(tensors)),
        422,
        "invalid-adapter",
        "not a float type",
    )
    assert_nothing_stored(registry)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_non_finite_weights_are_refused(ready: Any, registry: Any, bad: float, dtype: str) -> None:
    tensors = good_tensors()
    name = KEY.format(layer=1, proj="q_proj", f="B")
    values = np.full((32, 4), 0.1, dtype="<f4")
    values[3, 2] = bad
    if dtype == "F32":
        payload = values.tobytes()
    elif dtype == "F16":
        payload = values.astype("<f2").tobytes()
    else:  # bfloat16 = the high half of float32
        payload = (values.view("<u4") >> 16).astype("<u2").tobytes()
    tensors = {k: (dtype, s, _convert(p, dtype)) for k, (_, s, p) in tensors.items()}
    tensors[name] = (dtype, [32, 4], payload)
    response = upload(ready, config=lora_config(), weights=raw_safetensors(tensors))
    assert_problem(response, 422, "invalid-adapter", f"{name!r} contains NaN or Inf")
    assert_nothing_stored(registry)


def _convert(f32_bytes: bytes, dtype: str) -> bytes:
    values = np.frombuffer(f32_bytes, "<f4")
    if dtype == "F32":
        return f32_bytes
    if dtype == "F16":
        return values.astype("<f2").tobytes()
    return (values.view("<u4") >> 16).astype("<u2").tobytes()


# -- metadata and base model -----------------------------------------------------------


def test_unknown_base_model_is_422_in_the_error_list(ready: Any, registry: Any) -> None:
    response = upload(
        ready,
        metadata=brick_metadata(base_model="no-such-model"),
        config=lora_config(),
        weights=raw_safetensors(good_tensors()),
    )
    assert_problem(response, 422, "invalid-input", "metadata.base_model: no base model named 'no-such-model'")
    assert_nothing_stored(registry)


def test_every_problem_is_reported_at_once(ready: Any, registry: Any) -> None:
    tensors = good_tensors()
    tensors[KEY.format(layer=0, proj="q_proj", f="A")] = ("F32", [4, 31], f32(4, 31))
    metadata = {"name": "../escape", "base_model": "tiny-llama", "description": "", "tags": ["Not A Tag!"]}
    config = lora_config(base_model_name_or_path="other/model")
    response = upload(ready, metadata=metadata, config=config, weights=raw_safetensors(tensors))
    needles = ("metadata.name", "metadata.description", "metadata.tags.0", "other/model", "[4, 31]")
    body = assert_problem(response, 422, "invalid-adapter", *needles)
    assert len(body["errors"]) == 5
    assert_nothing_stored(registry)


@pytest.mark.parametrize(
    "metadata",
    [
        "not json at all",
        "[]",
        json.dumps(brick_metadata(name="a/b")),
        json.dumps(brick_metadata(name="x" * 10_000)),
        json.dumps(brick_metadata(name="bаse")),  # Cyrillic a
        json.dumps(brick_metadata(name="nul\u0000byte")),
        json.dumps(brick_metadata(version=0)),
        json.dumps(brick_metadata(version=2**63)),  # past int64 (2**40 is a valid version since 0006)
        json.dumps(brick_metadata(unexpected="field")),
        json.dumps({**brick_metadata(), "metrics": {"acc": "high"}}),
        '{"name": "a", "metrics": {"acc": NaN}}',
    ],
    ids=[
        "not-json", "not-object", "slash", "10k-name", "lookalike", "nul", "version-0", "version-huge",
        "extra-field", "metric-string", "metric-nan",
    ],
)  # fmt: skip
def test_bad_metadata_is_422(ready: Any, registry: Any, metadata: str) -> None:
    response = upload(ready, metadata=metadata, config=lora_config(), weights=raw_safetensors(good_tensors()))
    assert_problem(response, 422, "invalid-input")
    assert_nothing_stored(registry)


def test_missing_parts_are_422(ready: Any, registry: Any) -> None:
    response = ready.post("/v1/bricks", data={"metadata": json.dumps(brick_metadata())})
    body = assert_problem(response, 422, "invalid-input")
    assert any("adapter_config" in e for e in body["errors"])
    assert any("adapter_weights" in e for e in body["errors"])
    assert_nothing_stored(registry)


# -- size limits -----------------------------------------------------------------------


@pytest.fixture
def small_client(settings: Any, llama_base: Path) -> Any:
    from fastapi.testclient import TestClient

    from registry.api import create_app
    from registry.service import Registry
    from registry.settings import LimitSettings

    small = settings.model_copy(
        update={"limits": LimitSettings(max_adapter_bytes=4096, max_config_bytes=512, max_metadata_bytes=2048)}
    )
    registry = Registry.open(small)
    token, _ = registry.tokens.create("admin", "admin", actor="tests")
    with TestClient(
        create_app(registry=registry), raise_server_exceptions=False, headers={"Authorization": f"Bearer {token}"}
    ) as test_client:
        register_base(test_client, llama_base)
        yield test_client, registry
    registry.close()


def test_size_limits_are_413(small_client: Any) -> None:
    client, registry = small_client
    big_weights = raw_safetensors(good_tensors(r=8))  # > 4096 bytes
    assert len(big_weights) > 4096
    assert_problem(upload(client, config=lora_config(), weights=big_weights), 413, "payload-too-large", "4096")
    padded_config = lora_config(padding="x" * 600)
    assert_problem(
        upload(client, config=padded_config, weights=raw_safetensors(good_tensors(r=1))), 413, "payload-too-large"
    )
    big_meta = json.dumps(brick_metadata(description="d" * 3000))
    assert_problem(upload(client, metadata=big_meta, config=lora_config(), weights=b"x"), 413, "payload-too-large")
    assert_nothing_stored(registry)


def test_body_over_the_total_limit_is_cut_off_while_streaming(small_client: Any) -> None:
    client, registry = small_client

    def chunks() -> Any:
        for _ in range(10_000):  # 10 MB, far above the ~70 kB total limit
            yield b"x" * 1024

    response = client.post(
        "/v1/bricks",
        content=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=zzz"},
    )
    assert_problem(response, 413, "payload-too-large")
    declared = client.post(
        "/v1/bricks",
        content=b"",
        headers={"Content-Type": "multipart/form-data; boundary=zzz", "Content-Length": "999999999"},
    )
    assert_problem(declared, 413, "payload-too-large", "999999999")
    assert_nothing_stored(registry)


# -- module patterns (issue 15, items 4-5) ---------------------------------------------


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_back_reference_patterns_are_422_in_the_form_peft_uses(ready: Any, registry: Any, field: str) -> None:
    # (q)(_)\2 compiles alone; inside PEFT's (.*\.)?({key})$ its \2 names an open group.
    config = lora_config(**{field: {r"(q)(_)\2": 4}})
    response = upload(ready, config=config, weights=raw_safetensors(good_tensors()))
    assert_problem(response, 422, "invalid-adapter", "not a valid regular expression as PEFT uses it")
    assert_nothing_stored(registry)


def test_a_pattern_that_times_out_is_422(ready: Any, registry: Any) -> None:
    config = lora_config(alpha_pattern={r"(\w|[a-z_.0-9]|.)*\d\d\d\d": 4})
    response = upload(ready, config=config, weights=raw_safetensors(good_tensors()))
    assert_problem(response, 422, "invalid-adapter", "takes more than")
    assert_nothing_stored(registry)


@pytest.fixture
def budget_client(settings: Any, llama_base: Path) -> Any:
    from fastapi.testclient import TestClient

    from registry.api import create_app
    from registry.service import Registry
    from registry.settings import LimitSettings

    tight = settings.model_copy(update={"limits": LimitSettings(pattern_seconds=0.1)})
    registry = Registry.open(tight)
    token, _ = registry.tokens.create("admin", "admin", actor="tests")
    with TestClient(
        create_app(registry=registry), raise_server_exceptions=False, headers={"Authorization": f"Bearer {token}"}
    ) as test_client:
        register_base(test_client, llama_base)
        yield test_client, registry
    registry.close()


def test_many_slow_patterns_are_bounded_in_total_time(budget_client: Any) -> None:
    import time

    client, registry = budget_client
    # Each key backtracks a little on every module name, far under the 50 ms limit of one
    # match; 1000 of them take about 0.7 s here (minutes with slower keys and more modules),
    # over this server's 0.1 s budget.
    keys = {rf"(\w|\w)*\d\d{i}X": 4 for i in range(1000)}
    started = time.monotonic()
    response = upload(client, config=lora_config(alpha_pattern=keys), weights=raw_safetensors(good_tensors()))
    elapsed = time.monotonic() - started
    assert_problem(response, 422, "invalid-adapter", "time budget")
    assert elapsed < 15, elapsed
    assert_nothing_stored(registry)


def test_hostile_families_of_the_fuzzer_are_refused_promptly(
    client: Any, registry: Any, llama_base: Path, tmp_path: Path
) -> None:
    from bench.fuzz import probe_hostile_families

    register_base(client, llama_base)
    scratch = tmp_path / "hostile"
    scratch.mkdir()
    secret = registry.settings.admin_token_file
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("bky_pretend_admin_secret\n")
    report = probe_hostile_families(client, llama_base, scratch, secret)
    assert not report.findings, report.render()
    assert report.cases >= 20
    assert 4 <= report.statuses[201] <= 5  # the four large versions, and 1024 + 1024 keys when within the budget


# -- a delta that changes nothing --------------------------------------------------------


def test_untrained_adapter_with_zero_b_is_refused(ready: Any, registry: Any) -> None:
    tensors = good_tensors()
    for layer in (0, 1):
        tensors[KEY.format(layer=layer, proj="q_proj", f="B")] = ("F32", [32, 4], f32(32, 4, value=0.0))
    response = upload(ready, config=lora_config(), weights=raw_safetensors(tensors))
    assert_problem(response, 422, "invalid-adapter", "changes nothing", "exactly zero", "saved before training")
    assert_nothing_stored(registry)


def test_negligible_delta_is_refused_and_a_small_one_registers(ready: Any, registry: Any, llama_base: Path) -> None:
    from safetensors.numpy import load_file

    from composer import NEGLIGIBLE_DELTA

    base = load_file(str(llama_base / "model.safetensors")) if (llama_base / "model.safetensors").exists() else {}
    if not base:
        for shard in sorted(llama_base.glob("model-*.safetensors")):
            base.update(load_file(str(shard)))
    # Every entry of s*B@A is s * r * a * b for constant factors a, b (s = alpha / r = 2).
    rms_q = min(
        float(np.sqrt(np.mean(base[f"model.layers.{layer}.self_attn.q_proj.weight"].astype("f8") ** 2)))
        for layer in (0, 1)
    )
    a = 0.1

    def with_b(value: float) -> bytes:
        tensors = good_tensors()
        for layer in (0, 1):
            tensors[KEY.format(layer=layer, proj="q_proj", f="B")] = ("F32", [32, 4], f32(32, 4, value=value))
        return raw_safetensors(tensors)

    below = 0.1 * NEGLIGIBLE_DELTA * rms_q / (2 * 4 * a)
    response = upload(ready, config=lora_config(), weights=with_b(below))
    assert_problem(response, 422, "invalid-adapter", "changes nothing", "negligible")
    assert_nothing_stored(registry)
    above = 100 * NEGLIGIBLE_DELTA * rms_q / (2 * 4 * a)
    assert upload(ready, config=lora_config(), weights=with_b(above)).status_code == 201
