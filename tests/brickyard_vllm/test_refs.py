"""The plugin's pure parts: reference grammar, cache keys, vLLM adapter ids."""

from __future__ import annotations

import pytest

from brickyard_vllm.refs import BrickRef, CompositionRef, adapter_key, lora_int_id, parse_reference

HEX = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sentiment", BrickRef("sentiment")),
        ("sentiment@3", BrickRef("sentiment", 3)),
        ("a.b_c-d@12", BrickRef("a.b_c-d", 12)),
        ("x" * 100, BrickRef("x" * 100)),
        (HEX, CompositionRef(HEX)),
        ("sentiment@2147483647", BrickRef("sentiment", 2**31 - 1)),
    ],
)
def test_parse_reference_accepts_the_registry_grammar(text: str, expected: object) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "@3",
        "sentiment@",
        "sentiment@0",
        "sentiment@03",
        "sentiment@-1",
        "sentiment@2147483648",
        "sentiment@1@2",
        "-leading-dash",
        ".hidden",
        "x" * 101,
        "has space",
        "../etc",
        "a/b",
    ],
)
def test_parse_reference_refuses_what_names_nothing(text: str) -> None:
    assert parse_reference(text) is None


def test_uppercase_hex_is_a_brick_name_not_a_composition() -> None:
    # Composition ids are lowercase; 64 uppercase hex characters are a valid brick name.
    assert parse_reference(HEX.upper()) == BrickRef(HEX.upper())


def test_adapter_key_ignores_listing_order_and_sees_every_change() -> None:
    files = [("adapter_config.json", "a" * 64), ("adapter_model.safetensors", "b" * 64)]
    key = adapter_key(files)
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)
    assert adapter_key(reversed(files)) == key
    assert adapter_key([files[0], ("adapter_model.safetensors", "c" * 64)]) != key
    assert adapter_key([files[0], ("renamed.safetensors", "b" * 64)]) != key
    assert adapter_key(files[:1]) != key


def test_lora_int_id_is_positive_31_bit_and_derived_from_the_key() -> None:
    assert lora_int_id("0" * 64) == 1
    assert lora_int_id("00000001" + "f" * 56) == 2
    assert lora_int_id("ffffffff" + "0" * 56) == 0xFFFFFFFF % (2**31 - 1) + 1 == 2
    assert lora_int_id("7ffffffe" + "0" * 56) == 2**31 - 1
    assert lora_int_id(HEX) == lora_int_id(HEX) == 0x01234567 + 1
