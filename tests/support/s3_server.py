"""A real S3-compatible server over HTTP for tests (moto's threaded server) with an
`outputs` bucket; moto takes any credentials."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest

from tests.redis_server import free_port

CREDENTIALS = {"aws_access_key_id": "test-key", "aws_secret_access_key": "test-secret"}


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDENTIALS).create_bucket(
        Bucket="outputs"
    )
    yield endpoint
    server.stop()
