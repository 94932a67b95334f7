"""A storage outage in the middle of a run: the S3 test server's endpoint goes away (a relay in
front of it closes every connection and refuses new ones, `storage_relay.Relay`) and comes back.
The search rides it out (`workflows.outages`); an outage longer than the run waits is one line.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest
from storage_relay import Relay

from workflows import outages

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def relay(s3_server, monkeypatch):
    """The S3 test server behind a relay; this process reaches it through the relay."""
    url = urlparse(s3_server["AWS_ENDPOINT_URL"])
    r = Relay((url.hostname, url.port))
    monkeypatch.setenv("AWS_ENDPOINT_URL", r.endpoint)
    try:
        yield r
    finally:
        r.down()


def _bucket_client(s3_server):
    """boto3 on the server itself, not through the relay: the test's own view of the bucket."""
    return boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])


def _back_after(relay: Relay, seconds: float) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(seconds), relay.up()), daemon=True)
    t.start()
    return t


def test_ride_out_waits_for_the_storage_and_calls_again(relay, s3_bucket):
    import pyarrow.fs as pafs

    location = f"{s3_bucket}/run"
    fs, path = pafs.FileSystem.from_uri(location)
    calls, said = [], []

    def write():
        calls.append(time.monotonic())
        with fs.open_output_stream(f"{path}/state.json") as f:
            f.write(b'{"epoch": 3}')
        return "written"

    relay.down()
    back = _back_after(relay, 8)
    assert outages.ride_out(write, location, wait_s=60, say=said.append) == "written"
    back.join()
    assert len(calls) == 2, calls
    unreachable = rf"advtrain: storage {location} unreachable \(.+\); waiting up to 60 s"
    assert re.match(unreachable, said[0])
    assert re.match(rf"advtrain: storage {location} reachable again after \d+ s", said[1])
    with fs.open_input_stream(f"{path}/state.json") as f:
        assert json.loads(f.read()) == {"epoch": 3}


def test_an_outage_longer_than_the_wait_is_one_line_and_other_errors_pass_through(relay, s3_bucket):
    import pyarrow.fs as pafs

    location = f"{s3_bucket}/run"
    fs, path = pafs.FileSystem.from_uri(location)
    missing = []

    def read_missing():
        missing.append(1)
        return fs.open_input_stream(f"{path}/nothing.json").read()

    with pytest.raises(FileNotFoundError):  # not an outage: raised at once, not waited on
        outages.ride_out(read_missing, location, wait_s=60, say=print)
    assert len(missing) == 1
    relay.down()
    t0 = time.monotonic()
    with pytest.raises(outages.StorageUnreachable) as e:
        outages.ride_out(lambda: fs.get_file_info(path), location, wait_s=3, say=print)
    assert time.monotonic() - t0 < 60
    line = str(e.value)
    assert "\n" not in line and re.match(rf"storage {location} unreachable for \d+ s \(", line)
    # A trial's failure on it, as Tune keeps it (a Ray task's error, the class as text), is the
    # search-ending error the driver reports in one line.
    from workflows.tune import fatal_error_in

    from_ray = RuntimeError(f"ray::run_trial()\n  ...\nworkflows.outages.{e.typename}: {line}")
    found = fatal_error_in(from_ray)
    assert isinstance(found, outages.StorageUnreachable) and str(found) == line
    assert fatal_error_in(RuntimeError("a bug")) is None


def _clean_env(endpoint: str) -> dict[str, str]:
    """A new user's shell: no Ray cluster to join (advtrain starts Ray on this machine), the
    bucket's credentials, and its endpoint through the relay."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"AWS_ENDPOINT_URL": endpoint, "PYTHONUNBUFFERED": "1"})
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _check_nothing_half_written(client, bucket: str) -> dict[str, int]:
    """Every object in the bucket is whole: each JSON document (or pickle) loads and every .keras
    file opens; every Tune trial's checkpoint (the delivered model) holds model and history.
    Train checkpoint folders missing a file are counted, not asserted: Ray registers a
    checkpoint only once its upload finished and never reads another, and the trial deletes
    those it finds (`remove_unregistered_checkpoints`), but one test run in four still left one
    (see the note of issue 23)."""
    keys = {
        o["Key"]: o["Size"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    }
    checkpoints: dict[str, set[str]] = {}
    for key, size in keys.items():
        if m := re.match(r"(.*/checkpoint_[^/]+)/([^/]+)$", key):
            checkpoints.setdefault(m.group(1), set()).add(m.group(2))
        body = None
        if key.endswith((".json", ".keras")):
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        if key.endswith(".json") and body[:1] == b"\x80":
            pickle.loads(body)  # Tune's searcher state: a pickle, though named .json
        elif key.endswith(".json") and size:
            try:
                json.loads(body)
            except ValueError:  # Tune's result.json is JSON Lines
                try:
                    for line in body.decode().splitlines():
                        json.loads(line)
                except ValueError as e:
                    raise AssertionError(f"{key} ({size} bytes): {e}; {body[:200]!r}") from None
        if key.endswith(".keras"):
            assert zipfile.is_zipfile(io.BytesIO(body)), key
    trial = {"model.keras", "history.json"}
    train = {*trial, "state.index", "state.data-00000-of-00001"}
    delivered = {c: f for c, f in checkpoints.items() if "/tune/" in c}
    assert delivered and all(trial <= f for f in delivered.values()), delivered
    pending = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return {
        "objects": len(keys),
        "checkpoints": len(checkpoints),
        "partial train checkpoints": sum(not train <= f for f in checkpoints.values()),
        "unfinished uploads": len(pending),
    }


@pytest.mark.ray
@pytest.mark.slow
def test_a_search_rides_out_a_storage_outage_and_every_object_in_the_bucket_is_whole(
    relay, s3_server, s3_bucket, tmp_path
):
    """README's one-machine path with its results in a bucket: `advtrain tune --storage s3://...`
    (Ray started locally). The storage goes away for 20 s (longer than pyarrow's own connect
    retries, 6 s) once the first trials have checkpointed, while they train and upload."""
    client, bucket = _bucket_client(s3_server), s3_bucket.removeprefix("s3://")
    log = tmp_path / "advtrain.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("advtrain")),
                "tune",
                "--config",
                "tests/data/cluster_smoke.yaml",
                "--samples",
                "2",
                "--storage",
                f"{s3_bucket}/advtrain",
            ],
            cwd=REPO,
            env=_clean_env(relay.endpoint),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 400
        while not any(
            re.search(r"/checkpoint_[^/]+/model\.keras$", o["Key"])
            for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])
        ):
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.5)
        relay.down()
        time.sleep(20)
        relay.up()
        assert proc.wait(timeout=500) == 0, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    waits = re.findall(r"advtrain: storage \S+ unreachable \(", text)
    backs = re.findall(r"advtrain: storage \S+ reachable again after (\d+) s", text)
    assert waits and len(backs) == len(waits), text[-6000:]
    name = re.search(r"folder s3://\S+/advtrain/(\S+) ", text).group(1)
    trials = json.loads(
        client.get_object(Bucket=bucket, Key=f"advtrain/{name}/trials.json")["Body"].read()
    )["trials"]
    assert len(trials) == 2 and all(t["test_robust_acc"] is not None for t in trials), trials
    counts = _check_nothing_half_written(client, bucket)
    removed = re.findall(r"advtrain: removed (\d+) checkpoint\(s\) cut off part-way", text)
    print(
        f"outage ridden out by {len(waits)} trial(s), back after {backs} s; checkpoints cut off "
        f"part-way and removed: {sum(map(int, removed))}; bucket: {counts}"
    )
