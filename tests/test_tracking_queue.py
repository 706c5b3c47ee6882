"""Tracking off the training thread: a real MLflow server that goes down for 30 s neither stops the training
loop nor loses a metric; refused calls are dropped and counted, never retried forever."""
import time

import pytest

from pretrain.config import load_config
from pretrain.tracking import build_tracker
from pretrain.tracking_queue import QueuedTracker
from tests.conftest import REPO
from tests.servers import MLflowServer

pytestmark = pytest.mark.slow


def test_training_goes_on_while_the_server_is_down_for_30_s_and_no_metric_is_lost(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    server = MLflowServer(str(tmp_path), REPO).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)  # restored after the test (MLflow sets it too)
    cfg = load_config(None, [f"tracking.uri={server.url}", "tracking.experiment=outage",
                             "tracking.system_metrics=false"]).tracking
    tracker = build_tracker(cfg, str(tmp_path / "run"), "outage", is_main=True)
    step = 0

    def train_for(seconds: float) -> int:
        """A training loop that logs every step; returns how many steps it made."""
        nonlocal step
        start, end = step, time.monotonic() + seconds
        while time.monotonic() < end:
            step += 1
            tracker.log_metrics({"loss": 1.0 / step}, step)
            time.sleep(0.1)
        return step - start

    try:
        train_for(3)
        server.stop()
        made_while_down = train_for(30)
        assert made_while_down > 100  # a loop that waited on the server would have made one or two
        assert tracker.pending() > 0  # they wait in the queue, with the retried call
        server.start()
        tracker.finish()
        history = MlflowClient(server.url).get_metric_history(tracker.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, step + 1))
        assert tracker.dropped == 0 and MlflowClient(server.url).get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        server.stop()


class Refusing:
    """A tracker whose server refuses one kind of request (as MLflow refuses a changed param value)."""

    run_id = "refusing"

    def __init__(self):
        self.metrics, self.finished = [], None

    def log_params(self, params):
        error = RuntimeError("INVALID_PARAMETER_VALUE: changing param values is not allowed")
        error.error_code = "INVALID_PARAMETER_VALUE"
        raise error

    def log_metrics(self, metrics, step):
        self.metrics.append(step)

    def finish(self, status="FINISHED"):
        self.finished = status


def test_a_refused_call_is_dropped_and_counted_and_the_calls_after_it_go_through():
    inner = Refusing()
    tracker = QueuedTracker(inner, maxsize=4)
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.log_params({"lr": 1})
    for step in range(2, 8):  # more than the queue holds: the loop waits for room, nothing is dropped
        tracker.log_metrics({"loss": 1.0}, step)
    tracker.finish("KILLED")
    assert inner.metrics == list(range(1, 8)) and tracker.dropped == 1 and inner.finished == "KILLED"


class Batching(Refusing):
    """A tracker that takes several steps' metrics in one call, and records each call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def log_metrics_many(self, rows):
        self.calls.append([step for _, step in rows])


def test_queued_metric_calls_reach_the_store_in_batches_in_order():
    inner = Batching()
    tracker = QueuedTracker(inner, interval_s=0.5)
    for step in range(1, 51):
        tracker.log_metrics({"loss": 1.0 / step}, step)
    tracker.finish()
    assert [step for call in inner.calls for step in call] == list(range(1, 51))
    assert len(inner.calls) < 10  # a few round trips, not 50
