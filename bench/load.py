"""Mixed load against ``brickyard serve`` on 127.0.0.1: 16 concurrent clients for 60 s,
80% searches, 15% brick registrations, 5% composition requests, on SQLite and on
PostgreSQL. Compositions are built by the server's worker (a niced child process) while
the load runs, on a ~35M-parameter base so that builds take real time.

Reported: requests/s, p50/p95/p99 per kind, answers by status; then every acknowledged
registration is checked (present, sha256 of its stored bytes equal to what was sent).
With ``--profile``, py-spy samples the server for the whole run and the top frames are
printed: that is what limits throughput.

    python bench/load.py [--backends sqlite,postgresql] [--seconds 60] [--clients 16] [--profile]
    python bench/load.py --rate 15      # open loop: 15 requests/s offered, same mix
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._registry import (
    CACHE,
    live_server,
    load_tasks,
    migrated_database,
    percentile,
    scratch_home,
    task_brick_form,
)

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 512, 1536, 8, 8000
SEED_BRICKS = 100
EXAMPLES = 3  # instance inputs registered as a brick's examples


def base_model() -> Path:
    """A Llama-shaped random base of ~35M parameters (float32, ~140 MB), built once."""
    from composer.testing import make_base_model

    path = CACHE / "load-base"
    if not (path / "config.json").exists():
        make_base_model(
            path, num_layers=LAYERS, hidden=HIDDEN, intermediate=INTERMEDIATE, vocab=VOCAB, max_shard_size="50MB"
        )
    return path


def adapter(seed: int, r: int = 4) -> tuple[bytes, bytes]:
    """A random LoRA on q_proj and v_proj of every layer of `base_model` (unique per seed)."""
    import struct

    rng = np.random.default_rng(seed)
    kv_out = HIDDEN // 2  # toy Llama: 4 heads, 2 key/value heads
    header: dict[str, Any] = {}
    data = bytearray()
    for layer in range(LAYERS):
        for proj, out in (("q_proj", HIDDEN), ("v_proj", kv_out)):
            for factor, shape in (("A", [r, HIDDEN]), ("B", [out, r])):
                payload = rng.normal(0, 0.02, shape).astype("<f4").tobytes()
                name = f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{factor}.weight"
                header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
                data += payload
    encoded = json.dumps(header).encode()
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]}
    return json.dumps(config).encode(), struct.pack("<Q", len(encoded)) + encoded + bytes(data)


class Recorder:
    """Latencies and statuses per request kind, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.status: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
        self.acknowledged: dict[str, str] = {}
        self.transport_errors = 0
        self.search_stages: dict[str, list[float]] = collections.defaultdict(list)

    def add(self, kind: str, seconds: float, status: int) -> None:
        with self.lock:
            self.latency[kind].append(seconds * 1000)
            self.status[kind][status] += 1

    def add_search_stages(self, seconds: float, server_timing: str) -> None:
        """A search's ``Server-Timing`` stages, and the rest of its latency ("outside":
        waiting for a server thread, authentication, HTTP, the clients' own delays)."""
        stages = {}
        for part in server_timing.split(","):
            name, _, duration = part.strip().partition(";dur=")
            if duration:
                stages[name] = float(duration)
        with self.lock:
            for name, ms in stages.items():
                self.search_stages[name].append(ms)
            self.search_stages["outside"].append(seconds * 1000 - sum(stages.values()))


def seed(url: str, token: str, console: Console) -> None:
    """Register the base model and the bricks that compositions pick from."""
    import httpx

    tasks = load_tasks()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        response = http.post("/v1/base-models", json={"name": "base", "path": str(base_model())})
        response.raise_for_status()
        for i in range(SEED_BRICKS):
            task = tasks[i % len(tasks)]
            config, weights = adapter(i)
            form = task_brick_form(f"seed-{i:03d}", "base", task, EXAMPLES, config, weights)
            http.post("/v1/bricks", **form).raise_for_status()
    console.print(f"seeded {SEED_BRICKS} bricks")


def run(
    url: str, token: str, *, seconds: float, clients: int, rate: float, mix: tuple[float, float], console: Console
) -> Recorder:
    """``clients`` threads mixing searches, registrations and compositions for ``seconds``.

    ``rate`` 0: closed loop, each client sends its next request as soon as it has an answer
    (the server is saturated; latency is mostly queueing). ``rate`` > 0: requests arrive at
    that many per second in total (one Poisson schedule), and each arrival is sent by the
    next client that is free, so a slow registration delays no other request; a request's
    latency is counted from its scheduled arrival, so time spent waiting for a free client
    counts too (no coordinated omission)."""
    import httpx

    tasks = load_tasks()
    queries = [i["input"] for t in tasks for i in t["instances"][5:]] + [t["definition"][:200] for t in tasks]
    headers = {"Authorization": f"Bearer {token}"}
    recorder = Recorder()
    stop = time.monotonic() + seconds
    counter = iter(range(10**9))
    counter_lock = threading.Lock()
    schedule = random.Random(-1)
    next_arrival = [time.perf_counter()]

    def take_arrival() -> float:
        with counter_lock:
            next_arrival[0] += schedule.expovariate(rate)
            return next_arrival[0]

    def client(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
            while time.monotonic() < stop:
                roll = rng.random()
                started = time.perf_counter()
                if rate > 0:
                    arrival = take_arrival()
                    if arrival > started:
                        time.sleep(arrival - started)
                    started = arrival
                try:
                    if roll < mix[0]:
                        kind = "search"
                        response = http.post("/v1/search", json={"query": rng.choice(queries), "k": 5})
                    elif roll < mix[1]:
                        kind = "register"
                        with counter_lock:
                            n = next(counter)
                        config, weights = adapter(100_000 + n)
                        task = tasks[n % len(tasks)]
                        name = f"load-{n:06d}"
                        form = task_brick_form(name, "base", task, EXAMPLES, config, weights)
                        response = http.post("/v1/bricks", **form)
                        if response.status_code == 201:
                            with recorder.lock:
                                recorder.acknowledged[name] = hashlib.sha256(weights).hexdigest()
                    else:
                        kind = "compose"
                        pair = rng.sample(range(SEED_BRICKS), 2)
                        request = {
                            "base_model": "base",
                            "bricks": [
                                {"name": f"seed-{p:03d}", "weight": round(rng.uniform(0.2, 1.0), 2)} for p in pair
                            ],
                            "method": rng.choice(["linear", "ties"]),
                        }
                        response = http.post("/v1/compositions", json=request)
                    elapsed = time.perf_counter() - started
                    recorder.add(kind, elapsed, response.status_code)
                    if kind == "search" and response.status_code == 200:
                        recorder.add_search_stages(elapsed, response.headers.get("server-timing", ""))
                except httpx.TransportError:
                    with recorder.lock:
                        recorder.transport_errors += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorder.elapsed = time.monotonic() - began  # type: ignore[attr-defined]
    return recorder


def verify(url: str, token: str, recorder: Recorder) -> tuple[int, int]:
    """(acknowledged registrations found intact, lost or altered)."""
    import httpx

    found: dict[str, str] = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 500, "all_versions": True}
            if cursor:
                params["cursor"] = cursor
            page = http.get("/v1/bricks", params=params).json()
            found.update({b["name"]: b["sha256"] for b in page["items"]})
            cursor = page["next_cursor"]
            if cursor is None:
                break
        intact = lost = 0
        for name, digest in recorder.acknowledged.items():
            stored = http.get(f"/v1/bricks/{name}/versions/1/files/adapter_model.safetensors")
            ok = found.get(name) == digest and hashlib.sha256(stored.content).hexdigest() == digest
            intact, lost = (intact + 1, lost) if ok else (intact, lost + 1)
    return intact, lost


_CATEGORIES = (
    ("composition builds (build process)", ("registry/builds/jobs.py", "(composer/")),
    ("embedding brick texts (embedding process)", ("registry/search/embed_process.py",)),
    ("embedding texts (MiniLM forward)", ("registry/embed.py",)),
    ("adapter validation (upload)", ("registry/spec.py", "registry/storage/blobs.py")),
    ("ranking + candidate generation", ("registry/retrieve.py", "registry/index.py", "registry/lexical.py")),
    ("database (SQLAlchemy + driver)", ("sqlalchemy/", "psycopg/")),
    ("HTTP, validation, serialisation", ("starlette/", "fastapi/", "uvicorn/", "pydantic", "h11/", "anyio/")),
)


def profile_top(raw: Path, console: Console, limit: int = 10) -> None:
    """Print where py-spy saw the server and its build processes spend time: by category
    (first matching rule over the stack) and by innermost frame of Brickyard's own code."""
    categories: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack.startswith("process "):
            continue
        n = int(count)
        total += n
        category = next(
            (label for label, needles in _CATEGORIES if any(needle in stack for needle in needles)), "other / idle"
        )
        categories[category] += n
        frames = stack.split(";")
        mine = [f for f in frames[1:] if "(registry/" in f or "(composer/" in f]
        ours[(mine[-1] if mine else "(outside Brickyard code)") + "  ->  " + frames[-1].split(" (")[0]] += n
    table = Table(title=f"py-spy: {total} samples (50/s per thread, server and build process)")
    table.add_column("share", justify="right")
    table.add_column("where")
    for name, n in categories.most_common():
        table.add_row(f"{100 * n / max(total, 1):.1f}%", name)
    table.add_section()
    for frame, n in ours.most_common(limit):
        table.add_row(f"{100 * n / max(total, 1):.1f}%", frame[:140])
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--profile", action="store_true", help="sample the server with py-spy")
    parser.add_argument("--workers", type=int, default=1, help="server processes (brickyard serve --workers)")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="offered requests/s in total (Poisson); 0: closed loop (default)"
    )
    parser.add_argument(
        "--mix", default="80,15,5", help="percent of searches, registrations, compositions (default 80,15,5)"
    )
    args = parser.parse_args()
    shares = [float(x) for x in args.mix.split(",")]
    if len(shares) != 3 or min(shares) < 0 or not sum(shares):
        parser.error("--mix takes three non-negative percentages, e.g. 80,15,5")
    mix = (shares[0] / sum(shares), (shares[0] + shares[1]) / sum(shares))
    console = Console(width=150)
    base_model()
    summary = []
    for backend in args.backends.split(","):
        offered = f", {args.rate:g} req/s offered" if args.rate > 0 else ", closed loop"
        console.rule(f"{backend}: {args.clients} clients, {args.seconds:.0f} s{offered}")
        with scratch_home("brickyard-load-") as home, migrated_database(backend, home) as database_url:
            url_env = {"BRICKYARD_HOME": str(home), "BRICKYARD_DATABASE_URL": database_url}
            with live_server(url_env, log=home / "server.log", workers=args.workers) as url:
                token = (home / "admin-token").read_text().strip()
                spy = None
                if args.profile:
                    pid = _server_pid(home)
                    spy_command = [
                        str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--format", "raw",
                        "--rate", "50", "--subprocesses", "--output", str(home / "profile.txt"), "--nonblocking",
                    ]  # fmt: skip
                    spy = subprocess.Popen(spy_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                seed(url, token, console)
                server = psutil.Process(_server_pid(home))
                cpu_before = _cpu_seconds(server)
                recorder = run(
                    url, token, seconds=args.seconds, clients=args.clients, rate=args.rate, mix=mix, console=console
                )
                recorder.cpu = {k: v - cpu_before.get(k, 0.0) for k, v in _cpu_seconds(server).items()}  # type: ignore[attr-defined]
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait(60)
                intact, lost = verify(url, token, recorder)
            summary.append((backend, recorder, intact, lost))
            _print(backend, recorder, intact, lost, console)
            if args.profile and (home / "profile.txt").exists():
                profile_top(home / "profile.txt", console)
    console.rule("summary")
    for backend, recorder, intact, lost in summary:
        errors = sum(n for c in recorder.status.values() for s, n in c.items() if s >= 500)
        search_p95 = percentile(recorder.latency["search"], 95)
        console.print(
            f"{backend}: {sum(len(v) for v in recorder.latency.values()) / recorder.elapsed:.1f} req/s, "  # type: ignore[attr-defined]
            f"5xx={errors}, lost registrations={lost} of {intact + lost}, search p95={search_p95:.0f} ms "
            f"(goal: 0 5xx, 0 lost, search p95 < 100 ms)"
        )


def _cpu_seconds(server: Any) -> dict[str, float]:
    """CPU seconds (user + system) of the API server, its embedding and build processes,
    the PostgreSQL server (every ``postgres`` process on the machine: the bench's own) and
    this process, the clients."""
    import psutil

    def used(process: Any) -> float:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return float(times.user + times.system)

    children = server.children(recursive=True)
    builders = [c for c in children if "registry.builds.jobs" in " ".join(c.cmdline())]
    embedders = [c for c in children if "registry.search.embed_process" in " ".join(c.cmdline())]
    api = [server, *(c for c in children if c not in builders and c not in embedders)]
    database = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]
    return {
        "API server": sum(used(p) for p in api),
        "embedding process": sum(used(c) for c in embedders),
        "build processes": sum(used(c) for c in builders),
        "PostgreSQL": sum(used(p) for p in database),
        "load generator": used(psutil.Process()),
    }


def _server_pid(home: Path) -> int:
    out = subprocess.run(["pgrep", "-o", "-f", "registry serve"], capture_output=True, text=True).stdout.split()
    return int(out[0])


def _print(backend: str, recorder: Recorder, intact: int, lost: int, console: Console) -> None:
    elapsed = recorder.elapsed  # type: ignore[attr-defined]
    table = Table(title=f"{backend}: {sum(len(v) for v in recorder.latency.values()) / elapsed:.1f} requests/s")
    for column in ("kind", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "answers by status"):
        table.add_column(column, justify="right" if column != "kind" else "left")
    for kind in ("search", "register", "compose"):
        values = recorder.latency.get(kind, [])
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(recorder.status[kind].items()))
        table.add_row(
            kind,
            str(len(values)),
            f"{len(values) / elapsed:.1f}",
            f"{percentile(values, 50):.0f}",
            f"{percentile(values, 95):.0f}",
            f"{percentile(values, 99):.0f}",
            statuses,
        )
    console.print(table)
    if recorder.search_stages:
        stages = Table(title="where a search's time goes (Server-Timing; outside = the rest)")
        for column in ("stage", "p50 ms", "p95 ms", "p99 ms"):
            stages.add_column(column, justify="right" if column != "stage" else "left")
        for name, values in recorder.search_stages.items():
            stages.add_row(name, *(f"{percentile(values, q):.1f}" for q in (50, 95, 99)))
        console.print(stages)
    console.print(
        f"transport errors: {recorder.transport_errors}; acknowledged registrations intact: {intact}, lost: {lost}"
    )
    cpu = getattr(recorder, "cpu", {})
    if cpu:
        spent = ", ".join(
            f"{name} {seconds:.0f} s ({100 * seconds / (2 * elapsed):.0f}% of 2 cores)"
            for name, seconds in cpu.items()
            if seconds >= 0.5
        )
        console.print(f"CPU used during the load (after seeding): {spent}")


if __name__ == "__main__":
    main()
