"""Remote reads that retry: a real HTTP server and a real SeaweedFS gateway stopped for 5 s in the middle of
a stream, and a real HTTP server that cuts a transfer or answers 503, give exactly the samples of an
undisturbed read, with the retries counted; what is not transient (a missing shard) or outlasts the
retries ends that shard, counted, as before."""
from __future__ import annotations

import itertools
import os
import random
import shutil
import threading
import time

import pytest

from data_pipeline.errors import BadInputError
from data_pipeline.pipelines import build_loader
from data_pipeline.retry import RetryPolicy, transient
from data_pipeline.shards import check_shards_exist
from data_pipeline.stream import Report, skip_and_count, tar_samples
from data_pipeline.stream_state import Cursor
from pretrain.config_data import RetryConfig
from tests.conftest import TINY, metric_history, run_pretrain
from tests.servers import FaultyHttpServer, HttpServer, s3_with
from tests.test_pipeline import SPEC, data_cfg

QUICK = RetryConfig(attempts=30, initial_s=0.1, max_s=1.0)  # enough tries to outlast a 5 s outage and a restart


def keys_read(cfg, count: int, outage=None):
    """The keys of ``count`` batches and the stream state; ``outage(batch_index)`` runs between batches."""
    loader, stream, _ = build_loader(cfg, SPEC, seed=3, rank=0, world_size=1)
    keys = []
    for index, batch in enumerate(itertools.islice(loader, count)):
        stream.state.advance(batch["__reader__"], batch["__cursor__"])
        keys += batch["key"]
        if outage is not None:
            outage(index)
    return keys, stream.state


def stopped_for(server, seconds: float, at_batch: int):
    """An ``outage`` callback: stop ``server`` after batch ``at_batch`` and start it again ``seconds`` later."""
    def outage(index: int) -> None:
        if index == at_batch:
            server.stop()
            threading.Timer(seconds, server.start).start()
    return outage


@pytest.fixture(scope="module")
def restartable_http(xray_shards, tmp_path_factory):
    server = HttpServer(os.path.dirname(xray_shards), str(tmp_path_factory.mktemp("http")))
    yield server, f"{server.url}/{os.path.basename(xray_shards)}"
    server.stop()


@pytest.fixture(scope="module")
def restartable_s3(xray_shards, tmp_path_factory):
    with s3_with(xray_shards, str(tmp_path_factory.mktemp("s3")), "fault-shards") as found:
        yield found


@pytest.mark.parametrize("store", ["restartable_http", "restartable_s3"])
def test_a_server_stopped_for_5_s_mid_stream_costs_no_sample(store, request):
    server, root = request.getfixturevalue(store)
    cfg = data_cfg(root, retry=QUICK)
    undisturbed, _ = keys_read(cfg, 14)  # 56 samples: past the end of the first pass of 48
    started = time.monotonic()
    disturbed, state = keys_read(cfg, 14, stopped_for(server, 5.0, at_batch=2))
    assert disturbed == undisturbed
    assert state.retries > 0 and state.skipped == 0 and state.shard_errors == 0
    assert time.monotonic() - started >= 5.0  # the outage was met, not read around


@pytest.fixture()
def faulty(xray_shards, tmp_path):
    folder = tmp_path / "served"
    shutil.copytree(xray_shards, folder)
    server = FaultyHttpServer(str(folder))
    yield server
    server.stop()


def read_shard(url: str, retry) -> tuple:
    cursor = Cursor()
    samples = list(tar_samples(Report(skip_and_count, cursor), retry)(iter([url])))
    return [(s["__key__"], s["__index__"]) for s in samples], cursor


def test_a_cut_transfer_is_reopened_and_read_on_from_the_first_sample_not_passed_on(faulty):
    url = f"{faulty.url}/xray-000001.tar"
    whole, _ = read_shard(url, None)
    faulty.faults["xray-000001.tar"] = ["cut", 503, 429]
    again, cursor = read_shard(url, RetryPolicy(attempts=5, initial_s=0.05, max_s=0.1))
    assert again == whole and len(whole) == 8
    assert (cursor.retries, cursor.shard_errors) == (3, 0)
    assert faulty.requests.count("xray-000001.tar") == 5  # the whole read, the cut one, 503, 429, the good one


def test_retries_spent_or_an_error_that_is_not_transient_end_the_shard_counted(faulty):
    url = f"{faulty.url}/xray-000002.tar"
    faulty.faults["xray-000002.tar"] = [503] * 3
    samples, cursor = read_shard(url, RetryPolicy(attempts=2, initial_s=0.05, max_s=0.1))
    assert samples == [] and (cursor.retries, cursor.shard_errors) == (2, 1)
    samples, cursor = read_shard(f"{faulty.url}/no-such-shard.tar", RetryPolicy(attempts=5, initial_s=0.05))
    assert samples == [] and (cursor.retries, cursor.shard_errors) == (0, 1)  # 404: not retried
    with pytest.raises(BadInputError, match="no-such-shard.tar: shard not found"):
        check_shards_exist([f"{faulty.url}/no-such-shard.tar"], RetryPolicy(attempts=5, initial_s=0.05))
    faulty.faults["xray-000003.tar"] = [503] * 3  # GET only: a start-up check asks with HEAD
    check_shards_exist([f"{faulty.url}/xray-000003.tar"])
    faulty.stop()
    with pytest.raises(BadInputError, match="xray-000003.tar: cannot reach shard"):
        check_shards_exist([f"{faulty.url}/xray-000003.tar"], RetryPolicy(attempts=1, initial_s=0.05))


def test_transient_errors_are_told_from_the_others():
    refused = FileNotFoundError("http://host/a.tar")
    refused.__cause__ = ConnectionRefusedError(111, "Connect call failed")
    assert transient(refused) and transient(TimeoutError()) and not transient(OSError("disk full"))
    assert not transient(FileNotFoundError("http://host/a.tar")) and not transient(PermissionError("denied"))
    slow_down = OSError(16, "Please reduce your request rate")
    slow_down.__cause__ = type("ClientError", (Exception,), {})()
    slow_down.__cause__.response = {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}
    assert transient(slow_down)
    denied = type("ClientError", (Exception,), {})()
    denied.response = {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}
    assert not transient(denied)
    policy = RetryPolicy(attempts=3, initial_s=1.0, max_s=3.0)
    delays = [policy.delay(k, random.Random(0)) for k in range(4)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 1.5 <= delays[2] <= 3.0 and delays[3] is None


def test_a_training_run_over_a_faulty_server_trains_on_the_same_samples_and_logs_its_retries(faulty, xray_shards,
                                                                                           tmp_path):
    """Every shard's first two requests fail (a cut transfer, then 503 SlowDown): the run's losses are those of
    a run on the local shards, step for step, and MLflow has the retries the server saw."""
    for name in (f"xray-{index:06d}.tar" for index in range(6)):
        faulty.faults[name] = ["cut", 503]
    common = [*TINY, "train.steps=4", "checkpoint.every=0", "tracking.system_metrics=false", "data.batch_size=4",
              "data.retry.initial_s=0.05", "data.retry.max_s=0.1"]
    run_pretrain(["train", *common, f"output_dir={tmp_path}", "name=local", f"data.shards={xray_shards}"])
    run_pretrain(["train", *common, f"output_dir={tmp_path}", "name=remote", f"data.shards={faulty.url}"])
    assert metric_history(str(tmp_path / "remote")) == metric_history(str(tmp_path / "local"))
    opened = {name for name in faulty.requests if name.endswith(".tar")}
    assert opened and all(faulty.requests.count(name) == 3 for name in opened)
    assert metric_history(str(tmp_path / "remote"), "shard_retries")[-1][1] == 2 * len(opened)
    assert metric_history(str(tmp_path / "local"), "shard_retries")[-1][1] == 0
