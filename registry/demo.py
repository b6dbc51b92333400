"""``brickyard demo``: the whole flow on a fresh machine, with nothing downloaded.

Builds a tiny random Llama base model and a few LoRA bricks locally, starts the API on
the embedded SQLite database, registers everything over REST, lists and searches it,
composes two bricks, downloads the composed model, loads it with transformers and
generates a few tokens, and asks an OpenAI-style request with ``model="auto"`` (the prompt
picks the bricks), printing what it did at each step. Then the same with bricks that
have learned something (`registry.demo_skills`): the trained test bed, base vs composed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["DEMO_BRICKS", "run_demo"]

DEMO_BRICKS = [
    {
        "name": "sentiment",
        "description": "Classify the sentiment of a product review as positive or negative.",
        "examples": ["The battery died after two days, very disappointed.", "Best headphones I ever owned!"],
        "tags": ["classification", "english"],
        "lora": {"r": 4, "alpha": 8, "target_modules": ("q_proj", "v_proj"), "seed": 11},
    },
    {
        "name": "translate-ro-en",
        "description": "Translate customer emails from Romanian to English.",
        "examples": ["Bună ziua, comanda mea nu a ajuns încă.", "Vă mulțumesc pentru ajutor!"],
        "tags": ["translation", "romanian"],
        "lora": {"r": 8, "alpha": 16, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj"), "seed": 12},
    },
    {
        "name": "summarize",
        "description": "Summarize a news article in one sentence.",
        "examples": ["The city council voted on Tuesday to expand the bike lane network by 40 km ..."],
        "tags": ["summarization", "english"],
        "lora": {
            "r": 4,
            "alpha": 8,
            "target_modules": ("gate_proj", "up_proj", "down_proj"),
            "use_rslora": True,
            "seed": 13,
        },
    },
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not become ready within {timeout_s:.0f} s")


def build_models(workdir: Path, console: Console) -> tuple[Path, dict[str, Path]]:
    """Build (once) the tiny base model and one adapter per demo brick under ``workdir``."""
    from transformers.utils import logging as hf_logging

    from composer.testing import make_base_model, make_lora

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    models = workdir / "models"
    base = models / "tiny-llama"
    if not (base / "config.json").exists():
        make_base_model(base, num_layers=2, hidden=64, intermediate=128, max_shard_size="100KB")
        console.print(f"built a tiny Llama base model in {base}")
    adapters = {}
    for spec in DEMO_BRICKS:
        target = models / str(spec["name"])
        if not (target / "adapter_config.json").exists():
            make_lora(base, target, **spec["lora"])  # type: ignore[arg-type]
            console.print(f"built LoRA brick {spec['name']} in {target}")
        adapters[str(spec["name"])] = target
    return base, adapters


def _generate(model_dir: Path) -> str:
    """Load a composed model with transformers and generate a few tokens (greedy)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = tokenizer("translate customer emails", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return str(tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def _auto_request(url: str, token: str, console: Console) -> None:
    """POST /v1/chat/completions with ``model="auto"``, streamed; print the bricks that answered."""
    from registry.serve.console import stream_generation

    question = "Translate this Romanian customer email into English: Buna ziua, comanda mea nu a ajuns."
    pieces: list[str] = []

    def used(record: dict[str, Any]) -> None:
        bricks = ", ".join(f"{b['name']}@{b['version']} x{b['weight']:.2f} (score {b['score']:.1f})"
                           for b in record["bricks"])  # fmt: skip
        console.print(f"POST /v1/chat/completions model=auto {question!r}")
        console.print(f"  answered by {record['base_model']} + {bricks or 'no brick'}"
                      + (f", recipe {record['recipe_id'][:16]}" if record.get("recipe_id") else ""))  # fmt: skip
        if record.get("note"):
            console.print(f"  {record['note']}")

    body = {"model": "auto", "messages": [{"role": "user", "content": question}], "max_tokens": 12, "temperature": 0}
    stream_generation(body, chat=True, url=url, token=token, on_used=used, on_text=pieces.append)
    console.print(f"  generated: {''.join(pieces)!r} (embedded engine: transformers + PEFT in a child process)")


def run_demo(workdir: Path, console: Console, *, skills: bool = True) -> int:
    """Run the demo; returns the process exit code. ``skills=False`` stops before the trained
    test bed (step 9, `registry.demo_skills.show_skills`, tested on its own)."""
    from registry.client import RemoteClient, iter_bricks
    from registry.demo_skills import show_skills
    from registry.errors import BaseModelExists, BrickExists

    workdir = workdir.resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    console.rule("[bold]1. build a tiny base model and LoRA bricks (local, no downloads)")
    base_dir, adapters = build_models(workdir, console)

    console.rule("[bold]2. start the Brickyard API on SQLite")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "BRICKYARD_HOME": str(workdir / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("BRICKYARD_DATABASE_URL", None)
    # The demo's models are built in workdir/models: the server may read base models there.
    env.setdefault("BRICKYARD_MODEL_ROOTS", json.dumps([str(workdir / "models")]))
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [sys.executable, "-m", "registry", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_ready(url, server)
        console.print(f"serving {url} (data in {workdir / 'home'}, log in {workdir / 'server.log'})")
        token_file = workdir / "home" / "admin-token"
        token = token_file.read_text().strip()
        console.print(f"the server created an admin API token on first start (saved in {token_file}):\n  {token}")
        with RemoteClient(url, token=token) as client:
            console.rule("[bold]3. register the base model over REST")
            try:
                base = client.add_base_model("tiny-llama", str(base_dir), description="demo base model")
                console.print(
                    f"POST /v1/base-models -> {base.name}: {base.architecture}, {base.parameter_count:,} parameters, "
                    f"{base.linear_module_count} linear modules, fingerprint {base.fingerprint[:12]}"
                )
            except BaseModelExists:
                console.print("tiny-llama is already registered")

            console.rule("[bold]4. register the bricks over REST")
            for spec in DEMO_BRICKS:
                metadata = {k: spec[k] for k in ("name", "description", "examples", "tags")}
                metadata["base_model"] = "tiny-llama"
                try:
                    brick = client.register_brick(adapters[str(spec["name"])], metadata)
                    console.print(
                        f"POST /v1/bricks -> {brick.name}@{brick.version}: rank {brick.rank}, "
                        f"{brick.module_count} modules, sha256 {brick.sha256[:12]}"
                    )
                except BrickExists as exc:
                    console.print(f"{spec['name']}: {exc.detail}")

            console.rule("[bold]5. list them")
            table = Table("brick", "rank", "modules", "tags", "description")
            for brick in iter_bricks(client, base_model="tiny-llama"):
                table.add_row(
                    f"{brick.name}@{brick.version}",
                    str(brick.rank),
                    ",".join(brick.target_modules),
                    ",".join(brick.tags),
                    brick.description,
                )
            console.print("GET /v1/bricks?base_model=tiny-llama")
            console.print(table)

            console.rule("[bold]6. search")
            for query in ("translate my customers' Romanian emails", "This blender is loud and broke in a week."):
                hits = client.search(query, base_model="tiny-llama", k=2)
                ranked = ", ".join(f"{h.brick.name} ({h.matched}, score {h.score:.2f})" for h in hits)
                console.print(f"POST /v1/search {query!r} -> {ranked}")

            console.rule("[bold]7. compose two bricks (TIES), download, load with transformers, generate")
            request = {
                "base_model": "tiny-llama",
                "bricks": [{"name": "sentiment", "weight": 0.6}, {"name": "translate-ro-en", "weight": 0.4}],
                "method": "ties",
                "params": {"density": 0.5},
            }
            composition = client.compose(request)
            console.print(f"POST /v1/compositions -> {composition.id[:16]} ({composition.status})")
            composition = client.wait_composition(composition.id)
            if composition.status != "ready":
                raise RuntimeError(f"composition failed: {composition.error}")
            target = workdir / "composed" / composition.id[:16]
            if target.exists():
                shutil.rmtree(target)
            paths = client.download_composition(composition.id, target)
            console.print(f"downloaded {len(paths)} files ({sum(p.stat().st_size for p in paths):,} bytes) to {target}")
            console.print(
                f"generated: {_generate(target)!r} (random toy weights: the text is noise; the point is that\n"
                "the composed files load and run)"
            )

            console.rule("[bold]8. ask model=auto: the prompt picks the bricks, composed and served per request")
            _auto_request(url, token, console)
            if skills:
                console.rule("[bold]9. bricks that learned something: the trained test bed, base vs composed")
                show_skills(client, workdir, console)
        console.rule("[bold green]demo finished")
        return 0
    except Exception as exc:  # noqa: BLE001 - report any failure of the demo plainly
        console.print(f"[bold red]demo failed:[/] {exc}")
        console.print(f"server log: {workdir / 'server.log'}")
        return 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
