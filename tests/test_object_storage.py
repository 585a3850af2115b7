"""Builds on object storage against a real S3 API: a moto server on 127.0.0.1, started by the test."""

import os
import socket
import time
from functools import partial

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer

from factory.build.command import build, cli_build
from factory.build.lock import LockHeld, S3Lease
from factory.build.runner import run_in_process
from factory.build.spec import validate_spec

torch.set_num_threads(1)
BUCKET = "factory-builds"


@pytest.fixture
def s3(monkeypatch):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def test_a_lease_keeps_a_second_run_out_and_an_expired_one_is_taken_over_once(s3):
    uri = f"s3://{BUCKET}/builds/nightly"
    logs = []
    with S3Lease(uri) as first:
        assert first.key == "builds/.nightly.lock"
        with pytest.raises(LockHeld) as err:
            S3Lease(uri).acquire()
        message = str(err.value)
        assert "\n" not in message and f"pid {os.getpid()} on host {socket.gethostname()}" in message and first.uri in message
    S3Lease(uri).acquire()  # released: the next run takes it (and, killed, leaves it behind)
    with pytest.raises(LockHeld):
        S3Lease(uri).acquire()
    dead = S3Lease(uri, ttl=0.5)
    dead.client.delete_object(Bucket=BUCKET, Key=dead.key)
    dead.acquire()
    dead._stop.set()  # the run is killed: its lease is no longer renewed
    time.sleep(0.7)
    stale_etag = s3.head_object(Bucket=BUCKET, Key=dead.key)["ETag"]
    taker = S3Lease(uri, log=logs.append)
    taker.acquire()
    assert logs and "taking over the expired lease" in logs[0]
    late = S3Lease(uri)  # a second run that judged the same expired lease: its conditional write loses
    assert not late.put(IfMatch=stale_etag)
    with pytest.raises(LockHeld):
        late.acquire()
    taker.release()
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="builds/.nightly.lock")


def test_a_build_on_s3_holds_its_lease_and_refuses_an_overlapping_run_in_one_line(s3, tiny_adapter, capsys):
    out = f"s3://{BUCKET}/builds/small"
    spec = validate_spec({"source": {"kind": "synthetic", "n": 3}, "sampler": {"budget": 6}, "output": {"dir": out, "shard_size": 2}})
    with S3Lease(out):
        with pytest.raises(SystemExit) as exit_:
            cli_build(["--output", out, "--limit", "3"])
    assert str(exit_.value.code).startswith(f"factory build: another run holds s3://{BUCKET}/builds/.small.lock: pid ")
    manifest = build(spec, log=lambda _: None, runner=partial(run_in_process, adapter=tiny_adapter))
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="builds/")["Contents"]}
    assert "builds/small/manifest.json" in keys and "builds/.small.lock" not in keys  # released when the build ended
    assert manifest["problems"] == 3
