"""Serving benchmark (issue #18), on a tiny Llama with head_dim 64 (hidden 256, 2 layers) and
rank-8 all-projection bricks, in one run against ``create_app`` served by uvicorn on 127.0.0.1:

- (a) vLLM asked directly for a brick it has loaded (``--vllm-python``: the vLLM virtualenv's
  interpreter, as ``make vllm-env`` builds it; vLLM runs with Brickyard's resolver plugin);
- (b) the same brick through Brickyard's gateway (``brickyard serve`` in its own process on the
  same registry with ``serve.engine = vllm``, forwarding to that vLLM), and (b') a second
  gateway with ``serve.relay`` off (streams parsed and written again chunk by chunk): TTFT of
  (a), (b), (b') in turn, and 8 streaming clients on (b) and (b') in paired rounds with each
  gateway's CPU per 1000 tokens;
- (c) the routing decision of ``auto`` with a cached recipe (search + plan, in-process
  ``Router.route``), p50/p95;
- (d) ``auto`` with a new recipe (search + compose + build), once;
- (e) the embedded engine through the gateway;
- (f) plain transformers + PEFT ``generate`` on the same brick, prompt and length, in this
  process with as many torch threads as the embedded engine's child.

The embedded part runs first, then vLLM starts (its processes would otherwise share the cores
with it). Peers are measured in alternation ((e) then (f), (a) then (b), ``--runs`` times each), so both
see the same machine load. Time to first token (TTFT): a streamed request, client side, to the
first chunk with text. Tokens/s: a whole request's ``usage.completion_tokens`` over its wall
time (for (f): new tokens over ``generate``'s time); 8 clients: all tokens over the wall time
of 8 concurrent requests. Every answer is greedy and the same length for every peer.

(a) against (b) is the comparison a busy machine spoils (on 2 cores vLLM saturates both, and
other work moves single numbers by +-30%), so it is made in paired rounds (`Paired`): each
round measures (a) and (b) back to back in ABBA order, and the table gives the median of the
per-round ratios with their spread (lowest .. highest), the 1-minute load average seen during
the rounds (min / median / max), and the gateway process's own CPU seconds per 1000 tokens of
(b), which load does not move much. ``--py-spy PREFIX`` records the gateway during (b)'s rounds.

    python bench/serve.py [--tokens 32] [--runs 10] [--rounds 8] [--vllm-python PATH] [--only-vllm]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
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
EIGHT = ["french@1", "legal@1", "sql@1", "french@1", "legal@1", "sql@1", "french@1", "legal@1"]


def pct(values: list[float], q: float) -> float:
    """The q-quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _body(model: str, tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, **extra}


def ttft(http: httpx.Client, model: str, tokens: int) -> float:
    """Seconds from sending a streamed completion to its first chunk with text."""
    started = time.perf_counter()
    with http.stream("POST", "/v1/completions", json=_body(model, tokens, stream=True)) as response:
        assert response.status_code == 200, response.read()
        first = None
        for line in response.iter_lines():  # read to the end, as a client does
            if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                first = time.perf_counter() - started
    assert first is not None, f"{model}: no text streamed"
    return first


def whole(http: httpx.Client, model: str, tokens: int) -> tuple[int, float]:
    """(completion tokens, seconds) of a whole completion."""
    started = time.perf_counter()
    response = http.post("/v1/completions", json=_body(model, tokens))
    assert response.status_code == 200, response.text
    return int(response.json()["usage"]["completion_tokens"]), time.perf_counter() - started


def streamed(http: httpx.Client, model: str, tokens: int) -> tuple[int, float]:
    """(chunks with text, seconds) of a streamed completion read to its end (vLLM sends a
    token per chunk; asked directly or through the gateway, the same count)."""
    started = time.perf_counter()
    count = 0
    with http.stream("POST", "/v1/completions", json=_body(model, tokens, stream=True)) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                count += 1
    return count, time.perf_counter() - started


def eight_clients(
    http: httpx.Client, models: list[str], tokens: int, one: Callable[..., tuple[int, float]] = whole
) -> tuple[int, float]:
    """(completion tokens, wall seconds) of 8 concurrent completions (``one``: `whole`, `streamed`)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(lambda m: one(http, m, tokens), models))
    return sum(r[0] for r in results), time.perf_counter() - started


def rate(result: tuple[int, float]) -> float:
    """Tokens/s of a (tokens, seconds) result."""
    return result[0] / result[1]


class PlainGenerate:
    """(f): transformers + PEFT ``generate`` (greedy, EOS ignored) on one brick."""

    def __init__(self, base: Path, adapter: Path, tokens: int, threads: int) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        tokenizer: Any = AutoTokenizer.from_pretrained(base)
        self.model: Any = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter)
        ).eval()
        self.ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
        self.tokens = tokens

    def rate(self) -> float:
        """Tokens/s of one ``generate``."""
        import torch

        started = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=self.ids, attention_mask=torch.ones_like(self.ids),
                                      max_new_tokens=self.tokens, min_new_tokens=self.tokens, do_sample=False,
                                      pad_token_id=1)  # fmt: skip
        return (out.shape[1] - self.ids.shape[1]) / (time.perf_counter() - started)


def serve(app: Any) -> tuple[Any, str]:
    """Run ``app`` with uvicorn on a free loopback port; (server, URL)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alternate(runs: int, *measures: Callable[[], float]) -> list[list[float]]:
    """Run each measure ``runs`` times, in turn, so peers share the machine's load."""
    out: list[list[float]] = [[] for _ in measures]
    for _ in range(runs):
        for values, measure in zip(out, measures, strict=True):
            values.append(measure())
    return out


class Paired:
    """Interleaved rounds of two peers measured the same way: per round, one (a) and one (b),
    in ABBA order (a round's second measure never always falls to the same peer), and the ratio
    b/a of that round. Reported: the median ratio and its spread (lowest .. highest round), so a
    noisy machine shows as a wide spread instead of a misleading single number."""

    def __init__(self) -> None:
        self.a: list[float] = []
        self.b: list[float] = []

    def run(self, rounds: int, a: Callable[[], float], b: Callable[[], float]) -> Paired:
        """``rounds`` rounds of ``a`` and ``b``; returns self."""
        for i in range(rounds):
            if i % 2 == 0:
                ra, rb = a(), b()
            else:
                rb, ra = b(), a()
            self.a.append(ra)
            self.b.append(rb)
        return self

    @property
    def ratios(self) -> list[float]:
        """b/a per round."""
        return [rb / ra for ra, rb in zip(self.a, self.b, strict=True)]

    def summary(self) -> str:
        """``median ratio (spread lo..hi over N rounds)``."""
        r = self.ratios
        return f"{statistics.median(r):.1%} of (a) (rounds {min(r):.0%}..{max(r):.0%}, n={len(r)})"


class LoadSampler:
    """The 1-minute load average, sampled every second in a thread while a section runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(1.0)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        """``min / median / max`` of the samples."""
        s = self.samples or [os.getloadavg()[0]]
        return f"{min(s):.1f} / {statistics.median(s):.1f} / {max(s):.1f}"


class CpuMeter:
    """CPU seconds (user + system) a process spends during the measures wrapped by `measure`,
    and the tokens those measures produced: the gateway's cost per token."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.seconds = 0.0
        self.tokens = 0

    def _cpu(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def measure(self, run: Callable[[], tuple[int, float]]) -> Callable[[], float]:
        """``run`` returns (tokens, seconds); the wrapped measure returns tokens/s and counts."""

        def measured() -> float:
            before = self._cpu()
            tokens, seconds = run()
            self.seconds += self._cpu() - before
            self.tokens += tokens
            return tokens / seconds

        return measured

    def per_thousand_tokens(self) -> float:
        """CPU seconds per 1000 tokens."""
        return 1000 * self.seconds / max(self.tokens, 1)


def start_vllm(
    python: Path, base: Path, work: Path, brickyard_url: str, token: str
) -> tuple[subprocess.Popen[bytes], str]:
    """vLLM's OpenAI server on ``base`` with Brickyard's resolver (as tests/vllm starts it)."""
    port = free_port()
    env = {
        **os.environ,
        "VLLM_PLUGINS": "brickyard",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_LOOPBACK_IP": "127.0.0.1",
        "BRICKYARD_URL": brickyard_url,
        "BRICKYARD_TOKEN": token,
        "BRICKYARD_VLLM_CACHE": str(work / "vllm-adapters"),
    }
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "128",
        "--enforce-eager", "--enable-lora", "--max-lora-rank", "64", "--max-loras", "8",
    ]  # fmt: skip
    log = (work / "vllm.log").open("ab")
    # Its own session: stopping it stops its engine-core processes too (`stop_process`).
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_up(process, f"{url}/health", 900, f"vLLM (see {work / 'vllm.log'})")
    return process, url


def wait_up(process: subprocess.Popen[bytes], probe: str, seconds: float, what: str) -> None:
    """Wait until ``probe`` answers 200; stop ``process`` and exit if it dies or stalls."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop_process(process)  # what it started may outlive it
            raise SystemExit(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(probe, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    stop_process(process)
    raise SystemExit(f"{what} did not start in {seconds:.0f} s")


def start_gateway(work: Path, vllm_url: str | None, *, relay: bool = True) -> tuple[subprocess.Popen[bytes], str]:
    """``brickyard serve`` on the benchmark's registry, in its own process as deployed: with
    ``serve.engine = vllm`` forwarding to ``vllm_url`` (``relay``: ``serve.relay``), or the
    embedded engine when None."""
    port = free_port()
    engine = (
        {"BRICKYARD_SERVE__ENGINE": "vllm", "BRICKYARD_SERVE__VLLM_URL": vllm_url,
         "BRICKYARD_SERVE__RELAY": "true" if relay else "false"}
        if vllm_url else {}
    )  # fmt: skip
    env = {**os.environ, "BRICKYARD_HOME": str(work / "home"), "BRICKYARD_MODEL_ROOTS": json.dumps([str(work)]),
           **engine}  # fmt: skip
    log = (work / ("gateway.log" if relay else "gateway-rewrite.log")).open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "registry", "serve", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_up(process, f"{url}/readyz", 300, f"the gateway (see {work / 'gateway.log'})")
    return process, url


def py_spy(pid: int, prefix: Path, clients: str) -> subprocess.Popen[bytes]:
    """``py-spy record`` of ``pid`` until stopped, into ``<prefix>-<clients>.svg`` (a flame graph)."""
    out = prefix.with_name(f"{prefix.name}-{clients.replace(' ', '-')}.svg")
    command = [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--rate", "200",
               "--output", str(out), "--nonblocking"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a server started in its own session and what it started, politely first."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def main() -> int:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8, help="interleaved (a)/(b) rounds of 8 clients")
    parser.add_argument("--vllm-python", type=Path, default=None, help="the vLLM virtualenv's python: adds (a), (b)")
    parser.add_argument("--only-vllm", action="store_true", help="skip (c)-(f): only (a) and (b)")
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        help="record the gateway with py-spy during (b)'s rounds: PREFIX-<clients>.svg",
    )
    args = parser.parse_args()

    from composer.testing import LLAMA_PROJECTIONS, make_base_model, make_lora
    from registry.api import create_app
    from registry.serve.embedded import engine_threads
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

    def settings(**serve: Any) -> Settings:
        return Settings(
            home=work / "home",
            compose=ComposeSettings(isolation="thread"),
            embedding={"isolation": "thread"},
            model_roots=[work],  # base models register only from the model roots (registry/storage/model_roots.py)
            serve=serve,
        )

    registry = Registry.open(settings())
    token, _ = registry.tokens.create("bench", "admin", actor="bench")
    headers = {"Authorization": f"Bearer {token}"}
    server, url = serve(create_app(registry=registry))
    http = httpx.Client(base_url=url, timeout=600, headers=headers)
    rows: list[tuple[str, str]] = []
    stop: list[Callable[[], None]] = []
    try:
        register_base(http, base, name="bench")
        for name, description in DESCRIPTIONS.items():
            meta = brick_metadata(name, base_model="bench", description=description, examples=[], tags=[])
            assert upload(http, adapters[name], metadata=meta).status_code == 201

        if not args.only_vllm:
            router = Router(registry, wake_builds=None)
            options = RoutingOptions(k=2, min_score=-1e9)
            query = "translate this English sentence into French"
            started = time.perf_counter()
            router.route("auto:bench", query, options)
            rows.append(
                ("(d) auto, new recipe: search + compose + build", f"{(time.perf_counter() - started) * 1000:.0f} ms")
            )
            router.route("auto:bench", query, options)  # embedder warm
            decisions, searches = [], []
            request = {"query": query, "base_model": "bench", "k": 2, "min_score": -1e9, "kind": "lora"}
            for _ in range(max(args.runs, 30)):
                started = time.perf_counter()
                router.route("auto:bench", query, options)
                decisions.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                registry.search(request)
                searches.append((time.perf_counter() - started) * 1000)
            rows.append(("(c) auto, cached recipe: routing decision p50 / p95",
                         f"{pct(decisions, 0.5):.1f} / {pct(decisions, 0.95):.1f} ms (goal p50 <= 15)"))  # fmt: skip
            rows.append(("    of which the search alone: p50", f"{pct(searches, 0.5):.1f} ms"))

            threads = engine_threads(registry.settings.serve.threads)
            plain = PlainGenerate(base, adapters["french"], args.tokens, threads)
            # The embedded engine behind a gateway in its own process, as deployed (in this process
            # the server thread would share the GIL with the client, as for (b) below).
            embedded_process, embedded_url = start_gateway(work, None)
            stop.append(lambda: stop_process(embedded_process))
            http = httpx.Client(base_url=embedded_url, timeout=600, headers=headers)
            whole(http, "french@1", args.tokens)  # the child loads the base and the adapter
            plain.rate()
            e_rate, f_rate = alternate(args.runs, lambda: rate(whole(http, "french@1", args.tokens)), plain.rate)
            e_ttft = [ttft(http, "french@1", args.tokens) * 1000 for _ in range(args.runs)]
            e8 = [rate(eight_clients(http, EIGHT, args.tokens)) for _ in range(max(3, args.runs // 3))]
            e, f = statistics.median(e_rate), statistics.median(f_rate)
            rows += [
                ("(e) embedded via gateway, 1 client: TTFT p50", f"{pct(e_ttft, 0.5):.1f} ms"),
                (f"(e) embedded via gateway, 1 client: tokens/s ({threads} torch threads)",
                 f"{e:.1f} ({e / f:.0%} of (f); goal >= 90%)"),
                (f"(f) transformers + PEFT generate: tokens/s ({threads} torch threads)", f"{f:.1f}"),
                ("(e) embedded via gateway, 8 clients: tokens/s total (FIFO)", f"{statistics.median(e8):.1f}"),
            ]  # fmt: skip
            http.close()
            stop_process(embedded_process)  # its engine would share the cores with vLLM

        if args.vllm_python is not None:
            process, vllm_url = start_vllm(args.vllm_python, base, work, url, token)
            stop.append(lambda: stop_process(process))
            # The gateway in its own process, as deployed (in this one it would share the GIL with
            # the 8 client threads, which vLLM asked directly does not).
            gateway_process, gateway_url = start_gateway(work, vllm_url)
            stop.append(lambda: stop_process(gateway_process))
            # (b') the same gateway with ``serve.relay`` off (streams parsed and written again chunk
            # by chunk), so the relay's TTFT and CPU are compared in the same run.
            rewrite_process, rewrite_url = start_gateway(work, vllm_url, relay=False)
            stop.append(lambda: stop_process(rewrite_process))
            direct = httpx.Client(base_url=vllm_url, timeout=600)
            gateway = httpx.Client(base_url=gateway_url, timeout=600, headers=headers)
            rewrite = httpx.Client(base_url=rewrite_url, timeout=600, headers=headers)
            for model in ("french@1", "legal@1", "sql@1"):  # resolved and loaded by vLLM: preloaded
                for client in (direct, gateway, rewrite):
                    assert whole(client, model, 4)[0] > 0
            a_ttft, b_ttft, r_ttft = (
                [seconds * 1000 for seconds in values]
                for values in alternate(
                    args.runs,
                    lambda: ttft(direct, "french@1", args.tokens),
                    lambda: ttft(gateway, "french@1", args.tokens),
                    lambda: ttft(rewrite, "french@1", args.tokens),
                )
            )
            a_p50 = pct(a_ttft, 0.5)

            def over_direct(values: list[float]) -> str:
                p50 = pct(values, 0.5)
                return f"{p50:.1f} ms (+{p50 - a_p50:.1f} ms; goal <= +10), p90 {pct(values, 0.9):.1f} ms"

            rows += [
                ("(a) vLLM direct, 1 client: TTFT p50", f"{a_p50:.1f} ms, p90 {pct(a_ttft, 0.9):.1f} ms"),
                ("(b) vLLM via gateway, 1 client: TTFT p50", over_direct(b_ttft)),
                ("(b') via gateway, relay off, 1 client: TTFT p50", over_direct(r_ttft)),
            ]  # fmt: skip
            for clients, measure, rounds in (
                ("1", lambda http: whole(http, "french@1", args.tokens), args.runs),
                ("8", lambda http: eight_clients(http, EIGHT, args.tokens), args.rounds),
                ("8 streaming", lambda http: eight_clients(http, EIGHT, args.tokens, streamed), args.rounds),
            ):
                cpu = CpuMeter(gateway_process.pid)
                recording = py_spy(gateway_process.pid, args.py_spy, clients) if args.py_spy else None
                with LoadSampler() as load:
                    pair = Paired().run(
                        rounds,
                        lambda m=measure: rate(m(direct)),  # type: ignore[misc]
                        cpu.measure(lambda m=measure: m(gateway)),  # type: ignore[misc]
                    )
                if recording is not None:  # py-spy writes its file on SIGINT (Ctrl-C)
                    recording.send_signal(signal.SIGINT)
                    recording.wait(120)
                rows += [
                    (f"(a) vLLM direct, {clients} client(s): tokens/s median", f"{statistics.median(pair.a):.1f}"),
                    (f"(b) vLLM via gateway, {clients} client(s): tokens/s median",
                     f"{statistics.median(pair.b):.1f}"),
                    (f"    (b)/(a) per round, {clients} client(s) (goal >= 95%)", pair.summary()),
                    (f"    gateway CPU per 1000 tokens, {clients} client(s)", f"{cpu.per_thousand_tokens():.3f} s"),
                    (f"    load average min / median / max, {clients} client(s)", load.summary()),
                ]  # fmt: skip
            # The relay against re-writing every chunk: 8 streaming clients on both gateways in
            # paired rounds, each gateway's CPU per 1000 streamed tokens.
            relay_cpu, rewrite_cpu = CpuMeter(gateway_process.pid), CpuMeter(rewrite_process.pid)
            with LoadSampler() as load:
                pair = Paired().run(
                    args.rounds,
                    rewrite_cpu.measure(lambda: eight_clients(rewrite, EIGHT, args.tokens, streamed)),
                    relay_cpu.measure(lambda: eight_clients(gateway, EIGHT, args.tokens, streamed)),
                )
            rows += [
                ("(b) relay / (b') relay off, 8 streaming clients: tokens/s", pair.summary().replace("(a)", "(b')")),
                ("    gateway CPU per 1000 tokens, relay / relay off",
                 f"{relay_cpu.per_thousand_tokens():.3f} s / {rewrite_cpu.per_thousand_tokens():.3f} s"),
                ("    load average min / median / max", load.summary()),
            ]  # fmt: skip
            direct.close()
            gateway.close()
            rewrite.close()

    finally:
        for action in reversed(stop):
            action()
        server.should_exit = True
        http.close()
        width = max((len(r[0]) for r in rows), default=0)
        print(f"\nserving benchmark, {args.tokens} tokens, {args.runs} runs, {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f}")  # fmt: skip
        for label, value in rows:
            print(f"{label:<{width}}  {value}", flush=True)
        time.sleep(1)
        registry.close()
        if os.environ.get("BRICKYARD_BENCH_KEEP") == "1":  # as bench/_registry.py: keep it to read the logs
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
