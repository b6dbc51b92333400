"""Brickyard's OpenAI routes with ``serve.engine = vllm``: the official ``openai`` client against
the Brickyard server, which forwards to the session's vLLM server. Answers are compared with
vLLM asked directly, with the embedded engine (run here on the same files) and with
transformers + PEFT."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest

from tests.vllm.conftest import BASE, NEW_TOKENS, Stack, greedy_reference

# Text, as OpenAI clients send: through the gateway, vLLM's answer to a prompt of token ids
# starts with the prompt's text (seen with vLLM 0.32; asked directly it does not).
PROMPT = "the quick brown fox"


def gateway(stack: Stack) -> openai.OpenAI:
    client: openai.OpenAI = stack.openai()
    return client


def through_gateway(stack: Stack, model: str, **extra: Any) -> Any:
    body = {"prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, **extra}
    return gateway(stack).completions.create(model=model, **body)


def vllm_direct(stack: Stack, model: str, prompt: str | list[int] = PROMPT) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0}
    import httpx

    response = httpx.post(f"{stack.vllm_url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def embedded(base: Path, adapter: Path | None, key: str | None, tmp: Path, prompt: str | list[int] = PROMPT) -> str:
    """The embedded engine's greedy text on the same files."""
    from registry.serve.embedded import EmbeddedEngine
    from registry.serve.engine import Generation, Piece
    from registry.serve.routing import Adapter, Target
    from registry.settings import ServeSettings

    target = Target(SimpleNamespace(path=str(base), name=BASE), Adapter(key, adapter) if adapter and key else None)  # type: ignore[arg-type]
    generation = Generation(target, prompt, None, NEW_TOKENS, 0.0, 1.0, None, [], 1)

    async def run() -> str:
        engine = EmbeddedEngine(ServeSettings(), log_path=tmp / "engine.log")
        try:
            return "".join([e.text async for e in engine.generate(generation) if isinstance(e, Piece)])
        finally:
            await engine.aclose()

    return asyncio.run(run())


def reference_text(base: Path, adapter: Path | None) -> str:
    """transformers + PEFT greedy tokens, cut at EOS (vLLM and the gateway stop there), as text."""
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(base)
    tokens = greedy_reference(base, adapter, prompt=list(tokenizer(PROMPT)["input_ids"]))
    if 1 in tokens:  # the tiny models' eos_token_id
        tokens = tokens[: tokens.index(1)]
    return str(tokenizer.decode(tokens, skip_special_tokens=True))


def test_gateway_equals_vllm_direct_embedded_and_reference(stack: Stack, tmp_path: Path) -> None:
    cases = [(BASE, str(stack.base), None, None), ("alpha", "alpha@1", stack.adapters["alpha"], "alpha@1"),
             ("beta@1", "beta@1", stack.adapters["beta"], "beta@1")]  # fmt: skip
    for model, direct, adapter, key in cases:
        answer = through_gateway(stack, model)
        text = answer.choices[0].text
        assert text == vllm_direct(stack, direct), model
        # vLLM leaves out a character cut off by the last token, which a full decode (and the
        # embedded engine's final flush) renders as U+FFFD: compare without it.
        reference = reference_text(stack.base, adapter).removesuffix("\ufffd")
        assert text.removesuffix("\ufffd") == reference, model
        assert embedded(stack.base, adapter, key, tmp_path).removesuffix("\ufffd") == reference, model
    assert through_gateway(stack, "alpha").brickyard["bricks"][0]["version"] == 1  # type: ignore[attr-defined]


def test_streaming_through_the_gateway(stack: Stack) -> None:
    text = "test brick c0"
    whole = through_gateway(stack, "c0", prompt=text).choices[0].text
    assert whole == vllm_direct(stack, "c0@1", text)
    with gateway(stack).completions.create(
        model="c0", prompt=text, max_tokens=NEW_TOKENS, temperature=0, stream=True
    ) as stream:
        chunks = list(stream)
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole
    # vLLM's chunks are relayed as bytes: still the model asked for, one id, ``brickyard`` first.
    assert {chunk.model for chunk in chunks} == {"c0"} and len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].brickyard["bricks"][0]["name"] == "c0"  # type: ignore[attr-defined]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # A chat on this base (no chat template) reaches vLLM as a plain prompt: chat chunks still.
    with gateway(stack).chat.completions.create(
        model="c0", messages=[{"role": "user", "content": text}], max_tokens=NEW_TOKENS, temperature=0, stream=True
    ) as chat:
        pieces = list(chat)
    assert {piece.object for piece in pieces} == {"chat.completion.chunk"} and {p.model for p in pieces} == {"c0"}
    assert "".join(piece.choices[0].delta.content or "" for piece in pieces)


def test_auto_routing_and_a_composition_through_vllm(stack: Stack, tmp_path: Path) -> None:
    options = {"bricks": ["c1", "c2"], "k": 2, "min_score": -1e9}
    question = "test brick c1"
    answer = through_gateway(stack, f"auto:{BASE}", prompt=question, extra_body={"brickyard": options})
    used = answer.brickyard
    assert sorted(b["name"] for b in used["bricks"]) == ["c1", "c2"] and used["recipe_id"]
    directory = _composition_dir(stack, used["recipe_id"])
    text = answer.choices[0].text
    assert text == vllm_direct(stack, used["recipe_id"], question)
    assert text == embedded(stack.base, directory, used["recipe_id"], tmp_path, question)
    # a composition requested by id
    body = {"base_model": BASE, "bricks": [{"name": "alpha", "weight": 0.7}, {"name": "beta", "weight": -0.4}],
            "output": "adapter"}  # fmt: skip
    composition_id = stack.brickyard.post("/v1/compositions", json=body).json()["id"]
    _composition_dir(stack, composition_id)
    by_id = through_gateway(stack, composition_id).choices[0].text
    assert by_id == embedded(stack.base, _composition_dir(stack, composition_id), composition_id, tmp_path)


def _composition_dir(stack: Stack, composition_id: str) -> Path:
    deadline = time.monotonic() + 300
    while (status := stack.brickyard.get(f"/v1/compositions/{composition_id}").json()["status"]) != "ready":
        assert status != "failed" and time.monotonic() < deadline, status
        time.sleep(0.2)
    home = Path(stack.vllm_log).parent / "home"
    return home / "compositions" / composition_id


def test_eight_concurrent_clients_on_different_bricks(stack: Stack) -> None:
    names = ("alpha", "beta", "c0", "c1", "c2", "c3", "c4", "c5")
    single = {name: through_gateway(stack, name).choices[0].text for name in names}
    with ThreadPoolExecutor(8) as pool:
        together = dict(zip(names, pool.map(lambda n: through_gateway(stack, n).choices[0].text, names), strict=True))
    assert together == single
    assert len(set(single.values())) > 1


def test_gateway_refuses_unknown_and_deleted_bricks(stack: Stack) -> None:
    stack.register_brick("gateway-gone", stack.adapters["gateway-gone"])
    expected = reference_text(stack.base, stack.adapters["gateway-gone"])
    assert through_gateway(stack, "gateway-gone").choices[0].text == expected
    assert stack.brickyard.delete("/v1/bricks/gateway-gone/versions/1").status_code == 200
    for model in ("gateway-gone", "gateway-gone@1", "never-registered"):
        with pytest.raises(openai.NotFoundError):
            through_gateway(stack, model)
