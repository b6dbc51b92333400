"""The Hugging Face Hub-compatible routes, read by the real clients (``huggingface_hub``,
``transformers``, ``peft``) from a uvicorn server on loopback, on both backends."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import brick_metadata, register_base, serve_in_thread, upload, wait_ready

HUB_ERROR_HEADER = "x-error-code"


@dataclass
class Access:
    """One request the server answered: method, path, status, Range header, body bytes sent."""

    method: str
    path: str
    status: int
    range: str | None
    body_bytes: int


@dataclass
class HubServer:
    url: str
    token: str
    log: list[Access] = field(default_factory=list)
    cut_next_get: list[str] = field(default_factory=list)  # paths whose next full GET is cut mid-body

    def http(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(base_url=self.url, timeout=60, headers=headers)

    def gets(self, fragment: str) -> list[Access]:
        return [a for a in self.log if a.method == "GET" and fragment in a.path]


class _Recorder:
    """ASGI wrapper: records every response, and can drop the connection half-way through
    the body of a chosen file (the network failure a resumed download recovers from)."""

    def __init__(self, app: Any, server: HubServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        http_range = headers.get(b"range", b"").decode() or None
        entry = Access(scope["method"], scope["path"], 0, http_range, 0)
        cut = scope["method"] == "GET" and http_range is None and scope["path"] in self.server.cut_next_get
        if cut:
            self.server.cut_next_get.remove(scope["path"])

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                entry.status = message["status"]
                self.server.log.append(entry)
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if cut and body:
                    half = body[: len(body) // 2]
                    entry.body_bytes += len(half)
                    await send({"type": "http.response.body", "body": half, "more_body": True})
                    raise ConnectionAbortedError("connection cut by the test")
                entry.body_bytes += len(body)
            await send(message)

        await self.app(scope, receive, recording_send)


@pytest.fixture
def hub_server(registry: Any, admin_token: str) -> Iterator[HubServer]:
    """The application on a uvicorn server in a thread of this process (port chosen free)."""
    from registry.api import create_app

    server = HubServer(url="", token=admin_token)
    app = _Recorder(create_app(registry=registry), server)
    with serve_in_thread(app, log_level="critical", start_timeout_s=30, stop_timeout_s=15) as url:
        server.url = url
        yield server


@pytest.fixture
def hf(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the clients of this process at the server, online, with an empty cache and no
    token (a test sets ``HF_TOKEN`` itself). ``huggingface_hub`` reads ``HF_ENDPOINT`` at
    import, so its constants are patched too. Returns the cache directory."""
    from huggingface_hub import constants, hf_api

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # peft reads the environment
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api.api, "endpoint", hub_server.url)  # the module's default client (file_exists, ...)
    from transformers.utils import hub as transformers_hub

    # transformers keeps one HfApi made on first use: make it here, and forget it afterwards.
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-hf-token"))
    return cache


@pytest.fixture
def bricks(hub_server: HubServer, llama_base: Path, loras: dict[str, Path]) -> HubServer:
    """Base ``tiny-llama`` and brick ``sentiment`` in versions 1 (r4) and 2 (rsLoRA)."""
    with hub_server.http() as http:
        register_base(http, llama_base)
        meta = brick_metadata("sentiment", license="apache-2.0")
        assert upload(http, loras["r4"], metadata=meta).status_code == 201
        assert upload(http, loras["rslora"], metadata=meta).status_code == 201
    return hub_server


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(model: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([[3, 17, 42, 5, 99]])).logits


# -- huggingface_hub --------------------------------------------------------------------


def test_model_info_snapshot_download_and_the_client_cache(bricks: HubServer, hf: Path, loras: dict[str, Path]) -> None:
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(endpoint=bricks.url)
    latest = api.model_info("bricks/sentiment")
    first = api.model_info("bricks/sentiment", revision="1", files_metadata=True)
    assert latest.sha is not None and len(latest.sha) == 40 and int(latest.sha, 16) >= 0
    assert first.sha != latest.sha
    assert api.model_info("bricks/sentiment", revision="2").sha == latest.sha  # main is the latest version
    assert api.model_info("bricks/sentiment", revision=latest.sha).sha == latest.sha  # a commit id resolves
    assert api.model_info("bricks/sentiment").sha == latest.sha  # stable: derived from content
    siblings = {s.rfilename: s for s in first.siblings or []}
    assert set(siblings) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    weights = siblings["adapter_model.safetensors"]
    assert weights.lfs is not None and weights.lfs.sha256 == _sha256(loras["r4"] / "adapter_model.safetensors")
    assert weights.size == (loras["r4"] / "adapter_model.safetensors").stat().st_size
    assert first.card_data is not None
    assert first.card_data.base_model == "base-models/tiny-llama"
    assert first.card_data["base_model_relation"] == "adapter"
    assert first.card_data.license == "apache-2.0"
    assert "sentiment" in (first.card_data.tags or [])

    folder = Path(snapshot_download("bricks/sentiment", revision="1", cache_dir=hf))
    assert folder.name == first.sha  # the snapshot is filed under the commit id
    stored = (loras["r4"] / "adapter_model.safetensors").read_bytes()
    assert (folder / "adapter_model.safetensors").read_bytes() == stored
    served_config = json.loads((folder / "adapter_config.json").read_bytes())
    original_config = json.loads((loras["r4"] / "adapter_config.json").read_bytes())
    assert served_config["base_model_name_or_path"] == "base-models/tiny-llama"
    assert {k: v for k, v in served_config.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in original_config.items() if k != "base_model_name_or_path"
    }
    for name, sibling in siblings.items():  # the listing describes the served (rewritten) bytes
        assert sibling.size == (folder / name).stat().st_size, name
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and 'base_model_relation: "adapter"' in card
    assert "classify the sentiment of a product review" in card
    with bricks.http() as http:  # the native route still serves the stored bytes
        native = http.get("/v1/bricks/sentiment/versions/1/files/adapter_config.json")
        assert native.content == (loras["r4"] / "adapter_config.json").read_bytes()

    downloads = len(bricks.gets("/resolve/"))
    assert downloads == 3
    again = Path(snapshot_download("bricks/sentiment", revision="1", cache_dir=hf))
    assert again == folder
    assert len(bricks.gets("/resolve/")) == downloads  # served from the client's cache: no body transferred


def _git_object_id(data: bytes) -> str:
    """What git itself says the blob's id is."""
    import subprocess

    return (
        subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True, check=True)
        .stdout.decode()
        .strip()
    )


def test_listed_blob_ids_are_git_object_ids(bricks: HubServer, hf: Path) -> None:
    """``blobId``/``oid`` as the Hub lists them: git's blob id of the file, and for weights
    (LFS) of the git-lfs pointer file, whose size is ``pointerSize``."""
    from huggingface_hub import snapshot_download

    with bricks.http() as http:
        for repo in ("bricks/sentiment", "base-models/tiny-llama"):
            folder = Path(snapshot_download(repo, cache_dir=hf))
            info = http.get(f"/api/models/{repo}").json()
            tree = {entry["path"]: entry for entry in http.get(f"/api/models/{repo}/tree/main").json()}
            assert {s["rfilename"] for s in info["siblings"]} == set(tree)
            lfs_files = 0
            for sibling in info["siblings"]:
                data = (folder / sibling["rfilename"]).read_bytes()
                if "lfs" in sibling:
                    lfs_files += 1
                    pointer = (
                        "version https://git-lfs.github.com/spec/v1\n"
                        f"oid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n"
                    ).encode()
                    assert sibling["lfs"]["pointerSize"] == len(pointer)
                    expected = _git_object_id(pointer)
                else:
                    expected = _git_object_id(data)
                assert sibling["blobId"] == expected == tree[sibling["rfilename"]]["oid"], (repo, sibling)
            assert lfs_files >= 1 and len(info["siblings"]) > lfs_files


def test_hf_hub_download_resumes_with_range_and_then_uses_its_cache(
    bricks: HubServer, hf: Path, loras: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants, hf_hub_download

    stored = (loras["rslora"] / "adapter_model.safetensors").read_bytes()
    # The client writes whole chunks: small ones, so that the part received before the cut
    # is kept and the download resumes from it instead of starting over.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    bricks.cut_next_get.append("/bricks/sentiment/resolve/main/adapter_model.safetensors")
    path = Path(hf_hub_download("bricks/sentiment", "adapter_model.safetensors", cache_dir=hf))
    assert path.read_bytes() == stored
    cut, resumed = bricks.gets("/resolve/main/adapter_model.safetensors")
    assert (cut.status, cut.range) == (200, None)
    assert 1024 <= cut.body_bytes < len(stored)
    kept = cut.body_bytes // 1024 * 1024
    assert (resumed.status, resumed.range, resumed.body_bytes) == (206, f"bytes={kept}-", len(stored) - kept)
    heads = [a for a in bricks.log if a.method == "HEAD" and a.path.endswith("adapter_model.safetensors")]
    assert heads and heads[0].status == 200

    with bricks.http() as http:  # the headers the client relies on
        head = http.head("/bricks/sentiment/resolve/2/adapter_model.safetensors")
        assert head.headers["x-linked-etag"] == f'"{hashlib.sha256(stored).hexdigest()}"'
        assert head.headers["x-linked-size"] == str(len(stored)) == head.headers["content-length"]
        assert head.headers["x-repo-commit"] == http.get("/api/models/bricks/sentiment").json()["sha"]
        tail = http.get("/bricks/sentiment/resolve/2/adapter_config.json", headers={"Range": "bytes=-10"})
        full = http.get("/bricks/sentiment/resolve/2/adapter_config.json").content
        assert tail.status_code == 206 and tail.content == full[-10:]

    before = len(bricks.gets("/resolve/"))
    assert Path(hf_hub_download("bricks/sentiment", "adapter_model.safetensors", cache_dir=hf)) == path
    assert len(bricks.gets("/resolve/")) == before  # a HEAD confirmed the cached blob; no GET


def test_missing_repo_revision_and_file_raise_the_typed_errors(bricks: HubServer, hf: Path, registry: Any) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(endpoint=bricks.url)
    for repo in ("bricks/nope", "base-models/nope", "compositions/" + "0" * 64, "someone/else"):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info(repo)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(repo, "config.json", cache_dir=hf)
    for revision in ("3", "0", "²", "no-such-alias", "f" * 40):
        with pytest.raises(RevisionNotFoundError):
            api.model_info("bricks/sentiment", revision=revision)
        with pytest.raises(RevisionNotFoundError):
            hf_hub_download("bricks/sentiment", "adapter_config.json", revision=revision, cache_dir=hf)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("base-models/tiny-llama", revision="1")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("bricks/sentiment", "pytorch_model.bin", cache_dir=hf)
    assert not api.file_exists("bricks/sentiment", "tokenizer_config.json")
    assert api.file_exists("base-models/tiny-llama", "config.json")

    # A composition that is not ready: a clear 404 naming its state.
    composition_id = "a" * 64
    base_id = registry.store.base_model_id("tiny-llama")
    registry.compositions.store.create(
        composition_id, {"unusable": True}, base_model_id=base_id, output="full", method="linear", actor="tests"
    )
    with pytest.raises(RepositoryNotFoundError, match="not ready"):
        api.model_info(f"compositions/{composition_id}")
    with bricks.http() as http:
        answer = http.get(f"/api/models/compositions/{composition_id}")
        assert answer.status_code == 404 and answer.headers[HUB_ERROR_HEADER] == "RepoNotFound"
        assert answer.headers["content-type"] == "application/problem+json"


def test_list_models_by_search_filter_and_author(bricks: HubServer, hf: Path, loras: dict[str, Path]) -> None:
    from huggingface_hub import HfApi

    with bricks.http() as http:
        meta = brick_metadata("translate", description="translate customer emails", tags=["translation"])
        assert upload(http, loras["r8"], metadata=meta).status_code == 201
        body = http.post("/v1/compositions", json={"base_model": "tiny-llama", "bricks": [{"name": "sentiment"}]})
        composition_id = body.json()["id"]
        assert wait_ready(http, composition_id)["status"] == "ready"
    api = HfApi(endpoint=bricks.url)
    everything = {m.id for m in api.list_models()}
    assert everything == {
        "bricks/sentiment",
        "bricks/translate",
        f"compositions/{composition_id}",
        "base-models/tiny-llama",
    }
    on_base = {m.id for m in api.list_models(filter="base_model:base-models/tiny-llama")}
    assert on_base == everything - {"base-models/tiny-llama"}
    assert {m.id for m in api.list_models(search="transl")} == {"bricks/translate"}
    assert {m.id for m in api.list_models(filter="translation")} == {"bricks/translate"}
    assert {m.id for m in api.list_models(author="compositions")} == {f"compositions/{composition_id}"}
    assert [m.id for m in api.list_models(search="sentiment", filter="brick", limit=5)] == ["bricks/sentiment"]
    merged = api.model_info(f"compositions/{composition_id}")
    assert merged.card_data is not None and merged.card_data["base_model_relation"] == "merge"
    assert merged.card_data.base_model == "base-models/tiny-llama"


def test_closed_reads_refuse_without_a_token_and_accept_hf_token(
    bricks: HubServer, hf: Path, registry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    monkeypatch.setattr(registry.settings.auth, "open_reads", False)
    api = HfApi(endpoint=bricks.url)
    # No token: what the Hub answers for a private repository (401, "not found ... make sure
    # you are authenticated"), so the client raises its usual typed error.
    with pytest.raises(RepositoryNotFoundError, match="authenticated") as refused:
        api.model_info("bricks/sentiment")
    assert refused.value.response.status_code == 401
    assert "needs a token with scope 'read'" in refused.value.response.json()["detail"]
    with pytest.raises(RepositoryNotFoundError) as refused:
        hf_hub_download("bricks/sentiment", "adapter_config.json", cache_dir=hf)
    assert refused.value.response.status_code == 401
    # A token that is not valid: a plain HTTP error, not "not found".
    with pytest.raises(HfHubHTTPError) as refused:
        HfApi(endpoint=bricks.url, token="by_not-a-token").model_info("bricks/sentiment")
    assert refused.value.response.status_code == 401
    assert not isinstance(refused.value, RepositoryNotFoundError)
    token, _ = registry.tokens.create("reader", "read", actor="tests")
    monkeypatch.setenv("HF_TOKEN", token)
    assert HfApi(endpoint=bricks.url).model_info("bricks/sentiment").sha is not None
    assert Path(hf_hub_download("bricks/sentiment", "adapter_config.json", cache_dir=hf)).is_file()


# -- transformers and peft --------------------------------------------------------------


def test_transformers_and_peft_load_from_the_endpoint(
    bricks: HubServer, hf: Path, llama_base: Path, loras: dict[str, Path], registry: Any
) -> None:
    from huggingface_hub import HfApi
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    with bricks.http() as http:
        request = {"base_model": "tiny-llama", "bricks": [{"name": "sentiment", "version": 1, "weight": 0.5}]}
        composition_id = http.post("/v1/compositions", json=request).json()["id"]
        assert wait_ready(http, composition_id)["status"] == "ready"
    on_disk = registry.compositions.directory(composition_id)

    served = AutoModelForCausalLM.from_pretrained(f"compositions/{composition_id}")
    local = AutoModelForCausalLM.from_pretrained(on_disk)
    assert torch.equal(_logits(served), _logits(local))

    base = AutoModelForCausalLM.from_pretrained(llama_base)
    expected = _logits(PeftModel.from_pretrained(base, loras["rslora"]))
    base = AutoModelForCausalLM.from_pretrained(llama_base)
    assert torch.equal(_logits(PeftModel.from_pretrained(base, "bricks/sentiment", revision="2")), expected)
    base = AutoModelForCausalLM.from_pretrained(llama_base)
    expected_v1 = _logits(PeftModel.from_pretrained(base, loras["r4"]))
    base = AutoModelForCausalLM.from_pretrained(llama_base)
    assert torch.equal(_logits(PeftModel.from_pretrained(base, "bricks/sentiment", revision="1")), expected_v1)

    # The base comes through the endpoint too: adapter_config.json names base-models/tiny-llama.
    auto = AutoPeftModelForCausalLM.from_pretrained("bricks/sentiment")
    assert torch.equal(_logits(auto), expected)
    assert any("/base-models/tiny-llama/resolve/" in a.path for a in bricks.log)

    # An adapter output: its served adapter_config.json names the base repository as well.
    with bricks.http() as http:
        request = {**request, "output": "adapter"}
        adapter_id = http.post("/v1/compositions", json=request).json()["id"]
        assert wait_ready(http, adapter_id)["status"] == "ready"
    base = AutoModelForCausalLM.from_pretrained(llama_base)
    local_adapter = _logits(PeftModel.from_pretrained(base, registry.compositions.directory(adapter_id)))
    served_adapter = AutoPeftModelForCausalLM.from_pretrained(f"compositions/{adapter_id}")
    assert torch.equal(_logits(served_adapter), local_adapter)
    card = HfApi(endpoint=bricks.url).model_info(f"compositions/{adapter_id}").card_data
    assert card is not None and card["base_model_relation"] == "adapter"
