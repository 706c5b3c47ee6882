"""Shards streamed from a real HTTP server and a real S3-compatible object store (SeaweedFS).

The remote streams must give exactly the batches of the local files, with DataLoader
workers, and resume exactly; S3 credentials and endpoint come from the environment only.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.servers import HttpServer, s3_with
from tests.test_pipeline import data_cfg, take


@pytest.fixture(scope="module")
def http_root(xray_shards, tmp_path_factory):
    server = HttpServer(os.path.dirname(xray_shards), str(tmp_path_factory.mktemp("http")))
    yield f"{server.url}/{os.path.basename(xray_shards)}"
    server.stop()


@pytest.fixture(scope="module")
def s3_root(xray_shards, tmp_path_factory):
    with s3_with(xray_shards, str(tmp_path_factory.mktemp("s3")), "pretrain-shards") as (_, root):
        yield root


def assert_same_batches(a, b):
    assert [x["key"] for x in a] == [y["key"] for y in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x["image"], y["image"], rtol=0, atol=0)


@pytest.mark.parametrize("store", ["http_root", "s3_root"])
def test_remote_shards_stream_like_local_ones_and_resume(store, xray_shards, request):
    root = request.getfixturevalue(store)
    local, _ = take(data_cfg(xray_shards, num_workers=2), 5)
    remote, _ = take(data_cfg(root, num_workers=2), 5)
    assert_same_batches(local, remote)
    assert all(url.startswith(root) for batch in remote for url in batch["url"])
    first, state = take(data_cfg(root), 2)
    rest, _ = take(data_cfg(root), 3, state=state)  # resumed from the saved stream position
    assert_same_batches(take(data_cfg(xray_shards), 5)[0], first + rest)
