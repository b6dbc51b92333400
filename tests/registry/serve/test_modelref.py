"""The ``model`` grammar (pure) and the OpenAI request options."""

from __future__ import annotations

import pytest

from registry.errors import InvalidInput
from registry.serve.chat import render_plain_chat
from registry.serve.gateway import parse_request
from registry.serve.modelref import ModelRef, parse_model
from registry.serve.protocol import ChatRequest, CompletionRequest


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("tiny-llama", ModelRef("name", "tiny-llama")),
        ("sentiment@3", ModelRef("brick", "sentiment", 3)),
        ("g" * 64, ModelRef("name", "g" * 64)),  # not hex: a name
        ("0123456789abcdef" * 4, ModelRef("composition", "0123456789abcdef" * 4)),
        ("auto", ModelRef("auto", None)),
        ("auto:tiny-llama", ModelRef("auto", "tiny-llama")),
    ],
)
def test_model_grammar(model: str, expected: ModelRef) -> None:
    assert parse_model(model) == expected


@pytest.mark.parametrize("model", ["", "a b", "brick@0", "brick@v1", "auto:", "auto:a b", "x@1@2", "-lead"])
def test_models_outside_the_grammar_are_invalid_input(model: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_model(model)
    assert "auto:<base>" in caught.value.errors[0]


def test_routing_options_come_nested_or_at_the_top_level() -> None:
    nested = parse_request(CompletionRequest, {"model": "auto", "prompt": "hi", "brickyard": {"k": 2}})
    top = parse_request(CompletionRequest, {"model": "auto", "prompt": "hi", "k": 2, "min_score": 1.5})
    assert nested.brickyard.k == 2 and top.brickyard.k == 2 and top.brickyard.min_score == 1.5


def test_bad_fields_name_the_parameter() -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_request(CompletionRequest, {"model": "m", "prompt": "hi", "max_tokens": -1})
    assert caught.value.extra["param"] == "max_tokens"
    with pytest.raises(InvalidInput):
        parse_request(CompletionRequest, {"model": "m", "prompt": "hi", "brickyard": {"nonsense": 1}})


def test_chat_query_is_the_last_user_message_and_plain_rendering() -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
                {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}]  # fmt: skip
    request = parse_request(ChatRequest, {"model": "auto", "messages": messages})
    assert request.query == "three"
    assert render_plain_chat(messages[:2]) == "system: be brief\nuser: one\nassistant:"
