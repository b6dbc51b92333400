"""The first search of a fresh server (issue #21, item 5): how long after ``/readyz`` first
answers 200 does the first search take, on a fresh ``BRICKYARD_HOME``?

Each round starts ``brickyard serve`` in a subprocess on a new, empty home and the default
settings (no ``BRICKYARD_EMBEDDING__CACHE_DIR``), with ``XDG_CACHE_HOME`` pointing at a
scratch directory shared by the rounds: round 1 is the first run on a machine, the later
rounds are fresh servers (new homes) on a machine that ran one before. Reported per round:
seconds until ``/readyz`` answers 200, the latency of the first search sent right then, of
the second search, and the server-side embedding time of the first search (its
``Server-Timing`` header). The peer in the same run is the code before the change, run from a
``git archive`` of a given revision (``--before REV``) with the same interpreter.

    python bench/first_search.py                      # this tree, 3 rounds
    python bench/first_search.py --before HEAD~3      # and the code of HEAD~3, in the same run
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _round(source: Path, xdg: Path, scratch: Path) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="home-", dir=scratch))
    port = _port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRICKYARD_")}
    env.update(
        BRICKYARD_HOME=str(home),
        XDG_CACHE_HOME=str(xdg),
        PYTHONPATH=str(source),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    log = open(home.parent / f"{home.name}.log", "wb")  # noqa: SIM115 - closed below
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "registry", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=scratch,
    )
    try:
        while True:
            if process.poll() is not None:
                log.flush()
                raise RuntimeError("server exited:\n" + Path(log.name).read_text(errors="replace")[-3000:])
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        ready_s = time.perf_counter() - started
        searches = []
        for query in ("translate customer emails from Romanian to English", "classify the sentiment of a review"):
            t0 = time.perf_counter()
            response = httpx.post(f"{url}/v1/search", json={"query": query}, timeout=600)
            response.raise_for_status()
            timing = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
            searches.append(((time.perf_counter() - t0) * 1000, float(timing["embed"])))
        return {
            "ready_s": ready_s,
            "first_ms": searches[0][0],
            "first_embed_ms": searches[0][1],
            "second_ms": searches[1][0],
        }
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _source_of(revision: str, scratch: Path) -> Path:
    out = scratch / f"src-{revision.replace('/', '_').replace('~', '_')}"
    out.mkdir()
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True)
    archive.check_returncode()
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def main() -> None:
    """Run the rounds for this tree (and ``--before``), print one line per round."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="a git revision to measure in the same run (the peer)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="brickyard-first-search-"))
    try:
        sources = [("this tree", ROOT)]
        if args.before:
            sources.insert(0, (f"before ({args.before})", _source_of(args.before, scratch)))
        for label, source in sources:
            xdg = scratch / f"xdg-{len(list(scratch.iterdir()))}"  # a fresh machine cache per code version
            xdg.mkdir()
            for n in range(1, args.rounds + 1):
                r = _round(source, xdg, scratch)
                embed = f"{r['first_embed_ms']:.1f}"
                print(
                    f"{label:24} round {n}: ready {r['ready_s']:5.2f} s, first search {r['first_ms']:8.1f} ms "
                    f"(embed {embed} ms), second {r['second_ms']:6.1f} ms",
                    flush=True,
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
