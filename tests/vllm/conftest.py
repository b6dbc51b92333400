"""Integration fixtures: a Brickyard server and a vLLM OpenAI server with Brickyard's resolver.

Run by ``make test-vllm`` (never by plain ``make test``: pyproject's ``norecursedirs``). Once per
session: a tiny Llama whose head_dim is 64 (vLLM's CPU attention needs it), LoRA bricks for it and
for a structurally different base, a ``brickyard serve`` on loopback with the bases and bricks
registered over HTTP, and vLLM started from the virtualenv that ``make vllm-env`` built
(``BRICKYARD_VLLM_PYTHON``). References come from transformers + PEFT in this process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import brick_metadata

PROMPT = [5, 17, 42, 99, 200, 7, 63, 128]  # token ids: the test compares tokens, not text
NEW_TOKENS = 12
BASE = "vllm-llama"
OTHER_BASE = "other-llama"
# Bricks registered before vLLM starts; "late" is registered by a test after it started.
BRICKS = ("alpha", "beta", "c0", "c1", "c2", "c3", "c4", "c5")
VLLM_START_TIMEOUT_S = 420.0
TIMINGS: dict[str, float] = {}  # printed at the end of the run
SERVER_LOGS: list[Path] = []  # the servers' logs: their ends are attached to a failed test's report
LOG_LINES_ON_FAILURE = 60


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The first test also pays for the session's set-up (models, both servers: minutes on a busy
    host), which pytest-timeout counts against it: give these tests more than the suite's 300 s."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.timeout(900))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print how long the servers took to start (``make test-vllm`` reports it)."""
    for what, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{what}: {seconds:.1f} s")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report ends with the last lines of both servers' logs: what vLLM's
    resolver and Brickyard said is often the only account of why a request was refused."""
    report = yield
    if report.failed:
        for log in SERVER_LOGS:
            if log.is_file():
                tail = log.read_text(errors="replace").splitlines()[-LOG_LINES_ON_FAILURE:]
                report.sections.append((f"{log.name} (last {LOG_LINES_ON_FAILURE} lines)", "\n".join(tail)))
    return report


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{url} exited with {process.returncode}:\n{log.read_text()[-6000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout_s} s:\n{log.read_text()[-6000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@dataclass
class Stack:
    """The running servers and the local files behind them."""

    brickyard: httpx.Client
    vllm_url: str
    vllm_log: Path
    base: Path
    adapters: dict[str, Path]
    brickyard_url: str = ""  # its OpenAI routes forward to vllm_url (serve.engine = vllm)
    admin_token: str = ""
    _openai: Any = None

    def openai(self) -> Any:
        """An ``openai.OpenAI`` client of Brickyard's OpenAI routes (admin token, no retries);
        one per session, closed with the stack."""
        if self._openai is None:
            import openai

            base_url = f"{self.brickyard_url}/v1"
            self._openai = openai.OpenAI(base_url=base_url, api_key=self.admin_token, max_retries=0, timeout=300)
        return self._openai

    def close(self) -> None:
        """Close the OpenAI client, if one was made."""
        if self._openai is not None:
            self._openai.close()

    def complete(self, model: str, prompt: list[int] = PROMPT, max_tokens: int = NEW_TOKENS) -> httpx.Response:
        """POST /v1/completions to vLLM, greedy, EOS ignored (so the reference can run the full length)."""
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        return httpx.post(f"{self.vllm_url}/v1/completions", json=body, timeout=120)

    def tokens(self, model: str) -> list[int]:
        """The generated token ids of a greedy completion that must succeed."""
        response = self.complete(model)
        assert response.status_code == 200, response.text
        return [int(t) for t in response.json()["choices"][0]["token_ids"]]

    def register_brick(self, name: str, adapter: Path, base_model: str = BASE) -> dict[str, Any]:
        """Upload an adapter directory as a brick; answers the registered brick."""
        import json

        files = {
            part: (filename, (adapter / filename).read_bytes())
            for part, filename in (
                ("adapter_config", "adapter_config.json"),
                ("adapter_weights", "adapter_model.safetensors"),
            )
        }
        meta = json.dumps(brick_metadata(name, base_model=base_model, description=f"test brick {name}"))
        response = self.brickyard.post("/v1/bricks", data={"metadata": meta}, files=files)
        assert response.status_code == 201, response.text
        return dict(response.json())


def greedy_reference(base: Path, adapter: Path | None, prompt: list[int] = PROMPT, n: int = NEW_TOKENS) -> list[int]:
    """transformers + PEFT greedy tokens: argmax of a full forward pass per step (no cache, no EOS stop)."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return [int(t) for t in ids[0, len(prompt) :]]


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The vLLM virtualenv's interpreter (``make test-vllm`` sets it)."""
    value = os.environ.get("BRICKYARD_VLLM_PYTHON")
    if not value or not Path(value).is_file():
        pytest.fail("BRICKYARD_VLLM_PYTHON must name the vLLM virtualenv's python: run `make test-vllm`")
    return Path(value)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The bases and adapters: ``base``, ``other`` (3 layers: another fingerprint), and one rank-8
    all-projection LoRA per brick name (random A and B), plus ``late``, ``gone`` and ``foreign``."""
    from composer.testing import LLAMA_PROJECTIONS, make_base_model, make_lora

    started = time.monotonic()
    root = tmp_path_factory.mktemp("vllm-models")
    base = make_base_model(root / "base", hidden=256, intermediate=512, num_layers=2)
    other = make_base_model(root / "other", hidden=256, intermediate=512, num_layers=3, seed=9)
    out = {"base": base, "other": other}
    names = (*BRICKS, "late", "gone", "gateway-gone")
    for seed, name in enumerate(names, start=1):
        out[name] = make_lora(base, root / name, r=8, alpha=16, target_modules=LLAMA_PROJECTIONS, seed=seed)
    out["foreign"] = make_lora(other, root / "foreign", r=8, alpha=16, target_modules=LLAMA_PROJECTIONS, seed=99)
    TIMINGS["tiny models and adapters"] = time.monotonic() - started
    return out


@pytest.fixture(scope="session")
def stack(vllm_python: Path, models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Brickyard (bases and BRICKS registered) and vLLM serving ``models["base"]`` with the resolver."""
    work = tmp_path_factory.mktemp("vllm-stack")
    home = work / "home"
    port = _free_port()
    vllm_port = _free_port()
    env = {
        **os.environ,
        "BRICKYARD_HOME": str(home),
        "BRICKYARD_SERVE__ENGINE": "vllm",
        "BRICKYARD_SERVE__VLLM_URL": f"http://127.0.0.1:{vllm_port}",
    }
    env.pop("BRICKYARD_DATABASE_URL", None)
    brickyard_log = work / "brickyard.log"
    SERVER_LOGS[:] = [brickyard_log, work / "vllm.log"]
    with brickyard_log.open("ab") as out:
        brickyard = subprocess.Popen(
            [sys.executable, "-m", "registry", "serve", "--port", str(port), "--log-level", "info"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    vllm: subprocess.Popen[bytes] | None = None
    stack: Stack | None = None
    http: httpx.Client | None = None
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/readyz", brickyard, brickyard_log, 90)
        admin = (home / "admin-token").read_text().strip()
        http = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {admin}"})
        for name, path in ((BASE, models["base"]), (OTHER_BASE, models["other"])):
            response = http.post("/v1/base-models", json={"name": name, "path": str(path)})
            assert response.status_code == 201, response.text
        created = http.post("/v1/tokens", json={"name": "vllm", "scope": "read"})
        assert created.status_code == 201, created.text
        stack = Stack(http, "", work / "vllm.log", models["base"], models, brickyard_url=url, admin_token=admin)
        for name in BRICKS:
            stack.register_brick(name, models[name])

        vllm_env = {
            **os.environ,
            "VLLM_PLUGINS": "brickyard",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            # vLLM's processes talk over the host's own address unless told: keep it on loopback.
            "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_LOOPBACK_IP": "127.0.0.1",
            "BRICKYARD_URL": url,
            "BRICKYARD_TOKEN": created.json()["token"],
            "BRICKYARD_VLLM_CACHE": str(work / "adapter-cache"),
            # The Hugging Face-compatible endpoints: vLLM fetches a `lora_path` that is no local
            # directory with huggingface_hub, from Brickyard (loopback) rather than the Hub.
            "HF_ENDPOINT": url,
            "HF_TOKEN": created.json()["token"],
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(work / "hf-home"),
        }
        command = [
            str(vllm_python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(models["base"]),
            "--host", "127.0.0.1", "--port", str(vllm_port),
            "--dtype", "float32", "--max-model-len", "128", "--enforce-eager",
            "--enable-lora", "--max-lora-rank", "64", "--max-loras", "8", "--max-cpu-loras", "16",
        ]  # fmt: skip
        started = time.monotonic()
        with stack.vllm_log.open("ab") as out:
            vllm = subprocess.Popen(command, env=vllm_env, stdout=out, stderr=subprocess.STDOUT, cwd=work)
        stack.vllm_url = f"http://127.0.0.1:{vllm_port}"
        _wait_http(f"{stack.vllm_url}/health", vllm, stack.vllm_log, VLLM_START_TIMEOUT_S)
        TIMINGS["vLLM server start (to /health)"] = time.monotonic() - started
        yield stack
    finally:
        if stack is not None:
            stack.close()
        if vllm is not None:
            _stop(vllm)
        _stop(brickyard)
        if http is not None:
            http.close()
