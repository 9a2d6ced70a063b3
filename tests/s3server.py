"""A real S3-compatible server for tests: moto's ThreadedMotoServer on 127.0.0.1, with the
environment an s3fs client needs pointed at it (credentials, endpoint, no proxy) for the block.

    with moto_s3("bucket") as port:   # s3://bucket/... works through pipeline.storage
        ...
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[int]:
    """Start the server, create ``bucket``, yield the port; stop and forget cached clients after."""
    import s3fs
    from moto.server import ThreadedMotoServer

    from pipeline.dev.services import free_port

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "NO_PROXY": "127.0.0.1,localhost"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(k, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir(bucket)
        try:
            yield port
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()
