"""The step's metrics vector has one length on every rank, whatever sources each rank drew."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from pretrain import dist, step_metrics
from pretrain.dist import free_port

NAMES = ["xray", "ct", "pathology"]
DRAWN = {0: (["xray", "xray"], [1.0, 3.0]), 1: (["ct", "xray"], [10.0, 5.0])}  # rank -> (sources, losses)


def rank_vector(rank: int) -> torch.Tensor:
    sources, losses = DRAWN[rank]
    retries = [3.0 * rank, 0.0, float(rank)]  # per source, rank 1 retried 3 xray and 1 pathology read
    return step_metrics.pack([torch.tensor(v) for v in losses], sources, NAMES,
                             [rank, float(rank == 1), sum(retries)] + retries)


def test_ranks_that_drew_different_sources_pack_vectors_of_one_length():
    assert rank_vector(0).shape == rank_vector(1).shape == (1 + len(step_metrics.COUNTERS) + 3 * len(NAMES),)


def test_the_summed_vector_gives_the_mean_loss_counters_and_per_source_means():
    metrics = step_metrics.unpack((rank_vector(0) + rank_vector(1)).tolist(), NAMES, world=2)
    assert metrics["loss"] == pytest.approx((2.0 + 7.5) / 2)
    assert metrics["skipped_samples"] == 1 and metrics["shard_errors"] == 1 and metrics["shard_retries"] == 4
    assert (metrics["shard_retries/xray"], metrics["shard_retries/ct"], metrics["shard_retries/pathology"]) == (3, 0, 1)
    assert metrics["loss/xray"] == pytest.approx((1 + 3 + 5) / 3) and metrics["loss/ct"] == pytest.approx(10.0)
    assert "loss/pathology" not in metrics  # drawn by no rank this step


def test_a_single_source_stream_has_no_per_source_part():
    vector = step_metrics.pack([torch.tensor(2.0)], ["only"], [], [0, 0, 2])
    assert step_metrics.unpack(vector.tolist(), [], world=1) == {"loss": 2.0, "skipped_samples": 0,
                                                                  "shard_errors": 0, "shard_retries": 2}
    with pytest.raises(ValueError, match="2 counters"):
        step_metrics.pack([torch.tensor(2.0)], ["only"], [], [0, 0])


def _reduce_on_rank(rank: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out[rank] = dist.all_reduce_tensor(rank_vector(rank)).tolist()
    finally:
        dist.destroy()


def test_two_real_ranks_with_different_sources_reduce_in_one_collective():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_reduce_on_rank, args=(free_port(), out), nprocs=2, join=True)
        assert out[0] == out[1] == (rank_vector(0) + rank_vector(1)).tolist()
