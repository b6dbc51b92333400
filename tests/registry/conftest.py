"""Fixtures of the registry tests: an S3-compatible server (moto's, on loopback) for the
object-storage configuration of the blob store."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

from registry.storage.s3_blobs import make_s3_client

_buckets = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of moto's S3 server on a free loopback port, with dummy credentials in the
    environment (the usual AWS way, also seen by child processes)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise

    env = {
        "AWS_ACCESS_KEY_ID": "brickyard-test",
        "AWS_SECRET_ACCESS_KEY": "brickyard-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        # Never ask the instance metadata service (a link-local address) for credentials.
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def s3_client(s3_endpoint: str) -> Any:
    """A plain client (without the store's conditional-create hook): the test's hands on the bucket."""
    return make_s3_client(endpoint_url=s3_endpoint, region="us-east-1")


@pytest.fixture
def bucket(s3_client: Any) -> str:
    """A fresh, empty bucket for one test."""
    name = f"bricks-{os.getpid()}-{next(_buckets)}"
    s3_client.create_bucket(Bucket=name)
    return name
