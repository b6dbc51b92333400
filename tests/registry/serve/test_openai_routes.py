"""The OpenAI-compatible routes on the embedded engine, through the official ``openai`` client
against a real HTTP server (uvicorn in a thread, so client disconnects reach the server).

One server per module (SQLite): the routes read the catalog and the composition store, whose
storage behaviour is tested on both backends elsewhere; what is tested here is generation.
References are transformers + PEFT ``generate`` in this process, on freshly loaded models.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import brick_metadata, register_base, serve_in_thread, upload

PROMPT = "the quick brown fox"
TOKENS = 8
DESCRIPTIONS = {
    "french": "translate English sentences into French",
    "legal": "summarize legal contracts into plain language bullet points",
    "sql": "write SQL queries from questions about a database",
}


class Served:
    """The running server, its registry, and the adapters behind its bricks."""

    def __init__(self, url: str, app: Any, token: str, base: Path, adapters: dict[str, Path]) -> None:
        self.url, self.app, self.base, self.adapters = url, app, base, adapters
        self.http = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"})
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=120)

    @property
    def engine(self) -> Any:
        return self.app.state.gateway.engine

    def child_status(self) -> dict[str, Any]:
        return asyncio.run(self.engine.child_status())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from composer.testing import make_base_model, make_lora
    from registry.api import create_app
    from registry.service import Registry
    from registry.settings import ComposeSettings, Settings

    root = tmp_path_factory.mktemp("serve")
    base = make_base_model(root / "base", hidden=64, intermediate=128)
    adapters = {
        name: make_lora(base, root / name, r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), seed=seed)
        for seed, name in enumerate((*DESCRIPTIONS, "doomed"), start=1)
    }
    settings = Settings(
        home=root / "home",
        compose=ComposeSettings(isolation="thread"),
        embedding={"isolation": "thread"},
        serve={"max_loaded_adapters": 2, "min_score": 5.0, "threads": 1},
    )
    registry = Registry.open(settings)
    token, _ = registry.tokens.create("test-admin", "admin", actor="tests")
    app = create_app(registry=registry)
    try:
        with serve_in_thread(app) as url:
            served = Served(url, app, token, base, adapters)
            with served.http as http:
                register_base(http, base, name="tiny")
                for name, description in {**DESCRIPTIONS, "doomed": "a brick deleted by a test"}.items():
                    meta = brick_metadata(name, base_model="tiny", description=description, examples=[], tags=[])
                    response = upload(http, adapters[name], metadata=meta)
                    assert response.status_code == 201, response.text
                yield served
    finally:
        registry.close()


_REFERENCE_CACHE: dict[tuple[str, str | None, int], str] = {}


def reference(base: Path, adapter: Path | None, prompt: str = PROMPT, n: int = TOKENS) -> str:
    """transformers + PEFT greedy text, on models loaded for this call alone."""
    key = (str(base), str(adapter) if adapter else None, n)
    if key in _REFERENCE_CACHE:
        return _REFERENCE_CACHE[key]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=model.config.eos_token_id)  # fmt: skip
    text = str(tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    _REFERENCE_CACHE[key] = text
    return text


def complete(served: Served, model: str, **extra: Any) -> Any:
    """A completion of PROMPT, greedy unless ``extra`` says otherwise."""
    return served.client.completions.create(
        model=model, **{"prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, **extra}
    )


def test_base_and_brick_equal_transformers_peft(served: Served) -> None:
    base = complete(served, "tiny")
    assert base.choices[0].text == reference(served.base, None)
    assert base.brickyard["bricks"] == [] and base.brickyard["recipe_id"] is None  # type: ignore[attr-defined]
    for name in ("french", "legal", "sql", "french"):  # 3 adapters with an LRU bound of 2: one is reloaded
        brick = complete(served, f"{name}@1")
        assert brick.choices[0].text == reference(served.base, served.adapters[name]), name
    assert complete(served, "french").choices[0].text == reference(served.base, served.adapters["french"])
    # the base alone again, with adapters attached: they are switched off
    assert complete(served, "tiny").choices[0].text == base.choices[0].text
    loaded = served.child_status()["bases"][str(served.base)]
    assert len(loaded) == 2 and loaded[-1] == "french@1"


def test_composition_by_id_equals_peft_on_its_files(served: Served) -> None:
    body = {"base_model": "tiny", "bricks": [{"name": "french", "weight": 0.7}, {"name": "sql", "weight": -0.4}],
            "output": "adapter"}  # fmt: skip
    created = served.http.post("/v1/compositions", json=body)
    assert created.status_code in (200, 201, 202), created.text
    composition_id = created.json()["id"]
    deadline = time.monotonic() + 120
    while served.http.get(f"/v1/compositions/{composition_id}").json()["status"] != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    answer = complete(served, composition_id)
    directory = served.app.state.registry.compositions.directory(composition_id)
    assert answer.choices[0].text == reference(served.base, directory)
    assert answer.brickyard["recipe_id"] == composition_id  # type: ignore[attr-defined]
    assert [(b["name"], b["weight"]) for b in answer.brickyard["bricks"]] == [("french", 0.7), ("sql", -0.4)]  # type: ignore[attr-defined]


def test_auto_routes_to_the_matching_brick_and_caches_the_recipe(served: Served) -> None:
    question = "Translate this English sentence into French please"
    raw = served.client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": question}], max_tokens=TOKENS, temperature=0,
        extra_body={"k": 2},
    )  # fmt: skip
    answer = raw.parse()
    used = answer.brickyard  # type: ignore[attr-defined]
    assert used["bricks"][0]["name"] == "french", used
    assert all(b["score"] >= 5.0 for b in used["bricks"])
    # The compositions' rule (registry.builds.instruction_weights, tested on its own) on the same hits.
    from registry.builds.instruction_weights import instruction_weights
    from registry.domain import SearchHit
    from registry.inputs import SearchRequest

    hits: list[SearchHit] = served.app.state.registry.search(
        SearchRequest(query=question, base_model="tiny", k=2, min_score=5.0, kind="lora")
    ).hits
    weights = instruction_weights([h.similarity for h in hits])
    expected = [(h.brick.name, w) for h, w in zip(hits, weights, strict=True) if w > 0]
    assert [(b["name"], b["weight"]) for b in used["bricks"]] == [(n, pytest.approx(w)) for n, w in expected]
    assert sum(b["weight"] for b in used["bricks"]) == pytest.approx(1.0)
    assert json.loads(raw.headers["X-Brickyard-Used"]) == used
    assert raw.headers["X-Brickyard-Recipe"] == used["recipe_id"]
    # generated with the composed adapter: equal to PEFT on the composition's files
    directory = served.app.state.registry.compositions.directory(used["recipe_id"])
    prompt = f"user: {question}\nassistant:"
    assert answer.choices[0].message.content == reference(served.base, directory, prompt=prompt)
    again = served.client.chat.completions.create(
        model="auto:tiny", messages=[{"role": "user", "content": question}], max_tokens=TOKENS, temperature=0,
        extra_body={"brickyard": {"k": 2}},
    )  # fmt: skip
    assert again.brickyard["recipe_id"] == used["recipe_id"]  # type: ignore[attr-defined]


def test_auto_without_a_match_answers_with_the_base(served: Served) -> None:
    answer = complete(served, "auto", extra_body={"min_score": 1000.0})
    assert answer.brickyard["bricks"] == [] and "base model answered" in answer.brickyard["note"]  # type: ignore[attr-defined]
    assert answer.choices[0].text == reference(served.base, None)


def test_streaming_equals_whole_answer_and_disconnect_stops_generation(served: Served) -> None:
    whole = complete(served, "legal@1").choices[0].text
    pieces = []
    with served.client.completions.create(
        model="legal@1", prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True
    ) as stream:
        for chunk in stream:
            pieces.append(chunk.choices[0].text)
    assert "".join(pieces) == whole
    # a long generation, abandoned after its first piece of text
    limit = 100
    with served.client.completions.create(
        model="sql@1", prompt="a", max_tokens=limit, temperature=1.0, seed=3, stream=True
    ) as stream:
        for chunk in stream:
            if chunk.choices[0].text:
                break
    deadline = time.monotonic() + 30
    while not served.child_status().get("cancelled"):
        assert time.monotonic() < deadline, "the child never saw the cancel"
        time.sleep(0.2)
    assert served.child_status()["cancelled"][-1]["tokens"] < limit


def test_sampling_with_a_seed_repeats(served: Served) -> None:
    first = complete(served, "sql@1", temperature=0.9, top_p=0.9, seed=11, n=2)
    second = complete(served, "sql@1", temperature=0.9, top_p=0.9, seed=11, n=2)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len(first.choices) == 2 and first.choices[0].text != first.choices[1].text  # seed + index per choice


def test_bad_requests_are_openai_errors_and_load_nothing(served: Served) -> None:
    before = served.child_status().get("bases", {})
    with pytest.raises(openai.NotFoundError) as unknown:
        complete(served, "no-such-brick")
    assert unknown.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as negative:
        served.client.completions.create(model="legal@1", prompt=PROMPT, max_tokens=-1)
    assert negative.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as too_long:
        served.client.completions.create(model="sql@1", prompt=" ".join(["fox"] * 200), max_tokens=4)
    assert too_long.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):  # over the context with no max_tokens at all
        served.client.completions.create(model="sql@1", prompt=" ".join(["fox"] * 200))
    with pytest.raises(openai.BadRequestError):
        complete(served, "not a model!")
    assert served.child_status().get("bases", {}) == before
    # the rest of the API keeps problem+json
    problem = served.http.get("/v1/bricks/no-such-brick")
    assert problem.headers["content-type"].startswith("application/problem+json")


def test_deleted_brick_is_refused(served: Served) -> None:
    assert complete(served, "doomed@1").choices[0].text == reference(served.base, served.adapters["doomed"])
    assert "doomed@1" in served.child_status()["bases"][str(served.base)]
    assert served.http.delete("/v1/bricks/doomed/versions/1").status_code in (200, 204)
    # unloaded from the child too (the child reads its input in order: the unload came first)
    assert "doomed@1" not in served.child_status()["bases"][str(served.base)]
    for model in ("doomed", "doomed@1"):
        with pytest.raises(openai.NotFoundError):
            complete(served, model)
    assert complete(served, "sql@1").choices[0].text == reference(served.base, served.adapters["sql"])


def test_a_remembered_brick_deleted_behind_the_gateway_is_refused(served: Served, tmp_path: Path) -> None:
    """The router remembers ``name@version``; a deletion by another process (straight on the
    catalog, no gateway hook) must still be refused on the very next request."""
    from composer.testing import make_lora

    adapter = make_lora(served.base, tmp_path / "fleeting", r=4, alpha=8, target_modules=("q_proj",), seed=77)
    meta = brick_metadata("fleeting", base_model="tiny", description="a brick deleted behind the gateway",
                          examples=[], tags=[])  # fmt: skip
    assert upload(served.http, adapter, metadata=meta).status_code == 201
    expected = reference(served.base, adapter)
    for _ in range(2):  # the second request is answered from the router's memory
        assert complete(served, "fleeting@1").choices[0].text == expected
    served.app.state.gateway.registry.delete_brick("fleeting", 1, actor="another process")
    with pytest.raises(openai.NotFoundError):
        complete(served, "fleeting@1")


def test_a_stop_string_ends_the_whole_answer(served: Served) -> None:
    """A whole (non-streamed) answer is sent by the child in one piece: its stop strings are
    still found as the text grows, and it ends where the first one starts."""
    text = reference(served.base, served.adapters["french"])
    assert len(text) >= 4, text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    answer = complete(served, "french@1", stop=[stop]).choices[0]
    assert answer.text == text[: text.find(stop)]
    assert answer.finish_reason == "stop"
    assert complete(served, "french@1").choices[0].text == text


def test_models_lists_bases_bricks_and_auto(served: Served) -> None:
    ids = {m.id for m in served.client.models.list()}
    assert {"tiny", "auto", "auto:tiny", "french", "french@1", "sql@1"} <= ids


def test_engine_killed_mid_request_is_503_then_recovers(served: Served) -> None:
    expected = complete(served, "legal@1").choices[0].text
    pid = served.engine.pid
    assert pid is not None
    outcome: list[httpx.Response] = []
    long_request = {"model": "legal@1", "prompt": "a", "max_tokens": 100, "n": 8, "temperature": 1.0, "seed": 1}
    worker = threading.Thread(target=lambda: outcome.append(served.http.post("/v1/completions", json=long_request)))
    worker.start()
    deadline = time.monotonic() + 60
    while not served.engine.pending:  # killed once the request reached the child (8 x 100 tokens to go)
        assert time.monotonic() < deadline and worker.is_alive(), outcome
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    worker.join(60)
    assert outcome and outcome[0].status_code == 503, outcome and outcome[0].text
    assert outcome[0].headers["Retry-After"] and outcome[0].json()["error"]["type"] == "server_error"
    assert complete(served, "legal@1").choices[0].text == expected  # a new child, same answer
    assert served.engine.pid not in (None, pid)


def test_auto_reuses_its_plan_until_the_composition_is_evicted(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from registry.serve import routing
    from registry.serve.protocol import RoutingOptions

    monkeypatch.setattr(routing, "_PLAN_RECHECK_S", 1e9)  # no re-verification by age here, however slow the host
    router = served.app.state.gateway.router
    compositions = served.app.state.registry.compositions
    calls: list[Any] = []
    original = compositions.request
    monkeypatch.setattr(compositions, "request", lambda *a, **k: calls.append(a) or original(*a, **k))
    options = RoutingOptions(k=2, min_score=-1e9, bricks=["legal", "sql"])
    query = "summarize this contract"
    first = router.route("auto:tiny", query, options)
    assert len(calls) == 1
    again = router.route("auto:tiny", query, options)
    assert len(calls) == 1 and again.used == first.used and again.adapter == first.adapter
    # evicted as the compositions' LRU does it: row, then directory
    recipe_id = first.used["recipe_id"]
    assert compositions.store.delete_ready(recipe_id)
    shutil.rmtree(compositions.root / recipe_id)
    rebuilt = router.route("auto:tiny", query, options)
    assert len(calls) == 2 and rebuilt.used["recipe_id"] == recipe_id
    assert (rebuilt.adapter.path / "adapter_model.safetensors").is_file()
    # a deletion drops every plan: the next request is verified again
    served.app.state.gateway.router.forget()
    router.route("auto:tiny", query, options)
    assert len(calls) == 3


def test_the_child_runs_the_configured_torch_threads(served: Served) -> None:
    complete(served, "tiny")
    assert served.child_status()["threads"] == 1  # serve.threads in the fixture
