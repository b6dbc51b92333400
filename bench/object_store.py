"""Benchmark: Brickyard on S3-compatible object storage, each claim against its peer in the
same run, with the same boto3 client and transfer settings.

1. Publishing a composition's output (`registry.storage.composition_outputs.publish_directory`:
   stage + sha256, conditional upload with SHA-256 checksums the server checks, a HEAD that
   compares size, metadata and checksum) against (peer) a plain ``upload_file`` of the same
   files. The runs alternate, each into a fresh bucket; best and median are reported.
2. Registering a base model from an ``s3://`` prefix: what registration reads
   (`registry.storage.s3_bases.base_model_headers` + `composer.read_base_model`: config, index and
   two ranged GETs per shard) against (peer) downloading the whole model
   (`registry.storage.s3_bases.base_model_dir`, what a build does once per machine). Bytes and
   requests are counted with botocore's events, so they do not depend on the machine.

The output and the base model are a synthetic Llama (random bf16 weights, cached in .bench/).

    python bench/object_store.py                       # moto's server in a child process
    python bench/object_store.py --endpoint http://127.0.0.1:9000   # MinIO: docker compose up minio
    (MinIO: export AWS_ACCESS_KEY_ID=brickyard AWS_SECRET_ACCESS_KEY=brickyard-minio-secret,
     the credentials of docker-compose.yml, and publish its port 9000 on loopback)

What the numbers mean: on moto the server is a Python process on the same cores as the
client, so seconds measure Brickyard's overhead over a plain upload through the same slow
server (hashing, checksums, the verifying HEAD), not the throughput of a storage system; the
ratio to the peer is the number to read, and only on a quiet machine. Bytes and request
counts of (2) are exact on any server.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench"
sys.path.insert(0, str(ROOT))


def _model(args: argparse.Namespace) -> Path:
    from composer.testing import make_synthetic_llama

    name = f"s3-llama-l{args.layers}-h{args.hidden}-v{args.vocab}-s{args.shard_mb}"
    target = CACHE / name
    if not (target / "config.json").exists():
        shutil.rmtree(target, ignore_errors=True)
        make_synthetic_llama(
            target,
            num_layers=args.layers,
            hidden=args.hidden,
            intermediate=4 * args.hidden,
            vocab=args.vocab,
            num_heads=args.hidden // 64,
            num_kv_heads=args.hidden // 64,
            shard_bytes=args.shard_mb * 1000 * 1000,
        )
    return target


@contextmanager
def _moto() -> Iterator[str]:
    """moto's S3 server in its own process (not a thread of this one: it must not share our GIL)."""
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_EC2_METADATA_DISABLED="true")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)


class _Counter:
    """Requests and response-body bytes of one client, from botocore's events."""

    def __init__(self) -> None:
        self.requests = 0
        self.gets = 0
        self.bytes = 0

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-send.s3", self._sent)
        client.meta.events.register("after-call.s3.GetObject", self._received)
        return client

    def _sent(self, **_: Any) -> None:
        self.requests += 1

    def _received(self, parsed: dict[str, Any], **_: Any) -> None:
        self.gets += 1
        self.bytes += int(parsed.get("ContentLength", 0))


def _empty(client: Any, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for entry in page.get("Contents", ()):
            client.delete_object(Bucket=bucket, Key=entry["Key"])
    client.delete_bucket(Bucket=bucket)


def _publish_vs_upload(args: argparse.Namespace, endpoint: str, model: Path, total: int) -> None:
    from boto3.s3.transfer import TransferConfig

    from registry.settings import BlobSettings
    from registry.storage.composition_outputs import publish_directory
    from registry.storage.s3_blobs import S3BlobStore, make_s3_client

    defaults = BlobSettings()  # the store's transfer settings, given to the plain upload too
    transfer = TransferConfig(
        multipart_threshold=defaults.multipart_threshold_bytes,
        multipart_chunksize=defaults.multipart_chunk_bytes,
        max_concurrency=defaults.max_concurrency,
    )
    client = make_s3_client(endpoint_url=endpoint, region="us-east-1")
    files = sorted(p for p in model.iterdir() if p.is_file())
    names = (f"bench-{os.getpid()}-{i}" for i in itertools.count())
    scratch = Path(tempfile.mkdtemp(prefix="brickyard-bench-"))

    def publish() -> float:
        bucket = next(names)
        client.create_bucket(Bucket=bucket)
        store = S3BlobStore(
            client,
            bucket,
            "blobs/",
            cache_dir=scratch / bucket,
            multipart_threshold=defaults.multipart_threshold_bytes,
            multipart_chunk=defaults.multipart_chunk_bytes,
            max_concurrency=defaults.max_concurrency,
        )
        started = time.perf_counter()
        publish_directory(store, model)
        seconds = time.perf_counter() - started
        _empty(client, bucket)
        shutil.rmtree(scratch / bucket, ignore_errors=True)
        return seconds

    def upload() -> float:
        bucket = next(names)
        client.create_bucket(Bucket=bucket)
        started = time.perf_counter()
        for path in files:
            client.upload_file(str(path), bucket, f"plain/{path.name}", Config=transfer)
        seconds = time.perf_counter() - started
        _empty(client, bucket)
        return seconds

    publish(), upload()  # warm-up: connections, imports, the page cache
    runs: dict[str, list[float]] = {"publish": [], "upload": []}
    for _ in range(args.repeat):
        for kind, run in (("publish", publish), ("upload", upload)):
            runs[kind].append(run())
        print(f"  publish {runs['publish'][-1]:6.2f} s   upload {runs['upload'][-1]:6.2f} s", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    best = {k: min(v) for k, v in runs.items()}
    median = {k: statistics.median(v) for k, v in runs.items()}
    print()
    print(f"(1) publishing {len(files)} files, {total / 1e6:,.0f} MB; best and median of {args.repeat}")
    print(f"{'contender':<36}{'best s':>9}{'median s':>10}{'MB/s':>8}{'vs upload':>11}")
    for kind, label in (("publish", "brickyard publish_directory"), ("upload", "plain upload_file (peer)")):
        print(
            f"{label:<36}{best[kind]:9.2f}{median[kind]:10.2f}{total / 1e6 / best[kind]:8.0f}"
            f"{best[kind] / best['upload']:10.2f}x"
        )
    print(f"median ratio publish / upload: {median['publish'] / median['upload']:.2f}x")


def _registration_vs_download(endpoint: str, model: Path, total: int) -> None:
    from composer import read_base_model
    from registry.settings import Settings
    from registry.storage import s3_bases, s3_blobs

    client = s3_blobs.make_s3_client(endpoint_url=endpoint, region="us-east-1")
    bucket = f"bench-base-{os.getpid()}"
    client.create_bucket(Bucket=bucket)
    for path in sorted(model.iterdir()):
        if path.is_file():
            client.upload_file(str(path), bucket, f"models/m/{path.name}")
    url = f"s3://{bucket}/models/m"
    rows = []
    make = s3_blobs.make_s3_client
    for label, view in (
        ("registration: headers view", s3_bases.base_model_headers),
        ("full download (peer)", s3_bases.base_model_dir),
    ):
        home = Path(tempfile.mkdtemp(prefix="brickyard-bench-home-"))
        settings = Settings(home=home, blobs={"endpoint_url": endpoint, "region": "us-east-1"})
        counter = _Counter()
        s3_blobs.make_s3_client = lambda counter=counter, **kw: counter.attach(make(**kw))  # type: ignore[assignment]
        try:
            started = time.perf_counter()
            local = view(url, settings)
            seconds = time.perf_counter() - started
        finally:
            s3_blobs.make_s3_client = make  # type: ignore[assignment]
        layout = read_base_model(local)  # what registration parses next, from local files
        disk = sum(p.stat().st_blocks * 512 for p in home.rglob("*") if p.is_file())
        rows.append((label, seconds, counter.gets, counter.requests, counter.bytes, disk, layout.fingerprint()))
        shutil.rmtree(home, ignore_errors=True)
    _empty(client, bucket)
    assert rows[0][-1] == rows[1][-1], "the header view and the full copy disagree on the fingerprint"
    print()
    print(f"(2) reading a base model for registration from s3:// ({total / 1e6:,.0f} MB in the bucket)")
    print(
        f"{'contender':<30}{'seconds':>9}{'GETs':>6}{'requests':>10}{'bytes fetched':>16}{'of model':>10}{'disk':>12}"
    )
    for label, seconds, gets, requests, fetched, disk, _ in rows:
        print(
            f"{label:<30}{seconds:9.2f}{gets:6d}{requests:10d}{fetched:16,d}{100 * fetched / total:9.3f}%"
            f"{disk / 1e6:10.1f}MB"
        )
    print("(seconds: listing and fetching only; both then parse the same local files)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint", default=None, help="S3-compatible endpoint (default: moto in a child process)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the synthetic model")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=50, help="shard size (MB) of the synthetic model")
    parser.add_argument("--repeat", type=int, default=5, help="alternating runs of publish and upload")
    args = parser.parse_args()
    CACHE.mkdir(exist_ok=True)
    model = _model(args)
    total = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with _moto() if args.endpoint is None else _given(args.endpoint) as endpoint:
        print(f"object store: {'moto (child process)' if args.endpoint is None else endpoint}; load average {load}")
        _publish_vs_upload(args, endpoint, model, total)
        _registration_vs_download(endpoint, model, total)
    end = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average at start {load}, at the end {end} ({os.cpu_count()} cores)")


@contextmanager
def _given(endpoint: str) -> Iterator[str]:
    yield endpoint


if __name__ == "__main__":
    main()
