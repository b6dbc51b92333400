"""Serving benchmark (issue #18), on a tiny Llama with head_dim 64 (hidden 256, 2 layers) and
rank-8 all-projection bricks, in one run against ``create_app`` served by uvicorn on 127.0.0.1:

- (c) the routing decision of ``auto`` with a cached recipe (search + recipe lookup, in-process
  ``Router.route``), p50/p95;
- (d) ``auto`` with a new recipe (search + compose + build), once;
- (e) the embedded engine through the gateway: time to first token (streamed, client side) and
  tokens/s, single client and 8 clients;
- (f) plain transformers + PEFT ``generate`` on the same brick, prompt and length: tokens/s.

Not measured here: (a) vLLM direct and (b) vLLM through the gateway (``make test-vllm``
starts vLLM; on this machine its start alone takes 2-4 minutes).

    python bench/serve.py [--tokens 32] [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DESCRIPTIONS = {
    "french": "translate English sentences into French",
    "legal": "summarize legal contracts into plain language bullet points",
    "sql": "write SQL queries from questions about a database",
}
PROMPT = "the quick brown fox jumps over the lazy dog"


def pct(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stream_once(http: httpx.Client, model: str, tokens: int) -> tuple[float, float, int]:
    """(time to first text, total seconds, pieces of text) of one streamed completion."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "brickyard": {"min_score": -1e9}}  # fmt: skip
    started = time.perf_counter()
    first = None
    pieces = 0
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                first = first or time.perf_counter() - started
                pieces += 1
    return first or 0.0, time.perf_counter() - started, pieces


def plain_generate(base: Path, adapter: Path, tokens: int, runs: int) -> float:
    """(f): tokens/s of transformers + PEFT ``generate`` (greedy, EOS ignored)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(base)
    model: Any = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter)
    )
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    rates = []
    with torch.no_grad():
        for _ in range(runs):
            started = time.perf_counter()
            out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                        min_new_tokens=tokens, do_sample=False, pad_token_id=1)  # fmt: skip
            rates.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> int:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    import uvicorn

    from composer.testing import LLAMA_PROJECTIONS, make_base_model, make_lora
    from registry.api import create_app
    from registry.serve.protocol import RoutingOptions
    from registry.serve.routing import Router
    from registry.service import Registry
    from registry.settings import ComposeSettings, Settings
    from tests.conftest import brick_metadata, register_base, upload

    work = Path(tempfile.mkdtemp(prefix="brickyard-serve-bench-"))
    base = make_base_model(work / "base", hidden=256, intermediate=512, num_layers=2)
    adapters = {
        name: make_lora(base, work / name, r=8, alpha=16, target_modules=LLAMA_PROJECTIONS, seed=seed)
        for seed, name in enumerate(DESCRIPTIONS, start=1)
    }
    settings = Settings(
        home=work / "home", compose=ComposeSettings(isolation="thread"), embedding={"isolation": "thread"}
    )
    registry = Registry.open(settings)
    token, _ = registry.tokens.create("bench", "admin", actor="bench")
    app = create_app(registry=registry)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600, headers={"Authorization": f"Bearer {token}"})
    rows: list[tuple[str, str]] = []
    try:
        register_base(http, base, name="bench")
        for name, description in DESCRIPTIONS.items():
            meta = brick_metadata(name, base_model="bench", description=description, examples=[], tags=[])
            assert upload(http, adapters[name], metadata=meta).status_code == 201

        router = Router(registry, wake_builds=None)
        options = RoutingOptions(k=2, min_score=-1e9)
        query = "translate this English sentence into French"
        started = time.perf_counter()
        router.route("auto:bench", query, options)
        rows.append(
            ("(d) auto, new recipe: search + compose + build", f"{(time.perf_counter() - started) * 1000:.0f} ms")
        )
        router.route("auto:bench", query, options)  # embedder warm
        decisions = []
        for _ in range(max(args.runs, 20)):
            started = time.perf_counter()
            router.route("auto:bench", query, options)
            decisions.append((time.perf_counter() - started) * 1000)
        rows.append(("(c) auto, cached recipe: routing decision p50 / p95",
                     f"{pct(decisions, 0.5):.1f} / {pct(decisions, 0.95):.1f} ms"))  # fmt: skip

        stream_once(http, "french@1", args.tokens)  # the child loads the base and the adapter
        single = [stream_once(http, "french@1", args.tokens) for _ in range(args.runs)]
        ttft = [s[0] * 1000 for s in single]
        rate = statistics.median(s[2] / s[1] for s in single)
        rows.append(("(e) embedded via gateway, 1 client: TTFT p50", f"{pct(ttft, 0.5):.1f} ms"))
        rows.append(("(e) embedded via gateway, 1 client: tokens/s (text pieces)", f"{rate:.1f}"))
        models = ["french@1", "legal@1", "sql@1", "french@1", "legal@1", "sql@1", "french@1", "legal@1"]
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda m: stream_once(http, m, args.tokens), models))
        wall = time.perf_counter() - started
        rows.append(("(e) embedded via gateway, 8 clients: tokens/s total",
                     f"{sum(r[2] for r in results) / wall:.1f}"))  # fmt: skip
        rows.append(
            ("(e) embedded, 8 clients: TTFT p50 (FIFO queue)", f"{pct([r[0] * 1000 for r in results], 0.5):.0f} ms")
        )
        rows.append(
            (
                "(f) transformers + PEFT generate: tokens/s",
                f"{plain_generate(base, adapters['french'], args.tokens, args.runs):.1f}",
            )
        )
    finally:
        server.should_exit = True
        http.close()
        time.sleep(1)
        registry.close()
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
