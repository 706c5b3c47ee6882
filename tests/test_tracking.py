"""The JSON-lines tracker: metrics, params, tags and status in the run folder, appended on resume."""
import json

from pretrain.config import load_config
from pretrain.tracking import JsonlTracker, build_tracker


def test_jsonl_tracker_writes_metrics_lines_and_a_summary_and_appends_on_resume(tmp_path):
    cfg = load_config(None, ["tracking.backend=jsonl"]).tracking
    tracker = build_tracker(cfg, str(tmp_path), "tiny", is_main=True)
    assert isinstance(tracker.inner, JsonlTracker) and tracker.run_id == "jsonl-tiny"  # behind the queue
    tracker.log_params({"model.size": "tiny"})
    tracker.set_tags({"host": "here"})
    tracker.log_metrics({"loss": 1.5}, 1)
    tracker.finish("KILLED")
    resumed = build_tracker(cfg, str(tmp_path), "tiny", is_main=True, run_id=tracker.run_id)
    resumed.log_metrics({"loss": 1.25}, 2)
    resumed.finish()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 1.5}, {"step": 2, "loss": 1.25}]
    summary = json.loads((tmp_path / "tracking.json").read_text())
    assert summary["params"] == {"model.size": "tiny"} and summary["tags"] == {"host": "here"}
    assert summary["status"] == "FINISHED"
